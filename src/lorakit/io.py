"""Saving and loading adapters: ``adapter.safetensors`` + ``adapter.json``, no pickle anywhere.

``adapter.json`` holds the method, its options, the wrapped module names, every tensor's shape, the lorakit
version, a fingerprint of the base weights the adapter was trained on, and the SHA-256 of the tensor file
(so truncation or corruption is detected before anything touches the model).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import __version__
from .errors import AdapterFileError, IncompatibleAdapterError
from .model import (
    AdapterRecord,
    _record,
    adapter_modules,
    attach,
    remove,
    shared_module,
    target_fingerprint,
)
from .layers import layer_kind, weight_view

FORMAT = "lorakit-adapter"
FORMAT_VERSION = 1
TENSORS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
SHARED_PREFIX = "__shared__."


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(tmp_path)`` then rename over ``path``: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def adapter_tensors(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Every tensor that defines adapter ``name``, keyed as saved (``<module>.<tensor>``)."""
    rec = _record(model, name)
    out: dict[str, Tensor] = {}
    if rec.is_layer_method:
        for target, adapter in adapter_modules(model, name).items():
            for key, t in adapter.state_dict().items():
                out[f"{target}.{key}"] = t
        shared = shared_module(model, name)
        if shared is not None:
            for key, t in shared.state_dict().items():
                out[SHARED_PREFIX + key] = t
    else:
        params = dict(model.named_parameters())
        out = {n: params[n] for n in rec.targets}
    return out


