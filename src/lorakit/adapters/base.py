"""The adapter contract every method implements.

An adapter is a small module attached to one base layer (see :class:`lorakit.layers.AdaptedLayer`).
It answers three questions, and everything else (merge, unmerge, save, export, tests) derives from them:

- ``delta_weight(W0)``: the dense update ``dW`` (``(d_out, d_in)``, fp32), so the adapted layer computes
  ``(W0 + dW) x``. This is the single source of each method's math.
- ``forward(x, base_out, layer)``: the same update applied to an input, ``dW x``, computed cheaply.
- which tensors train: exactly the adapter's ``nn.Parameter``s. Frozen tensors are buffers.

Methods whose training rule is not a layer (LoRA+, Delta-LoRA's base update, rank pruning, LoRA-SB's
data-driven init) keep that rule outside the layer: an optimizer option, a post-step hook, a callback, or
:meth:`Adapter.initialize`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleAdapterError
from ..layers import LayerInfo, LayerKind

if TYPE_CHECKING:
    from ..layers import AdaptedLayer

#: A target specification: ``"all-linear"``, a regex (any other string), or a list of names/suffixes.
Targets = str | list[str]


class AdapterConfig(BaseModel):
    """Options shared by every method. Subclasses add their own fields; unknown keys are errors.

    Attributes:
        targets: which modules to adapt: ``"all-linear"`` (every linear layer except the output head),
            a list of module names or name suffixes (``["q_proj", "v_proj"]``), or any other string,
            read as a regular expression that must match the full module name.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: Targets = "all-linear"

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> AdapterConfig:
        """Validate ``options`` into this config, raising :class:`ConfigError` with every problem."""
        try:
            return cls(**options)
        except ValidationError as e:
            problems = []
            for err in e.errors():
                field = ".".join(str(p) for p in err["loc"]) or "<config>"
                msg = err["msg"]
                if err["type"] == "extra_forbidden":
                    allowed = ", ".join(sorted(cls.model_fields))
                    msg = f"unknown option (allowed: {allowed})"
                problems.append(f"{field}: {msg}")
            raise ConfigError(f"invalid {cls.__name__}: " + "; ".join(problems)) from None


