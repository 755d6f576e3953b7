"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

::

    V  = W0 + s B A                     (the LoRA-updated direction)
    W' = m * V / ||V||_row              (m: (d_out,), one magnitude per output row)
    dW = W' - W0

``m`` starts at ``||W0||_row`` and ``B`` at zero, so the model starts unchanged. As in the paper (Sec. 4.3) the
norm ``||V||_row`` is treated as a constant in backward (detached), which saves memory and changes the
gradient only slightly. Trainable: ``r (d_in + d_out) + d_out``.

Forward without materialising ``W'`` x: ``W' x = (m / ||V||) * (W0 x + s B A x)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.core.contract import LoraForm, cast
from lorakit.core.layers import AdaptedLayer, LayerInfo, LayerKind
from lorakit.methods.lora import Lora, LoraConfig, lora_form


class DoraConfig(LoraConfig):
    """Same options as LoRA (see :class:`lorakit.methods.lora.LoraConfig`)."""


class Dora(Lora):
    """LoRA direction + trainable per-row magnitude ``m``."""

    method = "dora"
    config_cls = DoraConfig
    kinds = frozenset({LayerKind.LINEAR, LayerKind.CONV1D})
    peft_counterpart = "dora"
    peft_import = "dora"

    def __init__(self, layer: LayerInfo, config: DoraConfig, shared: nn.Module | None = None,
                 *, init: bool = True) -> None:
        super().__init__(layer, config, shared, init=init)
        self.magnitude = nn.Parameter(torch.ones(layer.d_out, device=layer.device, dtype=torch.float32))
        # ||V||_row at merge time, needed to invert the merge exactly (not saved).
        self.register_buffer("_merge_norm", None, persistent=False)

    def init_from_base(self, base_weight: Tensor) -> None:
        """``m <- ||W0||_row``."""
        with torch.no_grad():
            self.magnitude.copy_(base_weight.float().norm(dim=1))

    def _direction(self, base_weight: Tensor) -> Tensor:
        return base_weight.float() + (self.lora_B.float() @ self.lora_A.float()) * self.scale  # (d_out, d_in)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        form = self.lora_form()
        assert form is not None
        return form.delta_weight(base_weight)

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        with torch.no_grad():  # the norm is a constant in backward (paper, Sec. 4.3)
            norm = self._direction(layer.weight).norm(dim=1)
        ratio = cast(self.magnitude / norm, base_out)  # (d_out,)
        xd = self.dropout(x)
        lora = F.linear(layer.project(xd, self.lora_A) * self.scale, cast(self.lora_B, base_out))
        if self.training and isinstance(self.dropout, nn.Dropout):
            # the magnitude also rescales the base path of the dropped input
            base_term = F.linear(xd, cast(layer.weight, xd))
        else:
            base_term = base_out if layer.bias is None else base_out - layer.bias
        return (ratio - 1) * base_term + ratio * lora

    def lora_form(self) -> LoraForm | None:
        """PEFT stores DoRA natively: LoRA's ``A``, ``B`` plus the magnitude ``m``."""
        return lora_form(self, self.lora_A, self.lora_B, self.magnitude.float())

    def lora_factors(self, layer: AdaptedLayer) -> None:
        """None: DoRA's update is not a low-rank product (its row normalisation is dense)."""
        return None

    def merge_into(self, weight: Tensor) -> None:
        self._merge_norm = self._direction(weight).norm(dim=1).detach()
        super().merge_into(weight)

    def unmerge_from(self, weight: Tensor) -> None:
        # W' = m * V / n  =>  W0 = W' * n / m - s B A, with n cached at merge.
        assert self._merge_norm is not None, "unmerge without merge"
        w0 = weight.float() * (self._merge_norm / self.magnitude.float()).unsqueeze(1)
        w0 -= (self.lora_B.float() @ self.lora_A.float()) * self.scale
        weight.copy_(w0)
        self._merge_norm = None
