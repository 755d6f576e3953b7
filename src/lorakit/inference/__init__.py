"""Text generation shared by the CLI, the evaluation and the server: :mod:`~lorakit.inference.decode`, the one
batched incremental decode loop (KV cache, left padding, greedy or sampled, stop strings, text deltas)."""

from __future__ import annotations

from lorakit.inference.decode import Completion, Decoder, SamplingParams, complete

__all__ = ["Completion", "Decoder", "SamplingParams", "complete"]
