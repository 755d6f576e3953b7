"""Tokenized examples on disk: data larger than memory, tokenized once and memory-mapped by every later run.

A store is a directory of flat arrays, written by :class:`StoreWriter` into ``DIR.tmp`` and renamed when
complete (a run killed while tokenizing leaves no half store, and the next run starts that store over):

- ``ids.bin`` (int32): every example's token ids, one after the other;
- ``labels.bin`` (int32): their per-token labels, or one class index per example (classification);
- ``offsets.bin`` (int64, ``n + 1``): where example ``i`` starts and ends;
- ``segments.bin`` (int32, packed blocks only): which example each token belongs to;
- ``store.json``: counts and settings, written last.

:class:`TokenStore` reads them with ``numpy.memmap``: it is a ``Sequence`` of
:class:`~lorakit.train.data.Example` whose items are built on access, so only the pages a batch touches are
read, and resident memory stays flat whatever the data's size.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from lorakit.train.example import Example
from lorakit.util.files import write_json

STORE_FILE = "store.json"


class StoreWriter:
    """Appends examples to a store being written; :meth:`finish` publishes it (atomic rename)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self._ids = open(self.tmp / "ids.bin", "wb")
        self._labels = open(self.tmp / "labels.bin", "wb")
        self._segments: Any = None
        self.offsets = [0]
        self.class_labels: bool | None = None

    def add(self, input_ids: Sequence[int], labels: Sequence[int] | int, segments: Sequence[int] | None = None) -> None:
        cls = isinstance(labels, int)
        if self.class_labels is None:
            self.class_labels = cls
            if segments is not None:
                self._segments = open(self.tmp / "segments.bin", "wb")
        self._ids.write(np.asarray(input_ids, dtype=np.int32).tobytes())
        self._labels.write(np.asarray([labels] if cls else labels, dtype=np.int32).tobytes())
        if self._segments is not None:
            self._segments.write(np.asarray(segments, dtype=np.int32).tobytes())
        self.offsets.append(self.offsets[-1] + len(input_ids))

    def finish(self, meta: dict[str, Any]) -> TokenStore:
        for f in (self._ids, self._labels, self._segments):
            if f is not None:
                f.close()
        np.asarray(self.offsets, dtype=np.int64).tofile(self.tmp / "offsets.bin")
        write_json(self.tmp / STORE_FILE, {**meta, "n": len(self.offsets) - 1,
                                           "class_labels": bool(self.class_labels),
                                           "packed": self._segments is not None})
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(self.tmp, self.path)
        return TokenStore(self.path)

    def abort(self) -> None:
        for f in (self._ids, self._labels, self._segments):
            if f is not None:
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class TokenStore(Sequence[Example]):
    """A read-only, memory-mapped sequence of examples (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.meta: dict[str, Any] = json.loads((self.path / STORE_FILE).read_text())
        self.n = int(self.meta["n"])
        self.offsets = np.fromfile(self.path / "offsets.bin", dtype=np.int64)
        total = int(self.offsets[-1])
        self.ids = np.memmap(self.path / "ids.bin", dtype=np.int32, mode="r", shape=(total,)) if total else \
            np.zeros(0, np.int32)
        n_labels = self.n if self.meta["class_labels"] else total
        self.labels = np.memmap(self.path / "labels.bin", dtype=np.int32, mode="r", shape=(n_labels,)) \
            if n_labels else np.zeros(0, np.int32)
        self.segments = np.memmap(self.path / "segments.bin", dtype=np.int32, mode="r", shape=(total,)) \
            if self.meta["packed"] and total else None

    @staticmethod
    def exists(path: str | os.PathLike[str]) -> bool:
        return (Path(path) / STORE_FILE).is_file()

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> Example: ...

    @overload
    def __getitem__(self, i: slice) -> list[Example]: ...

    def __getitem__(self, i: int | slice) -> Example | list[Example]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        labels: Any = int(self.labels[i]) if self.meta["class_labels"] else self.labels[a:b].tolist()
        segments = self.segments[a:b].tolist() if self.segments is not None else None
        return Example(self.ids[a:b].tolist(), labels, segments)

    def __iter__(self) -> Iterator[Example]:
        for i in range(self.n):
            yield self[i]

    def lengths(self) -> list[int]:
        return np.diff(self.offsets).tolist()

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])


__all__ = ["StoreWriter", "TokenStore"]
