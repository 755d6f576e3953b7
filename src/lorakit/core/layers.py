"""The wrapper that puts adapters around a base layer.

Every supported base layer is seen through one convention, PyTorch's: a frozen weight ``W0`` of shape
``(d_out, d_in)`` with ``y = W0 x (+ bias)``.

- ``nn.Linear``: ``W0 = weight``.
- Hugging Face GPT-2 ``Conv1D`` stores the transpose, ``weight`` is ``(d_in, d_out)``: ``W0 = weight.T``.
- ``nn.Embedding`` is a linear map of a one-hot input: ``W0 = weight.T`` with ``d_in = num_embeddings`` and
  ``d_out = embedding_dim``; "``A x``" is then a row lookup of ``A.T``.
- A quantized linear (torchao NF4/int8, bitsandbytes 4/8-bit; :mod:`lorakit.core.quant`): ``W0 = dequant(Q)``,
  read one layer at a time by :func:`base_weight`; it cannot be written (no in-place merge).

:class:`AdaptedLayer` holds the base layer (composition, not inheritance) and any number of named adapters.
Its forward is ``base(x) + sum(adapter(x, base_out) for each active, unmerged adapter)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.core import quant
from lorakit.errors import AdapterStateError

try:  # transformers is a dependency, but keep the core importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]


class LayerKind(str, Enum):
    """The base-layer types an adapter can wrap."""

    LINEAR = "linear"
    CONV1D = "conv1d"
    EMBEDDING = "embedding"


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """``(module name, AdaptedLayer)`` for every wrapped layer of ``model``, in model order."""
    for n, m in model.named_modules():
        if isinstance(m, AdaptedLayer):
            yield n, m


def layer_kind(module: nn.Module) -> LayerKind | None:
    """Return the :class:`LayerKind` of ``module``, or ``None`` if it cannot be adapted."""
    if isinstance(module, AdaptedLayer):
        return module.kind
    if isinstance(module, nn.Linear):
        return LayerKind.LINEAR
    if Conv1D is not None and isinstance(module, Conv1D):
        return LayerKind.CONV1D
    if isinstance(module, nn.Embedding):
        return LayerKind.EMBEDDING
    return None


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, AdaptedLayer) else module


def weight_view(module: nn.Module) -> Tensor:
    """The base weight of ``module`` as a ``(d_out, d_in)`` view that shares storage with the parameter (what
    merging writes into).

    Raises:
        AdapterStateError: not an adaptable layer, or a quantized one (its weight cannot be written in place:
            read it with :func:`base_weight`).
    """
    kind = layer_kind(module)
    base = _unwrapped(module)
    if quant.is_quantized(base):
        raise AdapterStateError(
            f"the base weight of this {type(base).__name__} is quantized ({quant.quant_kind(base)}) and cannot be "
            "written in place; call lorakit.dequantize(model) first (e.g. to merge)")
    if kind is LayerKind.LINEAR:
        return base.weight
    if kind in (LayerKind.CONV1D, LayerKind.EMBEDDING):
        return base.weight.t()
    raise AdapterStateError(f"{type(module).__name__} is not an adaptable layer")


def base_weight(module: nn.Module) -> Tensor:
    """``W0`` of ``module`` as ``(d_out, d_in)``: the :func:`weight_view` of a dense layer, a freshly dequantized
    tensor (in the layer's compute dtype) of a quantized one. Read-only by contract."""
    base = _unwrapped(module)
    if quant.is_quantized(base):
        return quant.dequantize_weight(base)
    return weight_view(module)


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of an adaptable layer, dense or quantized (a packed weight's own shape is not it)."""
    base = _unwrapped(module)
    if quant.is_quantized(base):
        return quant.weight_shape(base)
    d_out, d_in = weight_view(module).shape
    return int(d_out), int(d_in)


#: Values of each weight a base fingerprint samples (evenly spaced over the flattened ``(d_out, d_in)`` weight).
SAMPLES = 256
#: How those values are chosen: ``exact`` (integer indices ``floor(i (n - 1) / (k - 1))``, the same on every
#: device and CPU), or ``linspace``, the float32 ``torch.linspace`` of adapters saved before ``exact`` existed
#: (lorakit <= 0.1.x wrote no ``base_sampling``): on a GPU, or on a CPU of another vector width, its rounding moves
#: indices of weights over 2^24 values, so it is only recomputed, on the CPU, to check those adapters.
SAMPLINGS = ("exact", "linspace")


def sample_indices(n: int, sampling: str = "exact") -> Tensor:
    """Indices (int64, on the CPU) of the :data:`SAMPLES` values a fingerprint reads from ``n`` values."""
    k = min(n, SAMPLES)
    if sampling == "linspace":
        idx = torch.linspace(0, n - 1, steps=k, device="cpu").long()
        return idx.clamp_(max=n - 1)  # float32 rounds the last index past the end beyond 2^24 values
    if sampling != "exact":
        raise ValueError(f"unknown sampling {sampling!r}; one of {SAMPLINGS}")
    if k <= 1:
        return torch.zeros(k, dtype=torch.long)
    return torch.arange(k, dtype=torch.long) * (n - 1) // (k - 1)  # exact integer arithmetic


def sample_weight(w: Tensor, sampling: str = "exact") -> Tensor:
    """:data:`SAMPLES` evenly spaced values of ``w`` (flattened), rounded to bfloat16, as fp32 on the CPU."""
    flat = w.detach().reshape(-1)
    return flat[sample_indices(flat.numel(), sampling).to(flat.device)].to(torch.bfloat16).float().cpu()


def original_samples(w: Tensor) -> dict[str, Tensor]:
    """:func:`sample_weight` of ``w`` under every sampling: kept by a layer that is about to be quantized."""
    return {s: sample_weight(w, s) for s in SAMPLINGS}


def weight_sample(module: nn.Module, sampling: str = "exact") -> tuple[Tensor, bool]:
    """``(sample, exact)``: :func:`sample_weight` of ``W0``, and whether it is the base model's own weight.

    A layer quantized by :func:`lorakit.quantize` kept the samples of its original weight (exact); a layer that
    was quantized elsewhere (bitsandbytes at load time) only has its dequantized weight, which differs from the
    original by the quantization error (not exact)."""
    base = _unwrapped(module)
    kept = base.__dict__.get(quant.ORIGINAL_SAMPLE)
    if kept is not None:  # quantized by lorakit (or dequantized since): the original weight's sample
        return kept[sampling], True
    if quant.is_quantized(base):
        return sample_weight(quant.dequantize_weight(base, torch.float32), sampling), False
    return sample_weight(weight_view(module), sampling), not base.__dict__.get(quant.DEQUANTIZED, False)


@dataclass(frozen=True)
class LayerInfo:
    """What an adapter needs to know about the layer it is built for."""

    name: str
    kind: LayerKind
    d_in: int
    d_out: int
    dtype: torch.dtype
    device: torch.device
    quant: str | None = None

    @classmethod
    def of(cls, name: str, module: nn.Module) -> LayerInfo:
        """The info of an adaptable ``module`` (dense or quantized; raises :class:`AdapterStateError` otherwise)."""
        kind = layer_kind(module)
        if kind is None:
            raise AdapterStateError(f"{type(module).__name__} is not an adaptable layer")
        base = _unwrapped(module)
        q = quant.quant_kind(base)
        d_out, d_in = weight_shape(module)
        dtype = quant.compute_dtype(base) if q else base.weight.dtype
        return cls(name, kind, d_in, d_out, dtype, base.weight.device, q)


class AdaptedLayer(nn.Module):
    """A base layer plus named adapters.

    Attributes:
        base: the original layer, unchanged in type; its weight is modified only by merge/unmerge and by
            methods whose training rule updates it (Delta-LoRA, full fine-tuning).
        adapters: adapters by name.
        active: names of the adapters applied in forward, in order.
        merged: names of the adapters whose ``delta_weight`` is currently added into ``base``'s weight.
        row_router: while set, ``row_router(layer, x)`` computes the forward instead (per-row adapters,
            :func:`lorakit.per_row` sets and clears it); ``None`` otherwise.
        projection_group: the group of sibling projections this layer shares its ``x A^T`` with
            (:func:`lorakit.fast.speed.group_projections`), or ``None``.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        kind = layer_kind(base)
        if kind is None or isinstance(base, AdaptedLayer):
            raise AdapterStateError(f"cannot wrap {type(base).__name__}")
        quant.pin_layout(base)  # a bitsandbytes 4-bit base keeps one weight layout while adapted
        self.base = base
        self.kind = kind
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.row_router: Any = None
        self.projection_group: Any = None

    # --- geometry -------------------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The base weight ``W0`` as ``(d_out, d_in)``: a view for Conv1D and Embedding, a dequantized copy for a
        quantized base (:func:`base_weight`)."""
        return base_weight(self.base)

    @property
    def weight_shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the base weight (dense or quantized)."""
        return weight_shape(self.base)

    @property
    def quant(self) -> str | None:
        """The base layer's quantization (:func:`lorakit.core.quant.quant_kind`), ``None`` when dense."""
        return quant.quant_kind(self.base)

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base, "bias", None)

    def project(self, x: Tensor, a: Tensor) -> Tensor:
        """``A x`` for this layer's input: ``x @ A.T`` for linear layers, a row lookup for embeddings.

        Args:
            x: the layer input, ``(..., d_in)`` floats, or integer ids for an embedding.
            a: ``(r, d_in)``.

        Returns:
            ``(..., r)``.
        """
        if self.kind is LayerKind.EMBEDDING:
            return F.embedding(x, a.t(), padding_idx=self.base.padding_idx)
        return F.linear(x, a.to(x.dtype))

    # --- forward --------------------------------------------------------------------------------------
    def pending(self) -> list[str]:
        """Active adapters that are not merged, i.e. those the forward must compute."""
        return [n for n in self.active if n not in self.merged]

    def forward(self, x: Tensor) -> Tensor:
        if self.row_router is not None:  # per-row adapters (lorakit.per_row)
            return self.row_router(self, x)
        pending = self.pending()
        if len(pending) == 1:
            fused = self.adapters[pending[0]].fused_forward(x, self)
            if fused is not None:
                return fused
        out = self.base(x)
        for name in pending:
            out = out + self.adapters[name](x, out, self)
        return out

    # --- merge ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Add ``delta_weight`` of each named (default: active) adapter into the base weight, once.

        Raises:
            AdapterStateError: the base is quantized (``W0 + dW`` does not fit in its 4 or 8 bits; dequantize
                the model first).
        """
        names = [n for n in (self.active if names is None else names) if n in self.adapters and n not in self.merged]
        if names and self.quant is not None:
            raise AdapterStateError(
                f"cannot merge into a quantized base layer ({self.quant}): W0 + dW does not fit in its quantized "
                "weight. Call lorakit.dequantize(model) first (or `lorakit merge`, which does), or keep the "
                "adapter unmerged")
        for name in names:
            self.adapters[name].merge_into(self.weight)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        """Undo :meth:`merge` for each named (default: every merged) adapter, newest first."""
        for name in reversed(list(self.merged)):
            if names is None or name in names:
                self.adapters[name].unmerge_from(self.weight)
                self.merged.remove(name)

    def add_adapter(self, name: str, adapter: nn.Module) -> None:
        """Add ``adapter`` (a :class:`lorakit.Adapter`) under ``name``."""
        if name in self.adapters:
            raise AdapterStateError(f"layer already has an adapter named {name!r}")
        self.adapters[name] = adapter

    def extra_repr(self) -> str:
        return f"kind={self.kind.value}, active={self.active}, merged={self.merged}"
