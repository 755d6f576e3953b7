"""Training data larger than memory: streamed from the file once into an on-disk token store, then
memory-mapped (``data.cache_dir``).

With ``data.cache_dir`` set, :func:`load_data` reads ``data.train`` (and ``data.eval``) record by record
(:func:`lorakit.train.sources.iter_records`), tokenizes (and packs) each example as it comes, and appends it
to a :class:`~lorakit.train.token_store.TokenStore` under ``cache_dir/<key>/``. Nothing but the current record
and the per-example lengths is held in memory. The key hashes everything the tokens depend on (the file's
path, size and modification time, the tokenizer, the data settings, the task and, for a held-out split, the
seed), so a resumed run, or any run with the same data, reuses the store without tokenizing again, and a
changed file or setting gets a store of its own.

Held-out split (``data.eval_fraction`` without ``data.eval``): each record goes to the evaluation set when a
hash of its line number and the seed falls below the fraction, so the split is decided on the fly, the same for
every run with that seed (it is a different draw from the in-memory split's).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorakit.train.config import DataConfig
from lorakit.train.data import DataError, Dataset, encode_records, load_datasets, pack_blocks, read_jsonl_rows
from lorakit.train.sources import iter_records, rename_columns
from lorakit.train.token_store import StoreWriter, TokenStore

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64: a fast, well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def held_out(line: int, seed: int, fraction: float) -> bool:
    """Whether record ``line`` belongs to the held-out split (decided per record, see the module docstring)."""
    return _mix(line * 1_000_003 + seed) / 2**64 < fraction


def tokenizer_id(tokenizer: Any) -> str:
    """A digest of what the tokenizer does (its serialised form when it has one, else its vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "chat_template", None)]
    return hashlib.sha256((text + json.dumps(extra, default=str)).encode()).hexdigest()[:16]


def store_key(source: Path, cfg: DataConfig, tokenizer: Any, *, task: str, num_labels: int, part: str,
              seed: int | None) -> str:
    """The cache key of one store (see the module docstring)."""
    st = source.stat()
    settings = cfg.model_dump(mode="json", exclude={"train", "eval", "cache_dir", "group_by_length", "max_tokens"})
    ident = {"source": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "tokenizer": tokenizer_id(tokenizer), "data": settings, "task": task, "num_labels": num_labels,
             "part": part, "seed": seed}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def _build(records: Iterator[tuple[int, dict[str, Any]]], path: Path, cfg: DataConfig, tokenizer: Any, *,
           task: str, num_labels: int, name: str, required: bool) -> Dataset | None:
    counts = Dataset([], "", source=name)
    examples = encode_records(records, tokenizer, fmt=cfg.format, task=task, max_length=cfg.max_length,
                              truncate=not cfg.packing, add_eos=cfg.add_eos, label_names=cfg.labels,
                              num_labels=num_labels, source=name, counts=counts, required=required)
    if cfg.packing:
        examples = pack_blocks(examples, cfg.max_length, counts)
    writer = StoreWriter(path)
    try:
        for ex in examples:
            writer.add(ex.input_ids, ex.labels, ex.segments)
        if len(writer.offsets) == 1:
            if not required and not counts.format:  # an empty held-out split: no evaluation
                writer.abort()
                return None
            raise DataError(f"{name}: every example was dropped (no trainable tokens within "
                            f"max_length={cfg.max_length})")
        store = writer.finish({"format": counts.format, "n_truncated": counts.n_truncated,
                               "n_dropped": counts.n_dropped, "source": name})
    except BaseException:
        writer.abort()
        raise
    return _dataset(store)


def _dataset(store: TokenStore) -> Dataset:
    m = store.meta
    return Dataset(store, m["format"], int(m["n_truncated"]), int(m["n_dropped"]), m["source"],
                   {"cache": str(store.path)})


def _stream(source: Path, cfg: DataConfig) -> Iterator[tuple[int, dict[str, Any]]]:
    return rename_columns(iter_records(source, jsonl_rows=read_jsonl_rows), cfg.columns, str(source))


def cached_dataset(source: str | os.PathLike[str], cfg: DataConfig, tokenizer: Any, *, task: str,
                   num_labels: int = 2, part: str = "all", seed: int | None = None,
                   log: Any = None) -> Dataset | None:
    """The store of one data file (built on first use), as a :class:`~lorakit.train.data.Dataset`.

    Args:
        part: ``"all"``, or ``"train"`` / ``"eval"``: the records outside / inside the held-out split of
            ``seed`` and ``cfg.eval_fraction``.
    """
    assert cfg.cache_dir is not None
    src = Path(source)
    if not src.exists():
        raise DataError(f"{src}: no such data file")
    key = store_key(src, cfg, tokenizer, task=task, num_labels=num_labels, part=part, seed=seed)
    path = Path(cfg.cache_dir) / key / part
    if TokenStore.exists(path):
        if log is not None:
            log(f"data: using the tokenized cache {path}")
        return _dataset(TokenStore(path))
    if log is not None:
        log(f"data: tokenizing {src} into {path} (once; later runs reuse it)")
    records = _stream(src, cfg)
    if part != "all":
        keep_eval = part == "eval"
        records = ((n, r) for n, r in records if held_out(n, int(seed or 0), cfg.eval_fraction) == keep_eval)
    name = str(src) if part != "eval" else f"{src} (held-out split)"
    return _build(records, path, cfg, tokenizer, task=task, num_labels=num_labels, name=name,
                  required=part != "eval")


def load_data(cfg: DataConfig, tokenizer: Any, *, task: str, seed: int, num_labels: int = 2,
              log: Any = None) -> tuple[Dataset, Dataset | None]:
    """``(train, eval)`` for a run: through the token stores with ``data.cache_dir`` (files only), else in memory
    (:func:`lorakit.train.data.load_datasets`)."""
    if cfg.cache_dir is None:
        return load_datasets(cfg, tokenizer, task=task, seed=seed, num_labels=num_labels)
    kw = {"task": task, "num_labels": num_labels, "log": log}
    if cfg.eval is not None:
        train = cached_dataset(cfg.train, cfg, tokenizer, **kw)
        evald = cached_dataset(cfg.eval, cfg, tokenizer, **kw)
    elif cfg.eval_fraction > 0:
        train = cached_dataset(cfg.train, cfg, tokenizer, part="train", seed=seed, **kw)
        evald = cached_dataset(cfg.train, cfg, tokenizer, part="eval", seed=seed, **kw)
    else:
        train, evald = cached_dataset(cfg.train, cfg, tokenizer, **kw), None
    assert train is not None
    if evald is not None and evald.format != train.format:
        raise DataError(f"{evald.source}: format {evald.format!r} differs from the training data's {train.format!r}")
    return train, evald


__all__ = ["cached_dataset", "held_out", "load_data", "store_key", "tokenizer_id"]
