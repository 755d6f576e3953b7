"""OLoRA: LoRA started from an orthonormal basis of the base weight (QR).

OLoRA (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775) initialises LoRA's factors from the QR decomposition of
the base weight, so ``B`` starts with orthonormal columns, and freezes the rest::

    W0 = Q R                                   (Q: (d_out, k) orthonormal columns; R: (k, d_in) upper-triangular)
    B0 = Q[:, :r],   A0 = R[:r, :]
    W_res = W0 - s B0 A0                        (frozen)
    y = W_res x + s B (A dropout(x)),      B, A trained, starting at B0, A0

As for PiSSA (:mod:`lorakit.methods.pissa`, whose layer this is), the base keeps ``W0`` and the adapter subtracts
the frozen part, ``dW = s (B A - B0 A0)``, exactly zero at step 0; it exports to PEFT as an exact rank-``2r``
LoRA. ``B0``, ``A0`` are not rescaled by ``1/s`` (the paper's and PEFT's init), so ``alpha`` (default ``2 r``, as
LoRA's) changes how much of ``W0`` the trained part starts with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorakit.methods.lora import LoraConfig
from lorakit.methods.pissa import Pissa


class Olora(Pissa):
    """PiSSA's layer with ``(B0, A0) = (Q_r, R_r)`` from ``W0 = Q R``."""

    method = "olora"
    config_cls = LoraConfig
    swap_free_options = frozenset({"targets", "r", "alpha", "use_rslora", "dropout"})

    def principal(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(Q[:, :r], R[:r])`` of the reduced QR decomposition of ``w`` ``(d_out, d_in)``."""
        q, r = torch.linalg.qr(w)
        return q[:, :self.config.r], r[:self.config.r]
