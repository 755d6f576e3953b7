"""One tokenized example: what data building produces and batching consumes (in memory or on disk)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Example:
    """One tokenized example.

    Attributes:
        input_ids: token ids.
        labels: per-token labels (``-100`` where no loss) for language modelling, a class index for
            classification.
        segments: for a packed block (:func:`pack`), the example each token belongs to (0, 0, 1, 1, 1...).
    """

    input_ids: list[int]
    labels: list[int] | int
    segments: list[int] | None = None  # packed blocks: which example each token belongs to
