"""The few collectives methods need under ``torchrun``: no-ops in a plain single-process run.

LoRA-SB sums its gradient estimate over processes and splits each init batch between them; rank1-sum's pruner
averages its importance scores, so every process keeps the same components. Everything else distributed lives
in :mod:`lorakit.train.distributed`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

#: Label of tokens that carry no loss (Hugging Face's ``ignore_index``).
IGNORE = -100


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Sum each tensor over all processes, in place (a no-op without ``torch.distributed``)."""
    if _world() > 1:
        for t in tensors:  # large (d_out, d_in) buffers: one at a time, no flat copy
            dist.all_reduce(t)


def all_reduce_mean_(scores: Tensor) -> Tensor:
    """THE distributed point: average the component scores over all processes, in place.

    With data parallelism every process sees its own gradients; averaging the scores before any decision
    makes every process keep exactly the same components. A no-op without ``torch.distributed``.
    """
    if _world() > 1:
        dist.all_reduce(scores, op=dist.ReduceOp.SUM)
        scores /= dist.get_world_size()
    return scores


def shard_rows(batch: Mapping[str, Any], n: int) -> tuple[dict[str, Any], int, float]:
    """This process's strided rows ``[rank::world]`` of a batch of ``n`` examples, how many, and their share of
    the batch's loss units (predicted tokens of causal-LM ``labels``, else rows).

    Every process must hold the same batch; tensors whose leading dimension is ``n`` are cut, other values
    pass unchanged. ``sum_r share_r L_r`` (``L_r`` the mean loss of process ``r``'s rows) is the batch's mean
    loss.
    Without ``torch.distributed`` the batch is returned whole, with share ``1.0``.
    """
    if _world() == 1:
        return dict(batch), n, 1.0
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {k: v[rank::world] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v
           for k, v in batch.items()}
    labels = batch.get("labels")
    if isinstance(labels, Tensor) and labels.dim() == 2 and labels.shape[0] == n:
        units = (labels[:, 1:] != IGNORE).sum(1).double()  # (n,) tokens each row predicts
    else:
        units = torch.ones(n, dtype=torch.float64)
    share = float(units[rank::world].sum() / units.sum().clamp_min(1))
    return out, len(range(rank, n, world)), share
