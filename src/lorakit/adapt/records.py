"""What lorakit knows about the adapters on a model: one :class:`AdapterRecord` per named adapter, kept on the
model itself, and the accessors the public API and the layers above read them with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.core.contract import Adapter, AdapterConfig, Method
from lorakit.core.experts import find_module
from lorakit.core.layers import SAMPLES, sample_weight, weight_sample, weight_shape
from lorakit.errors import AdapterStateError
from lorakit.methods import get_method
from lorakit.util.arguments import checked

_RECORDS = "_lorakit_adapters"  # attribute on the model: dict[name, AdapterRecord]
_ACTIVE = "_lorakit_active"  # attribute on the model: list of active adapter names
SHARED = "lorakit_shared"  # submodule of the model holding per-adapter shared tensors (VeRA)


@dataclass
class AdapterRecord:
    """What lorakit knows about one named adapter on a model.

    Attributes:
        name: the adapter's name.
        method: registry name of its method.
        config: its validated options.
        targets: module names it wraps (layer methods) or parameter names it trains (``full``).
        fingerprint: hash of the targeted base weights at attach time (see :func:`fingerprint`).
        sketch, base_exact: the rest of the :class:`BaseIdentity` (recognises the base through quantization).
        sampling: how the fingerprint chose its weight samples (:data:`~lorakit.core.layers.SAMPLINGS`):
            ``exact``, or ``linspace`` for an adapter loaded from a file saved before ``exact``.
        modules: its per-layer :class:`~lorakit.Adapter` modules by module name, in model order (empty for
            ``full``).
        extra: metadata saved with the adapter (e.g. what trained it), refreshed with the method's live
            :meth:`~lorakit.Adapter.metadata` (rank1-sum's ranks) whenever it is read.
    """

    name: str
    method: str
    config: AdapterConfig
    targets: list[str]
    fingerprint: str
    modules: dict[str, Adapter] = field(default_factory=dict, repr=False)
    sketch: list[float] = field(default_factory=list, repr=False)
    base_exact: bool = True
    sampling: str = "exact"
    _extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def method_cls(self) -> type[Method]:
        return get_method(self.method)

    @property
    def is_layer_method(self) -> bool:
        return self.method_cls.layer_method

    @property
    def extra(self) -> dict[str, Any]:
        cls = self.method_cls
        if self.modules and issubclass(cls, Adapter):
            self._extra.update(cls.metadata(self.modules))
        return self._extra

    @extra.setter
    def extra(self, value: dict[str, Any]) -> None:
        self._extra = dict(value)


# --- small accessors ---------------------------------------------------------------------------------------
def records_of(model: nn.Module) -> dict[str, AdapterRecord]:
    """The live record of every adapter on ``model`` by name (the model's own dict: the layers above read and
    update records through this and :func:`get_record`, never through the attribute)."""
    return model.__dict__.setdefault(_RECORDS, {})


@checked
def adapters(model: nn.Module) -> dict[str, AdapterRecord]:
    """The adapters on ``model`` by name, in attach order (a copy; edit through the API)."""
    return dict(records_of(model))


@checked
def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters."""
    return list(model.__dict__.get(_ACTIVE, []))


def get_record(model: nn.Module, name: str) -> AdapterRecord:
    """The live record of adapter ``name``; :class:`AdapterStateError` naming the adapters there otherwise."""
    recs = records_of(model)
    if name not in recs:
        raise AdapterStateError(f"model has no adapter named {name!r}; it has {sorted(recs) or 'none'}")
    return recs[name]


@checked
def adapter_modules(model: nn.Module, name: str = "default") -> dict[str, Adapter]:
    """The per-layer adapter modules of adapter ``name``, by wrapped module name."""
    return dict(get_record(model, name).modules)


def shared_module(model: nn.Module, name: str) -> nn.Module | None:
    """The shared tensors of adapter ``name`` (VeRA's random matrices), if its method has any."""
    store = getattr(model, SHARED, None)
    return store[name] if store is not None and name in store else None


@checked
def trainable_parameters(model: nn.Module) -> int:
    """Number of scalars that train (``requires_grad``), each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _digest(items: Iterable[tuple[str, tuple[int, ...], Tensor]]) -> str:
    h = hashlib.sha256()
    for name, shape, sample in items:
        h.update(f"{name}:{shape}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def fingerprint(named: Iterable[tuple[str, Tensor]], sampling: str = "exact") -> str:
    """A cheap, dtype-robust hash of base weights: names, shapes and 256 evenly spaced values of each,
    rounded to bfloat16 (so the same checkpoint loaded in fp32 or bf16 gives the same fingerprint)."""
    return _digest((name, tuple(t.shape), sample_weight(t, sampling)) for name, t in named)


#: Values per target kept in an adapter's base sketch (a subset of the fingerprint's samples).
SKETCH = 16
#: Largest relative distance ``||s - s'|| / ||s||`` between two sketches of the same base when one side only
#: knows its dequantized weights: 4-bit quantization moves weights by ~0.1 of their norm (NF4 0.09, FP4 0.15),
#: int8 by ~0.005; two different models are ~1.4 apart.
SKETCH_TOLERANCE = 0.35


@dataclass(frozen=True)
class BaseIdentity:
    """What identifies the base weights an adapter depends on.

    Attributes:
        fingerprint: :func:`fingerprint` of the targets' weights (the original weights of a base quantized by
            :func:`lorakit.quantize`, so quantizing does not change it).
        sketch: :data:`SKETCH` sampled values per target, in target order, to recognise the same base through
            quantization noise when the original weights are unknown.
        exact: the fingerprint comes from the base model's own weights (``False``: from the dequantized weights
            of a base quantized elsewhere, e.g. bitsandbytes at load time).
    """

    fingerprint: str
    sketch: list[float]
    exact: bool

    def matches(self, fingerprint: str, sketch: list[float] | None, exact: bool) -> bool:
        """Whether a saved identity (``fingerprint``, ``sketch``, ``exact``) is this base: the same fingerprint, or,
        when either side saw only dequantized weights, sketches within :data:`SKETCH_TOLERANCE`."""
        if fingerprint == self.fingerprint:
            return True
        if (exact and self.exact) or not sketch or len(sketch) != len(self.sketch):
            return False
        saved, own = torch.tensor(sketch), torch.tensor(self.sketch)
        norm = float(saved.norm())
        return norm > 0 and float((saved - own).norm()) / norm <= SKETCH_TOLERANCE


def base_identity(model: nn.Module, method: str, targets: list[str], sampling: str = "exact") -> BaseIdentity:
    """The :class:`BaseIdentity` of the base weights an adapter of ``method`` on ``targets`` depends on
    (``sampling``: ``linspace`` to check an adapter saved before ``exact`` sampling)."""
    items: list[tuple[str, tuple[int, ...], Tensor]] = []
    exact = True
    if not get_method(method).layer_method:
        params = dict(model.named_parameters())
        items = [(n, tuple(params[n].shape), sample_weight(params[n], sampling)) for n in targets]
    else:
        for n in targets:
            module = find_module(model, n)
            sample, ok = weight_sample(module, sampling)
            exact = exact and ok
            items.append((n, weight_shape(module), sample))
    step = max(1, SAMPLES // SKETCH)
    sketch = [round(float(v), 5) for _, _, sample in items for v in sample[::step][:SKETCH]]
    return BaseIdentity(_digest(items), sketch, exact)


def target_fingerprint(model: nn.Module, method: str, targets: list[str], sampling: str = "exact") -> str:
    """Fingerprint of the base weights an adapter of ``method`` on ``targets`` depends on."""
    return base_identity(model, method, targets, sampling).fingerprint
