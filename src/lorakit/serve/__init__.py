"""``lorakit serve``: an OpenAI-compatible HTTP server for a base model and its adapters, batching requests for
different adapters together (see ``docs/serving.md``).

- :mod:`~lorakit.serve.protocol`: the OpenAI request models and response bodies.
- :mod:`lorakit.inference.decode` (shared with ``lorakit generate`` and the evaluation): the batched incremental
  decode loop (KV cache, greedy or sampled, text deltas).
- :mod:`~lorakit.serve.engine`: the worker thread that owns the model, batches queued requests and loads
  adapters between batches.
- :mod:`~lorakit.serve.app`: the FastAPI app (endpoints, errors, server-sent events).
"""

from __future__ import annotations

from lorakit.serve.app import bind, create_app, run_server
from lorakit.serve.engine import Engine

__all__ = ["Engine", "bind", "create_app", "run_server"]
