"""What each update of a continued adapter keeps, so that later updates are measured against it and can replay it.

Every adapter saved by a run on next-token data (causal LM, not packed) keeps a ``history/`` folder beside its
tensors, one entry per update in its lineage, oldest first::

    history/index.json          [{"update": 1, "data": {"train": ..., "sha256": ...}, "steps": 200,
                                  "heldout": "1/heldout.jsonl", "replay": "1/replay.jsonl"}, ...]
    history/1/heldout.jsonl     up to HISTORY_EXAMPLES of that run's evaluation examples (tokenized)
    history/1/replay.jsonl      up to HISTORY_EXAMPLES of its training examples (a seeded sample, tokenized)

A run with ``adapter.continue_from`` copies the parent's history and appends its own update. Before training it
measures the starting model (the parent) on every earlier update's held-out examples; after training, the new
adapter on the same examples: ``extra.update.retention`` records, per earlier update, ``loss_before``,
``loss_after`` and their difference (what this update cost that one; the log says it too, ``lorakit inspect``
shows it). With ``data.replay: f``, ``round(f x training examples)`` examples drawn (seeded) from the earlier
updates' replay sets join the training data, the simplest guard against forgetting (``extra.update.replayed``).

The examples are stored tokenized (``{"input_ids", "labels"}`` per line): an update needs the same base, so the
same tokenizer, and the held-out loss of each update is then measured on exactly the same tokens every time.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.train.data import Dataset
from lorakit.train.example import Example
from lorakit.util.files import write_json

HISTORY_DIR = "history"
INDEX_FILE = "index.json"
#: Examples kept per update for its held-out and replay sets.
HISTORY_EXAMPLES = 200


def applies(trainer: Any) -> bool:
    """Whether this run keeps a history: next-token data of a causal LM, not packed."""
    cfg, data = trainer.config, trainer.train_data
    return cfg.model.task == "causal-lm" and not cfg.data.packing and data is not None and \
        data.format in ("text", "prompt_completion", "chat")


def read_index(adapter: Path) -> list[dict[str, Any]]:
    """The history entries of the adapter directory ``adapter`` (empty without a history)."""
    path = adapter / HISTORY_DIR / INDEX_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def read_examples(path: Path) -> list[Example]:
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out.append(Example(list(row["input_ids"]), list(row["labels"])))
    return out


def _write_examples(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"input_ids": e.input_ids, "labels": e.labels}) + "\n" for e in examples))


def _heldout_loss(trainer: Any, adapter: Path, entry: dict[str, Any]) -> float:
    examples = read_examples(adapter / HISTORY_DIR / entry["heldout"])
    return float(trainer.evaluate(Dataset(examples, "prompt_completion", source=entry["heldout"]))["eval_loss"])


def before_update(trainer: Any, parent: Path) -> dict[str, Any]:
    """At the start of an update from ``parent`` (loaded on the model): the parent's held-out loss on every earlier
    update, and ``data.replay``'s examples added to the training data. Returns ``extra.update``'s share."""
    if not applies(trainer):
        return {}
    entries = read_index(parent)
    info: dict[str, Any] = {"retention": [
        {"update": e["update"], "train": (e.get("data") or {}).get("train"),
         "loss_before": round(_heldout_loss(trainer, parent, e), 5)} for e in entries if e.get("heldout")]}
    share = trainer.config.data.replay
    if share:
        pool = [x for e in entries if e.get("replay") for x in read_examples(parent / HISTORY_DIR / e["replay"])]
        if not pool:
            raise ConfigError(f"data.replay: {parent} keeps no replay examples of earlier updates (adapters saved "
                              "before lorakit kept a history, or trained on data it does not keep); drop data.replay")
        n = max(1, round(share * len(trainer.train_data)))
        rng = random.Random(trainer.config.training.seed)
        drawn = [pool[rng.randrange(len(pool))] for _ in range(n)]  # with replacement: any share of any pool
        data = trainer.train_data
        trainer.train_data = Dataset(list(data.examples) + drawn, data.format, data.n_truncated, data.n_dropped,
                                     data.source, {**data.stats, "replayed": n})
        info["replayed"] = n
        trainer._log(f"replay: {n} examples of {len(entries)} earlier update(s) join the {len(data)} new ones")
    return info


def after_update(trainer: Any, parent: Path, retention: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trained model's held-out loss on every earlier update, beside the parent's (logged)."""
    entries = {e["update"]: e for e in read_index(parent)}
    out = []
    for r in retention:
        after = _heldout_loss(trainer, parent, entries[r["update"]])
        out.append({**r, "loss_after": round(after, 5), "change": round(after - r["loss_before"], 5)})
        trainer._log(f"update {r['update']} ({r.get('train')}): held-out loss {r['loss_before']:.4f} -> "
                     f"{after:.4f} ({after - r['loss_before']:+.4f})")
    return out


def write(adapter: Path, trainer: Any, parent: Path | None, data: dict[str, Any], steps: int) -> None:
    """Write ``adapter``'s history: the parent's, then this run's update."""
    if not applies(trainer):
        return
    root = adapter / HISTORY_DIR
    if root.exists():
        shutil.rmtree(root)
    entries: list[dict[str, Any]] = []
    if parent is not None and (parent / HISTORY_DIR).is_dir():
        shutil.copytree(parent / HISTORY_DIR, root)
        entries = read_index(parent)
    k = len(entries) + 1
    entry: dict[str, Any] = {"update": k, "data": data, "steps": steps, "heldout": None, "replay": None}
    if trainer.eval_data is not None and len(trainer.eval_data):
        _write_examples(root / str(k) / "heldout.jsonl", list(trainer.eval_data.examples[:HISTORY_EXAMPLES]))
        entry["heldout"] = f"{k}/heldout.jsonl"
    new = len(trainer.train_data) - int(trainer.train_data.stats.get("replayed", 0))  # this update's own examples
    pick = sorted(random.Random(trainer.config.training.seed).sample(range(new), min(new, HISTORY_EXAMPLES)))
    _write_examples(root / str(k) / "replay.jsonl", [trainer.train_data.examples[i] for i in pick])
    entry["replay"] = f"{k}/replay.jsonl"
    write_json(root / INDEX_FILE, [*entries, entry])


__all__ = ["HISTORY_EXAMPLES", "after_update", "before_update", "read_index", "write"]
