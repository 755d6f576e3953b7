"""LoRA and rsLoRA.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685)::

    y = W0 x + s * B (A dropout(x)),    s = alpha / r       (rsLoRA: s = alpha / sqrt(r),
                                                            Kalajdzievski 2023, https://arxiv.org/abs/2312.03732)
    dW = s * B A

``A`` is ``(r, d_in)``, kaiming-uniform with ``a = sqrt(5)`` (i.e. ``U(-1/sqrt(d_in), 1/sqrt(d_in))``);
``B`` is ``(d_out, r)`` and starts at zero, so the model starts unchanged. Trainable: ``r (d_in + d_out)``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from lorakit.core.contract import Adapter, AdapterConfig, LoraForm, cast, lora_scale
from lorakit.core.layers import AdaptedLayer, LayerInfo, LayerKind
from lorakit.core.lowrank import LowRank
from lorakit.errors import ConfigError


class LoraConfig(AdapterConfig):
    """Options of LoRA-style adapters.

    Attributes:
        r: rank of the update (> 0, at most ``min(d_in, d_out)`` of every target).
        alpha: scaling numerator; ``None`` means ``2 r``.
        dropout: dropout on the adapter input (0 keeps no extra activation; the default).
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    """

    r: int = Field(8, gt=0)
    alpha: float | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    use_rslora: bool = False

    @model_validator(mode="after")
    def _default_alpha(self) -> LoraConfig:
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(2 * self.r))
        return self

    @property
    def scale(self) -> float:
        assert self.alpha is not None
        return lora_scale(self.alpha, self.r, self.use_rslora)


def check_rank(layer: LayerInfo, r: int, method: str) -> None:
    """A rank above ``min(d_in, d_out)`` adds parameters without adding expressiveness: refuse it."""
    limit = min(layer.d_in, layer.d_out)
    if r > limit:
        raise ConfigError(
            f"r={r} is larger than layer {layer.name!r} allows for {method!r} "
            f"(min(d_in={layer.d_in}, d_out={layer.d_out}) = {limit})")


def input_dropout(config: LoraConfig, layer: LayerInfo) -> nn.Module:
    """Dropout on the adapter input, built only when asked for: it makes autograd keep an ``N x d_in`` mask (or
    a second activation), which frozen-``A`` methods exist to avoid. Embedding inputs are ids: no dropout."""
    use = config.dropout > 0 and layer.kind is not LayerKind.EMBEDDING
    return nn.Dropout(config.dropout) if use else nn.Identity()


def dropout_p(dropout: nn.Module) -> float:
    """The drop probability the fused path must apply now (0 in eval mode or without dropout)."""
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def lora_init_(a: Tensor) -> Tensor:
    """LoRA's A init: kaiming-uniform with ``a = sqrt(5)``, i.e. ``U(-1/sqrt(d_in), 1/sqrt(d_in))``."""
    return nn.init.kaiming_uniform_(a, a=math.sqrt(5))


class Lora(Adapter):
    """``dW = s B A`` with trainable ``A (r, d_in)`` and ``B (d_out, r)``."""

    method = "lora"
    config_cls = LoraConfig
    kinds = frozenset({LayerKind.LINEAR, LayerKind.CONV1D, LayerKind.EMBEDDING})
    bench_options = {"r": 16, "alpha": 32.0}
    peft_counterpart = "lora"
    peft_import = "lora"
    swap_free_options = frozenset({"targets", "r", "alpha", "use_rslora", "dropout"})
    rank_dims = {"lora_A": (0,), "lora_B": (1,)}
    scaled_tensors = frozenset({"lora_B"})
    config: LoraConfig

    def __init__(self, layer: LayerInfo, config: LoraConfig, shared: nn.Module | None = None,
                 *, init: bool = True) -> None:
        super().__init__(layer, config, shared, init=init)
        kw = {"device": layer.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(config.r, layer.d_in, **kw))
        self.lora_B = nn.Parameter(torch.zeros(layer.d_out, config.r, **kw))
        if init:
            lora_init_(self.lora_A)
        self.scale = config.scale
        self.dropout = input_dropout(config, layer)

    @classmethod
    def check_layer(cls, layer: LayerInfo, config: LoraConfig) -> None:  # type: ignore[override]
        super().check_layer(layer, config)
        check_rank(layer, config.r, cls.method)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """``lora_B`` is the LoRA+ "B" side; every other parameter (``lora_A``, and in subclasses such as
        DoRA the magnitude ``m``, which holds the base rows' norms and rescales the whole base output, so a
        ratio x larger step on it would move the pretrained function far more than one on ``B``) is "A"."""
        b = [self.lora_B] if isinstance(self.lora_B, nn.Parameter) else []
        return {"A": [p for p in self.parameters() if not any(p is q for q in b)], "B": b}

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        h = layer.project(self.dropout(x), self.lora_A) * self.scale  # (..., r): scale on the small side
        return torch.nn.functional.linear(h.to(base_out.dtype), cast(self.lora_B, base_out))

    def lowrank(self, layer: AdaptedLayer) -> LowRank | None:
        """The factors of ``dW = s B A`` for the fused path (:mod:`lorakit.core.lowrank`: ``W0 x + bias +
        s B A dropout(x)`` in one autograd function that saves ``x`` and ``A x`` only, and nothing for ``A``'s
        gradient when ``A`` is frozen), or ``None`` for a subclass whose forward is not LoRA's (DoRA), which
        must not inherit this fast path."""
        if type(self).forward is not Lora.forward:
            return None
        return LowRank(self.lora_A, self.lora_B, scale=self.scale, dropout=dropout_p(self.dropout))

    def lora_form(self) -> LoraForm | None:
        """LoRA is PEFT's native form: ``A``, ``B`` and the config's ``r``, ``alpha``, ``use_rslora``."""
        return lora_form(self, self.lora_A, self.lora_B)


def lora_form(adapter: Adapter, a: Tensor, b: Tensor, magnitude: Tensor | None = None) -> LoraForm:
    """The :class:`LoraForm` of an adapter with a :class:`LoraConfig` and factors ``a``, ``b``."""
    cfg: LoraConfig = adapter.config  # type: ignore[assignment]
    assert cfg.alpha is not None
    return LoraForm(a.float(), b.float(), cfg.r, cfg.alpha, cfg.use_rslora, cfg.dropout, magnitude)
