"""Training data: JSONL in, padded tensor batches out.

Each line of a JSONL file is one example, in one of four formats (``data.format: auto`` reads the first
line's keys; every line must then use the same format):

- ``{"text": ...}``: plain language modelling, loss on every token.
- ``{"prompt": ..., "completion": ...}``: loss only on the completion tokens (and the end-of-sequence token).
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: chat, rendered with the tokenizer's chat template
  when it has one; loss only on the assistant turns.
- ``{"text": ..., "label": ...}``: sequence classification (``label``: class index or name).
- ``{"prompt": ..., "chosen": ..., "rejected": ...}``: preference pairs (text or chat messages, the prompt
  optional) for the preference objectives (:mod:`lorakit.train.pairs`, :mod:`lorakit.train.preference`).

Tokens that carry no loss get the label ``-100`` (PyTorch's ``ignore_index``). Examples longer than
``max_length`` are cut (and counted); an example left with no trainable token is dropped (and counted).
With packing, whole examples share ``max_length`` blocks, each attending only to itself (see :func:`pack`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.core.collectives import IGNORE
from lorakit.train import sources
from lorakit.train.config import DataConfig
from lorakit.train.example import Example
from lorakit.train.pairs import encode_pair, pair_is_empty, truncate_pair
from lorakit.train.sources import DataError
from lorakit.util.files import JsonlLineError, iter_jsonl

FORMATS = ("text", "prompt_completion", "chat", "classification", "preference")


@dataclass
class Dataset:
    """Tokenized examples plus what happened while building them.

    Attributes:
        examples: the examples, in file order.
        format: the data format (one of :data:`FORMATS`).
        n_truncated: examples cut to ``max_length``.
        n_dropped: examples dropped because truncation left no trainable token.
        source: where the examples came from (for messages).
    """

    examples: Sequence[Example]  # a list, or a memory-mapped TokenStore (data.cache_dir)
    format: str
    n_truncated: int = 0
    n_dropped: int = 0
    source: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def n_tokens(self) -> int:
        stored = getattr(self.examples, "n_tokens", None)  # a TokenStore knows without reading
        return int(stored) if stored is not None else sum(e.n_tokens for e in self.examples)


# --- reading -----------------------------------------------------------------------------------------------
Record = tuple[int, dict[str, Any]]  # (1-based line number, parsed object)


def read_jsonl_rows(path: str | os.PathLike[str]) -> Iterator[Record]:
    """The records of a JSONL data file, one line at a time; :class:`DataError` names the file and line of the
    first bad line. Every line must hold one JSON object; blank lines are errors too (they usually mean a broken
    export)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such data file")
    try:
        yield from iter_jsonl(p, blank="error", objects=True)
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except JsonlLineError as e:
        raise DataError(f"{p}:{e.line}: {e.reason}") from None


def read_jsonl(path: str | os.PathLike[str]) -> list[Record]:
    """Every record of a JSONL data file (see :func:`read_jsonl_rows`); an empty file is a :class:`DataError`."""
    records = list(read_jsonl_rows(path))
    if not records:
        raise DataError(f"{Path(path)}: no examples (the file is empty)")
    return records


_REQUIRED = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "chat": ("messages",),
             "classification": ("text", "label"), "preference": ("chosen", "rejected")}


def check_record(obj: dict[str, Any], fmt: str, where: str) -> None:
    """Raise :class:`DataError` unless ``obj`` is a well-formed record of ``fmt``."""
    if fmt == "preference":
        return  # a pair is checked as it is split, once (encode_pair -> split_pair)
    missing = [k for k in _REQUIRED[fmt] if k not in obj]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing} for format {fmt!r} (keys present: {sorted(obj)})")
    for k in ("text", "prompt", "completion"):
        if k in _REQUIRED[fmt] and not isinstance(obj[k], str):
            raise DataError(f"{where}: {k!r} must be a string, got {type(obj[k]).__name__}")
    if fmt in ("text", "classification") and not obj["text"].strip():
        raise DataError(f"{where}: 'text' is empty")
    if fmt == "prompt_completion" and not obj["completion"]:
        raise DataError(f"{where}: 'completion' is empty (nothing to learn)")
    if fmt == "chat":
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{j}] must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no 'assistant' message (nothing to learn)")