class Adapter(nn.Module):
    """Base class of layer adapters. Subclasses set the class attributes and implement the two methods.

    Class attributes:
        method: the registry name (``"lora"``...).
        config_cls: the pydantic config class.
        kinds: base-layer kinds this method supports.
        runtime_options: keyword arguments of :func:`lorakit.attach` that are not part of the saved config
            (e.g. LoRA-SB's ``init_batches``); they are passed to :meth:`initialize`.
    """

    method: ClassVar[str]
    config_cls: ClassVar[type[AdapterConfig]] = AdapterConfig
    kinds: ClassVar[frozenset[LayerKind]] = frozenset({LayerKind.LINEAR, LayerKind.CONV1D})
    runtime_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, layer: LayerInfo, config: AdapterConfig, shared: nn.Module | None = None,
                 *, init: bool = True) -> None:
        """Build the adapter's tensors for ``layer``.

        Args:
            layer: shape, kind, dtype and device of the base layer.
            config: the validated options.
            shared: the object returned by :meth:`create_shared`, if any.
            init: initialise tensors as the method prescribes; ``False`` when they will be overwritten
                (loading), so costly inits such as an SVD are skipped.
        """
        super().__init__()
        self.config = config

    # --- hooks for the attach flow -------------------------------------------------------------------
    @classmethod
    def check_layer(cls, layer: LayerInfo, config: AdapterConfig) -> None:
        """Raise :class:`ConfigError` if this config cannot adapt ``layer`` (e.g. rank too large)."""
        if layer.kind not in cls.kinds:
            raise ConfigError(
                f"method {cls.method!r} cannot adapt {layer.name!r} ({layer.kind.value}); "
                f"supported layer kinds: {sorted(k.value for k in cls.kinds)}")

    @classmethod
    def create_shared(cls, layers: list[LayerInfo], config: AdapterConfig,
                      *, init: bool = True) -> nn.Module | None:
        """Tensors shared by all layers of one adapter (e.g. VeRA's random matrices), or ``None``."""
        return None

    @classmethod
    def initialize(cls, model: nn.Module, name: str, adapters: dict[str, Adapter],
                   config: AdapterConfig, **runtime: Any) -> None:
        """Data-driven init run once after every layer is attached (LoRA-SB). Default: nothing."""
        if runtime:
            raise ConfigError(f"method {cls.method!r} takes no option(s) {sorted(runtime)}")

    def init_from_base(self, base_weight: Tensor) -> None:
        """Init that depends on the base weight ``(d_out, d_in)`` (DoRA's magnitude, LoRA-XS's SVD).

        Called by attach after construction when ``init`` is true. Default: nothing.
        """

    @classmethod
    def callbacks(cls, model: nn.Module, name: str, config: AdapterConfig, *,
                  optimizer: torch.optim.Optimizer | None, total_steps: int) -> list[Any]:
        """Training-loop callbacks this method needs (:class:`lorakit.callbacks.TrainingCallback`).

        Delta-LoRA returns its post-step base update, rank1-sum its pruner. Default: none.
        """
        return []

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """This adapter's parameters split into the LoRA+ sides ``{"A": [...], "B": [...]}``.

        LoRA+ (https://arxiv.org/abs/2402.12354) trains the output-side factor ("B") with a larger learning
        rate; :func:`lorakit.param_groups` asks every adapter for this split instead of guessing from names.
        Default: every parameter on the "A" side (plain learning rate).
        """
        return {"A": list(self.parameters()), "B": []}

    # --- the math --------------------------------------------------------------------------------------
    def delta_weight(self, base_weight: Tensor) -> Tensor:
        """The dense update ``dW`` (``(d_out, d_in)``, fp32) such that the layer computes ``W0 + dW``."""
        raise NotImplementedError

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:  # noqa: D401
        """``dW x`` for input ``x``; ``base_out`` is ``W0 x + bias`` (the base layer's output)."""
        raise NotImplementedError

    def fused_forward(self, x: Tensor, layer: AdaptedLayer) -> Tensor | None:
        """The whole layer output ``(W0 + dW) x + bias`` in one fused op, or ``None`` for the plain path.

        Only called when this is the layer's single pending adapter. Must equal the plain path.
        """
        return None

    # --- merge: derived from delta_weight -----------------------------------------------------------------
    def merge_into(self, weight: Tensor) -> None:
        """``W <- W + dW`` in place (``weight`` is the ``(d_out, d_in)`` view), computed in fp32."""
        weight.copy_(weight.float().add_(self.delta_weight(weight)))

    def unmerge_from(self, weight: Tensor) -> None:
        """Exact inverse of :meth:`merge_into` (up to the weight dtype's rounding)."""
        weight.copy_(weight.float().sub_(self.delta_weight(weight)))

    # --- state ----------------------------------------------------------------------------------------
    def load_tensors(self, tensors: Mapping[str, Tensor], *, where: str = "") -> None:
        """Fill this adapter from saved tensors; shapes must match (methods with data-dependent shapes
        override this)."""
        own = self.state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise IncompatibleAdapterError(
                f"{where}: saved tensors do not match method {self.method!r} "
                f"(missing {missing}, unexpected {unexpected})")
        for key, value in tensors.items():
            if tuple(own[key].shape) != tuple(value.shape):
                raise IncompatibleAdapterError(
                    f"{where}.{key}: saved shape {tuple(value.shape)} != expected {tuple(own[key].shape)}")
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value)


def cast(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in the dtype of ``like`` (adapter weights are kept fp32; the math runs in the input dtype)."""
    return t if t.dtype == like.dtype else t.to(like.dtype)