def save(model: nn.Module, path: str | os.PathLike[str], name: str = "default",
         extra: dict[str, Any] | None = None) -> Path:
    """Write adapter ``name`` to directory ``path`` (created if needed); returns the directory.

    Both files are written atomically (temp file + rename), tensors first, so an interrupted save never
    leaves a readable but inconsistent adapter.
    """
    rec = _record(model, name)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (views, tied tensors)
    tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in adapter_tensors(model, name).items()}
    _atomic_write(out / TENSORS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lorakit_version": __version__,
        "name": name,
        "method": rec.method,
        "config": rec.config.model_dump(mode="json"),
        "targets": rec.targets,
        "layer_shapes": _layer_shapes(model, rec),
        "shapes": {k: list(t.shape) for k, t in tensors.items()},
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "base_fingerprint": rec.fingerprint,
        "tensors_sha256": _sha256(out / TENSORS_FILE),
        "extra": {**rec.extra, **(extra or {})},
    }
    _atomic_write(out / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return out


def _layer_shapes(model: nn.Module, rec: AdapterRecord) -> dict[str, list[int]]:
    if rec.is_layer_method:
        return {t: list(weight_view(model.get_submodule(t)).shape) for t in rec.targets}
    params = dict(model.named_parameters())
    return {n: list(params[n].shape) for n in rec.targets}


def read_adapter(path: str | os.PathLike[str], *, tensors: bool = True) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and verify an adapter directory: ``(metadata, tensors)``. Raises :class:`AdapterFileError`."""
    d = Path(path)
    meta_path, tensor_path = d / META_FILE, d / TENSORS_FILE
    if not d.is_dir():
        raise AdapterFileError(f"{d}: no such adapter directory")
    if not meta_path.is_file() or not tensor_path.is_file():
        raise AdapterFileError(f"{d}: not a lorakit adapter (needs {META_FILE} and {TENSORS_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{meta_path}: corrupted metadata ({e})") from None
    required = ("format", "method", "config", "targets", "shapes", "base_fingerprint", "tensors_sha256")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or any(k not in meta for k in required):
        raise AdapterFileError(f"{meta_path}: not lorakit adapter metadata (missing or wrong fields)")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterFileError(f"{d}: written by a newer lorakit ({meta.get('lorakit_version')}); upgrade lorakit")
    if not tensors:
        return meta, {}
    if _sha256(tensor_path) != meta["tensors_sha256"]:
        raise AdapterFileError(f"{tensor_path}: checksum mismatch, the file is truncated or corrupted")
    try:
        loaded = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{tensor_path}: unreadable tensor file ({e})") from None
    if {k: list(v.shape) for k, v in loaded.items()} != meta["shapes"]:
        raise AdapterFileError(f"{d}: tensor file and metadata disagree on tensor names or shapes")
    return meta, loaded


def load(model: nn.Module, path: str | os.PathLike[str], name: str | None = None, *,
         force: bool = False) -> nn.Module:
    """Attach the adapter saved in ``path`` to ``model`` and fill it; returns ``model``.

    Args:
        name: the name to give it on this model (default: the name it was saved under).
        force: load even if the base-weight fingerprint differs (e.g. a deliberately modified base).

    Raises:
        AdapterFileError: missing, truncated, corrupted or foreign files.
        IncompatibleAdapterError: the model lacks the targeted modules, their shapes differ, or (unless
            ``force``) the base weights are not the ones the adapter was trained on.
        The model is left unchanged on any error.

    A Hugging Face PEFT LoRA/DoRA directory (``adapter_config.json``, no ``adapter.json``) is read by
    :func:`lorakit.peft_format.load_peft` (it has no fingerprint, so ``force`` does not apply).
    """
    from .peft_format import is_peft_dir, load_peft  # lazy: peft_format imports this module

    if is_peft_dir(path):
        return load_peft(model, path, name)
    meta, tensors = read_adapter(path)
    name = name or meta.get("name") or "default"
    method, targets = meta["method"], list(meta["targets"])
    _check_fits(model, meta)
    fp = target_fingerprint(model, method, targets)
    if fp != meta["base_fingerprint"] and not force:
        raise IncompatibleAdapterError(
            f"{path}: adapter was trained on different base weights (fingerprint {meta['base_fingerprint']} "
            f"!= this model's {fp}); pass force=True to load anyway")
    options = dict(meta["config"])
    attach(model, method, name=name, _init=False, _modules=targets, **options)
    try:
        _fill(model, name, tensors)
    except BaseException:
        remove(model, name)
        raise
    rec = _record(model, name)
    rec.fingerprint = meta["base_fingerprint"]
    rec.extra = dict(meta.get("extra") or {})
    return model


def _check_fits(model: nn.Module, meta: dict[str, Any]) -> None:
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    problems = []
    for t, shape in (meta.get("layer_shapes") or {}).items():
        if meta["method"] == "full":
            if t not in params:
                problems.append(f"missing parameter {t}")
            elif list(params[t].shape) != shape:
                problems.append(f"{t}: shape {list(params[t].shape)} != saved {shape}")
        elif t not in modules:
            problems.append(f"missing module {t}")
        else:
            if layer_kind(modules[t]) is None:
                problems.append(f"{t}: {type(modules[t]).__name__} cannot be adapted")
                continue
            w = weight_view(modules[t])
            if list(w.shape) != shape:
                problems.append(f"{t}: weight (d_out, d_in) {list(w.shape)} != saved {shape}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise IncompatibleAdapterError(f"adapter does not fit this model: {shown}")


def _fill(model: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
    rec = _record(model, name)
    with torch.no_grad():
        if not rec.is_layer_method:
            params = dict(model.named_parameters())
            for n in rec.targets:
                params[n].copy_(tensors[n])
            return
        by_target: dict[str, dict[str, Tensor]] = {t: {} for t in rec.targets}
        shared: dict[str, Tensor] = {}
        for key, t in tensors.items():
            if key.startswith(SHARED_PREFIX):
                shared[key[len(SHARED_PREFIX):]] = t
                continue
            target, _, sub = _split_key(key, by_target)
            by_target[target][sub] = t
        store = shared_module(model, name)
        if store is not None:
            own = store.state_dict()
            if set(own) != set(shared) or any(own[k].shape != shared[k].shape for k in own):
                raise IncompatibleAdapterError("saved shared tensors do not match the method's")
            for k, v in shared.items():
                own[k].copy_(v)
        for target, adapter in adapter_modules(model, name).items():
            adapter.load_tensors(by_target[target], where=target)


def _split_key(key: str, targets: dict[str, Any]) -> tuple[str, str, str]:
    """Split ``<target>.<tensor>`` at the longest target prefix."""
    best = max((t for t in targets if key.startswith(t + ".")), key=len, default=None)
    if best is None:
        raise IncompatibleAdapterError(f"saved tensor {key!r} belongs to no targeted module")
    return best, ".", key[len(best) + 1:]
