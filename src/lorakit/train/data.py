"""Training data: JSONL in, padded tensor batches out.

Each line of a JSONL file is one example, in one of four formats (``data.format: auto`` reads the first
line's keys; every line must then use the same format):

- ``{"text": ...}``: plain language modelling, loss on every token.
- ``{"prompt": ..., "completion": ...}``: loss only on the completion tokens (and the end-of-sequence token).
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: chat, rendered with the tokenizer's chat template
  when it has one; loss only on the assistant turns.
- ``{"text": ..., "label": ...}``: sequence classification (``label``: class index or name).

Tokens that carry no loss get the label ``-100`` (PyTorch's ``ignore_index``). Examples longer than
``max_length`` are cut (and counted); an example left with no trainable token is dropped (and counted).
With packing, whole examples share ``max_length`` blocks, each attending only to itself (see :func:`pack`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorakit.core.collectives import IGNORE
from lorakit.train import sources
from lorakit.train.config import DataConfig
from lorakit.train.example import Example
from lorakit.train.sources import DataError
from lorakit.util.files import JsonlLineError, iter_jsonl

FORMATS = ("text", "prompt_completion", "chat", "classification")


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
        return int(stored) if stored is not None else sum(len(e.input_ids) for e in self.examples)


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
             "classification": ("text", "label")}


def check_record(obj: dict[str, Any], fmt: str, where: str) -> None:
    """Raise :class:`DataError` unless ``obj`` is a well-formed record of ``fmt``."""
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


# --- batching ----------------------------------------------------------------------------------------------
def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a list of examples into ``input_ids``/``attention_mask``/``labels`` tensors ``(B, T)``
    (``labels`` is ``(B,)`` for classification).

    Packed blocks (examples with ``segments``) also get ``position_ids`` ``(B, T)`` restarting at every example
    and a boolean ``attention_mask`` ``(B, 1, T, T)``: token ``i`` attends to token ``j <= i`` of its own
    example only (a padding token to itself, so no attention row is empty).
    """
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    token_labels = isinstance(examples[0].labels, list)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long) if token_labels else \
        torch.tensor([e.labels for e in examples], dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, :n] = 1
        if token_labels:
            labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.segments is not None for e in examples):
        batch.update(_packed_attention(examples, width))
    return batch


def _packed_attention(examples: Sequence[Example], width: int) -> dict[str, Tensor]:
    """``position_ids`` ``(B, T)`` and the block-diagonal causal ``attention_mask`` ``(B, 1, T, T)``."""
    seg = torch.full((len(examples), width), -1, dtype=torch.long)  # -1: padding
    for i, e in enumerate(examples):
        s = e.segments if e.segments is not None else [0] * len(e.input_ids)
        seg[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    # position of each token inside its example: its index minus the index where its example starts
    idx = torch.arange(width).expand_as(seg)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    start_idx = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    positions = (idx - start_idx).masked_fill(seg < 0, 0)
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T)
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)  # (B, T, T)
    allowed = (same & causal) | torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves
    return {"position_ids": positions, "attention_mask": allowed[:, None]}


