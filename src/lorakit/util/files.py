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


class JsonlLineError(ValueError):
    """A line of a JSONL file that is not what the caller asked for (``line``: its 1-based number)."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line, self.reason = line, reason


def iter_jsonl(path: str | os.PathLike[str], *, blank: str = "skip", bad: str = "raise",
               objects: bool = False) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for every line of a JSONL file: the one JSONL reader of lorakit.

    Args:
        blank: ``"skip"`` blank lines, or ``"error"`` (a blank line inside a data file usually means a broken
            export).
        bad: ``"raise"`` on a malformed line, or ``"skip"`` it (a log whose last line a killed run tore).
        objects: every value must be a JSON object.

    Raises:
        JsonlLineError: a blank (``blank="error"``), malformed or non-object line, with its number and reason.
        OSError, UnicodeDecodeError: the file cannot be read as UTF-8 text.
    """
    with open(path, encoding="utf-8", newline="\n") as f:  # streamed: a file larger than memory is fine
        for n, line in enumerate(f, 1):
            yield from _jsonl_line(n, line, blank=blank, bad=bad, objects=objects)


def _jsonl_line(n: int, line: str, *, blank: str, bad: str, objects: bool) -> Iterator[tuple[int, Any]]:
    """The value of line ``n`` of a JSONL file (nothing for a skipped line)."""
    if not line.strip():
        if blank == "error":
            raise JsonlLineError(n, "empty line (each line must be one JSON object)")
        return
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        if bad == "skip":
            return
        raise JsonlLineError(n, f"malformed JSON ({e.msg} at column {e.colno})") from None
    if objects and not isinstance(value, dict):
        raise JsonlLineError(n, f"expected a JSON object, got {type(value).__name__}")
    yield n, value


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
