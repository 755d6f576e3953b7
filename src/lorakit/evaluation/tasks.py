"""Deterministic synthetic task generators for fine-tuning experiments.

Four tasks exercise the three ways lorakit fine-tunes a model:

* :func:`generate_one_more` - one-sentence word problems where someone gains or loses one thing
  (``"Ada has 4 shells and finds one more. How many shells does Ada have now?"`` -> ``" 5"``), the task of
  ``make demo``: small enough for the bundled 5M-parameter model to learn in a minute on CPU.  Its eval
  file uses names that never occur in its training file.
* :func:`generate_arithmetic` - short multi-step arithmetic word problems
  (GSM8K-like, 2-3 operations, small numbers) as prompt/completion pairs whose
  completion shows the steps and ends with ``"The answer is N."``; score with
  :func:`extract_answer` and exact match.
* :func:`generate_domain_shift` - templated cooking recipes, a domain the bundled
  base model (trained on Python documentation) has never seen; rows ``{"text"}``
  for continued pretraining and forgetting measurements.
* :func:`generate_sentiment` - short product/service reviews labelled
  ``1`` (positive) or ``0`` (negative) for sequence classification.

Every generator is a pure function of ``(n, seed)``: it uses its own
:class:`random.Random` and never the global random state, so the same call
returns the same rows on every machine and Python 3.11+ version.

Command line::

    lorakit tasks arithmetic --n 2000 --seed 0 --out arithmetic.jsonl
    lorakit tasks bundle            # rewrites src/lorakit/bundled/data
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from lorakit.util.files import iter_jsonl, write_text
from lorakit.util.resources import BUNDLED_DIR

__all__ = [
    "BUNDLED_FILES",
    "HELDOUT_GENERATORS",
    "ONE_MORE_HELDOUT_NAMES",
    "ONE_MORE_TRAIN_NAMES",
    "TASKS",
    "extract_answer",
    "generate_arithmetic",
    "generate_domain_shift",
    "generate_one_more",
    "generate_sentiment",
    "read_jsonl",
    "write_bundled_data",
    "write_jsonl",
]

from lorakit.evaluation.text_tasks import generate_domain_shift, generate_sentiment
from lorakit.evaluation.word_problems import (
    ONE_MORE_HELDOUT_NAMES,
    ONE_MORE_TRAIN_NAMES,
    Row,
    extract_answer,
    generate_arithmetic,
    generate_one_more,
    generate_one_more_heldout,
)


def write_jsonl(rows: Iterable[Row], path: str | Path) -> Path:
    """Write ``rows`` as JSON Lines (one UTF-8 JSON object per line).

    Written atomically; parent folders are created.  Keys keep their insertion order so output is
    byte-for-byte reproducible.

    Args:
        rows: Dictionaries to write.
        path: Destination file.

    Returns:
        The destination path.
    """
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[Row]:
    """Read a JSON Lines file written by :func:`write_jsonl` (blank lines skipped)."""
    return [row for _, row in iter_jsonl(path)]


# --------------------------------------------------------------------------- #
# Registry, bundled files and CLI
# --------------------------------------------------------------------------- #
TASKS: dict[str, Callable[[int, int], list[Row]]] = {
    "one_more": generate_one_more,
    "arithmetic": generate_arithmetic,
    "domain_shift": generate_domain_shift,
    "sentiment": generate_sentiment,
}

#: Where the bundled task data lives.
BUNDLED_DATA = BUNDLED_DIR / "data"
#: ``file name -> (task, n, seed)`` of the files shipped in ``lorakit/bundled/data``.
#: Eval files use a different seed and drop rows that also occur in the train file; a task in
#: :data:`HELDOUT_GENERATORS` draws its eval rows from that generator instead (``one_more``: held-out names).
BUNDLED_FILES: dict[str, tuple[str, int, int]] = {
    "one_more_train.jsonl": ("one_more", 2000, 0),
    "one_more_eval.jsonl": ("one_more", 200, 1),
    "arithmetic_train.jsonl": ("arithmetic", 2000, 0),
    "arithmetic_eval.jsonl": ("arithmetic", 200, 1),
    "domain_train.jsonl": ("domain_shift", 1000, 0),
    "domain_eval.jsonl": ("domain_shift", 200, 1),
    "sentiment_train.jsonl": ("sentiment", 1000, 0),
    "sentiment_eval.jsonl": ("sentiment", 200, 1),
}


#: ``task -> generator`` of the rows of that task's bundled eval file, where they differ from :data:`TASKS`.
HELDOUT_GENERATORS: dict[str, Callable[[int, int], list[Row]]] = {"one_more": generate_one_more_heldout}


def _row_key(row: Row) -> str:
    """The field that identifies a row for train/eval de-duplication."""
    return str(row.get("prompt", row.get("text")))


def _generate_disjoint(task: str, n: int, seed: int, exclude: set[str]) -> list[Row]:
    """Generate ``n`` eval rows of ``task`` whose keys are not in ``exclude`` (nor repeated)."""
    generator = HELDOUT_GENERATORS.get(task, TASKS[task])
    size = n
    while True:
        rows, seen = [], set(exclude)
        for row in generator(size, seed):
            key = _row_key(row)
            if key not in seen:
                seen.add(key)
                rows.append(row)
            if len(rows) == n:
                return rows
        size *= 2


def write_bundled_data(directory: str | Path) -> list[Path]:
    """(Re)write every file of :data:`BUNDLED_FILES` into ``directory``.

    Returns:
        The written paths.
    """
    directory = Path(directory)
    written: list[Path] = []
    train_keys: dict[str, set[str]] = {}
    for name, (task, n, seed) in BUNDLED_FILES.items():
        if name.endswith("_train.jsonl"):
            rows = TASKS[task](n, seed)
            train_keys[task] = {_row_key(r) for r in rows}
        else:
            rows = _generate_disjoint(task, n, seed, train_keys.get(task, set()))
        written.append(write_jsonl(rows, directory / name))
    return written
