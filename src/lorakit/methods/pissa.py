"""PiSSA: LoRA started from the principal singular components of the base weight.

PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948) trains the top-``r`` singular triplets of ``W0`` and
freezes the rest::

    W0 = U S V^T
    B0 = U_r sqrt(S_r / s),   A0 = sqrt(S_r / s) V_r^T          (so  s B0 A0 = U_r S_r V_r^T)
    W_res = W0 - s B0 A0                                         (the residual, frozen)
    y = W_res x + s B (A dropout(x)),     B, A trained, starting at B0, A0

so the model starts exactly where it was, and the update trains the directions that carry most of ``W0``.

lorakit keeps ``W0`` in the base layer and subtracts the frozen principal part there instead of writing the
residual into it; the function is the same::

    y  = W0 x - s B0 (A0 x) + s B (A dropout(x))
    dW = s (B A - B0 A0)                       (exactly zero at step 0: B = B0 and A = A0)

The base weights stay those of the base model, so other adapters on the same layers, per-row batches,
``remove``/``detach``, the base fingerprint and loading onto a fresh copy of the base all see the model they
expect, and a saved adapter (``A``, ``B`` and the frozen ``A0``, ``B0``) loads without redoing the SVD. The cost
is one frozen rank-``r`` product more than LoRA per layer. On a quantized base the SVD is of the dequantized
weight (PiSSA on QLoRA's base; the paper's QPiSSA, which re-quantizes the residual, is not this).

PEFT export: ``dW = s [B, -B0] [A; A0]`` is a plain LoRA of rank ``2r``, the form PEFT converts PiSSA adapters
to (``save_pretrained(..., path_initial_model_for_weight_conversion=...)``), written exactly.

Options beyond LoRA's: ``niter`` (``None``: exact SVD; ``k``: ``torch.svd_lowrank`` with ``k`` subspace
iterations, PEFT's ``pissa_niter_k``, for wide layers). ``alpha`` defaults to ``r`` (``s = 1``), as in the paper's
and PEFT's examples; the product ``s B0 A0`` does not depend on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from lorakit.core.contract import Factors, LoraForm, cast
from lorakit.core.layers import AdaptedLayer, LayerInfo, LayerKind
from lorakit.core.lowrank import LowRank
from lorakit.methods.lora import Lora, LoraConfig, dropout_p


class PissaConfig(LoraConfig):
    """Options of PiSSA: LoRA's, with ``alpha`` defaulting to ``r``, and ``niter`` (``None``: exact SVD; ``k``:
    randomized SVD with ``k`` subspace iterations)."""

    niter: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _alpha_is_r(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("alpha") is None:
            return {**data, "alpha": float(data.get("r", 8))}
        return data


class Pissa(Lora):
    """``dW = s (B A - B0 A0)``: ``A``, ``B`` trained from the frozen ``A0``, ``B0`` of :meth:`principal`."""

    method = "pissa"
    config_cls = PissaConfig
    kinds = frozenset({LayerKind.LINEAR, LayerKind.CONV1D})
    peft_counterpart = None
    peft_import = None
    swap_free_options = frozenset({"targets", "r", "alpha", "use_rslora", "dropout", "niter"})
    rank_dims = {"lora_A": (0,), "lora_B": (1,), "base_A": (0,), "base_B": (1,)}
    scaled_tensors = frozenset({"lora_B", "base_B"})
    config: PissaConfig

    def __init__(self, layer: LayerInfo, config: PissaConfig, shared: nn.Module | None = None,
                 *, init: bool = True) -> None:
        super().__init__(layer, config, shared, init=False)  # A and B come from the base weight
        self.register_buffer("base_A", torch.zeros_like(self.lora_A))  # A0 (r, d_in), frozen
        self.register_buffer("base_B", torch.zeros_like(self.lora_B))  # B0 (d_out, r), frozen

    def principal(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(B0, A0)`` with ``s B0 A0 = U_r S_r V_r^T``, the top-``r`` singular part of ``w`` ``(d_out, d_in)``."""
        r, s = self.config.r, self.scale
        if self.config.niter is None:
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        else:
            u, sv, v = torch.svd_lowrank(w, q=r, niter=self.config.niter)
            vh = v.T
        root = (sv[:r] / s).sqrt()  # (r,)
        return u[:, :r] * root, root[:, None] * vh[:r]

    def init_from_base(self, base_weight: Tensor) -> None:
        b0, a0 = self.principal(base_weight.float())
        with torch.no_grad():
            for live, frozen, value in ((self.lora_B, self.base_B, b0), (self.lora_A, self.base_A, a0)):
                live.copy_(value)
                frozen.copy_(value)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return (self.lora_B.float() @ self.lora_A.float() - self.base_B.float() @ self.base_A.float()) * self.scale

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        h = layer.project(self.dropout(x), self.lora_A) * self.scale  # (..., r)
        h0 = layer.project(x, self.base_A) * self.scale  # (..., r): the frozen part sees x itself
        # two products, subtracted: exactly zero while B = B0 and A = A0
        return F.linear(h.to(base_out.dtype), cast(self.lora_B, base_out)) - \
            F.linear(h0.to(base_out.dtype), cast(self.base_B, base_out))

    def _b(self) -> Tensor:
        return torch.cat([self.lora_B, -self.base_B], 1)  # (d_out, 2r)

    def lowrank(self, layer: AdaptedLayer) -> LowRank | None:
        """``s [B, -B0] [A; A0] x`` for the fused path, when no dropout applies (the frozen part sees ``x``
        itself; with dropout on, the plain path draws it for ``A`` alone). One product over ``2r``: zero at step
        0 up to float rounding (the plain path's two products cancel exactly)."""
        if dropout_p(self.dropout) > 0:
            return None
        return LowRank(torch.cat([self.lora_A, self.base_A]), self._b(), scale=self.scale)

    def lora_form(self) -> LoraForm | None:
        return None  # not LoRA at rank r: exported through lora_factors at rank 2r

    def lora_factors(self, layer: AdaptedLayer) -> Factors | None:
        """``dW = (s [B, -B0]) [A; A0]``, rank ``2r``, exact."""
        return self._b().float() * self.scale, torch.cat([self.lora_A, self.base_A]).float()
