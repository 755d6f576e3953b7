"""Hot-swapping an adapter's weights in place: a new saved adapter into a loaded one, with no new tensors.

:func:`hot_swap` copies (``Tensor.copy_``) the tensors of a saved adapter into the tensors of adapter ``name``
already on the model, so everything that holds those tensors keeps working unchanged: a ``torch.compile``-d model
does not recompile, CUDA graphs and optimizers keep their pointers. What can be swapped:

- the same method on the same target layers (same shapes ``(d_out, d_in)``);
- the same options, except the ones the method declares free (:attr:`~lorakit.Method.swap_free_options`: those
  that only set the rank or the scale, the init or training-time behaviour; and ``targets``, which the target
  list replaces);
- for the rank-padded methods (LoRA, rsLoRA, DoRA, LoRA-FA, Delta-LoRA, LoRA-XS/SB, rank1-sum), a saved rank
  ``r' <= r``: ``A``-side tensors get ``r - r'`` zero rows, ``B``-side tensors zero columns (``R``, gates, masks
  zeros), so the extra components contribute nothing, and the scale difference is folded into ``B``::

      s' B' A' = s (c B'_pad) A'_pad,       c = s' / s       (s = alpha / r, or alpha / sqrt(r) for rsLoRA)

  The update is therefore exactly the saved adapter's (the live adapter keeps its own ``r``, ``alpha`` and
  dropout; saving it afterwards writes the padded form, which is the same function). A larger saved rank does not
  fit the existing tensors and is refused; so is any other shape change (VeRA's ``r``).

Everything is validated before the first copy: the saved adapter is first loaded into scratch modules by the
method's own loader (shape checks, VeRA's checksum, rank1-sum's per-layer ranks), then padded and compared with the
live tensors, and only then copied. An error leaves the model unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapt.model import target_fingerprint, target_shapes
from lorakit.adapt.records import get_record, shared_module
from lorakit.adapt.tensors import fill_modules
from lorakit.core.contract import Adapter
from lorakit.core.layers import LayerInfo
from lorakit.errors import AdapterFileError, AdapterStateError, ConfigError, IncompatibleAdapterError
from lorakit.formats.native import read_adapter, saved_config, saved_sampling
from lorakit.util.arguments import checked


def _scale(config: Any) -> float | None:
    s = getattr(config, "scale", None)
    return float(s) if isinstance(s, (int, float)) else None


def _pad(key: str, saved: Tensor, live: Tensor, where: str, rank_dims: Mapping[str, tuple[int, ...]]) -> Tensor:
    """``saved`` zero-padded along its rank dimensions (the method's :attr:`~lorakit.Adapter.rank_dims`) to
    ``live``'s shape, or an :class:`IncompatibleAdapterError`."""
    if saved.shape == live.shape:
        return saved
    dims = rank_dims.get(key.rsplit(".", 1)[-1], ())
    if saved.dim() != live.dim() or any(
            saved.shape[d] != live.shape[d] for d in range(live.dim()) if d not in dims):
        raise IncompatibleAdapterError(f"{where}{key}: saved shape {tuple(saved.shape)} cannot replace "
                                       f"{tuple(live.shape)}")
    if any(saved.shape[d] > live.shape[d] for d in dims):
        raise IncompatibleAdapterError(
            f"{where}{key}: the saved rank is larger than the loaded adapter's (shape {tuple(saved.shape)} vs "
            f"{tuple(live.shape)}); hot_swap only pads a smaller rank with zeros. Load the adapter instead "
            "(lorakit.load), or attach the loaded one with a larger r")
    out = saved.new_zeros(live.shape)
    out[tuple(slice(0, n) for n in saved.shape)] = saved
    return out


@checked
def hot_swap(model: nn.Module, name: str, path: str | os.PathLike[str], *, force: bool = False) -> nn.Module:
    """Replace the weights of loaded adapter ``name`` in place with those saved in ``path``.

    Args:
        model: the model holding adapter ``name`` (possibly wrapped by ``torch.compile``: pass the original module
            or the compiled one, both share the tensors).
        name: an adapter of ``model`` (not merged).
        path: a lorakit adapter directory (:func:`lorakit.save`) of the same method on the same target layers.
        force: swap even if the saved adapter was trained on different base weights (fingerprint mismatch).

    Returns:
        ``model``.

    Raises:
        AdapterFileError: missing, truncated or corrupted files.
        IncompatibleAdapterError: another method, other target layers or shapes, options that change the function,
            a larger rank, or (unless ``force``) other base weights.
        AdapterStateError: ``name`` is unknown, merged, full fine-tuning, or a Delta-LoRA whose drift is in the
            base weights.
        The model is unchanged after any error.
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile-d module: its tensors are the original's
    rec = get_record(model, name)
    where = f"{path}: "
    if not rec.is_layer_method:
        raise AdapterStateError(f"hot_swap: {name!r} is full fine-tuning; its weights are the model's own: load the "
                                "checkpoint instead")
    merged = [t for t in rec.targets if name in getattr(model.get_submodule(t), "merged", [])]
    if merged:
        raise AdapterStateError(f"hot_swap: adapter {name!r} is merged; call lorakit.unmerge(model) first")
    refused = [(t, why) for t, ad in rec.modules.items() if (why := ad.swap_refusal())]
    if refused:
        raise AdapterStateError(f"hot_swap: adapter {name!r} on {[t for t, _ in refused][:3]}: {refused[0][1]}")

    meta, saved = read_adapter(path)
    if meta["method"] != rec.method:
        raise IncompatibleAdapterError(f"{where}method {meta['method']!r} cannot replace adapter {name!r} of method "
                                       f"{rec.method!r}")
    targets = meta["targets"]
    if not isinstance(targets, list) or sorted(targets) != sorted(rec.targets):
        extra = sorted(set(targets) - set(rec.targets)) if isinstance(targets, list) else targets
        missing = sorted(set(rec.targets) - set(targets)) if isinstance(targets, list) else []
        raise IncompatibleAdapterError(f"{where}targets differ from adapter {name!r}'s (only saved: {extra[:5]}, only "
                                       f"loaded: {missing[:5]}); hot_swap needs the same target layers")
    shapes = target_shapes(model, name)
    if meta.get("layer_shapes") != shapes:
        raise IncompatibleAdapterError(f"{where}the saved layer shapes differ from this model's")
    cls = rec.method_cls
    try:
        config = saved_config(rec.method, meta["config"])
    except ConfigError as e:
        raise AdapterFileError(f"{where}saved options are not valid for method {rec.method!r} ({e})") from None
    live_opts, new_opts = rec.config.model_dump(), config.model_dump()
    free = cls.swap_free_options | {"targets"}
    changed = sorted(k for k in live_opts.keys() | new_opts.keys()
                     if k not in free and live_opts.get(k) != new_opts.get(k))
    if changed:
        raise IncompatibleAdapterError(
            f"{where}options {changed} differ from adapter {name!r}'s ({[new_opts.get(k) for k in changed]} vs "
            f"{[live_opts.get(k) for k in changed]}); hot_swap replaces weights, not the method's form")
    sampling = saved_sampling(meta, path)
    fp = target_fingerprint(model, rec.method, rec.targets, sampling)
    if fp != meta["base_fingerprint"] and not force:
        raise IncompatibleAdapterError(
            f"{where}adapter was trained on different base weights (fingerprint {meta['base_fingerprint']} != this "
            f"model's {fp}); pass force=True to swap anyway")

    # 1. the method's own loader on scratch modules built at the saved options: every per-method check runs
    assert issubclass(cls, Adapter)
    infos = [LayerInfo.of(t, model.get_submodule(t)) for t in rec.targets]
    try:
        for info in infos:
            cls.check_layer(info, config)
    except ConfigError as e:
        raise IncompatibleAdapterError(f"{where}{e}") from None
    scratch_shared = cls.create_shared(infos, config, init=False)
    scratch = {info.name: cls(info, config, scratch_shared, init=False) for info in infos}
    fill_modules(scratch, scratch_shared, saved, method=rec.method, where=where)

    # 2. pad to the live shapes, fold the scale, compare with every live tensor
    new_scale, live_scale = _scale(config), _scale(rec.config)
    ratio = 1.0 if new_scale is None or live_scale is None else new_scale / live_scale
    live: dict[str, Tensor] = {}  # "<target>.<tensor>" -> the live tensor (shares storage with the module's)
    incoming: dict[str, Tensor] = {}
    for t, module in scratch.items():
        live.update({f"{t}.{k}": v for k, v in rec.modules[t].state_dict().items()})
        incoming.update({f"{t}.{k}": v for k, v in module.state_dict().items()})
    if set(incoming) != set(live):
        raise IncompatibleAdapterError(f"{where}saved tensors {sorted(set(incoming) ^ set(live))[:5]} do not match "
                                       f"adapter {name!r}'s")
    shared = shared_module(model, name)
    shared_live = {} if shared is None else shared.state_dict()
    shared_in = {} if scratch_shared is None else scratch_shared.state_dict()
    if set(shared_in) != set(shared_live) or any(shared_in[k].shape != shared_live[k].shape for k in shared_in):
        raise IncompatibleAdapterError(f"{where}the shared tensors (VeRA's projections: its r) differ from adapter "
                                       f"{name!r}'s")
    ready: dict[str, Tensor] = {}
    for key, value in incoming.items():
        value = _pad(key, value, live[key], where, cls.rank_dims)
        if ratio != 1.0 and key.rsplit(".", 1)[-1] in cls.scaled_tensors:
            value = value * ratio
        ready[key] = value

    # 3. commit: copy into the live tensors (same shapes, checked above)
    with torch.no_grad():
        for key, value in ready.items():
            live[key].copy_(value)
        for key, value in shared_in.items():
            shared_live[key].copy_(value)
    for module in rec.modules.values():
        module.after_tensors_replaced()
    rec.fingerprint, rec.sampling = meta["base_fingerprint"], sampling
    rec.extra = dict(meta.get("extra") or {})
    return model


__all__ = ["hot_swap"]
