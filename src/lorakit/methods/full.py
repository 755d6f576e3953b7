"""Full fine-tuning: the baseline every comparison needs.

Not a layer adapter: every selected base parameter itself trains (``W = W0 + dW`` with ``dW`` dense and
unconstrained). Merge and unmerge are no-ops, since the weights already hold the update; saving stores the
trained parameters themselves.
"""

from __future__ import annotations

import re
from typing import ClassVar

from torch import nn

from lorakit.core.contract import AdapterConfig, Method, Targets
from lorakit.core.quant import quant_kind
from lorakit.errors import ConfigError, TargetError


class FullConfig(AdapterConfig):
    """Options of full fine-tuning.

    Attributes:
        targets: ``"all"`` (every parameter of the model, the default), a list of module names or
            suffixes whose parameters train, or a regex matching full module names.
    """

    targets: Targets = "all"


class Full(Method):
    """Marks base parameters trainable (``layer_method = False``); the one place that handles such a method is
    :mod:`lorakit.adapt.model` (attach, trainability, saved tensors, loading)."""

    method: ClassVar[str] = "full"
    config_cls: ClassVar[type[FullConfig]] = FullConfig
    layer_method: ClassVar[bool] = False
    relative_lr: ClassVar[float] = 0.05  # every weight moves: a far smaller step
    quantized_unsupported: ClassVar[str | None] = (
        "full fine-tuning trains W itself, and a 4/8-bit weight has no gradient and cannot take small updates; "
        "train on a dense base (model.quantize: none), or train an adapter (lora) on the quantized one")

    @classmethod
    def check_quantized(cls, model: nn.Module, chosen: list[str]) -> None:
        """Refuse to train a parameter of a quantized layer (other parameters, e.g. a task head, may train)."""
        for mod_name, module in model.named_modules():
            if quant_kind(module) is not None and any(n.startswith(f"{mod_name}.") for n in chosen):
                raise ConfigError(f"method 'full' cannot train on a quantized base ({mod_name!r} is "
                                  f"{quant_kind(module)}): {cls.quantized_unsupported}")

    @staticmethod
    def select(model: nn.Module, config: FullConfig) -> list[str]:
        """Names of the parameters that train under ``config.targets``."""
        names = [n for n, _ in model.named_parameters()]
        t = config.targets
        if t == "all":
            return names
        if isinstance(t, str):
            pattern = re.compile(t)
            mods = [m for m, _ in model.named_modules() if m and pattern.fullmatch(m)]
        else:
            mods = [m for m, _ in model.named_modules() if m and any(m == s or m.endswith("." + s) for s in t)]
        chosen = [n for n in names if any(n.startswith(m + ".") for m in mods)]
        if not chosen:
            raise TargetError(f"full fine-tuning targets {t!r} matched no parameters")
        return chosen
