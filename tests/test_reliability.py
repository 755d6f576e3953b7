"""Crashes and bad luck during training: the CLI's one error boundary, checkpoints that are whole or skipped,
NaN gradients that never reach the weights, a full disk, two processes on one run directory."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from lorakit.train import checkpoint
from lorakit.train.checkpoint import (
    STATE_FILE,
    RunLock,
    latest_checkpoint,
    latest_good_checkpoint,
    list_checkpoints,
    load_state,
    verify_checkpoint,
)
from lorakit.train.trainer import Trainer

from .fixtures_train import kill_when_checkpointed, make_config

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _err(capsys) -> str:
    return capsys.readouterr().err


# --- the CLI's error boundary ----------------------------------------------------------------------------------
def test_no_arguments_prints_the_help(capsys) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "Usage" in out and "train" in out and "Traceback" not in out
    assert main(["tasks"]) == 0  # a command group alone: its help
    assert "arithmetic" in capsys.readouterr().out


def test_an_unexpected_error_is_one_line_unless_debug(tmp_path: Path, capsys, monkeypatch) -> None:
    def boom(path):
        raise RuntimeError("something broke")

    monkeypatch.setattr("lorakit.cli.adapters.describe", boom)
    (tmp_path / "adapter.json").write_text("{}")
    assert main(["inspect", str(tmp_path)]) == 1
    err = _err(capsys)
    assert err.count("\n") == 1 and "unexpected RuntimeError: something broke" in err and "--debug" in err
    assert main(["inspect", str(tmp_path), "--debug"]) == 1
    assert "Traceback" in _err(capsys)
    monkeypatch.setenv("LORAKIT_DEBUG", "1")
    assert main(["inspect", str(tmp_path)]) == 1
    assert "Traceback" in _err(capsys)


def test_an_os_error_names_its_cause(tmp_path: Path, capsys, monkeypatch) -> None:
    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("lorakit.cli.adapters.describe", full)
    (tmp_path / "adapter.json").write_text("{}")
    assert main(["inspect", str(tmp_path)]) == 1
    err = _err(capsys)
    assert err.startswith("error: no space left on device") and "Traceback" not in err


# --- checkpoints: whole, or skipped -----------------------------------------------------------------------------
def _flip(path: Path, offset: int = -40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("victim", "damage"), [(STATE_FILE, _flip), ("adapter/adapter.safetensors", _flip),
                                                (STATE_FILE, _truncate), ("adapter/adapter.json", _truncate)])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(victim: str, damage, tiny_run, tmp_path: Path,
                                                              capsys) -> None:
    sections = {"training": {"max_steps": 4}, "output": {"save_every": 2, "keep_checkpoints": 3}}
    straight = make_config(tiny_run, tmp_path / "straight", **sections)
    assert main(["train", str(straight)]) == 0
    out = tmp_path / "flipped"
    cfg = make_config(tiny_run, out, **sections)
    assert main(["train", str(cfg)]) == 0
    newest = latest_checkpoint(out)
    assert newest.name == "ckpt-00000004" and verify_checkpoint(newest) is None
    damage(newest / victim)
    assert "checksum" in verify_checkpoint(newest)
    said: list[str] = []
    assert latest_good_checkpoint(out, said.append).name == "ckpt-00000002"
    assert said == [f"skipping checkpoint ckpt-00000004: {victim} fails its checksum (corrupted)"]
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume"]) == 0  # steps 3-4 again, from ckpt-2
    err = _err(capsys)
    assert "skipping checkpoint ckpt-00000004" in err and "resumed from" in err and "ckpt-00000002" in err
    a = load_file(tmp_path / "straight" / "adapter" / "adapter.safetensors")
    b = load_file(out / "adapter" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # and it ends where the uninterrupted run ended


def test_no_good_checkpoint_is_refused_not_restarted(tiny_run, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    cfg = make_config(tiny_run, out, training={"max_steps": 2}, output={"save_every": 1, "keep_checkpoints": 2})
    assert main(["train", str(cfg)]) == 0
    for _, ckpt in list_checkpoints(out):
        _flip(ckpt / STATE_FILE)
    assert main(["train", str(cfg), "--resume"]) == 1
    assert "passes its checksums" in _err(capsys)


def test_a_full_disk_keeps_the_last_complete_checkpoint(tiny_run, tmp_path: Path, capsys, monkeypatch) -> None:
    real = checkpoint.save_state
    calls = {"n": 0}

    def save_state(path, state):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: the disk is full half-way
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, state)

    monkeypatch.setattr(checkpoint, "save_state", save_state)
    out = tmp_path / "run"
    cfg = make_config(tiny_run, out, training={"max_steps": 6}, output={"save_every": 2})
    assert main(["train", str(cfg)]) == 1
    err = _err(capsys)
    assert "no space left on device" in err and "ckpt-00000002" in err and "intact" in err
    assert "Traceback" not in err
    assert [p.name for _, p in list_checkpoints(out)] == ["ckpt-00000002"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert verify_checkpoint(out / "checkpoints" / "ckpt-00000002") is None
    monkeypatch.setattr(checkpoint, "save_state", real)
    assert main(["train", str(cfg), "--resume"]) == 0  # the space came back: the run goes on


# --- NaN never reaches the weights -------------------------------------------------------------------------------
class _NanGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_a_nan_gradient_is_not_applied_and_a_lower_lr_resumes(tiny_run, tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    calls = {"n": 0}
    real = Trainer._loss

    def poisoned(self, model, batch):
        calls["n"] += 1
        loss = real(self, model, batch)
        return _NanGrad.apply(loss) if calls["n"] == 3 else loss  # the 3rd training step (evaluation: _lm_loss)

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    out = tmp_path / "run"
    cfg = make_config(tiny_run, out, output={"save_every": 2}, training={"eval_every": 100, "max_steps": 4})
    assert main(["train", str(cfg)]) == 1
    err = _err(capsys)
    assert "gradient norm is nan at step 3" in err and "not applied" in err and "ckpt-00000002" in err
    good = latest_checkpoint(out)
    assert good.name == "ckpt-00000002"
    _, tensors = lorakit.read_adapter(good / "adapter")
    assert all(torch.isfinite(t).all() for t in tensors.values())
    state = load_state(good / STATE_FILE)["optimizer"]["state"]
    assert all(torch.isfinite(v).all() for s in state.values() for v in s.values() if torch.is_tensor(v))
    monkeypatch.setattr(Trainer, "_loss", real)
    # the message's advice works: the same run, resumed with a lower learning rate
    assert main(["train", str(cfg), "--resume", "training.lr=0.005"]) == 0
    err = _err(capsys)
    assert "resuming with changed settings: training.lr 0.01 -> 0.005" in err and "ckpt-00000002" in err
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["training"]["lr"] == 0.005


# --- one process per run directory ----------------------------------------------------------------------------
def test_a_second_process_on_the_same_run_is_refused(tiny_run, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    cfg = make_config(tiny_run, out, training={"max_steps": 1})
    with RunLock(out):
        assert main(["train", str(cfg)]) == 1
        assert main(["train", str(cfg), "--resume"]) == 1
        err = _err(capsys)
        assert f"another lorakit process (pid {os.getpid()}) is training" in err and "Traceback" not in err
    assert not (out / "adapter").exists()
    assert main(["train", str(cfg)]) == 0  # released: it trains


def test_sigkill_releases_the_run_lock(tmp_path: Path) -> None:
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from lorakit.train.checkpoint import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(REPO / "src")], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(lorakit.LorakitError, match=f"pid {proc.pid}"):
            RunLock(tmp_path).acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    deadline = time.monotonic() + 5
    while True:  # the kernel drops the lock with the process
        try:
            RunLock(tmp_path).acquire().release()
            break
        except lorakit.LorakitError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- every method with training state resumes bit for bit after a kill -------------------------------------------
KILL_METHODS = ["lora", "delta-lora", "rank1-sum", "lora-fa"]


@pytest.mark.parametrize("method", KILL_METHODS)
def test_killed_run_resumes_bit_exact(method: str, tiny_run, tmp_path: Path) -> None:
    from .test_contract import CASES

    options = dict(CASES[method].options)
    if method == "lora-fa":
        options["projected_grad"] = True  # a callback with state of its own
    if "dropout" in lorakit.METHODS[method].config_cls.model_fields and method != "delta-lora":
        options["dropout"] = 0.1  # (Delta-LoRA refuses adapter dropout)
    # as real runs are: a warm-up the kill lands in or after, accumulation, a cosine schedule
    sections = {"training": {"max_steps": 12, "lr": CASES[method].lr, "eval_every": None, "warmup_ratio": 0.3,
                             "warmup_steps": None, "grad_accum": 2, "batch_size": 4},
                "output": {"save_every": 1}, "data": {"eval": None, "eval_fraction": 0}}
    straight = make_config(tiny_run, tmp_path / "straight", method=method, options=options, **sections)
    assert main(["train", str(straight)]) == 0
    out = tmp_path / "killed"
    cfg = make_config(tiny_run, out, method=method, options=options, **sections)
    kill_when_checkpointed(cfg, out, 3)
    if (out / "adapter").exists():
        pytest.skip("the run finished before it could be killed")
    assert main(["train", str(cfg), "--resume"]) == 0
    a = load_file(tmp_path / "straight" / "adapter" / "adapter.safetensors")
    b = load_file(out / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_fit_passes_and_an_interrupted_one_stops_the_caller(tmp_path: Path) -> None:
    """FitResult.finished(): code that scores or saves after fit() (the demo, the experiment scripts) stops on a
    run Ctrl-C cut short instead of using it as the run it asked for."""
    from lorakit.train.run import FitResult

    done = FitResult(step=5, total_steps=5, output_dir=tmp_path, adapter_dir=tmp_path / "adapter", checkpoint=None)
    assert done.finished() is done
    cut = FitResult(step=2, total_steps=5, output_dir=tmp_path, adapter_dir=None, checkpoint=None, interrupted=True)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 2/5"):
        cut.finished()
