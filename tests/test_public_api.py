"""Every public function refuses a bad argument with a lorakit error that names it, and changes nothing.

For each function (and constructor) in ``lorakit.__all__``, hypothesis takes a valid call and replaces one argument
by a value of the wrong type or shape: strings where modules are expected, malformed patterns and paths, NaN and
infinities, negative sizes, ``None``, containers of the wrong things, foreign objects. The call must then either
succeed or raise a :class:`lorakit.LorakitError` (never a stray ``TypeError``/``AttributeError``/``IndexError``
from deep inside) whose message names the argument (or quotes the bad value), and leave the model as it was.
The command line has the same check for its options in ``tests/test_cli_options.py``.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lorakit
from lorakit.methods.rank1_sum_pruning import grow

from .conftest import tiny_llama
from .test_failure_atomicity import _assert_same, _model, _state

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Env:
    """What a valid call needs: a model carrying two LoRA adapters, a saved adapter and a PEFT export of it,
    a model carrying a rank1-sum adapter, an optimizer, a scratch directory (also the working directory)."""

    model: torch.nn.Module
    ranked: torch.nn.Module
    saved: Path
    peft: Path
    tmp: Path

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-3)


def _env(tmp: Path) -> Env:
    model = _model()
    lorakit.attach(model, "lora", r=2)
    lorakit.attach(model, "lora", r=2, name="b", targets=["q_proj"])
    lorakit.set_active(model, ["default"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    saved = tmp / "saved"
    if not saved.exists():
        lorakit.save(model, saved)
        lorakit.export_peft(model, tmp / "peft")
    ranked = _model()
    lorakit.attach(ranked, "rank1-sum", r_init=2, target_rank=1)
    return Env(model, ranked, saved, tmp / "peft", tmp)


def _run_config(env: Env) -> dict[str, Any]:
    return {"model": {"path": str(env.tmp / "nowhere")}, "data": {"train": "train.jsonl"},
            "output": {"dir": str(env.tmp / "run")}}


@functools.cache
def _bpe_tokenizer() -> Any:
    from .test_gguf import _bpe_tokenizer as build

    return build()


def _gguf_model() -> torch.nn.Module:
    """A plain tiny Llama whose embedding holds the byte-level BPE tokenizer's ids (GGUF export's valid input)."""
    return tiny_llama(seed=0, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(_bpe_tokenizer()))


def _per_row(**kw: Any) -> None:
    with lorakit.per_row(**kw):
        pass


# each public callable: how to call it, and a valid set of arguments (by parameter name) in an Env
CALLS: dict[str, tuple[Callable[..., Any], Callable[[Env], dict[str, Any]]]] = {
    "attach": (lorakit.attach, lambda e: {"model": e.model, "method": "lora", "name": "c"}),
    "set_active": (lorakit.set_active, lambda e: {"model": e.model, "names": ["default"]}),
    "merge": (lorakit.merge, lambda e: {"model": e.model}),
    "unmerge": (lorakit.unmerge, lambda e: {"model": e.model}),
    "remove": (lorakit.remove, lambda e: {"model": e.model, "name": "b"}),
    "detach": (lorakit.detach, lambda e: {"model": e.model, "merge": True}),
    "training_callbacks": (lorakit.training_callbacks,
                           lambda e: {"model": e.model, "optimizer": e.optimizer, "total_steps": 4}),
    "adapters": (lorakit.adapters, lambda e: {"model": e.model}),
    "active_adapters": (lorakit.active_adapters, lambda e: {"model": e.model}),
    "adapter_modules": (lorakit.adapter_modules, lambda e: {"model": e.model, "name": "default"}),
    "trainable_parameters": (lorakit.trainable_parameters, lambda e: {"model": e.model}),
    "combine": (lorakit.combine, lambda e: {"model": e.model, "weights": {"default": 0.5, "b": 0.5}, "how": "cat",
                                            "name": "mix", "rank": None, "density": None, "seed": 0}),
    "per_row": (_per_row, lambda e: {"model": e.model, "names": ["default", None]}),
    "generate_per_row": (lorakit.generate_per_row, lambda e: {
        "model": e.model, "input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]), "adapter_names": ["default", "b"],
        "max_new_tokens": 1, "do_sample": False}),
    "quantize": (lorakit.quantize, lambda e: {"model": _model(), "scheme": "int8", "skip": ("lm_head",),
                                              "device": None}),
    "dequantize": (lorakit.dequantize, lambda e: {"model": e.model, "dtype": None}),
    "save": (lorakit.save, lambda e: {"model": e.model, "path": e.tmp / "out", "name": "default", "extra": None}),
    "read_adapter": (lorakit.read_adapter, lambda e: {"path": e.saved, "tensors": True}),
    "load": (lorakit.load, lambda e: {"model": e.model, "path": e.saved, "name": "c", "force": False}),
    "export_peft": (lorakit.export_peft, lambda e: {"model": e.model, "path": e.tmp / "peft-out", "name": "default",
                                                    "rank": None, "base_model_name_or_path": None}),
    "export_gguf": (lorakit.export_gguf, lambda e: {"model": _gguf_model(), "tokenizer": _bpe_tokenizer(),
                                                    "path": e.tmp / "model.gguf", "outtype": "f16", "name": None}),
    "export_gguf_adapter": (lorakit.export_gguf_adapter, lambda e: {"model": e.model, "path": e.tmp / "lora.gguf",
                                                                    "name": "default", "rank": None}),
    "load_peft": (lorakit.load_peft, lambda e: {"model": e.model, "path": e.peft, "name": "p"}),
    "hot_swap": (lorakit.hot_swap, lambda e: {"model": e.model, "name": "default", "path": e.saved, "force": False}),
    "grow": (grow, lambda e: {"model": e.ranked, "name": "default", "extra_rank": 1}),
    "get_method": (lorakit.get_method, lambda e: {"name": "lora"}),
    "param_groups": (lorakit.param_groups, lambda e: {"model": e.model, "lr": 1e-3, "loraplus_ratio": None,
                                                      "embedding_lr": 1e-6, "weight_decay": 0.0}),
    "optimizer": (lorakit.optimizer, lambda e: {"model": e.model, "lr": 1e-3, "loraplus_ratio": 4.0,
                                                "embedding_lr": 1e-6, "weight_decay": 0.0}),
    "load_config": (lorakit.load_config, lambda e: {"path": None, "overrides": ["training.lr=1e-3"],
                                                    "base": _run_config(e)}),
    "RankPruner": (lorakit.RankPruner, lambda e: {"model": e.ranked, "name": "default", "total_steps": 4,
                                                  "optimizer": None, "auto_shrink": None}),
    "Trainer": (lorakit.Trainer, lambda e: {"model": None, "config": _run_config(e), "tokenizer": None,
                                            "train_data": None, "eval_data": None, "callbacks": (), "log": None}),
}

NOT_CALLS = {"METHODS", "__version__", "Adapter", "AdapterConfig", "TrainConfig", "TrainingCallback", "FitResult"}


def test_every_public_callable_is_covered() -> None:
    public = {n for n in lorakit.__all__ if n not in NOT_CALLS and not (
        isinstance(getattr(lorakit, n), type) and issubclass(getattr(lorakit, n), Exception))}
    assert public <= set(CALLS), sorted(public - set(CALLS))


def _target(name: str) -> Callable[..., Any]:
    return {"per_row": lorakit.per_row}.get(name, CALLS[name][0])


def _parameters(name: str) -> list[str]:
    sig = inspect.signature(_target(name))
    return [p.name for p in sig.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
            and p.name != "self"]


WRONG = st.one_of(
    st.text(max_size=5),
    st.sampled_from(["[", "re:(", "", ".", "*", "../x", "nope/none", "default.x", "all-linear"]),
    st.integers(-3, 3), st.sampled_from([-1, -10**9, 10**12]),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.5, 0.0, 0.5, 1e308]),
    st.none(), st.booleans(), st.binary(max_size=3),
    st.lists(st.integers(-2, 2), max_size=2), st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(-1, 1), max_size=2),
    st.tuples(st.floats(allow_nan=True)),
    st.builds(object), st.builds(lambda: torch.full((2,), math.nan)), st.builds(lambda: torch.nn.Linear(2, 2)),
    st.builds(lambda: torch.zeros(2, 3, dtype=torch.long)), st.just(torch.float16), st.just(Path("elsewhere")),
)


def _names_it(message: str, param: str, value: Any) -> bool:
    """The message names the argument, or quotes the bad value (a name or path the user typed)."""
    if re.search(rf"\b{re.escape(param)}\b", message):
        return True
    values = value if isinstance(value, list | tuple | dict) else [value]
    return any(isinstance(v, str | Path) and (repr(str(v)) in message or re.search(rf"(^|[\s;(]){re.escape(str(v))}:",
                                                                                 message) is not None
                                              or len(str(v)) >= 2 and str(v) in message) for v in values)


def _model_of(kwargs: dict[str, Any]) -> torch.nn.Module | None:
    m = kwargs.get("model")
    return m if isinstance(m, torch.nn.Module) else None


@pytest.mark.parametrize("name", sorted(CALLS))
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_bad_argument_is_a_clear_error_and_changes_nothing(name: str, data: st.DataObject, tmp_path: Path,
                                                             monkeypatch) -> None:
    func, valid = CALLS[name]
    param = data.draw(st.sampled_from(_parameters(name)), label="argument")
    value = data.draw(WRONG, label="value")
    assume(not (value is None and inspect.signature(_target(name)).parameters[param].default is None))
    scratch = Path(tempfile.mkdtemp(dir=tmp_path))
    monkeypatch.chdir(scratch)  # relative paths drawn above land in this example's scratch directory
    env = _env(scratch)
    kwargs = valid(env)
    model = _model_of(kwargs)  # the model the valid call works on: a failed call must leave it as it was
    kwargs[param] = value
    before = _state(model) if model is not None else None
    try:
        func(**kwargs)
    except lorakit.LorakitError as e:
        assert _names_it(str(e), param, value), f"{name}({param}={value!r}): {e}"
        if model is not None:
            _assert_same(before, _state(model))
    # anything else (TypeError, AttributeError, IndexError, RuntimeError...) escapes and fails the test


def test_the_valid_calls_are_valid(tmp_path: Path, monkeypatch) -> None:
    """The baseline of every call succeeds, so each failure above comes from the replaced argument."""
    monkeypatch.chdir(tmp_path)
    for name, (func, valid) in CALLS.items():
        func(**valid(_env(tmp_path)))
        assert os.getcwd() == str(tmp_path), name
