"""The environment of a training run: device precision, seeds, the learning-rate schedule, and signals."""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lorakit.errors import ConfigError


def device_name(device: torch.device) -> str:
    """The accelerator's name (``run.json``), or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup``, then ``constant``, ``linear`` or ``cosine`` decay from 1 to
    ``min_ratio`` over the remaining steps (cosine: ``m + (1 - m) (1 + cos(pi p)) / 2``, ``p`` the progress).
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1 - p if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * p))
    return min_ratio + (1 - min_ratio) * shape


def lr_schedule(optimizer: torch.optim.Optimizer, *, total: int, warmup: int, schedule: str,
                min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's schedule: each group's learning rate is its peak rate times :func:`lr_factor` of the step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, total=total, warmup=warmup, schedule=schedule, min_ratio=min_ratio))


def rebase_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, peak_lrs: list[float]) -> bool:
    """After a checkpoint's scheduler state was loaded: continue at its step with ``peak_lrs``, this run's peak
    rates (the configured ``training.lr``, LoRA+ groups included), which a resume may have lowered.

    ``peak_lrs`` must be the rates the scheduler was built with (its ``base_lrs`` before loading), never the
    optimizer's current ``lr``: that one is already scaled by the step-0 factor (``1 / warmup`` in a warm-up).
    Returns whether anything changed (nothing does when the rates are the checkpoint's).
    """
    peak = [float(x) for x in peak_lrs]
    if peak == [float(x) for x in scheduler.base_lrs]:
        return False
    scheduler.base_lrs = peak
    step = scheduler.last_epoch
    for group, base, factor in zip(scheduler.optimizer.param_groups, peak, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(step)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]  # what get_last_lr() reports
    return True


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None``: plain fp32)."""
    cuda = device.type == "cuda"
    if precision == "auto":
        if not cuda:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and not cuda:
        raise ConfigError("training.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("training.precision=bf16: this GPU does not support bf16; use fp16")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[], bool]) -> Iterator[None]:
    """Turn Ctrl-C and SIGTERM into a stop request, so the loop stops between steps (never in the middle of
    an optimizer update) and saves a checkpoint.

    Args:
        request_stop: called on each signal; returns whether a stop was already requested, in which case a
            second Ctrl-C aborts at once (``KeyboardInterrupt``).

    Outside the main thread (where Python cannot install handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if request_stop() and signum == signal.SIGINT:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
