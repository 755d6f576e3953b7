"""Where training data comes from: the files and objects people bring, read into records, and the record
formats people use, turned into lorakit's four.

Sources (:func:`read_records`), chosen by what the path is:

- ``.jsonl`` / ``.ndjson``: one JSON object per line (strict: a blank or malformed line is an error naming it);
- ``.json``: a list of objects (or ``{"data": [...]}``, or JSON Lines under a ``.json`` name);
- ``.csv`` / ``.tsv``: a header row, then one example per row; every cell stays the string it is in the file
  (a completion ``" 0"`` is the string ``" 0"``, never the integer 0);
- ``.parquet``: via ``pyarrow`` (installed with ``datasets``);
- a directory written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: its ``train`` split);
- in Python, a ``datasets.Dataset`` or any sequence of dicts.

Formats (:func:`normalize`), detected from the columns unless ``data.format`` names one, after the renames of
``data.columns`` (``{prompt: question, completion: answer}`` reads the ``question`` column as ``prompt``):

- lorakit's ``text``, ``prompt_completion``, ``chat`` (``messages``) and ``classification`` (``text`` +
  ``label``);
- ``alpaca``: ``instruction``, optional ``input``, ``output`` -> prompt/completion, the prompt laid out as
  ``### Instruction:`` / ``### Input:`` / ``### Response:`` sections;
- ``sharegpt``: ``conversations`` of ``{"from", "value"}`` turns -> chat messages (``human``/``user`` ->
  user, ``gpt``/``assistant``/``model`` -> assistant, ``system`` -> system).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

#: ``(where, record)``: a record and where it came from: its line (JSONL, CSV) or 1-based row (others).
Record = tuple[int, dict[str, Any]]

#: The columns each format needs (``alpaca``'s ``input`` is optional).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "text": ("text",), "prompt_completion": ("prompt", "completion"), "chat": ("messages",),
    "classification": ("text", "label"), "alpaca": ("instruction", "output"), "sharegpt": ("conversations",),
    "preference": ("chosen", "rejected"),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "system": "system"}


class DataError(LorakitError, ValueError):
    """Training data that cannot be read or used; the message names the file and the line or row."""


# --- reading --------------------------------------------------------------------------------------------------
def read_records(source: str | os.PathLike[str] | Any, *, jsonl_reader: Any = None) -> tuple[list[Record], str]:
    """``(records, name)`` of a data file, a ``datasets`` directory, a ``datasets.Dataset`` or a list of dicts.

    Args:
        jsonl_reader: the strict JSONL reader for ``.jsonl`` files (lorakit's :func:`lorakit.train.data.read_jsonl`).
    """
    if not isinstance(source, (str, os.PathLike)):
        return _from_rows(source, type(source).__name__), type(source).__name__
    p = Path(source)
    if p.is_file() and p.suffix.lower() not in (".csv", ".tsv", ".parquet", ".json"):
        if jsonl_reader is None:  # pragma: no cover - the trainer always passes it
            raise DataError(f"{p}: no JSONL reader")
        return jsonl_reader(p), str(p)
    if p.is_file() and p.suffix.lower() == ".json":
        return _read_json(p, jsonl_reader), str(p)
    records = list(iter_records(p))
    if not records:
        raise DataError(f"{p}: no examples" + (" (only a header)" if p.suffix.lower() in (".csv", ".tsv") else ""))
    return records, str(p)


def iter_records(source: str | os.PathLike[str], *, jsonl_rows: Any = None) -> Iterator[Record]:
    """The records of a data file or ``datasets`` directory, one at a time: a file larger than memory streams
    (JSONL line by line, CSV row by row, parquet batch by batch, a ``datasets`` directory memory-mapped); a
    ``.json`` array is read whole.

    Args:
        jsonl_rows: ``path -> iterator of records`` for JSONL files (lorakit's strict line reader).
    """
    p = Path(source)
    if p.is_dir():
        for i, row in enumerate(_load_from_disk(p), 1):
            yield i, dict(row)
        return
    if not p.is_file():
        raise DataError(f"{p}: no such data file")
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        yield from _iter_csv(p, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        yield from _iter_parquet(p)
    elif suffix == ".json":
        yield from _read_json(p, None)
    else:
        if jsonl_rows is None:  # pragma: no cover
            raise DataError(f"{p}: no JSONL reader")
        yield from jsonl_rows(p)


def _from_rows(rows: Iterable[Any], name: str) -> list[Record]:
    out = []
    for i, row in enumerate(rows, 1):  # 1-based row numbers, like the line numbers of text files
        if not isinstance(row, Mapping):
            raise DataError(f"{name}:{i}: expected a record (a mapping of columns), got {type(row).__name__}")
        out.append((i, dict(row)))
    if not out:
        raise DataError(f"{name}: no examples")
    return out


def _read_json(p: Path, jsonl_reader: Any) -> list[Record]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError:
        if jsonl_reader is not None:  # JSON Lines under a .json name (a common export)
            return jsonl_reader(p)
        raise DataError(f"{p}: malformed JSON") from None
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{p}: a .json data file must hold a list of records (or {{\"data\": [...]}}), got "
                          f"{type(data).__name__}")
    return _from_rows(data, str(p))


def _iter_csv(p: Path, delimiter: str) -> Iterator[Record]:
    try:
        with open(p, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            if not reader.fieldnames:
                raise DataError(f"{p}: no header row")
            for row in reader:
                if None in row:  # more cells than header columns
                    raise DataError(f"{p}:{reader.line_num}: more cells than the header's "
                                    f"{len(reader.fieldnames)} columns")
                if any(v is None for v in row.values()):
                    raise DataError(f"{p}:{reader.line_num}: fewer cells than the header's "
                                    f"{len(reader.fieldnames)} columns")
                yield reader.line_num, dict(row)
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{p}: malformed CSV ({e})") from None


def _iter_parquet(p: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq  # comes with `datasets`
    except ImportError:  # pragma: no cover
        raise DataError(f"{p}: reading parquet needs pyarrow (pip install datasets)") from None
    try:
        batches = pq.ParquetFile(p).iter_batches(batch_size=1024)
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield n, row
    except DataError:
        raise
    except Exception as e:  # pyarrow's own error types
        raise DataError(f"{p}: unreadable parquet file ({e})") from None


def _load_from_disk(p: Path) -> Any:
    if not any((p / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        raise DataError(f"{p}: a directory, but not one written by datasets' save_to_disk")
    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise DataError(f"{p}: reading a datasets directory needs `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:
        raise DataError(f"{p}: unreadable datasets directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{p}: a DatasetDict without a 'train' split (splits: {sorted(ds)})")
        ds = ds["train"]
    return ds


# --- formats --------------------------------------------------------------------------------------------------
def rename_columns(records: Iterable[Record], columns: Mapping[str, str] | None, source: str) -> Iterator[Record]:
    """Apply ``data.columns`` (``{lorakit name: column in the data}``) to every record, one at a time."""
    if not columns:
        yield from records
        return
    for where, obj in records:
        missing = [c for c in columns.values() if c not in obj]
        if missing:
            raise DataError(f"{source}:{where}: data.columns names column(s) {missing} that this record lacks "
                            f"(columns: {sorted(obj)})")
        new = {k: v for k, v in obj.items() if k not in columns.values()}
        new.update({target: obj[col] for target, col in columns.items()})
        yield where, new


def detect(obj: Mapping[str, Any], task: str, source: str) -> str:
    """The format a record's columns imply; :class:`DataError` listing the columns found otherwise."""
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "messages" in obj:
        return "chat"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "label" in obj or task == "classification":
        return "classification"
    if "text" in obj:
        return "text"
    needs = "; ".join(f"{f}: {', '.join(c)}" for f, c in FORMAT_COLUMNS.items())
    raise DataError(f"{source}: cannot tell the data format from the columns {sorted(obj)}; the formats need "
                      f"{needs} (alpaca's input and preference's prompt are optional); rename columns with data.columns, e.g. "
                      "{prompt: question, completion: answer}")


def alpaca_prompt(instruction: str, context: str) -> str:
    """The prompt of an alpaca record: instruction, optional input, then the response header."""
    text = f"### Instruction:\n{instruction}\n\n"
    if context:
        text += f"### Input:\n{context}\n\n"
    return text + "### Response:\n"


def normalize(obj: dict[str, Any], fmt: str, where: str) -> tuple[dict[str, Any], str]:
    """``(record, format)`` in one of lorakit's four formats (alpaca and ShareGPT records are converted)."""
    if fmt == "alpaca":
        missing = [k for k in FORMAT_COLUMNS["alpaca"] if k not in obj]
        if missing:
            raise DataError(f"{where}: missing column(s) {missing} for format 'alpaca' (columns: {sorted(obj)})")
        for k in ("instruction", "input", "output"):
            if k in obj and obj[k] is not None and not isinstance(obj[k], str):
                raise DataError(f"{where}: {k!r} must be a string, got {type(obj[k]).__name__}")
        output = obj["output"] or ""
        return {"prompt": alpaca_prompt(obj["instruction"] or "", obj.get("input") or ""),
                "completion": output}, "prompt_completion"
    if fmt == "sharegpt":
        turns = obj.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
        messages = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
                raise DataError(f"{where}: conversations[{j}] must be an object with a string 'value'")
            role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise DataError(f"{where}: conversations[{j}]: unknown speaker {turn.get('from')!r} (known: "
                                  f"{', '.join(sorted(SHAREGPT_ROLES))})")
            messages.append({"role": role, "content": turn["value"]})
        return {"messages": messages}, "chat"
    return obj, fmt


def names(records: Sequence[Record]) -> list[str]:
    """The column names of the first record (for messages)."""
    return sorted(records[0][1]) if records else []


__all__ = ["FORMAT_COLUMNS", "DataError", "alpaca_prompt", "detect", "normalize", "read_records",
           "rename_columns"]
