"""A resumed run is the uninterrupted run: the property, over the settings real runs use.

For a drawn setting (method, schedule, warm-up as steps or as a ratio, adapter dropout, gradient accumulation,
packing, length grouping, a token budget per batch, LoRA+, where the checkpoint lands relative to the warm-up, and
how the run ended: Ctrl-C or a crash), a run that is stopped and resumed with ``--resume`` must log the same loss
and learning rate at every step and end with a bit-identical adapter. A deliberate lower ``training.lr`` on resume
is the one change that may move the rates: every later step at the new peak times the same schedule factor.

Every run is a few steps of a tiny Llama on one thread (about 0.2 s), so hypothesis can afford many settings.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import lorakit
from lorakit.core.callbacks import TrainingCallback
from lorakit.train.checkpoint import STATE_FILE, list_checkpoints, load_state
from lorakit.train.metrics import read_metrics
from lorakit.train.runtime import lr_factor
from lorakit.train.trainer import Trainer

from .test_contract import CASES

pytestmark = pytest.mark.usefixtures("one_thread")

TOTAL = 10  # optimizer steps; with batch 4 x grad_accum 2 over 64 examples the run crosses an epoch boundary


@dataclass(frozen=True)
class Setting:
    """One training configuration and where (and how) its run is interrupted."""

    method: str = "lora"
    schedule: str = "cosine"
    warmup_steps: int | None = 4
    warmup_ratio: float = 0.0
    dropout: float = 0.1
    grad_accum: int = 2
    packing: bool = False
    group_by_length: bool = False
    max_tokens: int | None = None
    loraplus_ratio: float | None = None
    min_lr_ratio: float = 0.0
    save_every: int | None = 3  # periodic checkpoints (a clean stop writes its own)
    stop_after: int = 3  # optimizer steps done before the interruption
    how: str = "signal"  # "signal": Ctrl-C, a checkpoint at the stop; "crash": an exception, resume from the last one

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * TOTAL)


def _options(s: Setting) -> dict[str, Any]:
    options = dict(CASES[s.method].options)
    if s.dropout and "dropout" in lorakit.METHODS[s.method].config_cls.model_fields and s.method != "delta-lora":
        options["dropout"] = s.dropout  # Delta-LoRA refuses adapter dropout by design
    return options


def _config(tiny_run: dict[str, Path], out: Path, s: Setting, **training: Any) -> dict[str, Any]:
    return {
        "model": {"path": str(tiny_run["base"]), "dtype": "float32", "quantize": CASES[s.method].quantize or "none"},
        "adapter": {"method": s.method, **_options(s)},
        "data": {"train": str(tiny_run["train"]), "eval": str(tiny_run["eval"]), "max_length": 48,
                 "packing": s.packing, "group_by_length": s.group_by_length, "max_tokens": s.max_tokens},
        "training": {"max_steps": TOTAL, "batch_size": 4, "grad_accum": s.grad_accum, "lr": CASES[s.method].lr,
                     "schedule": s.schedule, "warmup_steps": s.warmup_steps, "warmup_ratio": s.warmup_ratio,
                     "min_lr_ratio": s.min_lr_ratio, "loraplus_ratio": s.loraplus_ratio, "eval_every": 4,
                     "device": "cpu", "seed": 0, **training},
        "output": {"dir": str(out), "save_every": s.save_every, "keep_checkpoints": 2, "progress": False,
                   "tensorboard": False, "plot": False},
    }


class _Crash(Exception):
    pass


class _Interrupt(TrainingCallback):
    """Ends the run after ``after`` optimizer steps: Ctrl-C (the loop stops and checkpoints) or a crash in the
    middle of the next step (after its update: the state in memory is dirty, as in a kill)."""

    def __init__(self, after: int, how: str) -> None:
        self.after, self.how, self.steps = after, how, 0

    def step(self) -> None:
        self.steps += 1
        if self.how == "signal" and self.steps == self.after:
            os.kill(os.getpid(), signal.SIGINT)
        elif self.how == "crash" and self.steps == self.after + 1:
            raise _Crash


def _train(cfg: dict[str, Any], *, resume: bool = False, callbacks: tuple[TrainingCallback, ...] = ()) -> Any:
    return Trainer(None, cfg, callbacks=callbacks, log=lambda msg: None).fit(resume=resume, overwrite=not resume)


def _log(out: Path) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """What the run logged, by kind (``train``, ``eval``, ``ranks``), without the wall-clock figures."""
    kinds: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for r in read_metrics(out / "metrics.jsonl"):
        values = {k: v for k, v in r.items() if k not in ("kind", "step", "tokens_per_s", "peak_memory_mb")}
        kinds.setdefault(r["kind"], []).append((r["step"], values))
    return kinds


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter.safetensors")


def _final_state(out: Path) -> dict[str, Any]:
    return load_state(list_checkpoints(out)[-1][1] / STATE_FILE)


def _interrupted(tiny_run: dict[str, Path], out: Path, s: Setting, **training: Any) -> int:
    """Run ``s`` until its interruption; returns the step the resume will start from."""
    cfg = _config(tiny_run, out, s)
    if s.how == "signal":
        result = _train(cfg, callbacks=(_Interrupt(s.stop_after, "signal"),))
        assert result.interrupted and result.step == s.stop_after and result.adapter_dir is None
    else:
        with pytest.raises(_Crash):
            _train(cfg, callbacks=(_Interrupt(s.stop_after, "crash"),))
    found = list_checkpoints(out)
    return found[-1][0] if found else 0


def _assert_same_run(a: Path, b: Path) -> None:
    la, lb = _log(a), _log(b)
    assert la.keys() == lb.keys()
    for kind in la:
        assert la[kind] == lb[kind], kind  # every step's loss, lr, grad norm, eval loss, ranks: equal, not close
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # the optimizer ends in the same state too: every group's rates, every moment
    oa, ob = _final_state(a)["optimizer"], _final_state(b)["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert all(torch.equal(x, y) for i in oa["state"] for x, y in zip(oa["state"][i].values(), ob["state"][i].values(),
                                                                        strict=True))


def check_resume(tiny_run: dict[str, Path], root: Path, s: Setting) -> None:
    straight = root / "straight"
    _train(_config(tiny_run, straight, s))
    out = root / "resumed"
    _interrupted(tiny_run, out, s)
    result = _train(_config(tiny_run, out, s), resume=True)
    assert result.step == TOTAL and not result.interrupted
    _assert_same_run(straight, out)
    # and the rate at each step is the schedule's, from the configured peak (not only the same as some run's)
    lrs = [v["lr"] for _, v in _log(out)["train"]]
    expected = [CASES[s.method].lr * lr_factor(k, total=TOTAL, warmup=s.warmup(), schedule=s.schedule,
                                               min_ratio=s.min_lr_ratio) for k in range(TOTAL)]
    assert lrs == pytest.approx(expected, rel=1e-12)


# --- a stop asked before the first step: during the step-0 eval (minutes on a real model) ------------------------
class _SignalInFirstEval(Trainer):
    """Sends this process ``sig`` in the middle of the step-0 eval, if (and only if) lorakit's handler is installed
    for it by then: an unhandled SIGTERM would kill the test process, an unhandled Ctrl-C abort the session."""

    sig = signal.SIGINT
    handled: bool | None = None

    def evaluate(self, data: Any = None) -> dict[str, float]:
        if self.handled is None:
            self.handled = signal.getsignal(self.sig) not in (signal.SIG_DFL, signal.default_int_handler)
            if self.handled:
                os.kill(os.getpid(), self.sig)
        return super().evaluate(data)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_first_eval_stops_at_step_0_and_resumes_into_the_same_run(sig, tiny_run, tmp_path) -> None:
    s = Setting(stop_after=0)
    straight, out = tmp_path / "straight", tmp_path / "resumed"
    _train(_config(tiny_run, straight, s))
    trainer = _SignalInFirstEval(None, _config(tiny_run, out, s), log=lambda msg: None)
    trainer.sig = sig
    result = trainer.fit(overwrite=True)
    assert trainer.handled, "no lorakit signal handler during the step-0 eval"
    assert result.interrupted and result.step == 0 and result.adapter_dir is None
    assert [k for k, _ in list_checkpoints(out)] == [0]
    assert _log(out)["eval"] == _log(straight)["eval"][:1]  # the eval it was in finished and was logged
    resumed = _train(_config(tiny_run, out, s), resume=True)
    assert resumed.step == TOTAL and not resumed.interrupted
    _assert_same_run(straight, out)


# --- every method, with what real runs have: a warm-up, dropout, gradient accumulation, LoRA+ where it applies ----
@pytest.mark.parametrize("method", sorted(CASES))
def test_every_method_resumes_into_the_same_run(method: str, tiny_run, tmp_path: Path) -> None:
    plus = 4.0 if lorakit.METHODS[method].__name__ != "Full" else None
    check_resume(tiny_run, tmp_path, Setting(method=method, warmup_steps=None, warmup_ratio=0.5, stop_after=2,
                                             save_every=None, loraplus_ratio=plus))


# --- the settings, drawn ---------------------------------------------------------------------------------------
settings_ = st.builds(
    Setting,
    schedule=st.sampled_from(["cosine", "linear", "constant"]),
    warmup_steps=st.one_of(st.none(), st.integers(0, TOTAL)),
    warmup_ratio=st.sampled_from([0.0, 0.05, 0.1, 0.3, 0.5]),
    dropout=st.sampled_from([0.0, 0.1]),
    grad_accum=st.sampled_from([1, 2, 3]),
    packing=st.booleans(),
    group_by_length=st.booleans(),
    max_tokens=st.sampled_from([None, 96]),
    loraplus_ratio=st.sampled_from([None, 16.0]),
    min_lr_ratio=st.sampled_from([0.0, 0.1]),
    save_every=st.sampled_from([None, 1, 2, 3, 4]),
    stop_after=st.integers(1, TOTAL - 1),
    how=st.sampled_from(["signal", "crash"]),
)


@settings(max_examples=24, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(s=settings_)
# the places that matter, always tried: a checkpoint inside the warm-up, at its last step, right after it
@example(s=Setting(warmup_steps=4, stop_after=2, how="signal"))
@example(s=Setting(warmup_steps=4, stop_after=4, save_every=4, how="crash"))
@example(s=Setting(warmup_steps=None, warmup_ratio=0.3, stop_after=3, save_every=3, how="crash"))
@example(s=Setting(warmup_steps=2, stop_after=3, how="signal", packing=True, loraplus_ratio=16.0))
def test_a_resumed_run_is_the_uninterrupted_run(s: Setting, tiny_run, tmp_path_factory) -> None:
    check_resume(tiny_run, tmp_path_factory.mktemp("resume"), s)


# --- the one deliberate change: a lower learning rate ------------------------------------------------------------
@pytest.mark.parametrize("how", ["signal", "crash"])
def test_a_lower_lr_on_resume_rescales_only_the_later_steps(how: str, tiny_run, tmp_path: Path) -> None:
    s = Setting(warmup_steps=4, stop_after=3, save_every=3, how=how, loraplus_ratio=16.0)
    straight = tmp_path / "straight"
    _train(_config(tiny_run, straight, s))
    out = tmp_path / "lowered"
    start = _interrupted(tiny_run, out, s)
    assert start == 3
    peak = CASES["lora"].lr
    _train(_config(tiny_run, out, s, lr=peak / 4), resume=True)
    before = dict(_log(straight)["train"])
    after = dict(_log(out)["train"])
    for step in range(1, TOTAL + 1):
        factor = 1.0 if step <= start else 0.25  # steps up to the checkpoint ran at the old peak
        assert after[step]["lr"] == pytest.approx(factor * before[step]["lr"], rel=1e-12), step
    assert [after[k]["loss"] for k in range(1, start + 1)] == [before[k]["loss"] for k in range(1, start + 1)]
    assert after[start + 1]["loss"] == before[start + 1]["loss"]  # that step's forward precedes its update
    assert after[TOTAL]["loss"] != before[TOTAL]["loss"]
    # LoRA+'s B group follows the same change: its peak and its current rate stay 16x A's
    groups = {g["name"]: g for g in _final_state(out)["optimizer"]["param_groups"]}
    assert groups["A"]["initial_lr"] == peak / 4 and groups["B"]["initial_lr"] == pytest.approx(16 * peak / 4)
    assert groups["B"]["lr"] == pytest.approx(16 * groups["A"]["lr"], rel=1e-12)
