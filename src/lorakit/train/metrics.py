"""Run metrics: ``metrics.jsonl`` (one JSON object per line, flushed as written), passed on to the run's
trackers (:mod:`lorakit.train.tracking`: TensorBoard, W&B, MLflow), and the loss-curve plot written at the end of a
run."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from lorakit.train.tracking import Tracking
from lorakit.util.files import atomic_write, iter_jsonl, write_text

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLogger:
    """Append-only metrics log.

    Each record has a ``step`` and a ``kind`` (``train``, ``eval``, ``info``, ``ranks``...) plus values.
    On resume, records past the resumed step are dropped first, so the log matches an uninterrupted run.
    Every record also goes to ``tracking`` (its numbers as ``<kind>/<name>``), when given.
    """

    def __init__(self, output_dir: str | os.PathLike[str], *, tracking: Tracking | None = None,
                 resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        if resume_step is not None and self.path.is_file():
            kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= resume_step]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self.tracking = tracking

    def log(self, kind: str, step: int, **values: Any) -> None:
        """Write one record and flush it (so ``tail -f`` and crashed runs see every line)."""
        record = {"kind": kind, "step": step, **{k: _clean(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tracking is not None:
            self.tracking.log(kind, step, values)

    def close(self) -> None:
        """Close the file (the trackers stay open: the final adapter is logged to them after the run)."""
        self._file.close()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far, in MiB: ``torch.cuda.max_memory_allocated`` on a GPU, else the peak
    resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def _clean(v: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays valid JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a ``metrics.jsonl`` file (a torn last line, from a killed run, is skipped)."""
    return [record for _, record in iter_jsonl(path, bad="skip")]


def plot_losses(metrics_path: str | os.PathLike[str], out_path: str | os.PathLike[str], title: str = "") -> Path:
    """Plot training loss (and eval loss, if any) against the step into a PNG (matplotlib, Agg backend)."""
    # The object API with an explicit Agg canvas: no display, no pyplot global state (safe in threads).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and isinstance(r.get("loss"), float)]
    evals = [(r["step"], r["eval_loss"]) for r in records
             if r.get("kind") == "eval" and isinstance(r.get("eval_loss"), float)]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_write(out_path, fig.savefig)
