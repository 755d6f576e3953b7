"""The unquantized weights of a base model, one layer at a time, for inits that need them on a quantized base.

LoftQ (https://arxiv.org/abs/2310.08659) initialises an adapter from the quantization error ``W - Q`` of each
layer; once a model is quantized only ``Q`` is in memory. :class:`DenseWeights` gives back ``W`` from where it
still is: a state dict (or any ``name -> tensor`` mapping), or the base's safetensors checkpoint (a file, a
directory of shards, or a Hugging Face hub id already in the local cache), read lazily so that only one layer's
weight is in memory at a time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorakit.errors import ConfigError

#: What :class:`DenseWeights` accepts: a mapping of state-dict keys (or module names) to tensors, or the path of a
#: safetensors file or checkpoint directory (or a hub id in the local cache).
DenseSource = Mapping[str, Tensor] | str | os.PathLike[str]


class DenseWeights:
    """``weight(module_name)``: the dense ``weight`` of that module, as float32, from ``source``.

    Keys tried, in order: ``NAME.weight``, ``NAME``, then ``NAME.weight`` without the module name's first
    component (a checkpoint of the inner model: ``model.layers.0...`` saved as ``layers.0...``).
    """

    def __init__(self, source: DenseSource) -> None:
        self._mapping: Mapping[str, Tensor] | None = None
        self._files: dict[str, Path] = {}
        if isinstance(source, Mapping):
            self._mapping = source
        elif isinstance(source, str | os.PathLike):
            for f in _safetensors_files(source):
                for key in _keys(f):
                    self._files.setdefault(key, f)
        else:
            raise ConfigError(f"dense_weights: expected a state dict or a checkpoint path, got {type(source).__name__}")
        self.where = "the state dict" if self._mapping is not None else str(source)

    def keys(self) -> list[str]:
        return list(self._mapping) if self._mapping is not None else list(self._files)

    def weight(self, module_name: str) -> Tensor:
        """The dense weight of ``module_name``, float32 on the CPU.

        Raises:
            ConfigError: the source holds no weight for it.
        """
        candidates = [f"{module_name}.weight", module_name]
        if "." in module_name:
            candidates.append(f"{module_name.split('.', 1)[1]}.weight")
        for key in candidates:
            t = self._get(key)
            if t is not None:
                return t.detach().to("cpu", torch.float32)
        raise ConfigError(f"dense_weights: no weight for {module_name!r} in {self.where} (tried "
                          f"{', '.join(candidates)})")

    def _get(self, key: str) -> Tensor | None:
        if self._mapping is not None:
            value = self._mapping.get(key)
            return value if isinstance(value, Tensor) else None
        path = self._files.get(key)
        if path is None:
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _safetensors_files(source: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a file, a checkpoint directory, or a hub id in the local Hugging Face cache."""
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        path = _cached_snapshot(str(source))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"dense_weights: no *.safetensors file in {path} (the dense base is read from its "
                          "safetensors checkpoint; pass a state dict instead)")
    return files


def _cached_snapshot(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:  # not a hub id, or not in the cache
        raise ConfigError(f"dense_weights: {repo!r} is not a file, a directory, or a model in the local Hugging "
                          f"Face cache ({type(e).__name__})") from None


def dense_source(value: Any) -> DenseWeights:
    """``value`` as :class:`DenseWeights` (already one: returned as is)."""
    return value if isinstance(value, DenseWeights) else DenseWeights(value)


__all__ = ["DenseSource", "DenseWeights", "dense_source"]
