"""Training rules that are not layers: post-step hooks and loss regularisers.

Delta-LoRA's base-weight update and rank1-sum's pruning are training-loop callbacks, not layer code. Any
training loop (lorakit's :class:`~lorakit.Trainer`, a plain PyTorch loop, a ``transformers.Trainer``
callback) drives them the same way::

    callbacks = lorakit.training_callbacks(model, optimizer, total_steps=1000)
    for batch in data:
        loss = callbacks.regularize(model(**batch).loss)   # adds every regularizer
        loss.backward()
        callbacks.before_step()   # gradients are available here
        optimizer.step()
        callbacks.step()          # after the update, before the gradients are cleared
        optimizer.zero_grad()
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


class TrainingCallback:
    """Base class: every hook is optional. ``state_dict``/``load_state_dict`` make resumed runs exact."""

    def regularizer(self) -> Tensor | None:
        """A term to add to the loss this step, or ``None``."""
        return None

    def before_step(self) -> None:
        """Called after ``backward()`` and before ``optimizer.step()`` (gradients are populated)."""

    def step(self) -> None:
        """Called after each ``optimizer.step()``."""

    def ranks(self) -> dict[str, int] | None:
        """The per-layer ranks of a dynamic-rank method (the trainer logs them when they change), or ``None``."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class Callbacks(list[TrainingCallback]):
    """A list of callbacks driven as one: each call runs the same hook of every member, in order."""

    def regularize(self, loss: Tensor) -> Tensor:
        """``loss`` plus every member's :meth:`~TrainingCallback.regularizer` term."""
        for cb in self:
            reg = cb.regularizer()
            if reg is not None:
                loss = loss + reg
        return loss

    def before_step(self) -> None:
        for cb in self:
            cb.before_step()

    def step(self) -> None:
        for cb in self:
            cb.step()
