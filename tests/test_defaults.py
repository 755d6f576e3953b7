"""Defaults that exercise each method, each from its source (issue: honest defaults)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import lorakit
from lorakit.adapt.model import shared_module
from lorakit.formats.native import saved_config
from lorakit.methods.delta_lora import START_FRACTION
from lorakit.methods.lora_sb import FALLBACK_ETA
from lorakit.methods.vera import projections

from .conftest import batch_for, tiny_llama
from .fixtures_train import make_config


def test_vera_projections_use_the_reference_kaiming_init() -> None:
    """U(-sqrt(6/fan_in), sqrt(6/fan_in)) as VeRA's reference and PEFT (0.1.0 drew a sqrt(6) smaller bound)."""
    a, b = projections(64, 2048, 1024, seed=0)
    assert a.abs().max() <= math.sqrt(6 / 2048) and a.abs().max() > 0.99 * math.sqrt(6 / 2048)
    assert b.abs().max() <= math.sqrt(6 / 64) and b.abs().max() > 0.99 * math.sqrt(6 / 64)
    old, _ = projections(64, 2048, 1024, seed=0, init="linear")
    assert old.abs().max() <= math.sqrt(1 / 2048) < a.abs().max()
    model = lorakit.attach(tiny_llama(), "vera", r=16)
    shared = shared_module(model, "default")
    fan_in = shared.vera_A.shape[1]
    assert shared.vera_A.abs().max() > math.sqrt(1 / fan_in)  # the new bound is used by attach


def test_a_saved_vera_config_without_the_new_option_keeps_its_old_init() -> None:
    """Files written before ``projection_init`` existed regenerate what they were trained with."""
    assert saved_config("vera", {"r": 8}).projection_init == "linear"
    assert saved_config("vera", {"r": 8, "projection_init": "kaiming"}).projection_init == "kaiming"
    assert lorakit.get_method("vera").config_cls.parse({"r": 8}).projection_init == "kaiming"


def test_optimizer_is_plain_adamw_unless_loraplus_is_asked_for() -> None:
    model = lorakit.attach(tiny_llama(), "lora", r=2)
    assert {g["lr"] for g in lorakit.param_groups(model, 1e-3)} == {1e-3}
    assert {g["name"]: g["lr"] for g in lorakit.param_groups(model, 1e-3, loraplus_ratio=4)} == \
        {"A": 1e-3, "B": pytest.approx(4e-3)}


def _run(tiny_run: dict[str, Path], tmp_path: Path, method: str, options: dict, **training) -> dict:
    from lorakit.cli import main

    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / method
    cfg = make_config(tiny_run, out, method=method, options=options, training=training)
    assert main(["train", str(cfg)]) == 0
    return json.loads((out / "adapter" / "adapter.json").read_text())["config"]


def test_trainer_sets_lora_sb_eta_from_the_first_warmup_step(tiny_run, tmp_path: Path) -> None:
    """The reference sets eta to the learning rate of the first warm-up step: lr / warmup_steps."""
    saved = _run(tiny_run, tmp_path, "lora-sb", {"r": 4}, lr=2e-2, warmup_steps=4, max_steps=4)
    assert saved["eta"] == pytest.approx(2e-2 / 4)
    given = _run(tiny_run, tmp_path / "given", "lora-sb", {"r": 4, "eta": 1e-3}, max_steps=2)
    assert given["eta"] == 1e-3  # an explicit value is kept
    model = tiny_llama()
    lorakit.attach(model, "lora-sb", r=4, init_batches=[batch_for(model)])
    assert lorakit.adapters(model)["default"].config.eta is None and FALLBACK_ETA == 1e-6


def test_trainer_starts_delta_lora_at_a_share_of_the_run(tiny_run, tmp_path: Path) -> None:
    saved = _run(tiny_run, tmp_path, "delta-lora", {"r": 4}, max_steps=20)
    assert saved["delta_start"] == round(START_FRACTION * 20) == 2
    model = lorakit.attach(tiny_llama(), "delta-lora", r=4)
    (callback,) = lorakit.training_callbacks(model, total_steps=50)
    assert callback.start == 5  # a bare attach resolves K from the run length it is given
