"""LoRA-XS: low-rank adaptation with an extremely small number of parameters.

LoRA-XS (Balazy et al. 2024, https://arxiv.org/abs/2405.17604)::

    y  = W0 x + s * B R A x
    dW = s * B R A

``B`` ``(d_out, r)`` and ``A`` ``(r, d_in)`` are frozen buffers built from the truncated SVD of the base weight,
``W0 ~= U_r S_r V_r^T``: ``B = U_r``, ``A = S_r V_r^T``. Only ``R`` ``(r, r)`` trains, ``r^2`` scalars per layer
whatever the layer's width. ``R`` starts at ``N(0, init_std^2)`` with ``init_std = 1e-5`` as in the reference
code (drawn from the global RNG, like any model init), so the model starts within ~1e-5 relative of the base
model, not exactly at it; ``init_std=0`` starts exactly at it (``R``'s gradient ``s B^T g (A x)^T`` does not
vanish at ``R = 0``, so training still moves).

Scale: ``s = alpha / r`` with ``alpha = r`` (``s = 1``) by default, as in the reference math-tuning script
(``lora_alpha = lora_r``); the singular values already sit in ``A``, so no further scale is needed.

Activation memory: ``A`` is frozen, so autograd keeps only ``A x`` (``N x r``) for ``R``'s gradient; the
input ``x`` (``N x d_in``) is not saved by the adapter path (``F.linear`` saves an input only when the other
operand needs a gradient). There is no dropout for that reason.

LoRA-SB (:mod:`lorakit.methods.lora_sb`) shares this layer and changes only the init.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from lorakit.core.contract import Adapter, AdapterConfig, cast
from lorakit.core.layers import AdaptedLayer, LayerInfo
from lorakit.core.lowrank import LowRank
from lorakit.methods.lora import check_rank


class LoraXsConfig(AdapterConfig):
    """Options of LoRA-XS.

    Attributes:
        r: rank of the frozen SVD bases; ``r^2`` trainable scalars per layer (the paper uses up to 64-96 on
            7B models, 4-25 on RoBERTa). At most ``min(d_in, d_out)`` of every target.
        alpha: scale numerator, ``s = alpha / r``; ``None`` means ``r`` (``s = 1``).
        init_std: standard deviation of ``R``'s Gaussian init (reference code: 1e-5; 0 starts exactly at
            the base model).
    """

    r: int = Field(16, gt=0)
    alpha: float | None = Field(None, gt=0)
    init_std: float = Field(1e-5, ge=0.0)

    @model_validator(mode="after")
    def _default_alpha(self) -> LoraXsConfig:
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.r))
        return self

    @property
    def scale(self) -> float:
        assert self.alpha is not None
        return self.alpha / self.r


class LoraXs(Adapter):
    """``dW = s B R A`` with frozen ``B (d_out, r)``, ``A (r, d_in)`` and trainable ``R (r, r)``."""

    method = "lora-xs"
    config_cls = LoraXsConfig
    bench_options = {"r": 16, "alpha": 32.0}
    swap_free_options = frozenset({"targets", "r", "alpha", "init_std"})
    rank_dims = {"lora_A": (0,), "lora_B": (1,), "lora_R": (0, 1)}
    scaled_tensors = frozenset({"lora_B"})
    relative_lr = 3.0  # only an r x r matrix trains
    config: LoraXsConfig

    def __init__(self, layer: LayerInfo, config: LoraXsConfig, shared: nn.Module | None = None,
                 *, init: bool = True) -> None:
        super().__init__(layer, config, shared, init=init)
        r = config.r
        kw = {"device": layer.device, "dtype": torch.float32}
        # Frozen bases are persistent buffers: they are saved, so a reload does not depend on the SVD's
        # sign conventions (which differ between devices and LAPACK builds) or on the init data (LoRA-SB).
        self.register_buffer("lora_A", torch.zeros(r, layer.d_in, **kw))
        self.register_buffer("lora_B", torch.zeros(layer.d_out, r, **kw))
        self.lora_R = nn.Parameter(torch.zeros(r, r, **kw))
        self.scale = config.scale

    @classmethod
    def check_layer(cls, layer: LayerInfo, config: LoraXsConfig) -> None:  # type: ignore[override]
        super().check_layer(layer, config)
        check_rank(layer, config.r, cls.method)

    @torch.no_grad()
    def init_from_base(self, base_weight: Tensor) -> None:
        """``B = U_r``, ``A = S_r V_r^T`` from the exact SVD of ``W0`` (fp32); ``R ~ N(0, init_std^2)``."""
        r = self.config.r
        u, s, vh = torch.linalg.svd(base_weight.float(), full_matrices=False)  # (d_out, k), (k,), (k, d_in)
        self.lora_B.copy_(u[:, :r])
        self.lora_A.copy_(s[:r, None] * vh[:r])
        if self.config.init_std > 0:
            self.lora_R.normal_(0.0, self.config.init_std)

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """``R`` is on the LoRA+ "A" side (plain learning rate): it is not the output factor of a trainable
        pair, so LoRA+'s argument (the output factor needs a larger step as width grows) does not apply to an
        ``(r, r)`` matrix between frozen bases."""
        return {"A": [self.lora_R], "B": []}

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return (self.lora_B @ self.lora_R.float() @ self.lora_A) * self.scale

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        h = layer.project(x, self.lora_A)  # (..., r); A frozen: x is not saved for backward
        r_mat = cast(self.lora_R, h)
        if self.scale != 1.0:
            r_mat = r_mat * self.scale  # scale the (r, r) matrix, not the (N, r) activation
        h = F.linear(h, r_mat)  # (..., r); saves h, the adapter's only N-sized activation
        return F.linear(h.to(base_out.dtype), cast(self.lora_B, base_out))

    def lowrank(self, layer: AdaptedLayer) -> LowRank | None:
        """``A``, ``B`` frozen, ``mid = R`` for the fused path (:mod:`lorakit.core.lowrank`; it keeps only ``A x``)
        and the exact PEFT export ``B' = s B R``; ``None`` for a subclass that changes the forward."""
        return LowRank(self.lora_A, self.lora_B, mid=self.lora_R, scale=self.scale) \
            if type(self).forward is LoraXs.forward else None
