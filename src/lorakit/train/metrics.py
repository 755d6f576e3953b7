"""Run metrics: ``metrics.jsonl`` (one JSON object per line, flushed as written), TensorBoard when it is
installed, and the loss-curve plot written at the end of a run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lorakit.util.files import atomic_write, iter_jsonl, write_text

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLogger:
    """Append-only metrics log.

    Each record has a ``step`` and a ``kind`` (``train``, ``eval``, ``info``, ``ranks``...) plus values.
    On resume, records past the resumed step are dropped first, so the log matches an uninterrupted run.
    """

    def __init__(self, output_dir: str | os.PathLike[str], *, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        if resume_step is not None and self.path.is_file():
            kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= resume_step]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except Exception:  # tensorboard not installed (torch imports it lazily): it is optional
                self._tb = None

    def log(self, kind: str, step: int, **values: Any) -> None:
        """Write one record and flush it (so ``tail -f`` and crashed runs see every line)."""
        record = {"kind": kind, "step": step, **{k: _clean(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


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
