"""lorakit: fine-tune large language models with the whole LoRA family of parameter-efficient methods.

Typical use::

    import lorakit
    lorakit.attach(model, "lora", r=16, targets="all-linear")
    ...train...
    lorakit.save(model, "out/adapter")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .adapters import METHODS, Adapter, AdapterConfig, get_method  # noqa: E402
from .callbacks import TrainingCallback, training_callbacks  # noqa: E402
from .errors import (  # noqa: E402
    AdapterFileError,
    AdapterStateError,
    ConfigError,
    IncompatibleAdapterError,
    LorakitError,
    TargetError,
    UnknownMethodError,
)
from .io import load, read_adapter, save  # noqa: E402
from .optim import optimizer, param_groups  # noqa: E402
from .peft_format import export_peft, load_peft  # noqa: E402
from .model import (  # noqa: E402
    active_adapters,
    adapter_modules,
    adapters,
    attach,
    detach,
    merge,
    remove,
    set_active,
    trainable_parameters,
    unmerge,
)
from .pruning import RankPruner  # noqa: E402
from .config import TrainConfig, load_config  # noqa: E402
from .data import DataError  # noqa: E402
from .trainer import FitResult, Trainer, TrainingError  # noqa: E402

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
    "detach",
    "export_peft",
    "get_method",
    "load",
    "load_config",
    "load_peft",
    "merge",
    "optimizer",
    "param_groups",
    "read_adapter",
    "remove",
    "save",
    "set_active",
    "trainable_parameters",
    "training_callbacks",
    "unmerge",
]
