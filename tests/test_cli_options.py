"""Every command-line option refuses a wrong value before any work starts, naming the option.

The commands are read from the typer app itself, so a new command or option is covered without editing this file:
every numeric option gets NaN, infinities, text, an empty string and values outside its declared range; every
option with a fixed set of values gets one outside the set. Each must be a usage error (exit status 2, no
traceback) that names the option. A number option without declared bounds must be listed in ``UNBOUNDED`` with
the reason, so a new one cannot slip through unchecked.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.cli import app, main

UNBOUNDED: dict[str, str] = {}  # "command --option": why any integer is fine


def _commands() -> list[tuple[list[str], Any]]:
    """``(words, command)`` of every leaf command (``["tasks", "arithmetic"]``...)."""
    out = []

    def walk(words: list[str], cmd: Any) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in sorted(subs.items()):
                walk([*words, name], sub)
        else:
            out.append((words, cmd))

    walk([], typer.main.get_command(app))
    return out


def _required_args(cmd: Any, skip: str) -> list[str]:
    """Placeholder values for the command's required parameters, so only the option under test can fail."""
    args: list[str] = []
    for p in cmd.params:
        if p.name == skip or not p.required:
            continue
        if p.param_type_name == "argument":
            args.append("placeholder.yaml")
        else:
            args += [p.opts[0], "placeholder"]
    return args


def _kind(p: Any) -> str:
    """``int``, ``float``, ``choice`` (a parser of a fixed set, lorakit.cli.common.one_of), or ``other``."""
    td = p.type_descriptor
    parser = getattr(td.parameter_info, "parser", None)
    if parser is not None:
        return "choice" if "|" in parser.__name__ else "float" if parser.__name__ == "number" else "other"
    ann = td.annotation
    args = [a for a in getattr(ann, "__args__", ()) if a is not type(None)]
    ann = args[0] if len(args) == 1 else ann
    return {int: "int", float: "float"}.get(ann, "other")


OPTIONS = [(words, cmd, p) for words, cmd in _commands() for p in cmd.params
           if p.param_type_name == "option" and not p.is_flag and _kind(p) != "other"]


def _bad_values(p: Any) -> list[str]:
    kind = _kind(p)
    if kind == "choice":
        return ["bogus", "", " ", "AUTO", "none,nf4"]
    bad = ["nan", "NaN", "inf", "-inf", "1e999", "abc", "", "1,5", "0x10"]
    if kind == "int":
        bad += ["1.5", "2e0"]
    low, high = p.min, p.max
    if low is not None:
        bad.append(str(low - 1))
    if high is not None:
        bad.append(str(high + 1))
    return bad


def _id(item: tuple[list[str], Any, Any]) -> str:
    return " ".join(item[0]) + " " + item[2].opts[0]


def test_the_commands_have_checked_options() -> None:
    assert len(OPTIONS) >= 15, [_id(o) for o in OPTIONS]  # the walk found the commands and their number options


@pytest.mark.parametrize("item", OPTIONS, ids=_id)
def test_a_bad_option_value_is_a_usage_error_naming_the_option(item, capsys) -> None:
    words, cmd, p = item
    kind = _kind(p)
    if kind in ("int", "float"):
        parsed = getattr(p.type_descriptor.parameter_info, "parser", None) is not None
        bounded = p.min is not None or p.max is not None or (kind == "float" and parsed)
        assert bounded or _id(item) in UNBOUNDED, f"{_id(item)}: a number option needs bounds (min=/max=)"
    for value in _bad_values(p):
        code = main([*words, *_required_args(cmd, p.name), p.opts[0], value])
        err = capsys.readouterr().err
        assert code == 2, (_id(item), value, err)
        assert "Traceback" not in err
        assert re.search(rf"'{re.escape(p.opts[0])}'|{re.escape(p.opts[0])}\b", err), (_id(item), value, err)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)))
def test_generate_sampling_options_take_only_finite_numbers_in_range(value: Any) -> None:
    """The sampling knobs get any float or text: accepted exactly when finite and in range."""
    from lorakit.cli.common import finite

    for parser, low, high, low_open in ((finite(low=0.0), 0.0, None, False),
                                        (finite(low=0.0, high=1.0, low_open=True), 0.0, 1.0, True)):
        text = str(value)
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        ok = math.isfinite(number) and number >= low and (not low_open or number > low) \
            and (high is None or number <= high)
        if ok:
            assert parser(text) == number
        else:
            with pytest.raises(typer.BadParameter):
                parser(text)


@pytest.mark.parametrize(("args", "names"), [
    (["generate", "--adapter", "x", "--prompt", "p", "--device", "gpu0"], "--device"),
    (["serve", "--base", "x", "--device", "tpu"], "--device"),
    (["compare", "placeholder.yaml", "--seeds", "0,one"], "--seeds"),
    (["bench", "--methods", "lora,nope", "--device", "cpu"], "nope"),
    (["bench", "--quantize", "nf5", "--device", "cpu"], "nf5"),
    (["bench", "--device", "quantum"], "quantum"),
])
def test_free_text_options_are_checked_before_any_work(args: list[str], names: str, capsys,
                                                       tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and names in err and "Traceback" not in err
