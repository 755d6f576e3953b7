"""Every public function either succeeds or leaves the model exactly as it was (property-based, hypothesis).

For every method, hypothesis draws bad options, bad adapter files and bad call orders; after each failure the
model must be unchanged: outputs, parameters and buffers, ``requires_grad`` flags, module structure, the adapter
list, the active adapters and the merged state. A failure must also be a :class:`lorakit.LorakitError` (a clear
message), never a stray ``TypeError`` or ``KeyError`` from deep inside.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakit
from lorakit.adapt.quantize import quantized_layers
from lorakit.core.layers import adapted_layers

from .conftest import batch_for, output_of, tiny_llama
from .test_contract import CASES

METHODS = sorted(lorakit.METHODS)
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _model() -> torch.nn.Module:
    return tiny_llama(seed=0, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=32)


def _plain(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A tensor's values as plain tensors: its own, or a quantized tensor subclass's inner data and scales."""
    t = t.detach()
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return tuple(inner for n in names for inner in _plain(getattr(t, n)))
    return (t.clone(),)


def _state(model: torch.nn.Module) -> dict[str, Any]:
    """Everything a failed call must leave as it was."""
    with torch.no_grad():
        return {
            "tensors": {n: _plain(t) for n, t in model.state_dict(keep_vars=True).items()},
            "flags": {n: p.requires_grad for n, p in model.named_parameters()},
            "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "adapters": {k: (r.method, list(r.targets)) for k, r in lorakit.adapters(model).items()},
            "active": lorakit.active_adapters(model),
            "layers": {n: (list(layer.active), list(layer.merged)) for n, layer in adapted_layers(model)},
            "training": model.training,
            "output": output_of(model, batch_for(model)),
        }


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in ("flags", "modules", "adapters", "active", "layers", "training"):
        assert before[key] == after[key], key
    assert before["tensors"].keys() == after["tensors"].keys()
    for n, t in before["tensors"].items():
        assert len(t) == len(after["tensors"][n]) and all(map(torch.equal, t, after["tensors"][n])), n
    assert torch.equal(before["output"], after["output"])


def _attach_valid(model: torch.nn.Module, method: str, name: str = "default") -> None:
    case = CASES[method]
    lorakit.attach(case.base(model), method, name=name, **case.options, **case.runtime(model))


def _expect_clean_failure(model: torch.nn.Module, call: Any) -> None:
    """``call()`` succeeds, or raises a LorakitError and leaves ``model`` unchanged."""
    before = _state(model)
    try:
        call()
    except lorakit.LorakitError:
        _assert_same(before, _state(model))


# --- bad options -----------------------------------------------------------------------------------------------
BAD_VALUES = st.one_of(st.integers(min_value=-10**3, max_value=10**3), st.floats(allow_nan=True),
                       st.text(max_size=8), st.booleans(), st.none(), st.lists(st.integers(), max_size=3))


@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(data=st.data())
def test_bad_options_leave_the_model_unchanged(method: str, data: st.DataObject) -> None:
    fields = sorted(lorakit.METHODS[method].config_cls.model_fields)
    keys = data.draw(st.lists(st.sampled_from([*fields, "rank", "lr", "bogus"]), min_size=1, max_size=3,
                              unique=True))
    options = {k: data.draw(BAD_VALUES) for k in keys}
    model = CASES[method].base(_model())  # the base the method trains on (LoftQ: a quantized one)
    if data.draw(st.booleans()):  # on a bare model, or one that already carries an adapter
        _attach_valid(model, "lora", name="other")
    runtime = CASES[method].runtime(model) if data.draw(st.booleans()) else {}
    _expect_clean_failure(model, lambda: lorakit.attach(model, method, **options, **runtime))


