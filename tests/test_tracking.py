"""Experiment tracking (``output.report_to``): what a run logs is read back from each library's own local store
(TensorBoard event files, a W&B offline run file, an MLflow SQLite store) and must equal ``metrics.jsonl``."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorakit.errors import ConfigError
from lorakit.train import tracking
from lorakit.train.config import load_config
from lorakit.train.metrics import read_metrics
from lorakit.train.trainer import Trainer

from .fixtures_train import CtrlCAfter, make_config

pytest.importorskip("wandb")
pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def _wandb_records(run_dir: Path) -> Iterator[Any]:
    """The protobuf records of a W&B offline run file (``run-<id>.wandb``: a LevelDB-style log of 32 KiB blocks,
    each record a 7-byte header (CRC, length, FULL/FIRST/MIDDLE/LAST) and its bytes, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    data, pos, parts = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # the zero padding at a block's end
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)  # keys with "/" are stored as a nested key


def _wandb_run(out: Path, run_id: str) -> dict[str, Any]:
    """History (``{step: {key: value}}``), config and artifact names of the offline W&B run ``run_id``."""
    history: dict[int, dict[str, float]] = {}
    config: dict[str, Any] = {}
    artifacts: list[str] = []
    # one offline folder per process that logged to the run (a resumed run adds one, with the same id)
    for run_dir in sorted((out / "wandb").glob(f"offline-run-*-{run_id}")):
        for r in _wandb_records(run_dir):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                row = {_key(i): json.loads(i.value_json) for i in r.history.item if not _key(i).startswith("_")}
                history.setdefault(r.history.step.num, {}).update(row)
            elif kind == "config":
                config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
            elif kind == "artifact":
                artifacts.append(r.artifact.name)
    return {"history": history, "config": config, "artifacts": artifacts}


def _logged(out: Path) -> dict[tuple[int, str], float]:
    """``metrics.jsonl``'s numbers as the trackers name them: ``{(step, "train/loss"): value}``."""
    got: dict[tuple[int, str], float] = {}
    for r in read_metrics(out / "metrics.jsonl"):
        if r["kind"] != "info":
            for k, v in tracking.numeric(r["kind"], {k: v for k, v in r.items() if k not in ("kind", "step")}).items():
                got[(r["step"], k)] = v
    return got


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A private MLflow store (its artifacts go to ./mlruns: the test runs in tmp_path); W&B offline (its default
    here) and silent."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return uri


def _train(cfg: Path, *, resume: bool = False, **kw: Any) -> Any:
    lines: list[str] = []
    result = Trainer(None, cfg, log=lines.append, **kw).fit(resume=resume, overwrite=not resume)
    return result, lines


