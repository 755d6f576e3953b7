"""lorakit: fine-tune large language models with the whole LoRA family of parameter-efficient methods.

Typical use::

    import lorakit
    lorakit.attach(model, "lora", r=16, targets="all-linear")
    ...train...
    lorakit.save(model, "out/adapter")
"""

from __future__ import annotations

import lorakit.util.quiet  # noqa: F401  (first: filters dependency log noise before transformers loads them)
from lorakit._version import __version__
from lorakit.adapt.combine import combine
from lorakit.adapt.mixed import generate_per_row, per_row
from lorakit.adapt.model import (
    active_adapters,
    adapter_modules,
    adapters,
    attach,
    detach,
    merge,
    remove,
    set_active,
    trainable_parameters,
    training_callbacks,
    unmerge,
)
from lorakit.adapt.quantize import dequantize, quantize
from lorakit.core.callbacks import TrainingCallback
from lorakit.errors import (
    AdapterFileError,
    AdapterStateError,
    ConfigError,
    IncompatibleAdapterError,
    LorakitError,
    TargetError,
    UnknownMethodError,
)
from lorakit.formats.gguf_export import export_gguf, export_gguf_adapter
from lorakit.formats.native import load, read_adapter, save
from lorakit.formats.peft_export import export_peft
from lorakit.formats.peft_import import load_peft
from lorakit.formats.swap import hot_swap
from lorakit.methods import METHODS, Adapter, AdapterConfig, get_method
from lorakit.methods.rank1_sum_pruning import RankPruner
from lorakit.train.config import TrainConfig, load_config
from lorakit.train.data import DataError
from lorakit.train.optim import optimizer, param_groups
from lorakit.train.trainer import FitResult, Trainer, TrainingError

__all__ = [
    "METHODS",
    "Adapter",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterStateError",
    "ConfigError",
    "DataError",
    "FitResult",
    "IncompatibleAdapterError",
    "LorakitError",
    "RankPruner",
    "TargetError",
    "TrainConfig",
    "Trainer",
    "TrainingCallback",
    "TrainingError",
    "UnknownMethodError",
    "__version__",
    "active_adapters",
    "adapter_modules",
    "adapters",
    "attach",
    "combine",
    "dequantize",
    "detach",
    "export_gguf",
    "export_gguf_adapter",
    "export_peft",
    "generate_per_row",
    "get_method",
    "hot_swap",
    "load",
    "load_config",
    "load_peft",
    "merge",
    "optimizer",
    "param_groups",
    "per_row",
    "quantize",
    "read_adapter",
    "remove",
    "save",
    "set_active",
    "trainable_parameters",
    "training_callbacks",
    "unmerge",
]
