"""Files that are whole or absent: one atomic write for every file lorakit produces, and JSON/JSONL reading.

:func:`atomic_write` writes through a temporary file in the destination's directory, flushes it to disk and
renames it over the destination, so a reader (or a run killed half-way) sees either the old file or the new
one, never a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Produce ``path`` by ``write(tmp)`` on a temporary sibling, then rename it into place.

    The temporary name keeps the destination's suffix (``.png`` stays ``.png``), so writers that pick a format
    from the name (matplotlib) work unchanged. On any error the temporary file is removed and the old
    ``path``, if any, is left as it was. Parent directories are created.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=f".tmp{out.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2, sort_keys: bool = False,
               allow_nan: bool = True) -> Path:
    """Atomically write ``data`` as JSON (paths become strings), with a trailing newline."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, default=_json_default, allow_nan=allow_nan)
    return write_text(path, text + "\n")


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    """The JSON value in ``path``; :class:`LorakitError` naming the file if it is missing or malformed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LorakitError(f"{path}: unreadable {what} ({e})") from None


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of a JSONL file.

    Raises:
        json.JSONDecodeError: a malformed line (callers add the file name and line to their own error type).
        OSError, UnicodeDecodeError: unreadable file.
    """
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, json.loads(line)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
