"""The serving engine: one worker thread owns the model and turns queued requests into mixed-adapter batches.

Requests (:class:`Request`) go into a queue. The worker takes the first one, waits up to ``batch_window_ms``
for more (at most ``max_batch`` rows), and decodes them as one batch in which row ``i`` uses its own adapter
(:func:`lorakit.adapt.mixed.per_row`; ``mixed=False`` runs one batch per adapter instead, with
:func:`lorakit.set_active`). Requests that arrive while a batch decodes wait for the next one. Loading and
unloading adapters go through the same queue, so the model is only ever touched by the worker, between
batches. A failing batch fails its own requests (an error event each) and the worker goes on.

Events reach the HTTP side through a :class:`Sink`: an ``asyncio`` queue of the event loop that made the
request, fed thread-safely from the worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lorakit.adapt.mixed import per_row
from lorakit.adapt.model import remove, set_active
from lorakit.errors import AdapterStateError, ConfigError, LorakitError
from lorakit.formats.layout import is_peft_dir
from lorakit.formats.native import load, read_adapter
from lorakit.inference.decode import Decoder, SamplingParams
from lorakit.methods import get_method
from lorakit.train.config import ModelConfig
from lorakit.train.data import render_chat
from lorakit.train.loading import load_model, load_tokenizer, resolve_device
from lorakit.util.validation import parse

log = logging.getLogger("lorakit.serve")


class ServeError(LorakitError):
    """A request the server refuses; ``status`` is its HTTP status (400, 404, 409, 503...)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class Event:
    """What the worker tells a request: a text delta, its end (``finish_reason``), or an error."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: ServeError | None = None


class Sink:
    """The events of one HTTP request (all its choices), delivered to the event loop that created it."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        """Thread-safe: called by the worker."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def get(self) -> Event:
        return await self._queue.get()


