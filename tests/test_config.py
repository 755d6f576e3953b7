"""The run config: YAML + dotted overrides, validated into typed sections with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lorakit.errors import ConfigError
from lorakit.train.checkpoint import RunDirError, prepare_run_dir
from lorakit.train.config import TrainConfig, load_config, resolve_model_path
from lorakit.train.runtime import lr_factor

BASE = {"model": {"path": "some/model"}, "data": {"train": "t.jsonl"}, "output": {"dir": "out"}}


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_overrides_are_parsed_as_yaml_scalars(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE), ["training.lr=1e-3", "adapter.method=dora", "adapter.r=16",
                                               "adapter.targets=[q_proj, v_proj]", "training.max_grad_norm=null",
                                               "data.packing=true"])
    assert cfg.training.lr == 1e-3 and cfg.training.max_grad_norm is None and cfg.data.packing
    assert cfg.adapter.method == "dora" and cfg.adapter.options == {"r": 16, "targets": ["q_proj", "v_proj"]}
    assert cfg.adapter.method_config().r == 16  # validated by the method's own config class
    assert TrainConfig.parse(cfg.to_dict()) == cfg  # the resolved config round-trips


@pytest.mark.parametrize("overrides, message", [
    (["training.lrr=1"], "training.lrr: unknown key (allowed: "),
    (["training.schedule=step"], "training.schedule: Input should be 'cosine', 'linear' or 'constant'"),
    (["training.batch_size=0"], "training.batch_size: Input should be greater than or equal to 1"),
    (["model.dtype=fp8"], "model.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
    (["adapter.r=-1"], "adapter: invalid LoraConfig: r: Input should be greater than 0"),
    (["adapter.method=nope"], "adapter.method: unknown method 'nope'; available:"),
    (["bogus.x=1"], "bogus: unknown key (allowed: adapter, data, model, output, training)"),
    (["training"], "expected section.key=value"),
    (["data.packing=true", "model.task=classification"], "data.packing: packing is only for"),
])
def test_errors_name_the_field_and_allowed_values(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, BASE), overrides)
    assert message in str(e.value)


def test_missing_sections_and_malformed_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model: required field is missing"):
        load_config(_write(tmp_path, {"data": {"train": "x"}, "output": {"dir": "o"}}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\n data: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: malformed YAML at line \d+, column \d+"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_bundled_models_resolve(tmp_path: Path) -> None:
    assert resolve_model_path("org/name") == "org/name"
    with pytest.raises(ConfigError, match="no such bundled model"):
        resolve_model_path("bundled://does-not-exist")


def test_fingerprint_ignores_the_output_section() -> None:
    a = TrainConfig.parse(BASE)
    b = TrainConfig.parse({**BASE, "output": {"dir": "elsewhere", "save_every": 5}})
    c = TrainConfig.parse({**BASE, "training": {"lr": 1.0}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_run_dir_rules(tmp_path: Path) -> None:
    a, c = TrainConfig.parse(BASE), TrainConfig.parse({**BASE, "training": {"seed": 5}})
    out = tmp_path / "run"
    assert prepare_run_dir(out, a.fingerprint(), a.to_dict(), resume=False, overwrite=False) is False
    (out / "run.json").write_text(json.dumps({"fingerprint": a.fingerprint(), "config": a.to_dict()}))
    with pytest.raises(RunDirError, match=r"different run \(differs in: training.seed\)"):
        prepare_run_dir(out, c.fingerprint(), c.to_dict(), resume=True, overwrite=False)
    with pytest.raises(RunDirError, match="pass --resume"):
        prepare_run_dir(out, a.fingerprint(), a.to_dict(), resume=False, overwrite=False)
    assert prepare_run_dir(out, a.fingerprint(), a.to_dict(), resume=True, overwrite=False) is False  # no ckpt
    (out / "keep.txt").write_text("user file")
    assert prepare_run_dir(out, c.fingerprint(), c.to_dict(), resume=False, overwrite=True) is False
    assert not (out / "run.json").exists() and (out / "keep.txt").exists()


def test_resume_may_lower_the_learning_rate(tmp_path: Path) -> None:
    """What a NaN stop advises (a lower training.lr) is allowed on --resume, noted in the log and run.json;
    without --resume it is still a different run."""
    a, lower = TrainConfig.parse(BASE), TrainConfig.parse({**BASE, "training": {"lr": 1e-5}})
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"fingerprint": a.fingerprint(), "config": a.to_dict()}))
    with pytest.raises(RunDirError, match="training.lr"):
        prepare_run_dir(out, lower.fingerprint(), lower.to_dict(), resume=False, overwrite=False)
    said: list[str] = []
    prepare_run_dir(out, lower.fingerprint(), lower.to_dict(), resume=True, overwrite=False, log=said.append)
    assert said and "training.lr" in said[0] and "1e-05" in said[0]
    run = json.loads((out / "run.json").read_text())
    assert run["fingerprint"] == lower.fingerprint() and run["changes"][0]["training.lr"][1] == 1e-5


def test_lr_schedules() -> None:
    kw = {"total": 10, "warmup": 2, "min_ratio": 0.1}
    assert [lr_factor(s, schedule="constant", **kw) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(6, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_factor(10, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(6, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_factor(4, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.75)


def test_data_paths_accept_bundled_files() -> None:
    base = {"model": {"path": "bundled://tiny-base"}, "output": {"dir": "out"}}
    cfg = TrainConfig.parse({**base, "data": {"train": "bundled://data/arithmetic_train.jsonl",
                                              "eval": "bundled://data/arithmetic_eval.jsonl"}})
    assert Path(cfg.data.train).is_file() and Path(cfg.data.eval or "").name == "arithmetic_eval.jsonl"
    with pytest.raises(ConfigError, match="data.train"):
        TrainConfig.parse({**base, "data": {"train": "bundled://data/nope.jsonl"}})
