"""Saving and loading adapters: ``adapter.safetensors`` + ``adapter.json``, no pickle anywhere.

``adapter.json`` holds the method, its options, the wrapped module names, every tensor's shape, the lorakit
version, a fingerprint of the base weights the adapter was trained on, and the SHA-256 of the tensor file
(so truncation or corruption is detected before anything touches the model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lorakit._version import __version__
from lorakit.adapt.model import (
    adapter_tensors,
    attach_config,
    base_identity,
    check_fits,
    get_record,
    target_shapes,
)
from lorakit.core.layers import SAMPLINGS
from lorakit.errors import AdapterFileError, ConfigError, IncompatibleAdapterError
from lorakit.formats.layout import FORMAT, FORMAT_VERSION, META_FILE, TENSORS_FILE, is_peft_dir, output_dir
from lorakit.formats.peft_import import load_peft
from lorakit.methods import get_method
from lorakit.util.arguments import checked
from lorakit.util.files import atomic_write, sha256_file, write_json


@checked
def save(model: nn.Module, path: str | os.PathLike[str], name: str = "default",
         extra: dict[str, Any] | None = None) -> Path:
    """Write adapter ``name`` to directory ``path`` (created if needed); returns the directory.

    Both files are written atomically (temp file + rename), tensors first, so an interrupted save never
    leaves a readable but inconsistent adapter.
    """
    rec = get_record(model, name)
    out = output_dir(path)
    # clone: safetensors refuses tensors that share storage (views, tied tensors)
    tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in adapter_tensors(model, name).items()}
    atomic_write(out / TENSORS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lorakit_version": __version__,
        "name": name,
        "method": rec.method,
        "config": rec.config.model_dump(mode="json"),
        "targets": rec.targets,
        "layer_shapes": target_shapes(model, name),
        "shapes": {k: list(t.shape) for k, t in tensors.items()},
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "base_fingerprint": rec.fingerprint,
        "base_sketch": rec.sketch,
        "base_exact": rec.base_exact,
        "base_sampling": rec.sampling,
        "tensors_sha256": sha256_file(out / TENSORS_FILE),
        "extra": {**rec.extra, **(extra or {})},
    }
    write_json(out / META_FILE, meta)
    return out


@checked
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
    if sha256_file(tensor_path) != meta["tensors_sha256"]:
        raise AdapterFileError(f"{tensor_path}: checksum mismatch, the file is truncated or corrupted")
    try:
        loaded = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{tensor_path}: unreadable tensor file ({e})") from None
    if {k: list(v.shape) for k, v in loaded.items()} != meta["shapes"]:
        raise AdapterFileError(f"{d}: tensor file and metadata disagree on tensor names or shapes")
    return meta, loaded


@checked
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
    :func:`lorakit.formats.peft_import.load_peft` (it has no fingerprint, so ``force`` does not apply).
    """
    if is_peft_dir(path):
        return load_peft(model, path, name)
    meta, tensors = read_adapter(path)
    if name is None:
        name = meta.get("name") or "default"
    method, targets = meta["method"], list(meta["targets"])
    shapes = meta.get("layer_shapes")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets) \
            or not isinstance(shapes, dict) or sorted(targets) != sorted(shapes):
        raise AdapterFileError(f"{path}: corrupted metadata (targets and layer_shapes disagree)")
    try:
        config = saved_config(method, meta["config"])
    except ConfigError as e:
        raise AdapterFileError(f"{path}: saved options are not valid for method {method!r} ({e})") from None
    check_fits(model, method, shapes)
    sketch, exact = _saved_sketch(meta, path)
    sampling = saved_sampling(meta, path)
    ident = base_identity(model, method, targets, sampling)
    if not force and not ident.matches(meta["base_fingerprint"], sketch, exact):
        hint = ""
        if not (ident.exact and exact) and not sketch:
            hint = (" (one side is a base quantized outside lorakit and the adapter, saved by lorakit "
                    f"{meta.get('lorakit_version', '?')}, has no base sketch to compare through the quantization)")
        raise IncompatibleAdapterError(
            f"{path}: adapter was trained on different base weights (fingerprint {meta['base_fingerprint']} "
            f"!= this model's {ident.fingerprint}){hint}; pass force=True to load anyway")
    attach_config(model, config, method, name=name, targets=targets, init=False, tensors=tensors)
    rec = get_record(model, name)
    rec.fingerprint, rec.sketch, rec.base_exact, rec.sampling = meta["base_fingerprint"], sketch or [], exact, sampling
    rec.extra = dict(meta.get("extra") or {})
    return model


def saved_sampling(meta: dict[str, Any], path: str | os.PathLike[str]) -> str:
    """How the saved fingerprint sampled the base weights (files without ``base_sampling`` predate ``exact``)."""
    sampling = meta.get("base_sampling", "linspace")
    if sampling not in SAMPLINGS:
        raise AdapterFileError(f"{path}: corrupted metadata (base_sampling {sampling!r} is not one of "
                               f"{', '.join(SAMPLINGS)})")
    return sampling


def _saved_sketch(meta: dict[str, Any], path: str | os.PathLike[str]) -> tuple[list[float] | None, bool]:
    """The saved base sketch (``None`` if the adapter predates it) and whether the saved fingerprint is exact."""
    sketch = meta.get("base_sketch")
    exact = meta.get("base_exact", True)
    if sketch is not None and (not isinstance(sketch, list) or not all(isinstance(v, (int, float)) for v in sketch)):
        raise AdapterFileError(f"{path}: corrupted metadata (base_sketch is not a list of numbers)")
    if not isinstance(exact, bool):
        raise AdapterFileError(f"{path}: corrupted metadata (base_exact is not a boolean)")
    return sketch, exact


def saved_config(method: str, options: Any) -> Any:
    """The validated config of a saved adapter: options added since the file was written take the values that
    reproduce what it computed (:attr:`lorakit.Method.legacy_defaults`), not today's defaults."""
    cls = get_method(method)
    if isinstance(options, dict):
        options = {**{k: v for k, v in cls.legacy_defaults.items() if k not in options}, **options}
    return cls.config_cls.parse(options)