class Request:
    """One prompt to complete: the unit the worker batches (implements :class:`lorakit.inference.decode.Row`)."""

    def __init__(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams, sink: Sink,
                 index: int = 0) -> None:
        self.prompt_ids = prompt_ids
        self.adapter = adapter
        self.params = params
        self.sink = sink
        self.index = index
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Stop generating (the client went away); the worker drops the row at its next step."""
        self._cancelled = True

    def emit_text(self, text: str) -> None:
        self.sink.put(Event(self.index, text=text))

    def emit_done(self, finish_reason: str, completion_tokens: int) -> None:
        self.sink.put(Event(self.index, finish_reason=finish_reason, completion_tokens=completion_tokens))

    def emit_error(self, error: ServeError) -> None:
        self.sink.put(Event(self.index, error=error))


@dataclass
class BatchStats:
    """Counters of what the worker ran (``GET /health`` shows them)."""

    batches: int = 0
    rows: int = 0
    mixed_batches: int = 0  # batches whose rows used more than one adapter (the base counts as one)
    largest_batch: int = 0
    failed_batches: int = 0

    def add(self, names: list[str | None]) -> None:
        self.batches += 1
        self.rows += len(names)
        self.mixed_batches += len(set(names)) > 1
        self.largest_batch = max(self.largest_batch, len(names))


@dataclass
class _Admin:
    """Work on the model itself (load, unload), run by the worker between batches."""

    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


_STOP = object()


class Engine:
    """A base model, its adapters by serving name, and the worker that batches requests over them.

    Args:
        model: a causal LM in eval mode (it is owned by the worker once :meth:`start` ran).
        base_name: the ``model`` value that selects the base model with no adapter.
        max_model_len: prompt plus completion tokens allowed per request (default: the model's
            ``max_position_embeddings``).
        max_batch: rows per batch at most.
        batch_window_ms: how long the worker waits after the first request of a batch for more to join.
        max_waiting: queued requests at most; beyond it requests are refused with 503.
        mixed: batch different adapters together (:func:`lorakit.adapt.mixed.per_row`); ``False``: one
            batch per adapter.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, base_name: str, base_path: str | None = None,
                 max_model_len: int | None = None, max_batch: int = 32, batch_window_ms: float = 8.0,
                 max_waiting: int = 1024, mixed: bool = True) -> None:
        if max_batch < 1 or batch_window_ms < 0 or max_waiting < 1:
            raise ConfigError("max_batch and max_waiting must be >= 1 and batch_window_ms >= 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.base_path = base_path or base_name
        self.max_model_len = max_model_len or _model_len(model, tokenizer)
        self.max_batch = max_batch
        self.window_s = batch_window_ms / 1000
        self.max_waiting = max_waiting
        self.mixed = mixed
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_size = int(getattr(embeddings, "num_embeddings", 0) or len(tokenizer))
        self.stats = BatchStats()
        self.created = int(time.time())
        self._paths: dict[str, str] = {}  # serving name -> directory; written by the worker only
        self._queue: queue.Queue[Any] = queue.Queue()
        self._held: Any = None  # an item the batch collector took but that belongs after the batch
        self._decoder = Decoder(model, tokenizer, self._adapter_context)
        self._thread: threading.Thread | None = None
        set_active(model, [])

    @classmethod
    def from_pretrained(cls, base: str, adapters: Mapping[str, str | os.PathLike[str]] | None = None, *,
                        device: str = "auto", dtype: str = "auto", base_name: str | None = None,
                        quantize: str = "none", **options: Any) -> Engine:
        """Load the base model and tokenizer (a directory, hub id or ``bundled://NAME``), quantized as
        ``quantize`` says (``model.quantize`` of a training config: serve a QLoRA adapter on the base it was
        trained on), move it to ``device``, and load each adapter directory under its serving name."""
        cfg = parse(ModelConfig, {"path": base, "dtype": dtype, "quantize": quantize}, "--base")
        tokenizer = load_tokenizer(cfg)
        dev = resolve_device(device)
        model = load_model(cfg, device=dev).to(dev)
        engine = cls(model, tokenizer, base_name=base_name or base, base_path=base, **options)
        for name, path in (adapters or {}).items():
            engine._load(name, str(path))
        return engine

    # --- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lorakit-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        """Requests and adapter operations queued for the worker."""
        return self._queue.qsize()

    # --- what the HTTP side calls ------------------------------------------------------------------------
    def adapters(self) -> dict[str, str]:
        """Serving name -> directory of every loaded adapter."""
        return dict(self._paths)

    def resolve(self, model: str) -> str | None:
        """The adapter a request's ``model`` field selects (``None``: the base model); 404 if unknown."""
        if model == self.base_name:
            return None
        if model in self._paths:
            return model
        raise ServeError(404, f"model {model[:200]!r} does not exist; served: "
                         + ", ".join([self.base_name, *self._paths]), code="model_not_found")

    def encode(self, prompt: str | list[int], *, special: bool = True) -> list[int]:
        """Prompt tokens: text is tokenized with special tokens, as ``lorakit generate`` and training do."""
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt, add_special_tokens=special)["input_ids"])
        else:
            vocab = self.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise ServeError(400, f"prompt: token ids must be in [0, {vocab})")
            ids = list(prompt)
        if not ids:
            raise ServeError(400, "prompt: empty after tokenization")
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat prompt tokens: the tokenizer's chat template with the generation prompt, or without a template
        the plain ``role: content`` lines of :func:`lorakit.train.data.render_chat` ending in ``assistant:``."""
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        try:
            text = render_chat(self.tokenizer, messages, True)
        except Exception as e:  # noqa: BLE001  (the template's own errors: jinja raises its own types)
            raise ServeError(400, f"messages: the chat template refused them ({e})") from None
        # a template writes its own special tokens; the plain layout gets them like any prompt (as in
        # `lorakit generate --chat`)
        return self.encode(text, special=not templated)

    def check_length(self, prompt_len: int, max_tokens: int | None) -> int:
        """``max_tokens`` (default: the rest of the context), or 400 if prompt + completion do not fit."""
        room = self.max_model_len - prompt_len
        want = room if max_tokens is None else max_tokens
        if want < 1 or want > room:
            raise ServeError(400, f"this model's maximum context length is {self.max_model_len} tokens; the "
                             f"request needs {prompt_len + max(want, 1)} ({prompt_len} in the prompt, "
                             f"{max(want, 1)} for the completion)", code="context_length_exceeded")
        return want

    def submit(self, seq: Request) -> Request:
        if self._thread is None:
            raise ServeError(503, "the engine is not running")
        if self._queue.qsize() >= self.max_waiting:
            raise ServeError(503, f"server overloaded: {self.max_waiting} requests already waiting")
        self._queue.put(seq)
        return seq

    async def load_adapter(self, name: str, path: str) -> None:
        await self._admin(lambda: self._load(name, path))

    async def unload_adapter(self, name: str) -> None:
        await self._admin(lambda: self._unload(name))

    async def _admin(self, fn: Callable[[], Any]) -> Any:
        if self._thread is None:
            return fn()
        op = _Admin(fn)
        self._queue.put(op)
        return await asyncio.wrap_future(op.future)

    # --- the model (worker thread, or before start) ------------------------------------------------------
    def _load(self, name: str, path: str) -> None:
        if name == self.base_name or name in self._paths:
            raise ServeError(409, f"a model named {name!r} is already served; unload it first",
                             code="model_exists")
        if not is_peft_dir(path):
            meta, _ = read_adapter(path, tensors=False)
            if not get_method(meta["method"]).layer_method:
                raise ServeError(400, f"{path}: a {meta['method']!r} adapter changes the base weights "
                                 "themselves and cannot be switched per request; merge it (`lorakit merge`) "
                                 "and serve the merged model as --base")
        load(self.model, path, name=name)  # leaves the model unchanged on any error
        set_active(self.model, [])  # loading activates it; rows choose their adapters themselves
        self._paths[name] = path

    def _unload(self, name: str) -> None:
        if name not in self._paths:
            raise ServeError(404, f"no adapter named {name!r} is loaded", code="model_not_found")
        remove(self.model, name)
        del self._paths[name]

    def _adapter_context(self, names: list[str | None]) -> Any:
        return per_row(self.model, names) if self.mixed else _uniform(self.model, names)

    # --- the worker --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._held if self._held is not None else self._queue.get()
            self._held = None
            if item is _STOP:
                return
            if isinstance(item, _Admin):
                self._run_admin(item)
                continue
            batch = self._collect(item)
            if not self.mixed:  # one adapter per batch
                groups: dict[str | None, list[Request]] = {}
                for seq in batch:
                    groups.setdefault(seq.adapter, []).append(seq)
                for group in groups.values():
                    self._run_batch(group)
            else:
                self._run_batch(batch)

    def _collect(self, first: Request) -> list[Request]:
        """``first`` and whatever arrives within the batch window, up to ``max_batch`` rows."""
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not isinstance(item, Request):  # admin work and stop keep their place after this batch
                self._held = item
                break
            batch.append(item)
        return batch

    def _run_batch(self, batch: list[Request]) -> None:
        rows = []
        for seq in batch:
            if seq.cancelled:
                continue
            if seq.adapter is not None and seq.adapter not in self._paths:
                seq.emit_error(ServeError(404, f"adapter {seq.adapter!r} was unloaded", code="model_not_found"))
                continue
            rows.append(seq)
        if not rows:
            return
        self.stats.add([r.adapter for r in rows])
        try:
            self._decoder.run(rows)
        except Exception as e:  # the batch fails, the server goes on
            self.stats.failed_batches += 1
            log.exception("batch of %d rows failed", len(rows))
            for seq in rows:
                seq.emit_error(ServeError(500, f"generation failed: {type(e).__name__}: {e}"))
            with contextlib.suppress(Exception):
                set_active(self.model, [])

    def _run_admin(self, op: _Admin) -> None:
        try:
            op.future.set_result(op.fn())
        except Exception as e:  # noqa: BLE001  (handed to the caller)
            op.future.set_exception(e)


@contextlib.contextmanager
def _uniform(model: nn.Module, names: list[str | None]) -> Iterator[None]:
    """Every row on the same adapter (``mixed=False``): make it the active one for the batch."""
    chosen = set(names)
    if len(chosen) != 1:
        got = sorted(map(str, chosen))
        raise AdapterStateError(f"a batch without per-row adapters must use one adapter, got {got}")
    (name,) = chosen
    set_active(model, [name] if name is not None else [])
    try:
        yield
    finally:
        set_active(model, [])


def _model_len(model: nn.Module, tokenizer: Any) -> int:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    raise ConfigError("cannot tell the model's maximum length from its config; pass --max-model-len")


__all__ = ["BatchStats", "Engine", "Event", "Request", "ServeError", "Sink"]
