"""File names of the adapter formats lorakit reads and writes (a leaf of :mod:`lorakit.formats`)."""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.errors import AdapterFileError

#: lorakit's own format: ``adapter.safetensors`` + ``adapter.json``.
FORMAT = "lorakit-adapter"
FORMAT_VERSION = 1
TENSORS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"

#: Hugging Face PEFT's LoRA format: ``adapter_config.json`` + ``adapter_model.safetensors``.
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
#: PEFT's prefix of every tensor key.
PEFT_PREFIX = "base_model.model."


def is_peft_dir(path: str | os.PathLike[str]) -> bool:
    """``path`` is a PEFT adapter directory (``adapter_config.json``) and not a lorakit one."""
    d = Path(path)
    return (d / PEFT_CONFIG_FILE).is_file() and not (d / META_FILE).is_file()


def output_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a directory to write an adapter into (created with its parents); an existing file there is
    an :class:`AdapterFileError`, not a raw ``FileExistsError``."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise AdapterFileError(f"{out} exists and is not a directory; choose another path for the adapter")
    out.mkdir(parents=True, exist_ok=True)
    return out