def test_every_tracker_gets_the_metrics_config_and_adapter(tiny_run, tmp_path, stores, one_thread) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = make_config(tiny_run, out, method="rank1-sum", options={"r_init": 4, "target_rank": 2},
                      training={"max_steps": 4, "eval_every": 2},
                      output={"report_to": ["tensorboard", "wandb", "mlflow"], "run_name": "tracked"})
    _, lines = _train(cfg)
    expected = _logged(out)
    assert {k for _, k in expected} >= {"train/loss", "train/lr", "train/peak_memory_mb", "eval/eval_loss",
                                        "ranks/total_rank"}
    state = json.loads((out / tracking.STATE_FILE).read_text())
    assert any("wandb offline run" in line for line in lines) and any("mlflow run" in line for line in lines)

    # TensorBoard: every scalar at its step
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tb = {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    assert tb.keys() == expected.keys()
    assert all(tb[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())

    # MLflow: metrics, the flattened config as parameters, the adapter as artifacts, a finished run
    client = MlflowClient(stores)
    run = client.get_run(state["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    ml = {(m.step, key): m.value for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)}
    assert ml == pytest.approx(expected)
    assert run.data.params["training.lr"] == "0.01" and run.data.params["adapter.method"] == "rank1-sum"
    assert run.data.params["info.trainable_params"].isdigit()
    files = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter.json", "adapter/adapter.safetensors"} <= files

    # W&B (offline): the same history, the config, the adapter artifact
    wb = _wandb_run(out, state["wandb"]["id"])
    flat = {(step, k): v for step, row in wb["history"].items() for k, v in row.items()}
    assert flat == pytest.approx(expected)
    assert wb["config"]["training.lr"] == 0.01 and wb["artifacts"] == ["adapter"]


def test_a_resumed_run_continues_the_same_tracker_runs(tiny_run, tmp_path, stores, one_thread) -> None:
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    cfg = make_config(tiny_run, out, training={"max_steps": 4},
                      output={"report_to": ["wandb", "mlflow"], "save_every": 1})
    result, _ = _train(cfg, callbacks=(CtrlCAfter(2),))
    assert result.interrupted
    first = json.loads((out / tracking.STATE_FILE).read_text())
    client = MlflowClient(stores)
    assert client.get_run(first["mlflow"]["run_id"]).info.status == "KILLED"

    result, _ = _train(cfg, resume=True)
    assert result.step == 4
    assert json.loads((out / tracking.STATE_FILE).read_text()) == first  # the same runs, continued
    run = client.get_run(first["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
    assert steps == [1, 2, 3, 4]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    wb = _wandb_run(out, first["wandb"]["id"])  # one offline run folder per process, the same id
    assert {s for s, row in wb["history"].items() if "train/loss" in row} >= {3, 4}


def test_a_missing_client_fails_before_the_run_starts(tiny_run, tmp_path, monkeypatch) -> None:
    real = tracking.installed
    monkeypatch.setattr(tracking, "installed", lambda name: name != "wandb" and real(name))
    out = tmp_path / "run"
    cfg = make_config(tiny_run, out, output={"report_to": ["mlflow", "wandb"]})
    with pytest.raises(ConfigError, match=r"output.report_to: wandb is not installed \(pip install 'lorakit\[tracking\]'\)"):
        Trainer(None, cfg, log=lambda m: None).fit()
    assert not out.exists()  # nothing written


def test_a_failing_tracker_is_switched_off_and_the_run_goes_on(tiny_run, tmp_path, stores, monkeypatch,
                                                               one_thread) -> None:
    def broken(self, kind, step, values):
        raise OSError("disk full")

    monkeypatch.setattr(tracking._Mlflow, "log", broken)
    out = tmp_path / "run"
    cfg = make_config(tiny_run, out, training={"max_steps": 3}, output={"report_to": ["mlflow", "tensorboard"]})
    result, lines = _train(cfg)
    assert result.step == 3 and result.adapter_dir is not None
    assert [line for line in lines if "mlflow failed" in line] == [
        "tracking: mlflow failed on metrics (OSError: disk full); switched off for this run"]
    from mlflow.tracking import MlflowClient

    state = json.loads((out / tracking.STATE_FILE).read_text())
    assert MlflowClient(stores).get_run(state["mlflow"]["run_id"]).info.status == "FAILED"


@pytest.mark.parametrize("report_to, match", [
    (["comet"], "report_to"),
    (["wandb", "wandb"], "each tracker at most once"),
    ("wandb", "report_to"),
])
def test_report_to_rejects_bad_values(tmp_path, report_to, match) -> None:
    cfg = {"model": {"path": "bundled://tiny-base"}, "data": {"train": "x.jsonl"},
           "output": {"dir": str(tmp_path), "report_to": report_to}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_tensorboard_default_and_none(tmp_path) -> None:
    base = {"model": {"path": "bundled://tiny-base"}, "data": {"train": "x.jsonl"}, "output": {"dir": str(tmp_path)}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base))
    assert load_config(path).output.trackers() == ["tensorboard"]  # installed here: on by default, as before
    assert load_config(path, ["output.tensorboard=false"]).output.trackers() == []
    assert load_config(path, ["output.report_to=[]"]).output.trackers() == []
    assert load_config(path, ["output.report_to=[mlflow]"]).output.trackers() == ["mlflow"]
