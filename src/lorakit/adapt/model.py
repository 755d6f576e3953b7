"""Attaching adapters to a model and managing them: the functions behind lorakit's public API.

The adapt layer (this module, :mod:`~lorakit.adapt.records` and :mod:`~lorakit.adapt.tensors`) is the one place
that knows the two kinds of method (:attr:`lorakit.Method.layer_method`): layer adapters, whose tensors live in
:class:`~lorakit.core.layers.AdaptedLayer` modules, and full fine-tuning, which trains the base parameters
themselves. Everything above it (saving, loading, export, training) goes through
:class:`~lorakit.adapt.records.AdapterRecord` and the functions here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapt.records import (
    _ACTIVE,
    _RECORDS,
    SHARED,
    AdapterRecord,
    active_adapters,
    adapter_modules,
    adapters,
    base_identity,
    get_record,
    records_of,
    shared_module,
    target_fingerprint,
    trainable_parameters,
)
from lorakit.adapt.targets import find_targets
from lorakit.adapt.tensors import (
    SHARED_PREFIX,
    adapter_tensors,
    check_fits,
    check_parameters,
    copy_parameters,
    fill,
    fill_modules,
    target_shapes,
)
from lorakit.core.callbacks import Callbacks
from lorakit.core.contract import Adapter, AdapterConfig
from lorakit.core.experts import find_module, wrap_for
from lorakit.core.experts import uninstall as unwrap_experts
from lorakit.core.layers import AdaptedLayer, LayerInfo, adapted_layers, base_weight
from lorakit.errors import AdapterStateError, ConfigError
from lorakit.methods import get_method
from lorakit.methods.full import Full
from lorakit.util.arguments import Range, checked


# --- attach --------------------------------------------------------------------------------------------------
@checked
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
    runtime = {k: options.pop(k) for k in list(options) if k in cls.runtime_options}
    return attach_config(model, cls.config_cls.parse(options), method, name=name, runtime=runtime)


def attach_config(model: nn.Module, config: AdapterConfig, method: str, *, name: str = "default",
                  targets: list[str] | None = None, init: bool = True, runtime: dict[str, Any] | None = None,
                  tensors: Mapping[str, Tensor] | None = None, where: str = "") -> nn.Module:
    """:func:`attach` with options already validated into ``config`` (what the trainer and loading use).

    Args:
        targets: the exact module (or, for ``full``, parameter) names to adapt instead of resolving
            ``config.targets`` (a saved adapter's, in model order).
        init: initialise the tensors as the method prescribes; ``False`` when they are filled from
            ``tensors`` (costly inits such as an SVD, and data-driven inits, are skipped).
        runtime: runtime-only inputs of the method (LoRA-SB's ``init_batches``).
        tensors: saved tensors to fill the adapter with (keyed as :func:`adapter_tensors` keys them).
        where: prefix of error messages about ``tensors`` (the file they came from).

    Prepare, then commit: every module is built, checked and filled before the model is touched, so an error
    leaves the model exactly as it was; a data-driven init, which must run on the attached model, is undone
    (modules, ``requires_grad`` flags, active adapters) if it fails.
    """
    cls = get_method(method)
    if not isinstance(config, cls.config_cls):
        raise ConfigError(f"method {method!r} takes a {cls.config_cls.__name__}, got {type(config).__name__}")
    runtime = dict(runtime or {})
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in records_of(model):
        raise AdapterStateError(f"model already has an adapter named {name!r}; remove it or pick another name")
    if any(layer.merged for _, layer in adapted_layers(model)):
        raise AdapterStateError("cannot attach an adapter while others are merged; call lorakit.unmerge(model) first")

    if not cls.layer_method:  # full fine-tuning: the selected base parameters themselves train
        if runtime:
            raise ConfigError(f"method {method!r} takes no option(s) {sorted(runtime)}")
        chosen = targets or Full.select(model, config)  # type: ignore[arg-type]
        Full.check_quantized(model, chosen)
        params = dict(model.named_parameters())
        if tensors is not None:
            check_parameters(params, chosen, tensors, where=where)
        ident = base_identity(model, method, chosen)
        record = AdapterRecord(name, method, config, chosen, ident.fingerprint, sketch=ident.sketch,
                               base_exact=ident.exact)
        if tensors is not None:  # commit
            copy_parameters(params, tensors)
        records_of(model)[name] = record
        set_active(model, [name])
        return model

    assert issubclass(cls, Adapter)
    if init:
        cls.check_runtime(runtime)
    elif runtime:
        raise ConfigError(f"runtime options {sorted(runtime)} only apply to a fresh init")
    chosen = targets or find_targets(model, config.targets)
    modules = {t: find_module(model, t) for t in chosen}  # an expert not wrapped yet: a view of its slice
    infos = [LayerInfo.of(t, m) for t, m in modules.items()]
    for info in infos:
        cls.check_layer(info, config)
    ident = base_identity(model, method, chosen)
    # prepare: build (and fill) everything before touching the model
    shared = cls.create_shared(infos, config, init=init)
    built: dict[str, Adapter] = {}
    for info in infos:
        adapter = cls(info, config, shared, init=init)
        adapter.train(modules[info.name].training)  # follow the model's train/eval mode (dropout)
        if init:
            adapter.init_from_base(base_weight(modules[info.name]))  # dequantized, one layer at a time
        built[info.name] = adapter
    if tensors is not None:
        fill_modules(built, shared, tensors, method=method, where=where)

    before = _State.of(model)  # commit
    if shared is not None:
        if not hasattr(model, SHARED):
            model.add_module(SHARED, nn.ModuleDict())
        getattr(model, SHARED)[name] = shared
    wrap_for(model, chosen)  # experts modules reached: their per-expert layers become modules of the model
    layers: dict[str, AdaptedLayer] = {}
    for t, adapter in built.items():
        module = model.get_submodule(t)
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module)
            _replace(model, t, module)
        module.add_adapter(name, adapter)
        layers[t] = module
    records_of(model)[name] = AdapterRecord(name, method, config, chosen, ident.fingerprint, built,
                                          sketch=ident.sketch, base_exact=ident.exact)
    set_active(model, [name])
    if init:
        try:
            cls.initialize(model, built, layers, config, **runtime)
        except BaseException:
            remove(model, name)
            before.restore(model)
            raise
    return model


@dataclass
class _State:
    """What attaching changes besides the new adapter itself: ``requires_grad`` flags and the active adapters."""

    flags: list[tuple[nn.Parameter, bool]]
    active: list[str]

    @classmethod
    def of(cls, model: nn.Module) -> _State:
        return cls([(p, p.requires_grad) for p in model.parameters()], active_adapters(model))

    def restore(self, model: nn.Module) -> None:
        model.__dict__[_ACTIVE] = list(self.active)
        for _, layer in adapted_layers(model):
            layer.active = [n for n in self.active if n in layer.adapters]
        for p, flag in self.flags:
            p.requires_grad_(flag)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# --- activation, trainability ---------------------------------------------------------------------------------
@checked
def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Make exactly ``names`` active: their updates add up in forward and their tensors train.

    Everything else in the model is frozen. Raises :class:`AdapterStateError` for unknown names or while
    adapters are merged (unmerge first).
    """
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        get_record(model, n)
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
        rec = get_record(model, n)
        if rec.is_layer_method:
            for adapter in rec.modules.values():
                for p in adapter.parameters():
                    p.requires_grad_(True)
        else:
            for pn in rec.targets:
                params[pn].requires_grad_(True)


# --- merge ----------------------------------------------------------------------------------------------
@checked
def merge(model: nn.Module) -> nn.Module:
    """Fold every active adapter into its base weights (``W <- W0 + delta_weight()``). Idempotent.

    Raises:
        AdapterStateError: an adapted weight is tied to another module (e.g. an embedding tied to the
            output head): merging would change both. Nothing is merged then.
    """
    layers = list(adapted_layers(model))
    quantized = [name for name, layer in layers if layer.pending() and layer.quant is not None]
    if quantized:
        raise AdapterStateError(
            f"cannot merge in place into a quantized base ({len(quantized)} layers, e.g. {quantized[0]} is "
            f"{dict(layers)[quantized[0]].quant}): W0 + dW does not fit in 4/8-bit weights. Call "
            "lorakit.dequantize(model) first (the merged model is then dense), or keep the adapter unmerged")
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


@checked
def unmerge(model: nn.Module) -> nn.Module:
    """Exactly undo :func:`merge` (up to the weight dtype's rounding). Idempotent."""
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


# --- removal ----------------------------------------------------------------------------------------------
@checked
def remove(model: nn.Module, name: str) -> nn.Module:
    """Delete adapter ``name`` (unmerging it first). Layers left with no adapter are unwrapped.

    Removing ``full`` only stops tracking it: its trained weights stay in the model.
    """
    rec = get_record(model, name)
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
        unwrap_experts(model)
        store = getattr(model, SHARED, None)
        if store is not None and name in store:
            del store[name]
            if len(store) == 0:
                delattr(model, SHARED)
    del records_of(model)[name]
    model.__dict__[_ACTIVE] = [n for n in active_adapters(model) if n != name]
    _refresh_trainable(model)
    return model


@checked
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
    unwrap_experts(model)
    if hasattr(model, SHARED):
        delattr(model, SHARED)
    model.__dict__.pop(_RECORDS, None)
    model.__dict__.pop(_ACTIVE, None)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# --- training rules ----------------------------------------------------------------------------------------------
@checked(total_steps=Range(ge=1))
def training_callbacks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                       total_steps: int) -> Callbacks:
    """The callbacks every active adapter's method needs for training (empty for most methods).

    Each method gets its own per-layer modules and the layers they live in (:meth:`lorakit.Adapter.callbacks`).
    """
    out = Callbacks()
    for name in active_adapters(model):
        rec = get_record(model, name)
        cls = rec.method_cls
        if rec.modules and issubclass(cls, Adapter):
            layers = {t: model.get_submodule(t) for t in rec.modules}
            out.extend(cls.callbacks(name, rec.modules, layers, rec.config, optimizer=optimizer,
                                     total_steps=total_steps))
    return out


__all__ = ["SHARED", "SHARED_PREFIX", "AdapterRecord", "active_adapters", "adapter_modules", "adapter_tensors", "get_record",
           "records_of",
           "adapters", "attach", "attach_config", "check_fits", "detach", "fill", "merge", "remove", "set_active",
           "shared_module", "target_fingerprint", "target_shapes", "trainable_parameters", "training_callbacks",
           "unmerge"]