# --- tokenizing --------------------------------------------------------------------------------------------
def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def render_chat(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """Chat text from the tokenizer's template, or a plain ``role: content`` layout when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant:" if generation_prompt else "")


def _chat_example(tokenizer: Any, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[int]]:
    """Tokens and labels of a conversation; only assistant turns carry labels.

    The text of assistant turn ``i`` is ``render(messages[:i+1])`` minus ``render(messages[:i])`` with the
    generation prompt, so any prefix-consistent template works without special markers. Each segment is
    tokenized on its own, the way prompts are tokenized at generation time.
    """
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # text already turned into tokens
    with_template = bool(getattr(tokenizer, "chat_template", None))

    def add(text: str, train: bool) -> None:
        piece = _encode(tokenizer, text, special=not with_template and not ids)
        ids.extend(piece)
        labels.extend(piece if train else [IGNORE] * len(piece))

    try:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = render_chat(tokenizer, messages[:i], True)
            turn = render_chat(tokenizer, messages[:i + 1], False)
            if not prompt.startswith(done) or not turn.startswith(prompt):
                raise DataError(f"{where}: the chat template is not prefix-consistent; cannot locate the "
                                "assistant turns (use prompt/completion data instead)")
            add(prompt[len(done):], False)
            add(turn[len(prompt):], True)
            done = turn
        full = render_chat(tokenizer, messages, False)
    except DataError:
        raise
    except Exception as e:  # template errors (jinja raises its own types)
        raise DataError(f"{where}: chat template failed: {e}") from None
    if full.startswith(done) and full[len(done):]:
        add(full[len(done):], False)
    if not with_template:
        ids.extend(_eos(tokenizer))
        labels.extend(_eos(tokenizer))
    return ids, labels


def encode_record(tokenizer: Any, obj: dict[str, Any], fmt: str, *, add_eos: bool, where: str,
                  label_names: Sequence[str] | None = None, num_labels: int = 2) -> Example:
    """Tokenize one record (not truncated)."""
    eos = _eos(tokenizer) if add_eos else []
    if fmt == "preference":
        return encode_pair(tokenizer, obj, add_eos=add_eos, where=where, render_chat=render_chat)
    if fmt == "text":
        ids = _encode(tokenizer, obj["text"], True) + eos
        return Example(ids, list(ids))
    if fmt == "prompt_completion":
        p = _encode(tokenizer, obj["prompt"], True)
        c = _encode(tokenizer, obj["completion"], False) + eos
        return Example(p + c, [IGNORE] * len(p) + c)
    if fmt == "chat":
        ids, labels = _chat_example(tokenizer, obj["messages"], where)
        return Example(ids, labels)
    label = obj["label"]
    if isinstance(label, str):
        if not label_names or label not in label_names:
            raise DataError(f"{where}: label {label!r} is not in data.labels ({list(label_names or [])})")
        label = list(label_names).index(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
        raise DataError(f"{where}: label must be an integer in [0, {num_labels}) or a name in data.labels, "
                        f"got {obj['label']!r}")
    return Example(_encode(tokenizer, obj["text"], True), label)


def encode_records(records: Iterable[Record], tokenizer: Any, *, fmt: str = "auto", task: str = "causal-lm",
                   max_length: int = 512, truncate: bool = True, add_eos: bool = True,
                   label_names: Sequence[str] | None = None, num_labels: int = 2, source: str = "",
                   counts: Dataset, required: bool = True) -> Iterator[Example]:
    """Check, tokenize and truncate ``records`` one at a time (streaming: nothing is kept).

    ``counts`` receives the data format (``counts.format``) and the truncated and dropped counts; no record
    at all is a :class:`DataError` when ``required``.
    """
    stored = ""
    for line, raw in records:
        if not stored:  # the first record decides the format
            if fmt == "auto":
                fmt = sources.detect(raw, task, f"{source}:{line}")
            stored = {"alpaca": "prompt_completion", "sharegpt": "chat"}.get(fmt, fmt)  # what the records become
            if (stored == "classification") != (task == "classification"):
                raise DataError(f"{source}: format {fmt!r} does not fit model.task={task!r}")
            counts.format = stored
        where = f"{source}:{line}"
        obj, _ = sources.normalize(raw, fmt, where)
        check_record(obj, stored, where)
        ex = encode_record(tokenizer, obj, stored, add_eos=add_eos, where=where, label_names=label_names,
                           num_labels=num_labels)
        if ex.rejected is not None:  # a preference pair: both sequences cut, dropped if either has nothing left
            counts.n_truncated += truncate and truncate_pair(ex, max_length)
            if pair_is_empty(ex):
                counts.n_dropped += 1
                continue
            yield ex
            continue
        if truncate and len(ex.input_ids) > max_length:
            counts.n_truncated += 1
            ex.input_ids = ex.input_ids[:max_length]
            if isinstance(ex.labels, list):
                ex.labels = ex.labels[:max_length]
        if isinstance(ex.labels, list) and all(x == IGNORE for x in ex.labels[1:]):
            counts.n_dropped += 1  # causal LM shifts labels by one: the first label is never predicted
            continue
        yield ex
    if not stored and required:
        raise DataError(f"{source}: no examples")


def tokenize(records: Iterable[Record], tokenizer: Any, *, fmt: str = "auto", task: str = "causal-lm",
             max_length: int = 512, truncate: bool = True, add_eos: bool = True,
             label_names: Sequence[str] | None = None, num_labels: int = 2, source: str = "") -> Dataset:
    """Check, tokenize and truncate ``records`` into a :class:`Dataset` (in memory)."""
    out = Dataset([], "", source=source)
    out.examples = list(encode_records(records, tokenizer, fmt=fmt, task=task, max_length=max_length,
                                       truncate=truncate, add_eos=add_eos, label_names=label_names,
                                       num_labels=num_labels, source=source, counts=out))
    if not out.examples:
        raise DataError(f"{source}: every example was dropped (no trainable tokens within "
                        f"max_length={max_length})")
    return out


def pack_blocks(examples: Iterable[Example], max_length: int, counts: Dataset) -> Iterator[Example]:
    """The blocks of :func:`pack`, one at a time (``counts.n_truncated`` counts the examples cut)."""
    ids: list[int] = []
    labels: list[int] = []
    segments: list[int] = []

    def block() -> Iterator[Example]:
        if ids and any(x != IGNORE for x in labels[1:]):
            yield Example(list(ids), list(labels), list(segments))
        ids.clear()
        labels.clear()
        segments.clear()

    for ex in examples:
        assert isinstance(ex.labels, list)
        e_ids, e_labels = ex.input_ids, ex.labels
        if len(e_ids) > max_length:
            e_ids, e_labels = e_ids[:max_length], e_labels[:max_length]
            counts.n_truncated += 1
        if len(ids) + len(e_ids) > max_length:
            yield from block()
        seg = segments[-1] + 1 if segments else 0
        ids.extend(e_ids)
        labels.extend([IGNORE] + e_labels[1:])  # never predicted from the previous example
        segments.extend([seg] * len(e_ids))
    yield from block()


def pack(data: Dataset, max_length: int) -> Dataset:
    """Pack whole examples into blocks of at most ``max_length`` tokens, without leaks between them.

    Examples go into blocks in order, each whole (one longer than ``max_length`` is cut, and counted, as
    without packing); a block is closed when the next example does not fit. Inside a block every example
    keeps its own positions (they restart at 0) and attends only to itself: :func:`collate` turns the
    segments into ``position_ids`` and a block-diagonal causal ``attention_mask`` ``(B, 1, T, T)``. The first
    token of each example carries no label (it would be predicted from the previous example), so the packed
    loss is exactly the sum of the examples' own losses.
    """
    out = Dataset([], data.format, data.n_truncated, data.n_dropped, data.source,
                  {**data.stats, "packed_from": len(data.examples)})
    out.examples = list(pack_blocks(data.examples, max_length, out))
    return out


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded held-out split: ``(train, held_out)``, held-out ``max(1, round(n * fraction))`` records."""
    n_eval = max(1, round(len(records) * fraction))
    if len(records) - n_eval < 1:
        raise DataError(f"too few examples ({len(records)}) to hold out {fraction:.0%} for evaluation; "
                        "give data.eval or set data.eval_fraction=0")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


# --- the whole pipeline --------------------------------------------------------------------------------------
def records_like(data: Any) -> bool:
    """Data a Trainer can tokenize: a file path, or a sequence of mappings (``datasets.Dataset`` rows are)."""
    if isinstance(data, str | os.PathLike):
        return True
    if isinstance(data, bytes | Mapping):
        return False
    try:
        return len(data) == 0 or isinstance(data[0], Mapping)
    except Exception:
        return False


def read_source(source: Any, cfg: DataConfig) -> tuple[list[Record], str]:
    """The records of a data source (a file, a ``datasets`` directory or object, a list of dicts; see
    :mod:`lorakit.train.sources`) with ``data.columns`` applied, and the source's name for messages."""
    records, name = sources.read_records(source, jsonl_reader=read_jsonl)
    return list(sources.rename_columns(records, cfg.columns, name)), name


def dataset_from(source: Any, cfg: DataConfig, tokenizer: Any, *, task: str, num_labels: int = 2) -> Dataset:
    """Tokenize (and pack) any data source the way :func:`load_datasets` treats ``data.train``: what the
    trainer does with a ``datasets.Dataset`` or a list of dicts handed to it."""
    records, name = read_source(source, cfg)
    ds = tokenize(records, tokenizer, fmt=cfg.format, task=task, max_length=cfg.max_length,
                  truncate=not cfg.packing, add_eos=cfg.add_eos, label_names=cfg.labels, num_labels=num_labels,
                  source=name)
    return pack(ds, cfg.max_length) if cfg.packing else ds


def load_datasets(cfg: DataConfig, tokenizer: Any, *, task: str, seed: int,
                  num_labels: int = 2) -> tuple[Dataset, Dataset | None]:
    """Read, split, tokenize (and pack) the training and evaluation data described by ``cfg``.

    Returns:
        ``(train, eval)``; ``eval`` is ``None`` when there is no eval file and ``eval_fraction`` is 0.
    """
    train_records, train_source = read_source(cfg.train, cfg)
    eval_records: list[Record] | None = None
    eval_source = cfg.eval or ""
    if cfg.eval is not None:
        eval_records, eval_source = read_source(cfg.eval, cfg)
    elif cfg.eval_fraction > 0:
        train_records, eval_records = split_records(train_records, cfg.eval_fraction, seed)
        eval_source = f"{train_source} (held-out split)"

    def build(records: list[Record], source: str) -> Dataset:
        ds = tokenize(records, tokenizer, fmt=cfg.format, task=task, max_length=cfg.max_length,
                      truncate=not cfg.packing, add_eos=cfg.add_eos, label_names=cfg.labels,
                      num_labels=num_labels, source=source)
        return pack(ds, cfg.max_length) if cfg.packing else ds

    train = build(train_records, train_source)
    evald = build(eval_records, eval_source) if eval_records else None
    if evald is not None and evald.format != train.format:
        raise DataError(f"{eval_source}: format {evald.format!r} differs from the training data's "
                        f"{train.format!r}")
    return train, evald


__all__ = ["IGNORE", "DataError", "Dataset", "Example", "dataset_from",
           "load_datasets", "pack", "read_jsonl", "read_source", "split_records", "tokenize"]
