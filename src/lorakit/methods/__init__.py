"""Layer 2, the methods: one file per method, each a class implementing :class:`lorakit.core.contract.Adapter`
(or, for full fine-tuning, :class:`lorakit.core.contract.Method`), and this registry. Imports only core,
errors and util.

Adding a method = its file + one line in :data:`METHODS` + one row in the contract matrix
(``tests/test_contract.py``).
"""

from __future__ import annotations

from lorakit.core.contract import Adapter, AdapterConfig, Method
from lorakit.errors import UnknownMethodError
from lorakit.methods.delta_lora import DeltaLora
from lorakit.methods.dora import Dora
from lorakit.methods.full import Full
from lorakit.methods.loftq import Loftq
from lorakit.methods.lora import Lora
from lorakit.methods.lora_fa import LoraFa
from lorakit.methods.lora_sb import LoraSb
from lorakit.methods.lora_xs import LoraXs
from lorakit.methods.olora import Olora
from lorakit.methods.pissa import Pissa
from lorakit.methods.rank1_sum import Rank1Sum
from lorakit.methods.vera import Vera
from lorakit.util.arguments import checked

#: Every method lorakit offers, by name.
METHODS: dict[str, type[Method]] = {
    "lora": Lora,
    "dora": Dora,
    "full": Full,
    "lora-fa": LoraFa,
    "vera": Vera,
    "rank1-sum": Rank1Sum,
    "delta-lora": DeltaLora,
    "lora-xs": LoraXs,
    "lora-sb": LoraSb,
    "pissa": Pissa,
    "olora": Olora,
    "loftq": Loftq,
}


@checked
def method_for_peft(peft_type: str) -> str:
    """The registered method a PEFT adapter of ``peft_type`` (``"lora"``, ``"dora"``) loads as (its
    :attr:`~lorakit.Method.peft_import`)."""
    for name, cls in METHODS.items():
        if cls.peft_import == peft_type:
            return name
    raise UnknownMethodError(f"no registered method reads PEFT {peft_type!r} adapters")


@checked
def get_method(name: str) -> type[Method]:
    """The class registered as ``name``; :class:`UnknownMethodError` lists the valid names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UnknownMethodError(
            f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "Adapter", "AdapterConfig", "Method", "get_method", "method_for_peft"]
