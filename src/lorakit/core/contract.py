"""The adapter contract every method implements.

An adapter is a small module attached to one base layer (see :class:`lorakit.core.layers.AdaptedLayer`).
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

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from lorakit.core.layers import AdaptedLayer, LayerInfo, LayerKind
from lorakit.core.lowrank import LowRank, lowrank_linear
from lorakit.errors import ConfigError, IncompatibleAdapterError
from lorakit.util.validation import parse

if TYPE_CHECKING:
    from typing import Self

    from lorakit.core.callbacks import TrainingCallback

#: A target specification: ``"all-linear"``, a regex (any other string), or a list of names/suffixes.
Targets = str | list[str]

#: ``(B', A')`` with ``dW = B' A'``: ``B'`` ``(d_out, k)``, ``A'`` ``(k, d_in)``, fp32.
Factors = tuple[Tensor, Tensor]


class AdapterConfig(BaseModel):
    """Options shared by every method. Subclasses add their own fields; unknown keys are errors.

    Attributes:
        targets: which modules to adapt: ``"all-linear"`` (every linear layer except the output head and
            one-output gates, and every expert of a mixture-of-experts model), a list of module names or name
            suffixes (``["q_proj", "v_proj"]``; an experts' 3-D parameter, ``"experts.down_proj"``, names all its
            experts, ``"...down_proj.3"`` one), or any other string, read as a regular expression that must
            match the full module name (:mod:`lorakit.core.experts`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    targets: Targets = "all-linear"

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> Self:
        """Validate ``options`` into this config, raising :class:`ConfigError` with every problem."""
        return parse(cls, options, f"invalid {cls.__name__}", unknown="unknown option")


@dataclass(frozen=True)
class LoraForm:
    """An update that *is* LoRA (or DoRA): ``dW = s B A`` with the config's ``r``, ``alpha``, ``use_rslora``.

    What PEFT's LoRA format stores natively (:mod:`lorakit.formats.peft_export`): ``a`` ``(r, d_in)``, ``b``
    ``(d_out, r)``, and DoRA's per-row ``magnitude`` ``(d_out,)`` when it is DoRA.
    """

    a: Tensor
    b: Tensor
    r: int
    alpha: float
    use_rslora: bool
    dropout: float
    magnitude: Tensor | None = None

    @property
    def scale(self) -> float:
        """``s = alpha / r`` (rsLoRA, https://arxiv.org/abs/2312.03732: ``alpha / sqrt(r)``)."""
        return lora_scale(self.alpha, self.r, self.use_rslora)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        """``dW`` in float32: ``s B A``, or DoRA's ``m * V / ||V||_row - W0`` with ``V = W0 + s B A``
        (https://arxiv.org/abs/2402.09353, Eq. 5; the norm over each output row, as PEFT stores ``m``)."""
        lora = self.scale * (self.b.float() @ self.a.float())  # (d_out, d_in)
        if self.magnitude is None:
            return lora
        w0 = base_weight.float()
        v = w0 + lora
        return v * (self.magnitude.float() / v.norm(dim=1)).unsqueeze(1) - w0


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """LoRA's scale ``alpha / r`` (https://arxiv.org/abs/2106.09685), or rsLoRA's rank-stabilised ``alpha / sqrt(r)``
    (https://arxiv.org/abs/2312.03732)."""
    return alpha / (math.sqrt(r) if use_rslora else r)


class Method:
    """What every registered method declares, layer adapter or not (the registry holds these classes).

    Class attributes (declared by each method, read by the layers above instead of tables keyed by name):
        method: the registry name (``"lora"``...).
        config_cls: the pydantic config class.
        layer_method: the method wraps layers with :class:`Adapter` modules (``False``: full fine-tuning,
            which trains the base parameters themselves).
        runtime_options: keyword arguments of :func:`lorakit.attach` that are not part of the saved config
            (e.g. LoRA-SB's ``init_batches``); they are passed to :meth:`Adapter.initialize`.
        needs_init_data: attaching needs ``init_batches`` (a data-driven init: LoRA-SB).
        needs_dense_weights: attaching needs ``dense_weights``, the base's unquantized weights (a state dict or
            its safetensors checkpoint, :class:`lorakit.util.dense_weights.DenseWeights`), for an init from the
            quantization error of a quantized base (LoftQ); ``lorakit train`` passes ``model.path``.
        fsdp_unsupported: why FSDP cannot train this method (``None``: it can).
        quantized_unsupported: why this method cannot train on a quantized base (QLoRA; ``None``: it can).
        rank_tensor: for methods whose rank differs per layer, the ``(r,)`` tensor whose length is a layer's
            stored rank (``lorakit inspect`` reads it from the saved shapes).
        bench_options: the options ``lorakit bench`` measures this method with (docs/performance.md: r 16, alpha 32).
        peft_counterpart: the PEFT method of the same math (``"lora"``, ``"dora"``, ``"vera"``) the benchmark
            compares with, or ``None``.
        legacy_defaults: options added after an adapter format was written, with the values that reproduce what
            files written before them computed (used for saved configs that lack them).
        peft_import: the PEFT adapter type (``"lora"``, ``"dora"``) whose files load as this method, if any.
        swap_free_options: options a hot-swap may change (:func:`lorakit.hot_swap`): the rank and the scale, which
            the saved tensors carry, and init- or training-time settings; any other option fixes the function's
            form and must be equal. ``targets`` is always free (the target list replaces it).
        relative_lr: a sensible learning rate for this method relative to LoRA's on the same task (VeRA trains
            scaling vectors and wants ~10x more; full fine-tuning ~0.05x): what the demo and the examples start
            from before a sweep.
        growable: a trained adapter of this method can gain rank (:meth:`grow`: rank1-sum's zero-gated components),
            what ``adapter.grow`` uses when an update brings new data.
    """

    method: ClassVar[str]
    config_cls: ClassVar[type[AdapterConfig]] = AdapterConfig
    layer_method: ClassVar[bool] = True
    runtime_options: ClassVar[frozenset[str]] = frozenset()
    needs_init_data: ClassVar[bool] = False
    needs_dense_weights: ClassVar[bool] = False
    fsdp_unsupported: ClassVar[str | None] = None
    quantized_unsupported: ClassVar[str | None] = None
    rank_tensor: ClassVar[str | None] = None
    bench_options: ClassVar[Mapping[str, Any]] = {}
    peft_counterpart: ClassVar[str | None] = None
    legacy_defaults: ClassVar[Mapping[str, Any]] = {}
    peft_import: ClassVar[str | None] = None
    swap_free_options: ClassVar[frozenset[str]] = frozenset({"targets"})
    relative_lr: ClassVar[float] = 1.0
    growable: ClassVar[bool] = False

    @classmethod
    def grow(cls, model: nn.Module, name: str, extra: Mapping[str, int], *,
             generator: torch.Generator | None = None) -> dict[str, int]:
        """Add ``extra[layer]`` fresh rank-1 components to those layers of adapter ``name``, leaving the model's
        function unchanged; returns every layer's live rank. Only for :attr:`growable` methods."""
        raise NotImplementedError(f"{cls.method} adapters cannot grow")

    @classmethod
    def run_defaults(cls, config: AdapterConfig, *, lr: float, warmup_steps: int,
                     total_steps: int) -> dict[str, Any]:
        """Values for options left unset (``None``) that depend on the training run (the trainer fills them in
        before attaching, so the saved config records them): LoRA-SB's ``eta`` from the first warm-up step's
        learning rate, Delta-LoRA's start from the run length. Default: none."""
        return {}


class Adapter(Method, nn.Module):
    """Base class of layer adapters. Subclasses set the class attributes and implement the math.

    Class attributes: those of :class:`Method`, plus

    - ``kinds``: the base-layer kinds this method supports;
    - ``rank_dims``: for each tensor (buffers included) whose shape holds the rank, the dimensions that do: a
      hot-swap zero-pads a smaller saved rank there, which adds nothing to the update;
    - ``scaled_tensors``: the tensors that carry the scale ``s`` linearly (the ``B`` side), into which a hot-swap
      folds the ratio of the saved to the live scale.
    """

    kinds: ClassVar[frozenset[LayerKind]] = frozenset({LayerKind.LINEAR, LayerKind.CONV1D})
    rank_dims: ClassVar[Mapping[str, tuple[int, ...]]] = {}
    scaled_tensors: ClassVar[frozenset[str]] = frozenset()

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
        if layer.quant is not None and cls.quantized_unsupported:
            raise ConfigError(f"method {cls.method!r} cannot train on a quantized base ({layer.name!r} is "
                              f"{layer.quant}): {cls.quantized_unsupported}")

    @classmethod
    def create_shared(cls, layers: list[LayerInfo], config: AdapterConfig,
                      *, init: bool = True) -> nn.Module | None:
        """Tensors shared by all layers of one adapter (e.g. VeRA's random matrices), or ``None``."""
        return None

    @classmethod
    def check_runtime(cls, runtime: Mapping[str, Any]) -> None:
        """Refuse runtime options this method does not take, and a missing ``init_batches`` (``dense_weights``)
        when the method :attr:`needs_init_data` (:attr:`needs_dense_weights`), before anything is built."""
        unknown = sorted(set(runtime) - cls.runtime_options)
        if unknown:
            raise ConfigError(f"method {cls.method!r} takes no option(s) {unknown}")
        if cls.needs_init_data and runtime.get("init_batches") is None:
            raise ConfigError(
                f"method {cls.method!r} needs init_batches=<iterable of model input dicts with labels> to compute "
                "its init (the gradient of the training loss); pass it to lorakit.attach")
        if cls.needs_dense_weights and runtime.get("dense_weights") is None:
            raise ConfigError(
                f"method {cls.method!r} needs dense_weights=<the unquantized base: a state dict or its checkpoint "
                "directory> to compute its init (the quantization error W - Q); pass it to lorakit.attach")

    @classmethod
    def initialize(cls, model: nn.Module, adapters: Mapping[str, Adapter], layers: Mapping[str, AdaptedLayer],
                   config: AdapterConfig, **runtime: Any) -> None:
        """Data-driven init run once after every layer is attached (LoRA-SB), with the
        :meth:`check_runtime`-checked runtime options. ``model`` is there to run forward passes. Default:
        nothing."""

    def init_from_base(self, base_weight: Tensor) -> None:
        """Init that depends on the base weight ``(d_out, d_in)`` (DoRA's magnitude, LoRA-XS's SVD).

        Called by attach after construction when ``init`` is true. Default: nothing.
        """

    @classmethod
    def callbacks(cls, name: str, adapters: Mapping[str, Adapter], layers: Mapping[str, AdaptedLayer],
                  config: AdapterConfig, *, optimizer: torch.optim.Optimizer | None,
                  total_steps: int) -> list[TrainingCallback]:
        """Training-loop callbacks this method needs (:class:`lorakit.TrainingCallback`).

        Args:
            name: the adapter's name on its layers.
            adapters: its per-layer modules, by module name, in model order.
            layers: the :class:`AdaptedLayer` each of them lives in, by the same names.
            config: its validated options.
            optimizer: the optimizer training it (rank pruning resizes its state), if known.
            total_steps: optimizer steps of the run.

        Delta-LoRA returns its post-step base update, rank1-sum its pruner, LoRA-FA its projected gradient.
        Default: none.
        """
        return []

    @classmethod
    def metadata(cls, adapters: Mapping[str, Adapter]) -> dict[str, Any]:
        """Live facts about the adapter saved in its metadata (rank1-sum: ``{"ranks": {...}}``). Default: none."""
        return {}

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

    def lowrank(self, layer: AdaptedLayer) -> LowRank | None:
        """The factors of ``dW = s diag(out) B mid A`` as the forward applies them, or ``None``.

        A method whose update has this shape returns them and gets, from the defaults below, the fused layer
        (:func:`lorakit.core.lowrank.lowrank_linear`), the shared ``x A^T`` of sibling projections
        (:mod:`lorakit.fast.speed`) and its exact PEFT export (:meth:`lora_factors`). Default: ``None``.
        """
        return None

    def fused_forward(self, x: Tensor, layer: AdaptedLayer) -> Tensor | None:
        """The whole layer output ``(W0 + dW) x + bias`` in one fused op, or ``None`` for the plain path.

        Only called when this is the layer's single pending adapter; must equal the plain path. Default: the
        fused low-rank linear of :meth:`lowrank`'s factors.
        """
        f = self.lowrank(layer)
        return None if f is None else lowrank_linear(x, layer, f)

    # --- export: derived from the factors --------------------------------------------------------------
    def lora_form(self) -> LoraForm | None:
        """This layer's update as LoRA/DoRA itself (PEFT's native form), or ``None``. Default: ``None``."""
        return None

    def lora_factors(self, layer: AdaptedLayer) -> Factors | None:
        """Exact ``(B', A')`` with ``delta_weight = B' A'`` (PEFT export at scale 1), or ``None`` if no low-rank
        form is known (the export then needs a rank, for a truncated SVD).

        Default: from :meth:`lowrank`: ``B' = s diag(out) B mid``, ``A' = A``.
        """
        f = self.lowrank(layer)
        if f is None:
            return None
        b = f.b.float()  # (d_out, r)
        if f.mid is not None:
            b = b @ f.mid.float() if f.mid.dim() == 2 else b * f.mid.float()
        if f.out is not None:
            b = f.out.float()[:, None] * b
        return b * f.scale, f.a.float()

    # --- merge: derived from delta_weight -----------------------------------------------------------------
    def merge_into(self, weight: Tensor) -> None:
        """``W <- W + dW`` in place (``weight`` is the ``(d_out, d_in)`` view), computed in fp32."""
        weight.copy_(weight.float().add_(self.delta_weight(weight)))

    def unmerge_from(self, weight: Tensor) -> None:
        """Exact inverse of :meth:`merge_into` (up to the weight dtype's rounding)."""
        weight.copy_(weight.float().sub_(self.delta_weight(weight)))

    # --- in-place replacement (hot-swap) ------------------------------------------------------------------
    def swap_refusal(self) -> str | None:
        """Why this adapter's tensors cannot be replaced in place now, or ``None`` (Delta-LoRA whose update went into
        the base weights). Default: ``None``."""
        return None

    def after_tensors_replaced(self) -> None:
        """Called after a hot-swap copied new values into this adapter's tensors: refresh anything derived from
        them (Delta-LoRA's flags). Default: nothing."""

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
