"""What defines an adapter on disk: its tensors, the target shapes it needs, and filling it from saved tensors.

Like :mod:`lorakit.adapt.model`, it handles layer adapters and full fine-tuning (whose "adapter" is the trained
base parameters themselves) through :class:`~lorakit.adapt.records.AdapterRecord`, so the formats above never
ask which kind they hold.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lorakit.adapt.records import get_record, shared_module
from lorakit.adapt.targets import adaptable_modules
from lorakit.core.contract import Adapter
from lorakit.core.layers import layer_kind, weight_shape
from lorakit.errors import IncompatibleAdapterError
from lorakit.methods import get_method

#: Key prefix of an adapter's shared tensors (VeRA's random matrices) among its saved tensors.
SHARED_PREFIX = "__shared__."


def adapter_tensors(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Every tensor that defines adapter ``name``, keyed as saved (``<module>.<tensor>``, shared tensors under
    :data:`SHARED_PREFIX`, ``full``'s under their parameter names)."""
    rec = get_record(model, name)
    if not rec.is_layer_method:
        params = dict(model.named_parameters())
        return {n: params[n] for n in rec.targets}
    out: dict[str, Tensor] = {}
    for target, adapter in rec.modules.items():
        for key, t in adapter.state_dict().items():
            out[f"{target}.{key}"] = t
    shared = shared_module(model, name)
    if shared is not None:
        for key, t in shared.state_dict().items():
            out[SHARED_PREFIX + key] = t
    return out


def target_shapes(model: nn.Module, name: str) -> dict[str, list[int]]:
    """The shape each target must have for adapter ``name`` to fit: ``(d_out, d_in)`` of each wrapped layer, or
    each trained parameter's shape (``full``)."""
    rec = get_record(model, name)
    if rec.is_layer_method:
        return {t: list(weight_shape(model.get_submodule(t))) for t in rec.targets}
    params = dict(model.named_parameters())
    return {n: list(params[n].shape) for n in rec.targets}


def check_fits(model: nn.Module, method: str, shapes: dict[str, list[int]]) -> None:
    """Raise :class:`IncompatibleAdapterError` unless ``model`` has every target of ``shapes`` with that shape
    (see :func:`target_shapes`)."""
    layer = get_method(method).layer_method
    modules = {**dict(model.named_modules()), **dict(adaptable_modules(model))}  # experts' views included
    params = dict(model.named_parameters())
    problems = []
    for t, shape in shapes.items():
        if not layer:
            if t not in params:
                problems.append(f"missing parameter {t}")
            elif list(params[t].shape) != shape:
                problems.append(f"{t}: shape {list(params[t].shape)} != saved {shape}")
        elif t not in modules:
            problems.append(f"missing module {t}")
        elif layer_kind(modules[t]) is None:
            problems.append(f"{t}: {type(modules[t]).__name__} cannot be adapted")
        elif list(weight_shape(modules[t])) != shape:
            problems.append(f"{t}: weight (d_out, d_in) {list(weight_shape(modules[t]))} != saved {shape}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise IncompatibleAdapterError(f"adapter does not fit this model: {shown}")


@torch.no_grad()
def fill(model: nn.Module, name: str, tensors: Mapping[str, Tensor], *, where: str = "") -> None:
    """Copy saved ``tensors`` (keyed as :func:`adapter_tensors` keys them) into adapter ``name`` of ``model``."""
    rec = get_record(model, name)
    if not rec.is_layer_method:
        params = dict(model.named_parameters())
        check_parameters(params, rec.targets, tensors, where=where)
        copy_parameters(params, tensors)
        return
    fill_modules(rec.modules, shared_module(model, name), tensors, method=rec.method, where=where)


def check_parameters(params: Mapping[str, Tensor], targets: list[str], tensors: Mapping[str, Tensor], *,
                     where: str = "") -> None:
    """Refuse saved ``full`` tensors that are not exactly the ``targets`` parameters, shape for shape."""
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise IncompatibleAdapterError(f"{where}saved tensors do not match the trained parameters "
                                       f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for n in targets:
        if n not in params or tuple(params[n].shape) != tuple(tensors[n].shape):
            have = tuple(params[n].shape) if n in params else None
            raise IncompatibleAdapterError(f"{where}{n}: saved shape {tuple(tensors[n].shape)} != {have}")


@torch.no_grad()
def copy_parameters(params: Mapping[str, Tensor], tensors: Mapping[str, Tensor]) -> None:
    """Copy checked ``full`` tensors into the model's parameters."""
    for n, v in tensors.items():
        params[n].copy_(v)


@torch.no_grad()
def fill_modules(modules: Mapping[str, Adapter], shared: nn.Module | None, tensors: Mapping[str, Tensor], *,
                 method: str, where: str = "") -> None:
    """Fill per-layer adapter ``modules`` (and their ``shared`` tensors) from saved ``tensors``.

    The modules need not be attached yet: loading fills them first and attaches only what loaded.
    """
    by_target: dict[str, dict[str, Tensor]] = {t: {} for t in modules}
    saved_shared: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if key.startswith(SHARED_PREFIX):
            saved_shared[key[len(SHARED_PREFIX):]] = t
            continue
        target = max((m for m in by_target if key.startswith(m + ".")), key=len, default=None)  # longest prefix
        if target is None:
            raise IncompatibleAdapterError(f"{where}saved tensor {key!r} belongs to no targeted module")
        by_target[target][key[len(target) + 1:]] = t
    if shared is not None:
        own = shared.state_dict()
        if set(own) != set(saved_shared) or any(own[k].shape != saved_shared[k].shape for k in own):
            raise IncompatibleAdapterError(f"{where}saved shared tensors do not match the method's")
        for k, v in saved_shared.items():
            own[k].copy_(v)
    elif saved_shared:
        raise IncompatibleAdapterError(f"{where}saved shared tensors {sorted(saved_shared)} but method {method!r} "
                                       "has none")
    for target, adapter in modules.items():  # shared first: a layer may check them (VeRA's checksum)
        adapter.load_tensors(by_target[target], where=f"{where}{target}")
