"""The wrapper that puts adapters around a base layer.

Every supported base layer is seen through one convention, PyTorch's: a frozen weight ``W0`` of shape
``(d_out, d_in)`` with ``y = W0 x (+ bias)``.

- ``nn.Linear``: ``W0 = weight``.
- Hugging Face GPT-2 ``Conv1D`` stores the transpose, ``weight`` is ``(d_in, d_out)``: ``W0 = weight.T``.
- ``nn.Embedding`` is a linear map of a one-hot input: ``W0 = weight.T`` with ``d_in = num_embeddings`` and
  ``d_out = embedding_dim``; "``A x``" is then a row lookup of ``A.T``.

:class:`AdaptedLayer` holds the base layer (composition, not inheritance) and any number of named adapters.
Its forward is ``base(x) + sum(adapter(x, base_out) for each active, unmerged adapter)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def weight_view(module: nn.Module) -> Tensor:
    """The base weight of ``module`` as a ``(d_out, d_in)`` view that shares storage with the parameter."""
    kind = layer_kind(module)
    base = module.base if isinstance(module, AdaptedLayer) else module
    if kind is LayerKind.LINEAR:
        return base.weight
    if kind in (LayerKind.CONV1D, LayerKind.EMBEDDING):
        return base.weight.t()
    raise AdapterStateError(f"{type(module).__name__} is not an adaptable layer")


@dataclass(frozen=True)
class LayerInfo:
    """What an adapter needs to know about the layer it is built for."""

    name: str
    kind: LayerKind
    d_in: int
    d_out: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, name: str, module: nn.Module) -> LayerInfo:
        w = weight_view(module)
        kind = layer_kind(module)
        assert kind is not None
        return cls(name, kind, w.shape[1], w.shape[0], w.dtype, w.device)


class AdaptedLayer(nn.Module):
    """A base layer plus named adapters.

    Attributes:
        base: the original layer, unchanged in type; its weight is modified only by merge/unmerge and by
            methods whose training rule updates it (Delta-LoRA, full fine-tuning).
        adapters: adapters by name.
        active: names of the adapters applied in forward, in order.
        merged: names of the adapters whose ``delta_weight`` is currently added into ``base``'s weight.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        kind = layer_kind(base)
        if kind is None or isinstance(base, AdaptedLayer):
            raise AdapterStateError(f"cannot wrap {type(base).__name__}")
        self.base = base
        self.kind = kind
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []

    # --- geometry -------------------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The base weight as ``(d_out, d_in)`` (a view for Conv1D and Embedding)."""
        return weight_view(self.base)

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
        """Add ``delta_weight`` of each named (default: active) adapter into the base weight, once."""
        for name in self.active if names is None else names:
            if name in self.adapters and name not in self.merged:
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
