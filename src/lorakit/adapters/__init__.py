"""The method registry: one line per method. Adding a method = one file + one line here."""

from __future__ import annotations

from ..errors import UnknownMethodError
from .base import Adapter, AdapterConfig
from .delta_lora import DeltaLora
from .dora import Dora
from .full import Full
from .lora import Lora
from .lora_fa import LoraFa
from .lora_sb import LoraSb
from .lora_xs import LoraXs
from .rank1_sum import Rank1Sum
from .vera import Vera

#: Every method lorakit offers, by name.
METHODS: dict[str, type[Adapter] | type[Full]] = {
    "lora": Lora,
    "dora": Dora,
    "full": Full,
    "lora-fa": LoraFa,
    "vera": Vera,
    "rank1-sum": Rank1Sum,
    "delta-lora": DeltaLora,
    "lora-xs": LoraXs,
    "lora-sb": LoraSb,
}


def get_method(name: str) -> type[Adapter] | type[Full]:
    """The class registered as ``name``; :class:`UnknownMethodError` lists the valid names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UnknownMethodError(
            f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "Adapter", "AdapterConfig", "get_method"]
