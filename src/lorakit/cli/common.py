"""What every ``lorakit`` command shares: the typer app, option parsers (finite numbers, fixed choices), the
messages channel (stderr) and the description of operating-system errors."""

from __future__ import annotations

import errno
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(name="lorakit", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Fine-tune LLMs with the LoRA family of methods: train, evaluate, merge, generate, inspect.")

Overrides = Annotated[list[str] | None, typer.Argument(
    help="Config overrides as dotted section.key=value pairs, values parsed as YAML "
         "(e.g. training.lr=1e-3 adapter.r=16 'adapter.targets=[q_proj,v_proj]').", show_default=False)]
ConfigPath = Annotated[Path, typer.Argument(help="The run's YAML config (sections: model, adapter, data, "
                                                 "training, output).", show_default=False)]


def say(msg: str) -> None:
    typer.echo(msg, err=True)


def finite(*, low: float | None = None, high: float | None = None, low_open: bool = False) -> Callable[[str], float]:
    """Parser of a float option that must be a finite number within bounds (typer's own ``min``/``max`` let NaN
    through every bound)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise typer.BadParameter(f"{text!r} is not a finite number")
        if low is not None and (value < low or low_open and value == low):
            raise typer.BadParameter(f"{text} must be {'>' if low_open else '>='} {low:g}")
        if high is not None and value > high:
            raise typer.BadParameter(f"{text} must be <= {high:g}")
        return value

    parse.__name__ = "number"  # shown as the option's metavar
    return parse


def one_of(*values: str) -> Callable[[str], str]:
    """Parser of an option whose value is one of ``values``."""

    def parse(text: str) -> str:
        if text not in values:
            raise typer.BadParameter(f"{text!r} is not one of {', '.join(values)}")
        return text

    parse.__name__ = "|".join(values)
    return parse


DTYPES = ("auto", "float32", "bfloat16", "float16")




# --- entry point ------------------------------------------------------------------------------------------------
#: Set to 1 (or pass ``--debug``) to get the Python traceback of an error instead of the one-line message.
DEBUG_ENV = "LORAKIT_DEBUG"


def describe_os_error(e: OSError) -> str:
    """One line naming what the operating system refused and on which file (disk full, permission...)."""
    what = e.strerror or str(e) or type(e).__name__
    if e.errno == errno.ENOSPC:
        what = "no space left on device"
    where = e.filename if e.filename is not None else None
    return f"{what}: {where}" if where else what