# --- bad files -------------------------------------------------------------------------------------------------
def _corrupt(d: Path, how: str, index: int, value: Any) -> None:
    meta_path, tensors = d / "adapter.json", d / "adapter.safetensors"
    meta = json.loads(meta_path.read_text())
    if how == "truncate":
        data = tensors.read_bytes()
        tensors.write_bytes(data[: max(0, len(data) // 2)])
    elif how == "flip":
        data = bytearray(tensors.read_bytes())
        data[index % len(data)] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif how == "delete":
        tensors.unlink()
    elif how == "garbage-json":
        meta_path.write_text("{not json")
    elif how == "config":  # an option set to a drawn value (e.g. a rank the tensors do not have)
        key = sorted(meta["config"])[index % len(meta["config"])] if meta["config"] else "r"
        meta["config"][key] = value
        meta_path.write_text(json.dumps(meta))
    elif how == "rank":  # a valid rank that the saved tensors do not have: only filling can tell
        key = next((k for k in ("r", "r_init") if k in meta["config"]), None)
        if key is not None:
            meta["config"][key] += 1 + index % 2
            if "target_rank" in meta["config"]:
                meta["config"]["target_rank"] = 1
            meta_path.write_text(json.dumps(meta))
        else:  # full fine-tuning: a saved tensor of the wrong shape
            meta["layer_shapes"] = {k: [v[0] + 1, *v[1:]] for k, v in meta["layer_shapes"].items()}
            meta_path.write_text(json.dumps(meta))
    elif how == "method":
        meta["method"] = str(value)
        meta_path.write_text(json.dumps(meta))
    elif how == "targets":
        meta["targets"] = [str(value)]
        meta_path.write_text(json.dumps(meta))
    elif how == "shapes":
        key = next(iter(meta["shapes"]))
        meta["shapes"][key] = [index % 7 + 1]
        meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(how=st.sampled_from(["rank", "truncate", "flip", "delete", "garbage-json", "config", "method", "targets",
                            "shapes"]),
       index=st.integers(min_value=0, max_value=10**6),
       value=st.one_of(st.integers(min_value=-10**3, max_value=10**3), st.text(max_size=6), st.floats(allow_nan=True),
                       st.none(), st.lists(st.integers(), max_size=2)),
       onto_adapted=st.booleans())
def test_bad_adapter_files_leave_the_model_unchanged(method: str, how: str, index: int, value: Any,
                                                     onto_adapted: bool) -> None:
    source = _model()
    _attach_valid(source, method)
    d = Path(tempfile.mkdtemp())
    try:
        lorakit.save(source, d / "a")
        _corrupt(d / "a", how, index, value)
        model = CASES[method].base(_model())
        if onto_adapted:
            _attach_valid(model, "lora", name="other")
        _expect_clean_failure(model, lambda: lorakit.load(model, d / "a", force=True))
    finally:
        shutil.rmtree(d, ignore_errors=True)


PEFT_KEYS = ["r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
             "peft_type", "bias", "target_modules", "modules_to_save", "init_lora_weights"]
PEFT_VALUES = st.one_of(BAD_VALUES, st.dictionaries(st.text(max_size=4), BAD_VALUES, max_size=2))


def _damaged_peft_load(method: str, how: str, value: Any, onto_adapted: bool) -> None:
    source = _model()
    _attach_valid(source, method)
    d = Path(tempfile.mkdtemp())
    try:
        lorakit.export_peft(source, d / "p")
        cfg_path, weights = d / "p" / "adapter_config.json", d / "p" / "adapter_model.safetensors"
        if how == "truncate":
            weights.write_bytes(weights.read_bytes()[:100])
        else:
            cfg = json.loads(cfg_path.read_text())
            cfg[how] = value
            cfg_path.write_text(json.dumps(cfg))
        model = _model()
        if onto_adapted:
            _attach_valid(model, "lora", name="other")
        _expect_clean_failure(model, lambda: lorakit.load(model, d / "p", name="peft"))
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("method", ["lora", "dora"])
@SETTINGS
@given(how=st.sampled_from([*PEFT_KEYS, "truncate"]), value=PEFT_VALUES, onto_adapted=st.booleans())
def test_bad_peft_files_leave_the_model_unchanged(method: str, how: str, value: Any, onto_adapted: bool) -> None:
    _damaged_peft_load(method, how, value, onto_adapted)


@pytest.mark.parametrize(("how", "value"), [("lora_alpha", "abc"), ("lora_alpha", None), ("lora_dropout", "a"),
                                            ("use_rslora", "yes"), ("rank_pattern", 5), ("r", "x")])
def test_bad_peft_config_values_are_clear_errors(how: str, value: Any) -> None:
    """Values found by hand that once escaped as ValueError/TypeError/AttributeError or loaded silently."""
    model = _model()
    source = _model()
    _attach_valid(source, "lora")
    d = Path(tempfile.mkdtemp())
    try:
        lorakit.export_peft(source, d / "p")
        cfg = json.loads((d / "p" / "adapter_config.json").read_text())
        cfg[how] = value
        (d / "p" / "adapter_config.json").write_text(json.dumps(cfg))
        before = _state(model)
        with pytest.raises(lorakit.AdapterFileError):
            lorakit.load(model, d / "p")
        _assert_same(before, _state(model))
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- bad call orders ---------------------------------------------------------------------------------------------
CALLS = ["attach-again", "attach-while-merged", "set-active-unknown", "set-active-while-merged", "remove-unknown",
         "load-same-name", "export-merged", "save-onto-file", "merge", "unmerge", "grow", "pruner"]


@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(calls=st.lists(st.sampled_from(CALLS), min_size=1, max_size=4))
def test_bad_call_orders_leave_the_model_unchanged(method: str, calls: list[str]) -> None:
    model = _model()
    _attach_valid(model, method)
    d = Path(tempfile.mkdtemp())
    try:
        lorakit.save(model, d / "saved")
        (d / "file").write_text("not a directory")
        actions = {
            "attach-again": lambda: _attach_valid(model, method),
            "attach-while-merged": lambda: _attach_valid(model, "lora", name="second"),  # after a merge (below)
            "set-active-unknown": lambda: lorakit.set_active(model, ["default", "nope"]),
            "set-active-while-merged": lambda: lorakit.set_active(model, []),  # after a merge
            "remove-unknown": lambda: lorakit.remove(model, "nope"),
            "load-same-name": lambda: lorakit.load(model, d / "saved"),
            "export-merged": lambda: lorakit.export_peft(model, d / "peft", rank=2),  # after a merge
            "save-onto-file": lambda: lorakit.save(model, d / "file"),
            "merge": lambda: lorakit.merge(model),
            "unmerge": lambda: lorakit.unmerge(model),
            "grow": lambda: lorakit.methods.rank1_sum_pruning.grow(model, "default", 10**6),
            "pruner": lambda: lorakit.RankPruner(model, total_steps=0),
        }
        for call in calls:
            if call.endswith("-merged"):
                if quantized_layers(model):  # merging goes through a dense base
                    lorakit.dequantize(model)
                lorakit.merge(model)  # succeeds; the failing step is the next one
            before = _state(model)
            try:
                actions[call]()
            except lorakit.LorakitError:
                _assert_same(before, _state(model))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_save_onto_a_file_is_an_adapter_file_error(tmp_path: Path) -> None:
    model = _model()
    _attach_valid(model, "lora")
    (tmp_path / "f").write_text("x")
    with pytest.raises(lorakit.AdapterFileError, match="not a directory"):
        lorakit.save(model, tmp_path / "f")


def test_lora_sb_without_init_data_changes_nothing() -> None:
    model = _model()
    before = _state(model)
    with pytest.raises(lorakit.ConfigError, match="init_batches"):
        lorakit.attach(model, "lora-sb", r=2)
    _assert_same(before, _state(model))
