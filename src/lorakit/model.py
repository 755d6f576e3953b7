"""Attaching adapters to a model and managing them: the functions behind lorakit's public API."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import Adapter, get_method
from .adapters.base import AdapterConfig
from .adapters.full import Full
from .errors import AdapterStateError, ConfigError
from .layers import AdaptedLayer, LayerInfo, weight_view
from .targets import find_targets

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
        extra: free-form metadata saved with the adapter (e.g. training state of a method).
    """

    name: str
    method: str
    config: AdapterConfig
    targets: list[str]
    fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_layer_method(self) -> bool:
        return self.method != Full.method


# --- small accessors ---------------------------------------------------------------------------------------
def _records(model: nn.Module) -> dict[str, AdapterRecord]:
    return model.__dict__.setdefault(_RECORDS, {})


def adapters(model: nn.Module) -> dict[str, AdapterRecord]:
    """The adapters on ``model`` by name, in attach order (a copy; edit through the API)."""
    return dict(_records(model))


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters."""
    return list(model.__dict__.get(_ACTIVE, []))


def _record(model: nn.Module, name: str) -> AdapterRecord:
    recs = _records(model)
    if name not in recs:
        raise AdapterStateError(f"model has no adapter named {name!r}; it has {sorted(recs) or 'none'}")
    return recs[name]


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """``(module name, AdaptedLayer)`` for every wrapped layer."""
    for n, m in model.named_modules():
        if isinstance(m, AdaptedLayer):
            yield n, m


def adapter_modules(model: nn.Module, name: str = "default") -> dict[str, Adapter]:
    """The per-layer adapter modules of adapter ``name``, by wrapped module name."""
    rec = _record(model, name)
    if not rec.is_layer_method:
        return {}
    return {t: model.get_submodule(t).adapters[name] for t in rec.targets}


def shared_module(model: nn.Module, name: str) -> nn.Module | None:
    """The shared tensors of adapter ``name`` (VeRA's random matrices), if its method has any."""
    store = getattr(model, SHARED, None)
    return store[name] if store is not None and name in store else None


def trainable_parameters(model: nn.Module) -> int:
    """Number of scalars that train (``requires_grad``), each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fingerprint(named: Iterable[tuple[str, Tensor]]) -> str:
    """A cheap, dtype-robust hash of base weights: names, shapes and 256 evenly spaced values of each,
    rounded to bfloat16 (so the same checkpoint loaded in fp32 or bf16 gives the same fingerprint)."""
    h = hashlib.sha256()
    for name, t in named:
        flat = t.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, steps=min(flat.numel(), 256), device=flat.device).long()
        sample = flat[idx].to(torch.bfloat16).float().cpu()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def target_fingerprint(model: nn.Module, method: str, targets: list[str]) -> str:
    """Fingerprint of the base weights an adapter of ``method`` on ``targets`` depends on."""
    if method == Full.method:
        params = dict(model.named_parameters())
        return fingerprint((n, params[n]) for n in targets)
    return fingerprint((n, weight_view(model.get_submodule(n))) for n in targets)


# --- attach --------------------------------------------------------------------------------------------------
def attach(model: nn.Module, method: str, *, name: str = "default", **options: Any) -> nn.Module:
    """Add an adapter of ``method`` to ``model`` in place, make it the active one, and freeze the rest.

    Args:
        model: any PyTorch / Hugging Face model.
        method: a name in :data:`lorakit.METHODS`.
        name: the adapter's name (several adapters can live on one model).
        **options: the method's options (see its config class, e.g. ``r``, ``alpha``, ``targets``) and any
            runtime-only inputs it takes (LoRA-SB's ``init_batches``).

    Returns:
        ``model`` itself.

    Raises:
        UnknownMethodError, ConfigError, TargetError: bad input; the model is left untouched.
    """
    cls = get_method(method)
    init = bool(options.pop("_init", True))
    modules_override: list[str] | None = options.pop("_modules", None)
    runtime = {k: options.pop(k) for k in list(options) if k in cls.runtime_options}
    config = cls.config_cls.parse(options)
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in _records(model):
        raise AdapterStateError(f"model already has an adapter named {name!r}; remove it or pick another name")

    if cls is Full:
        targets = modules_override or Full.select(model, config)  # type: ignore[arg-type]
        rec = AdapterRecord(name, method, config, targets, target_fingerprint(model, method, targets))
        _records(model)[name] = rec
        set_active(model, [name])
        return model

    assert issubclass(cls, Adapter)
    targets = modules_override or find_targets(model, config.targets)
    modules = {t: model.get_submodule(t) for t in targets}
    infos = [LayerInfo.of(t, m) for t, m in modules.items()]
    for info in infos:
        cls.check_layer(info, config)
    fp = target_fingerprint(model, method, targets)
    # Build everything before touching the model, so an error leaves it as it was.
    shared = cls.create_shared(infos, config, init=init)
    built: dict[str, Adapter] = {}
    for info in infos:
        adapter = cls(info, config, shared, init=init)
        adapter.train(modules[info.name].training)  # follow the model's train/eval mode (dropout)
        if init:
            adapter.init_from_base(weight_view(modules[info.name]))
        built[info.name] = adapter

    if shared is not None:
        if not hasattr(model, SHARED):
            model.add_module(SHARED, nn.ModuleDict())
        getattr(model, SHARED)[name] = shared
    for t, adapter in built.items():
        module = modules[t]
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module)
            _replace(model, t, module)
        module.add_adapter(name, adapter)
    _records(model)[name] = AdapterRecord(name, method, config, targets, fp)
    set_active(model, [name])
    if init:
        try:
            cls.initialize(model, name, built, config, **runtime)
        except BaseException:
            remove(model, name)
            raise
    return model


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# --- activation, trainability ---------------------------------------------------------------------------------
def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Make exactly ``names`` active: their updates add up in forward and their tensors train.

    Everything else in the model is frozen. Raises :class:`AdapterStateError` for unknown names or while
    adapters are merged (unmerge first).
    """
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        _record(model, n)
    layers = list(adapted_layers(model))
    if any(layer.merged for _, layer in layers) and set(names) != set(active_adapters(model)):
        raise AdapterStateError("cannot change the active adapters while some are merged; unmerge first")
    model.__dict__[_ACTIVE] = names
    for _, layer in layers:
        layer.active = [n for n in names if n in layer.adapters]
    _refresh_trainable(model)


def _refresh_trainable(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.named_parameters())
    for n in active_adapters(model):
        rec = _record(model, n)
        if rec.is_layer_method:
            for adapter in adapter_modules(model, n).values():
                for p in adapter.parameters():
                    p.requires_grad_(True)
        else:
            for pn in rec.targets:
                params[pn].requires_grad_(True)


# --- merge ----------------------------------------------------------------------------------------------
def merge(model: nn.Module) -> nn.Module:
    """Fold every active adapter into its base weights (``W <- W0 + delta_weight()``). Idempotent.

    Raises:
        AdapterStateError: an adapted weight is tied to another module (e.g. an embedding tied to the
            output head): merging would change both. Nothing is merged then.
    """
    layers = list(adapted_layers(model))
    owners: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{mod_name}.{p_name}")
    for name, layer in layers:
        if layer.pending() and len(owners.get(id(layer.base.weight), [])) > 1:
            raise AdapterStateError(
                f"cannot merge into {name}: its weight is tied to {owners[id(layer.base.weight)]}; merging "
                "would change every tied module. Untie the weights first or keep the adapter unmerged.")
    for _, layer in layers:
        layer.merge()
    return model


_merge_model = merge  # detach's ``merge`` argument shadows the function


def unmerge(model: nn.Module) -> nn.Module:
    """Exactly undo :func:`merge` (up to the weight dtype's rounding). Idempotent."""
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


# --- removal ----------------------------------------------------------------------------------------------
def remove(model: nn.Module, name: str) -> nn.Module:
    """Delete adapter ``name`` (unmerging it first). Layers left with no adapter are unwrapped.

    Removing ``full`` only stops tracking it: its trained weights stay in the model.
    """
    rec = _record(model, name)
    if rec.is_layer_method:
        for t in rec.targets:
            layer = model.get_submodule(t)
            if not isinstance(layer, AdaptedLayer) or name not in layer.adapters:
                continue
            layer.unmerge([name])
            del layer.adapters[name]
            layer.active = [n for n in layer.active if n != name]
            if len(layer.adapters) == 0:
                _replace(model, t, layer.base)
        store = getattr(model, SHARED, None)
        if store is not None and name in store:
            del store[name]
            if len(store) == 0:
                delattr(model, SHARED)
    del _records(model)[name]
    model.__dict__[_ACTIVE] = [n for n in active_adapters(model) if n != name]
    _refresh_trainable(model)
    return model


def detach(model: nn.Module, merge: bool = True) -> nn.Module:
    """Return ``model`` as a plain model with no lorakit modules left.

    Args:
        merge: fold the active adapters into the base weights first (otherwise every adapter is dropped
            and the base weights are restored by unmerging).

    All parameters are made trainable again, as in a freshly loaded model.
    """
    if merge:
        _merge_model(model)
    else:
        unmerge(model)
    layers = list(adapted_layers(model))
    for path, layer in layers:
        _replace(model, path, layer.base)
    if hasattr(model, SHARED):
        delattr(model, SHARED)
    model.__dict__.pop(_RECORDS, None)
    model.__dict__.pop(_ACTIVE, None)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
