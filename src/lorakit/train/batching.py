"""Batches: padding and packed-sequence attention (:func:`collate`), the run's micro-batch order
(:class:`BatchOrder`: a pure function of the step, so a resumed run draws the same batches), and evaluation
batches (:func:`iter_batches`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lorakit.core.collectives import IGNORE
from lorakit.train.data import Dataset
from lorakit.train.example import Example


# --- batching ----------------------------------------------------------------------------------------------
def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a list of examples into ``input_ids``/``attention_mask``/``labels`` tensors ``(B, T)``
    (``labels`` is ``(B,)`` for classification).

    Packed blocks (examples with ``segments``) also get ``position_ids`` ``(B, T)`` restarting at every example
    and a boolean ``attention_mask`` ``(B, 1, T, T)``: token ``i`` attends to token ``j <= i`` of its own
    example only (a padding token to itself, so no attention row is empty).

    Preference pairs (examples with ``rejected``) become ``2B`` rows, the ``B`` chosen sequences then the ``B``
    rejected ones (one forward for both, as in TRL's concatenated forward), plus ``reference_logps`` ``(2B,)`` in
    the same order once the reference log-probabilities are known.
    """
    if examples[0].rejected is not None:
        rows = [Example(e.input_ids, e.labels) for e in examples]
        rows += [e.rejected for e in examples if e.rejected is not None]
        if len(rows) != 2 * len(examples):
            raise ValueError("collate(): a batch mixes preference pairs and single examples")
        batch = collate(rows, pad_id)
        if all(e.reference is not None for e in examples):
            ref = [e.reference for e in examples]
            batch["reference_logps"] = torch.tensor([r[0] for r in ref] + [r[1] for r in ref],  # type: ignore[index]
                                                    dtype=torch.float64)
        return batch
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    token_labels = isinstance(examples[0].labels, list)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long) if token_labels else \
        torch.tensor([e.labels for e in examples], dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, :n] = 1
        if token_labels:
            labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.segments is not None for e in examples):
        batch.update(_packed_attention(examples, width))
    return batch


def _packed_attention(examples: Sequence[Example], width: int) -> dict[str, Tensor]:
    """``position_ids`` ``(B, T)`` and the block-diagonal causal ``attention_mask`` ``(B, 1, T, T)``."""
    seg = torch.full((len(examples), width), -1, dtype=torch.long)  # -1: padding
    for i, e in enumerate(examples):
        s = e.segments if e.segments is not None else [0] * len(e.input_ids)
        seg[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    # position of each token inside its example: its index minus the index where its example starts
    idx = torch.arange(width).expand_as(seg)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    start_idx = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    positions = (idx - start_idx).masked_fill(seg < 0, 0)
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T)
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)  # (B, T, T)
    allowed = (same & causal) | torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves
    return {"position_ids": positions, "attention_mask": allowed[:, None]}


class BatchOrder:
    """A reproducible, resumable order of micro-batches over several epochs.

    Micro-batch ``k`` (counted from the start of training across epochs) is a pure function of ``k``,
    the seed and the dataset (size, and lengths when they shape the batches), so a resumed run needs only
    ``k`` to continue exactly where it stopped.

    Args:
        n: examples.
        batch_size: examples per micro-batch (at most, with ``max_tokens``).
        seed: seed of the shuffles (one per epoch).
        lengths: each example's length in tokens (needed by the two options below).
        group_by_length: batch examples of similar length together, so less of each batch is padding: each
            epoch's shuffled order is cut into chunks of ``50 x batch_size`` examples, each chunk is sorted by
            length and cut into batches, and the batches are shuffled.
        max_tokens: a token budget per micro-batch: a batch takes examples while ``its size x its longest
            example`` (the padded tokens) stays within the budget (one example at least, ``batch_size`` at
            most), so batches of short examples hold more of them.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, *,
                 lengths: Sequence[int] | None = None, group_by_length: bool = False,
                 max_tokens: int | None = None) -> None:
        if (group_by_length or max_tokens is not None) and (lengths is None or len(lengths) != n):
            raise ValueError("group_by_length and max_tokens need the length of every example")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.lengths = list(lengths) if lengths is not None else None
        self.group_by_length, self.max_tokens = group_by_length, max_tokens
        self._plans: dict[int, Any] = {}  # per epoch: a tuple of index tensors, or a list of index lists
        self._counts: dict[int, int] = {}  # batches of each epoch seen so far (kept: tiny)
        self.batches_per_epoch = len(self._plan(0))  # epochs may differ by a batch or two with max_tokens

    def _perm(self, epoch: int) -> Tensor:
        """The epoch's example order, ``(n,)`` int64 (a tensor: 8 bytes per example, for data of any size)."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def _cut(self, order: Tensor | list[int]) -> Any:
        """Consecutive batches of ``order``: ``batch_size`` each, or within the token budget."""
        if self.max_tokens is None:
            if isinstance(order, Tensor):  # batches stay views of the order tensor until asked for
                return order.split(self.batch_size)
            return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        assert self.lengths is not None
        batches: list[list[int]] = []
        cur: list[int] = []
        longest = 0
        for i in (order.tolist() if isinstance(order, Tensor) else order):
            grown = max(longest, self.lengths[i])
            if cur and (len(cur) == self.batch_size or grown * (len(cur) + 1) > self.max_tokens):
                batches.append(cur)
                cur, grown = [], self.lengths[i]
            cur.append(i)
            longest = grown
        if cur:
            batches.append(cur)
        return batches

    def _plan(self, epoch: int) -> Any:
        """The micro-batches of one epoch (cached: the plan of an epoch is fixed by the seed)."""
        if epoch not in self._plans:
            order = self._perm(epoch)
            if not self.group_by_length:
                plan = self._cut(order)
            else:
                assert self.lengths is not None
                lengths = self.lengths
                chunk = 50 * self.batch_size
                plan = []
                for s in range(0, len(order), chunk):
                    plan += self._cut(sorted(order[s:s + chunk].tolist(), key=lambda i: -lengths[i]))
                if self.shuffle:
                    g = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 1_000_000_007)
                    plan = [plan[j] for j in torch.randperm(len(plan), generator=g).tolist()]
            self._plans = {e: b for e, b in self._plans.items() if e >= epoch - 1}  # keep memory flat
            self._plans[epoch] = plan
            self._counts[epoch] = len(plan)
        return self._plans[epoch]

    def _locate(self, k: int) -> tuple[int, int]:
        """``(epoch, batch within it)`` of micro-batch ``k``."""
        if self.max_tokens is None:  # every epoch has the same number of batches
            return divmod(k, self.batches_per_epoch)
        epoch = 0
        while k >= (count := self._counts.get(epoch) or len(self._plan(epoch))):
            k -= count
            epoch += 1
        return epoch, k

    def indices(self, k: int) -> list[int]:
        """Example indices of micro-batch ``k``."""
        epoch, b = self._locate(k)
        batch = self._plan(epoch)[b]
        return batch.tolist() if isinstance(batch, Tensor) else list(batch)

    def epoch_of(self, k: int) -> float:
        return k / self.batches_per_epoch


def iter_batches(data: Dataset, batch_size: int, pad_id: int) -> Iterator[dict[str, Tensor]]:
    """Sequential (unshuffled) padded batches over ``data``, e.g. for evaluation."""
    for i in range(0, len(data), batch_size):
        yield collate(data.examples[i:i + batch_size], pad_id)


__all__ = ["BatchOrder", "collate", "iter_batches"]
