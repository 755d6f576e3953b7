"""Continuing an adapter on new data (``adapter.continue_from``), and the lineage every saved adapter records.

A run with ``adapter.continue_from: runs/v3`` (a run directory or an adapter directory) starts from that adapter's
weights instead of a fresh one: the same method, its saved options (an option the config sets differently is an
error, not a silent change), loaded onto a base the parent's fingerprint accepts. The new adapter's
``adapter.json`` ``extra`` records:

* ``data``: the training data of this run (``train`` as configured, and the file's ``sha256`` when it is a file);
* ``lineage``: the parent's lineage followed by the parent itself (its path, the SHA-256 of its tensors, its
  trained steps, run fingerprint and data), oldest first; ``lorakit inspect`` shows it.

An interrupted continuation resumes from its own checkpoints like any run (``--resume``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.errors import ConfigError
from lorakit.formats.layout import META_FILE, TENSORS_FILE
from lorakit.formats.native import load as load_adapter
from lorakit.formats.native import read_adapter
from lorakit.train.config import AdapterSection, TrainConfig
from lorakit.util import resources


def adapter_dir(path: str | Path) -> Path:
    """``path`` itself when it holds ``adapter.json``, else its ``adapter/`` (a run directory)."""
    p = Path(path)
    if not (p / META_FILE).is_file() and (p / "adapter" / META_FILE).is_file():
        return p / "adapter"
    return p


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def continue_adapter(model: nn.Module, section: AdapterSection, log: Callable[[str], None]) -> None:
    """Load the parent adapter ``section.continue_from`` onto ``model`` under ``section.name``.

    Raises:
        ConfigError: the parent is of another method, or the config sets one of its options differently.
        AdapterFileError, IncompatibleAdapterError: no adapter there, or one trained on another base.
    """
    assert section.continue_from is not None
    parent = adapter_dir(section.continue_from)
    meta, _ = read_adapter(parent, tensors=False)
    if meta["method"] != section.method:
        raise ConfigError(f"adapter.continue_from: {parent} is a {meta['method']!r} adapter but adapter.method is "
                          f"{section.method!r}; set adapter.method: {meta['method']}")
    saved = meta.get("config") or {}
    clash = {k: (v, saved[k]) for k, v in section.options.items() if k in saved and saved[k] != v
             and not (isinstance(v, (int, float)) and isinstance(saved[k], (int, float)) and float(v) == saved[k])}
    if clash:
        raise ConfigError("adapter.continue_from: the parent adapter was trained with other options (continuing keeps "
                          "them; drop these keys or start a new adapter): "
                          + ", ".join(f"{k}={v!r} (parent: {p!r})" for k, (v, p) in clash.items()))
    load_adapter(model, parent, name=section.name)
    steps = (meta.get("extra") or {}).get("trained_steps")
    log(f"continuing the {meta['method']} adapter of {parent}" + (f" ({steps} steps trained)" if steps else "")
        + ", " + ", ".join(f"{k}={v}" for k, v in saved.items() if k != "targets"))


def lineage_extra(cfg: TrainConfig) -> dict[str, Any]:
    """What a saved adapter records about its data and ancestry (``adapter.json`` ``extra``)."""
    train = cfg.data.train
    data: dict[str, Any] = {"train": train if isinstance(train, str) else None}
    if isinstance(train, str):
        local = resources.resolve(train, what="data.train") if resources.is_bundled(train) else train
        if Path(local).is_file():
            data["sha256"] = file_sha256(local)
    out: dict[str, Any] = {"data": data}
    if cfg.adapter.continue_from:
        parent = adapter_dir(cfg.adapter.continue_from)
        meta, _ = read_adapter(parent, tensors=False)
        extra = meta.get("extra") or {}
        entry = {"path": str(parent.resolve()), "sha256": file_sha256(parent / TENSORS_FILE),
                 "trained_steps": extra.get("trained_steps"), "run": extra.get("run"), "data": extra.get("data")}
        out["lineage"] = [*(extra.get("lineage") or []), entry]
    return out


__all__ = ["adapter_dir", "continue_adapter", "file_sha256", "lineage_extra"]
