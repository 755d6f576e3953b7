"""What one :meth:`lorakit.Trainer.fit` call is made of: its result, its position in the data, its objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.core.callbacks import Callbacks, TrainingCallback
from lorakit.errors import LorakitError
from lorakit.train.batching import BatchOrder
from lorakit.train.metrics import METRICS_FILE, MetricsLogger, read_metrics


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` did.

    Attributes:
        step: optimizer steps done. total_steps: steps planned.
        output_dir: the run directory. adapter_dir: the saved final adapter (``None`` if interrupted).
        checkpoint: the last checkpoint written.
        eval_start, eval_end: evaluation metrics before and after training (empty without eval data).
        interrupted: stopped early by Ctrl-C / SIGTERM (a checkpoint was saved; resume with ``--resume``).
    """

    step: int
    total_steps: int
    output_dir: Path
    adapter_dir: Path | None
    checkpoint: Path | None
    eval_start: dict[str, float] = field(default_factory=dict)
    eval_end: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False

    def finished(self) -> FitResult:
        """This result, if training ran to its last step; ``KeyboardInterrupt`` if Ctrl-C or SIGTERM stopped it
        (the trainer has said where its checkpoint is). For code that goes on to score, save or compare the
        model, which would otherwise use a shorter run as if it were the one asked for."""
        if self.interrupted:
            raise KeyboardInterrupt(f"training interrupted at step {self.step}/{self.total_steps}")
        return self


@dataclass
class Position:
    """Where the run is: optimizer steps done, micro-batches consumed, non-pad tokens seen."""

    step: int = 0
    micro: int = 0
    tokens: int = 0


@dataclass
class RunState:
    """The objects of one ``fit`` call, passed around the loop."""

    order: BatchOrder
    total: int
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler
    own_callbacks: list[TrainingCallback]  # the method's (checkpointed)
    callbacks: Callbacks  # the method's, then the user's
    metrics: MetricsLogger
    pos: Position
    result: FitResult
    ranks: dict[str, int] | None = None  # last logged per-layer ranks


def logged_eval(out: Path, step: int) -> dict[str, float]:
    """The eval metrics logged at ``step`` in ``out/metrics.jsonl`` (empty if none)."""
    p = out / METRICS_FILE
    records = read_metrics(p) if p.is_file() else []
    for r in records:
        if r.get("kind") == "eval" and r.get("step") == step:
            return {k: v for k, v in r.items() if k.startswith("eval_")}
    return {}
