"""Continuing an adapter on new data (``adapter.continue_from``), and the lineage every saved adapter records.

A run with ``adapter.continue_from: runs/v3`` (a run directory or an adapter directory) starts from that adapter's
weights instead of a fresh one: the same method, its saved options (an option the config sets differently is an
error, not a silent change), loaded onto a base the parent's fingerprint accepts. The new adapter's
``adapter.json`` ``extra`` records:

* ``data``: the training data of this run (``train`` as configured, and the file's ``sha256`` when it is a file);
* ``lineage``: the parent's lineage followed by the parent itself (its path, the SHA-256 of its tensors, its
  trained steps, run fingerprint and data), oldest first; ``lorakit inspect`` shows it.

Before training, what the starting model (the parent, or the base for a fresh adapter) already knows of the new
data is measured per example (:func:`measure_update`): the mean per-token negative log-likelihood of its labelled
tokens, ``nll``, and its geometric-mean token probability ``exp(-nll)`` (the model's confidence in the example).
With ``data.skip_known: p``, examples the model already predicts with confidence ``>= p`` are dropped from the
training data; the run logs and the adapter records (``extra.update``) how many examples and tokens that saved.

Each saved adapter keeps its update's held-out and replay examples (:mod:`lorakit.train.history`): a continuation
measures every earlier update before and after training (``extra.update.retention``) and can replay them
(``data.replay``).

An interrupted continuation resumes from its own checkpoints like any run (``--resume``); the measurement is taken
again from the parent's weights, so the kept examples are the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.adapt.model import adapters
from lorakit.core.collectives import IGNORE
from lorakit.errors import ConfigError
from lorakit.formats.layout import META_FILE, TENSORS_FILE
from lorakit.formats.native import load as load_adapter
from lorakit.formats.native import read_adapter
from lorakit.train import history
from lorakit.train.batching import iter_batches
from lorakit.train.config import AdapterSection, TrainConfig
from lorakit.train.data import Dataset
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


def example_nll(model: nn.Module, data: Dataset, batch_size: int, pad_id: int, device: torch.device) -> list[float]:
    """Mean negative log-likelihood per labelled token of every example (causal LM), in data order."""
    out: list[float] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in iter_batches(data, batch_size, pad_id):
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
            mask = target != IGNORE
            out += (nll * mask).sum(1).div(mask.sum(1).clamp(min=1)).tolist()
    model.train(was_training)
    return out


def measure_update(trainer: Any) -> dict[str, Any]:
    """Before training a run that continues an adapter or skips known examples: load the parent (if any), measure
    the starting model's confidence on every training example and drop the known ones (``data.skip_known``).

    Returns the figures recorded as ``extra.update``: examples, mean and median NLL, the share of examples with
    confidence >= 0.5 and >= 0.8, and with ``skip_known`` the examples and tokens skipped.
    """
    cfg, model, data = trainer.config, trainer.model, trainer.train_data
    if cfg.adapter.continue_from and cfg.adapter.name not in adapters(model):
        continue_adapter(model, cfg.adapter, trainer._log)
    if cfg.model.task != "causal-lm" or cfg.data.packing or data.format == "preference" or len(data) == 0:
        return {}  # per-example figures of next-token data only
    nll = example_nll(model, data, cfg.training.eval_batch_size or cfg.training.batch_size, trainer._pad_id,
                      trainer.device)
    conf = [math.exp(-x) for x in nll]
    info: dict[str, Any] = {"examples": len(nll), "mean_nll": round(sum(nll) / max(len(nll), 1), 4),
                            "median_nll": round(sorted(nll)[len(nll) // 2], 4) if nll else None,
                            "known_0.5": round(sum(c >= 0.5 for c in conf) / max(len(conf), 1), 4),
                            "known_0.8": round(sum(c >= 0.8 for c in conf) / max(len(conf), 1), 4)}
    trainer.new_data_confidence = (conf, 1 - info["known_0.5"])  # for adapter.grow (lorakit.train.growth)
    p = cfg.data.skip_known
    if p is not None:
        keep = [i for i, c in enumerate(conf) if c < p]
        if not keep:
            raise ConfigError(f"data.skip_known={p}: the model already predicts every training example with "
                              "confidence >= that; nothing left to train on")
        tokens = sum(len(e.input_ids) for e in data.examples)
        kept = [data.examples[i] for i in keep]
        info.update(skip_known=p, skipped=len(nll) - len(kept),
                    skipped_tokens_share=round(1 - sum(len(e.input_ids) for e in kept) / max(tokens, 1), 4))
        trainer.train_data = dataclasses.replace(data, examples=kept)
        trainer.new_data_confidence = ([conf[i] for i in keep], 1 - info["known_0.5"])
    trainer._log(f"what the starting model knows of the {len(nll)} training examples: mean NLL {info['mean_nll']:.3f} "
                 f"per token; {100 * info['known_0.5']:.1f}% predicted with confidence >= 0.5, "
                 f"{100 * info['known_0.8']:.1f}% >= 0.8" + (
                     f"; skipping {info['skipped']} (confidence >= {p}: {100 * info['skipped_tokens_share']:.1f}% of "
                     "the tokens)" if p is not None else ""))
    if cfg.adapter.continue_from:  # the parent on every earlier update's held-out examples; data.replay
        info.update(history.before_update(trainer, adapter_dir(cfg.adapter.continue_from)))
    return info


def finish_update(trainer: Any) -> None:
    """After training a continued adapter: the new model's held-out loss on every earlier update, beside the
    parent's (``extra.update.retention``; :mod:`lorakit.train.history`)."""
    info, cfg = trainer.update_info, trainer.config
    if info and info.get("retention") and cfg.adapter.continue_from:
        info["retention"] = history.after_update(trainer, adapter_dir(cfg.adapter.continue_from), info["retention"])


def lineage_extra(cfg: TrainConfig, update: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a saved adapter records about its data and ancestry (``adapter.json`` ``extra``)."""
    train = cfg.data.train
    data: dict[str, Any] = {"train": train if isinstance(train, str) else None}
    if isinstance(train, str):
        local = resources.resolve(train, what="data.train") if resources.is_bundled(train) else train
        if Path(local).is_file():
            data["sha256"] = file_sha256(local)
    out: dict[str, Any] = {"data": data}
    if update:
        out["update"] = update
    if cfg.adapter.continue_from:
        parent = adapter_dir(cfg.adapter.continue_from)
        meta, _ = read_adapter(parent, tensors=False)
        extra = meta.get("extra") or {}
        entry = {"path": str(parent.resolve()), "sha256": file_sha256(parent / TENSORS_FILE),
                 "trained_steps": extra.get("trained_steps"), "run": extra.get("run"), "data": extra.get("data")}
        out["lineage"] = [*(extra.get("lineage") or []), entry]
    return out


__all__ = ["adapter_dir", "continue_adapter", "example_nll", "file_sha256", "finish_update", "lineage_extra",
           "measure_update"]
