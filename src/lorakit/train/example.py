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
        rejected: for a preference pair, the rejected sequence (prompt + rejected completion); ``input_ids`` and
            ``labels`` then hold the chosen one (labels only on the completion).
        reference: for a preference pair, the reference model's log-probabilities of the chosen and the rejected
            completion (filled once before training, see :mod:`lorakit.train.preference`).
    """

    input_ids: list[int]
    labels: list[int] | int
    segments: list[int] | None = None  # packed blocks: which example each token belongs to
    rejected: Example | None = None
    reference: tuple[float, float] | None = None

    @property
    def n_tokens(self) -> int:
        """Tokens this example feeds the model (both sequences of a preference pair)."""
        return len(self.input_ids) + (len(self.rejected.input_ids) if self.rejected is not None else 0)