class BatchOrder:
    """A reproducible, resumable order of micro-batches over several epochs.

    Micro-batch ``k`` (counted from the start of training across epochs) is a pure function of ``k``,
    the seed and the dataset (size, and lengths when they shape the batches), so a resumed run needs only
    ``k`` to continue exactly where it stopped.

    Args:
        n: examples.
        batch_size: examples per micro-batch (at most, with ``max_tokens``).
        seed: seed of the shuffles (one per epoch).
        lengths: each example's length in tokens (needed by the two options below).
        group_by_length: batch examples of similar length together, so less of each batch is padding: each
            epoch's shuffled order is cut into chunks of ``50 x batch_size`` examples, each chunk is sorted by
            length and cut into batches, and the batches are shuffled.
        max_tokens: a token budget per micro-batch: a batch takes examples while ``its size x its longest
            example`` (the padded tokens) stays within the budget (one example at least, ``batch_size`` at
            most), so batches of short examples hold more of them.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, *,
                 lengths: Sequence[int] | None = None, group_by_length: bool = False,
                 max_tokens: int | None = None) -> None:
        if (group_by_length or max_tokens is not None) and (lengths is None or len(lengths) != n):
            raise ValueError("group_by_length and max_tokens need the length of every example")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.lengths = list(lengths) if lengths is not None else None
        self.group_by_length, self.max_tokens = group_by_length, max_tokens
        self._plans: dict[int, Any] = {}  # per epoch: a tuple of index tensors, or a list of index lists
        self._counts: dict[int, int] = {}  # batches of each epoch seen so far (kept: tiny)
        self.batches_per_epoch = len(self._plan(0))  # epochs may differ by a batch or two with max_tokens

    def _perm(self, epoch: int) -> Tensor:
        """The epoch's example order, ``(n,)`` int64 (a tensor: 8 bytes per example, for data of any size)."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def _cut(self, order: Tensor | list[int]) -> Any:
        """Consecutive batches of ``order``: ``batch_size`` each, or within the token budget."""
        if self.max_tokens is None:
            if isinstance(order, Tensor):  # batches stay views of the order tensor until asked for
                return order.split(self.batch_size)
            return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        assert self.lengths is not None
        batches: list[list[int]] = []
        cur: list[int] = []
        longest = 0
        for i in (order.tolist() if isinstance(order, Tensor) else order):
            grown = max(longest, self.lengths[i])
            if cur and (len(cur) == self.batch_size or grown * (len(cur) + 1) > self.max_tokens):
                batches.append(cur)
                cur, grown = [], self.lengths[i]
            cur.append(i)
            longest = grown
        if cur:
            batches.append(cur)
        return batches

    def _plan(self, epoch: int) -> Any:
        """The micro-batches of one epoch (cached: the plan of an epoch is fixed by the seed)."""
        if epoch not in self._plans:
            order = self._perm(epoch)
            if not self.group_by_length:
                plan = self._cut(order)
            else:
                assert self.lengths is not None
                lengths = self.lengths
                chunk = 50 * self.batch_size
                plan = []
                for s in range(0, len(order), chunk):
                    plan += self._cut(sorted(order[s:s + chunk].tolist(), key=lambda i: -lengths[i]))
                if self.shuffle:
                    g = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 1_000_000_007)
                    plan = [plan[j] for j in torch.randperm(len(plan), generator=g).tolist()]
            self._plans = {e: b for e, b in self._plans.items() if e >= epoch - 1}  # keep memory flat
            self._plans[epoch] = plan
            self._counts[epoch] = len(plan)
        return self._plans[epoch]

    def _locate(self, k: int) -> tuple[int, int]:
        """``(epoch, batch within it)`` of micro-batch ``k``."""
        if self.max_tokens is None:  # every epoch has the same number of batches
            return divmod(k, self.batches_per_epoch)
        epoch = 0
        while k >= (count := self._counts.get(epoch) or len(self._plan(epoch))):
            k -= count
            epoch += 1
        return epoch, k

    def indices(self, k: int) -> list[int]:
        """Example indices of micro-batch ``k``."""
        epoch, b = self._locate(k)
        batch = self._plan(epoch)[b]
        return batch.tolist() if isinstance(batch, Tensor) else list(batch)

    def epoch_of(self, k: int) -> float:
        return k / self.batches_per_epoch


def iter_batches(data: Dataset, batch_size: int, pad_id: int) -> Iterator[dict[str, Tensor]]:
    """Sequential (unshuffled) padded batches over ``data``, e.g. for evaluation."""
    for i in range(0, len(data), batch_size):
        yield collate(data.examples[i:i + batch_size], pad_id)


# --- the whole pipeline --------------------------------------------------------------------------------------
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


__all__ = ["IGNORE", "BatchOrder", "DataError", "Dataset", "Example", "collate", "dataset_from", "iter_batches",
           "load_datasets", "pack", "read_jsonl", "read_source", "split_records", "tokenize"]
