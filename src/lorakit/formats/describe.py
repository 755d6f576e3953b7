"""Describe a saved adapter without loading a model: what ``lorakit inspect ADAPTER_DIR`` prints.

Only ``adapter.json`` is read (and the tensor file's size): method, options, targeted layers, per-layer ranks
of dynamic-rank methods, parameter counts, the base-weight fingerprint.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from lorakit.adapt.model import SHARED_PREFIX
from lorakit.core.contract import Adapter
from lorakit.core.layers import LayerInfo, LayerKind
from lorakit.errors import UnknownMethodError
from lorakit.formats.layout import META_FILE, TENSORS_FILE
from lorakit.formats.native import read_adapter, saved_config
from lorakit.methods import get_method


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-serialisable summary of the adapter in directory ``path``.

    Returns:
        ``path``, ``name``, ``method``, ``config``, ``lorakit_version``, ``layers`` (count), ``targets``,
        ``ranks`` (per-layer live rank for dynamic-rank methods, else ``None``) and ``total_rank``,
        ``parameters`` (stored scalars), ``trainable_parameters`` (``None`` if it cannot be told without a
        model), ``dtypes``, ``base_fingerprint``, ``base_model`` (if recorded) and ``file_size_bytes``.

    Raises:
        AdapterFileError: not a readable lorakit adapter directory.
    """
    d = Path(path)
    meta, _ = read_adapter(d, tensors=False)
    extra = meta.get("extra") or {}
    shapes: dict[str, list[int]] = meta["shapes"]
    ranks = _ranks(meta)
    return {
        "path": str(d),
        "name": meta.get("name"),
        "method": meta["method"],
        "config": meta["config"],
        "lorakit_version": meta.get("lorakit_version"),
        "layers": len(meta["targets"]),
        "targets": list(meta["targets"]),
        "ranks": ranks,
        "total_rank": None if ranks is None else sum(ranks.values()),
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "trainable_parameters": _trainable(meta),
        "dtypes": meta.get("dtypes"),
        "base_fingerprint": meta["base_fingerprint"],
        "base_model": extra.get("base_model"),
        "trained_steps": extra.get("trained_steps"),
        "data": extra.get("data"),
        "lineage": extra.get("lineage") or [],
        "update": extra.get("update"),
        "file_size_bytes": sum((d / f).stat().st_size for f in (TENSORS_FILE, META_FILE)),
    }


def _ranks(meta: dict[str, Any]) -> dict[str, int] | None:
    recorded = (meta.get("extra") or {}).get("ranks")
    if isinstance(recorded, dict):
        return {str(k): int(v) for k, v in recorded.items()}
    try:
        key = get_method(meta["method"]).rank_tensor  # methods whose rank differs per layer
    except UnknownMethodError:
        key = None
    if key is None:
        return None
    # no recorded ranks: the saved capacity (masked components, if any, are counted)
    return {t: meta["shapes"][f"{t}.{key}"][0] for t in meta["targets"] if f"{t}.{key}" in meta["shapes"]}


def _trainable(meta: dict[str, Any]) -> int | None:
    """Scalars saved as parameters (not buffers): told by building the method's modules on the meta device."""
    shapes: dict[str, list[int]] = meta["shapes"]
    try:
        cls = get_method(meta["method"])
        if not cls.layer_method or not issubclass(cls, Adapter):  # full fine-tuning: every tensor trains
            return sum(math.prod(s) for s in shapes.values())
        config = saved_config(meta["method"], meta["config"])
        infos = [LayerInfo(t, LayerKind.LINEAR, s[1], s[0], torch.float32, torch.device("meta"))
                 for t, s in meta["layer_shapes"].items()]
        shared = cls.create_shared(infos, config, init=False)
        trainable = {SHARED_PREFIX + n for n, _ in shared.named_parameters()} if shared is not None else set()
        for info in infos:
            module = cls(info, config, shared, init=False)
            trainable |= {f"{info.name}.{n}" for n, _ in module.named_parameters()}
    except Exception:  # a method that cannot be built without real tensors: leave it unknown
        return None
    return sum(math.prod(s) for k, s in shapes.items() if k in trainable)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def format_description(d: dict[str, Any]) -> str:
    """Human-readable text of :func:`describe`'s result, one fact per line, then the per-layer ranks."""
    trainable = d.get("trainable_parameters")
    params = f"{d['parameters']:,} stored" + (f", {trainable:,} trainable" if trainable is not None else "")
    config = ", ".join(f"{k}={v}" for k, v in d["config"].items())
    lines = [
        f"adapter:     {d['path']} (name {d.get('name')!r}, lorakit {d.get('lorakit_version')})",
        f"method:      {d['method']}",
        f"config:      {config}",
        f"layers:      {d['layers']}",
        f"parameters:  {params} ({_size(d['file_size_bytes'])} on disk, {', '.join(d.get('dtypes') or [])})",
        f"base:        fingerprint {d['base_fingerprint']}"
        + (f", model {d['base_model']}" if d.get("base_model") else ""),
    ]
    ranks: dict[str, int] | None = d.get("ranks")
    if ranks:
        values = list(ranks.values())
        lines.append(f"ranks:       total {sum(values)}, mean {sum(values) / len(values):.2f}, "
                     f"min {min(values)}, max {max(values)}")
        width = max(len(n) for n in ranks)
        lines += [f"  {n:<{width}}  {r}" for n, r in ranks.items()]
    if d.get("lineage"):  # continued from earlier adapters (adapter.continue_from): oldest first
        lines.append("lineage:     oldest first")
        for i, e in enumerate(d["lineage"]):
            lines.append(f"  {i + 1}. {e.get('path')}: {e.get('trained_steps')} steps on "
                         f"{(e.get('data') or {}).get('train') or '?'} (tensors {str(e.get('sha256'))[:12]})")
        lines.append(f"  -> this adapter: {d.get('trained_steps')} more steps on "
                     f"{(d.get('data') or {}).get('train') or '?'}")
    update = d.get("update") or {}
    growth = update.get("growth") or {}
    if growth:
        lines.append(f"growth:      +{growth.get('added', 0)} components of adapter.grow={growth.get('requested')} "
                     f"({100 * growth.get('unknown_share', 0):.1f}% of the new data unknown), over "
                     f"{len(growth.get('layers') or {})} layers; total rank {growth.get('total_rank_before')} -> "
                     f"{growth.get('total_rank_grown')} grown -> {d.get('total_rank')} after pruning")
    if update.get("replayed"):
        lines.append(f"replay:      {update['replayed']} examples of earlier updates trained with the new data")
    if update.get("retention"):  # held-out loss of each earlier update, before and after this one
        lines.append("retention:   held-out loss of each earlier update, before -> after this one")
        for r in update["retention"]:
            after = r.get("loss_after")
            lines.append(f"  update {r['update']} ({r.get('train') or '?'}): {r['loss_before']:.4f} -> "
                         + ("?" if after is None else f"{after:.4f} ({r['change']:+.4f})"))
    return "\n".join(lines)
