"""Training rules that are not layers: post-step hooks and loss regularisers.

Delta-LoRA's base-weight update and rank1-sum's pruning are training-loop callbacks, not layer code. Any
training loop (lorakit's :class:`~lorakit.Trainer`, a plain PyTorch loop, a ``transformers.Trainer``
callback) drives them the same way::

    callbacks = lorakit.training_callbacks(model, optimizer, total_steps=1000)
    for batch in data:
        loss = model(**batch).loss
        for cb in callbacks:
            reg = cb.regularizer()
            if reg is not None:
                loss = loss + reg
        loss.backward()
        for cb in callbacks:
            cb.before_step()   # gradients are available here; they are cleared after the step
        optimizer.step()
        for cb in callbacks:
            cb.step()
        optimizer.zero_grad()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class TrainingCallback:
    """Base class: every hook is optional. ``state_dict``/``load_state_dict`` make resumed runs exact."""

    def regularizer(self) -> Tensor | None:
        """A term to add to the loss this step, or ``None``."""
        return None

    def before_step(self) -> None:
        """Called after ``backward()`` and before ``optimizer.step()`` (gradients are populated)."""

    def step(self) -> None:
        """Called after each ``optimizer.step()``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def training_callbacks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                       total_steps: int) -> list[TrainingCallback]:
    """The callbacks every active adapter's method needs for training (empty for most methods)."""
    from .adapters import Adapter, get_method
    from .model import _record, active_adapters

    out: list[TrainingCallback] = []
    for name in active_adapters(model):
        rec = _record(model, name)
        cls = get_method(rec.method)
        if isinstance(cls, type) and issubclass(cls, Adapter):
            out.extend(cls.callbacks(model, name, rec.config, optimizer=optimizer, total_steps=total_steps))
    return out
