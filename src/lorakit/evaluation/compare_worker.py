"""One ``lorakit compare`` run, in its own process: train, then measure time, memory, quality and forgetting.

``python -m lorakit.evaluation.compare_worker JOB.json`` reads the job written by
:func:`lorakit.evaluation.compare.run_compare` and writes its result file.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lorakit.adapt.model import trainable_parameters
from lorakit.core import lowrank
from lorakit.core.callbacks import TrainingCallback
from lorakit.evaluation import generation as ev
from lorakit.evaluation.compare_config import budgets_path
from lorakit.evaluation.scoring import choice_eval
from lorakit.fast import speed
from lorakit.train.config import load_config
from lorakit.train.metrics import METRICS_FILE, read_metrics
from lorakit.train.trainer import Trainer
from lorakit.util.files import write_json


class RunInterrupted(RuntimeError):
    """The run was stopped before its last step: it gives no result."""


#: The worker's exit status when a signal stopped its run (128 + SIGINT, as a shell reports Ctrl-C).
INTERRUPTED_STATUS = 130


class StepTimer(TrainingCallback):
    """Wall-clock time between consecutive optimizer steps (its median ignores evaluation and checkpoints)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def step(self) -> None:
        self.times.append(time.perf_counter())

    def median(self) -> float | None:
        gaps = sorted(b - a for a, b in zip(self.times, self.times[1:], strict=False))
        return gaps[len(gaps) // 2] if gaps else None


class BudgetEval(TrainingCallback):
    """Measures the model at the job's budgets during training (a learning curve in one run): the per-item loss
    of the choice rows' right answers at every budget, and the choice accuracy at ``choice_at``. Runs after the
    optimizer step, in eval mode and without gradients (no random draw, so the training is unchanged)."""

    def __init__(self, trainer: Any, job: dict[str, Any]) -> None:
        self.trainer, self.budgets, self.at = trainer, set(job.get("budgets") or []), set(job.get("choice_at") or [])
        spec = job.get("choice") or {}
        self.rows = ev.choice_rows(spec["data"], spec.get("examples")) if spec else []
        self.batch_size = int(spec.get("batch_size") or 16)
        self.steps = 0
        self.results: list[dict[str, Any]] = []
        # each measurement is also appended here as it is made: a run that times out or crashes keeps its curve
        self.progress = budgets_path(job["result"]) if job.get("result") else None

    def measure(self, step: int, full: bool) -> dict[str, Any]:
        model, tok = self.trainer.model, self.trainer.tokenizer
        t = time.perf_counter()
        rows = self.rows if full else [{**r, "choices": [r["choices"][int(r["answer"])]], "answer": 0}
                                       for r in self.rows]
        res = choice_eval(model, tok, rows, batch_size=self.batch_size)
        out = {"step": step, "choice_loss": res["choice_loss"], "item_loss": res["item_loss"]}
        if full:
            out.update(choice_accuracy=res["choice_accuracy"], choice_correct=res["choice_correct"])
        out["eval_s"] = round(time.perf_counter() - t, 1)
        return out

    def step(self) -> None:
        self.steps += 1
        if self.rows and self.steps in self.budgets:
            m = self.measure(self.steps, self.steps in self.at)
            self.results.append(m)
            if self.progress is not None:
                with open(self.progress, "a") as fh:
                    fh.write(json.dumps(m) + "\n")


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one run in this process; returns its measurements.

    With ``job["base"]`` the base model is evaluated first (before the adapter is attached), and its numbers
    are returned under ``"base"``; memory is then measured from a reset peak, so that evaluation does not
    count against the method.
    """
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    cfg = load_config(job["config"])
    timer = StepTimer()
    trainer = Trainer(None, cfg, callbacks=[timer], log=lambda m: print(m, file=sys.stderr, flush=True))
    budgets = BudgetEval(trainer, job)
    trainer.extra_callbacks.append(budgets)  # after the timer: its evaluations fall between two timed steps
    trainer.prepare()
    assert trainer.model is not None and trainer.train_data is not None
    res: dict[str, Any] = {"threads": torch.get_num_threads()}
    if job.get("base"):
        res["base"] = {"ok": True, "eval_loss": trainer.evaluate().get("eval_loss"), **_quality(trainer, job)}
        if budgets.rows:
            res["base"]["budgets"] = [budgets.measure(0, True)]
    cuda = trainer.device.type == "cuda"
    res["rss_before_train_bytes"] = ev.rss_bytes()
    windowed = ev.reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    fit = trainer.fit(overwrite=True)
    if fit.interrupted:  # Ctrl-C or SIGTERM stopped it early: a result here would be a shorter run's
        raise RunInterrupted(f"interrupted at step {fit.step}/{fit.total_steps} (Ctrl-C or SIGTERM): no result")
    res["train_s"] = round(time.perf_counter() - t0, 2)
    res["train_cpu_s"] = round(_cpu_seconds() - cpu0, 2)  # far below train_s x threads: the CPU was shared
    res["peak_rss_bytes"] = ev.window_peak_rss() if windowed else ev.peak_rss_bytes()
    res["process_peak_rss_bytes"] = ev.peak_rss_bytes()  # ru_maxrss: loading + training (+ base evaluation)
    if cuda:
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(trainer.device)
    res["step_time_s"] = timer.median()
    res["steps"] = fit.step
    records = read_metrics(Path(cfg.output.dir) / METRICS_FILE)
    info = next((r for r in records if r.get("kind") == "info"), {})
    res["trainable_params_start"] = info.get("trainable_params")
    res["trainable_params"] = trainable_parameters(trainer.model)  # after any pruning
    res["total_params"] = info.get("total_params")
    res["train_loss"] = [[r["step"], r["loss"]] for r in records
                         if r.get("kind") == "train" and isinstance(r.get("loss"), float)]
    res["eval_loss_start"] = fit.eval_start.get("eval_loss")
    res["eval_loss"] = fit.eval_end.get("eval_loss")
    assert fit.adapter_dir is not None
    res["adapter_bytes"] = ev.dir_bytes(fit.adapter_dir)
    shutil.rmtree(Path(cfg.output.dir) / "checkpoints", ignore_errors=True)  # only needed to resume
    res["saved_activation_bytes"] = _activation_bytes(trainer)
    res.update(_quality(trainer, job))
    if budgets.results:
        res["budgets"] = budgets.results
    return res


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _quality(trainer: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Task accuracy, token F1 and the loss on the forgetting text, for the model as it is now."""
    res: dict[str, Any] = {}
    acc = job.get("accuracy")
    if acc:
        rows = ev.answer_rows(acc["data"], acc["examples"])
        res.update(ev.task_accuracy(trainer.model, trainer.tokenizer, rows, max_new_tokens=acc["max_new_tokens"],
                                    batch_size=acc["batch_size"]))
    f1 = job.get("f1")
    if f1:
        rows = ev.completion_rows(f1["data"], f1["examples"])
        out = ev.completion_f1(trainer.model, trainer.tokenizer, rows, max_new_tokens=f1["max_new_tokens"],
                               batch_size=f1["batch_size"])
        res.update(token_f1=out["token_f1"], f1_examples=out["examples"], f1_samples=out["samples"])
    if job.get("forgetting"):
        data = ev.text_dataset(job["forgetting"], trainer.tokenizer, job["forgetting_max_length"])
        res["heldout_loss"] = trainer.evaluate(data).get("eval_loss")
    return res


def _activation_bytes(trainer: Any) -> int | None:
    """Saved-for-backward bytes of one training micro-batch, computed as the trainer computes its loss."""
    cfg = trainer.config
    if cfg.model.task != "causal-lm":
        return None
    batch = ev.training_batch(trainer.train_data, cfg.training.batch_size, int(trainer.tokenizer.pad_token_id),
                              trainer.device)
    model = trainer.model
    model.train()
    amp = torch.autocast(trainer.device.type, dtype=trainer.amp_dtype) if trainer.amp_dtype is not None \
        else contextlib.nullcontext()

    def step() -> torch.Tensor:
        with amp:
            return speed.causal_lm_loss(model, batch["input_ids"], batch["labels"],
                                        attention_mask=batch["attention_mask"])

    with lowrank.fused(cfg.training.fused):
        return ev.saved_activation_bytes(model, step)


def _worker(argv: Sequence[str]) -> int:
    """``python -m lorakit.evaluation.compare_worker JOB.json``: run the job and write its result file."""
    job = json.loads(Path(argv[0]).read_text())
    try:
        res = run_job(job)
    except RunInterrupted as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return INTERRUPTED_STATUS
    write_json(Path(job["result"]), _finite(res), indent=1, allow_nan=False)
    return 0


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: turn them into ``None`` (a diverged run shows as missing, not as a number)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


__all__ = ["INTERRUPTED_STATUS", "RunInterrupted", "StepTimer", "run_job"]

if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
