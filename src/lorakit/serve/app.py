"""The HTTP side of ``lorakit serve``: an OpenAI-compatible FastAPI app over an :class:`~lorakit.serve.engine.Engine`.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream=true``: server-sent events
``data: {...}`` then ``data: [DONE]``), ``GET /v1/models`` (the base model and every adapter),
``POST /v1/adapters`` ``{"name", "path"}`` and ``DELETE /v1/adapters/{name}`` (vLLM's
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` bodies are accepted too), ``GET /health``. With an API
key every endpoint but ``/health`` needs ``Authorization: Bearer KEY`` (see :mod:`lorakit.serve.security`).

The request's ``model`` field picks the adapter (its serving name) or the base model. Every refusal is a JSON
body in OpenAI's error shape: unknown model 404, a malformed body, an unsupported option or a prompt that does
not fit the context 400, an adapter that cannot be loaded 400 naming the reason; the server keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest

from lorakit._version import __version__
from lorakit.errors import LorakitError
from lorakit.inference.decode import SamplingParams
from lorakit.serve.engine import Engine, Event, Request, ServeError, Sink
from lorakit.serve.protocol import (
    ADAPTER_NAME,
    AdapterLoad,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    VllmAdapterLoad,
    VllmAdapterUnload,
    chat_body,
    chat_chunk,
    completion_body,
    error_body,
    model_card,
    new_id,
    now,
    usage,
)
from lorakit.serve.security import AdapterRoots, BearerAuth

#: ``model`` values and prompt text are echoed in errors only up to this many characters.
_ECHO = 200
_FIELD = re.compile(r"^(?!(str|int|float|bool|list|dict)$)[a-z_][a-z0-9_]*$")


def create_app(engine: Engine, *, runtime_adapters: bool = True, api_key: str | None = None,
               adapter_roots: Sequence[str | os.PathLike[str]] | None = None) -> FastAPI:
    """The app; it starts the engine's worker on startup and stops it on shutdown.

    Args:
        runtime_adapters: allow loading and unloading adapters over HTTP (403 otherwise).
        api_key: require ``Authorization: Bearer api_key`` on every endpoint but ``/health`` (401 otherwise).
        adapter_roots: directories runtime loads are confined to (a path outside, links resolved, is 403);
            ``None``: any directory the server can read, which suits a server on 127.0.0.1 only.
    """
    roots = AdapterRoots(adapter_roots) if adapter_roots is not None else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="lorakit", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.exception_handler(ServeError)
    async def _serve_error(_: HttpRequest, e: ServeError) -> JSONResponse:
        return _error(e.status, str(e), code=e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HttpRequest, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: HttpRequest, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: HttpRequest, e: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(e).__name__}: {e}")

    # --- generation --------------------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> JSONResponse | StreamingResponse:
        adapter = engine.resolve(body.model)
        prompts: list[Any] = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) \
            else list(body.prompt)
        encoded = [engine.encode(p) for p in prompts]
        rid, created = new_id("cmpl"), now()

        def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
            return completion_body(rid, created, body.model, [{"index": index, "text": text,
                                                               "finish_reason": finish}], None, chunk=True)

        def usage_chunk(use: dict[str, int]) -> dict[str, Any]:
            return completion_body(rid, created, body.model, [], use, chunk=True)

        reqs, sink = _submit(engine, encoded, adapter, body, body.max_tokens)
        if body.stream:
            return _sse(_stream(sink, reqs, chunk, usage_chunk, body.include_usage))
        choices, use = await _gather(sink, reqs)
        return JSONResponse(completion_body(rid, created, body.model, choices, use))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        adapter = engine.resolve(body.model)
        ids = engine.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        rid, created = new_id("chatcmpl"), now()

        def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
            delta = {"content": text} if text else {}
            return chat_chunk(rid, created, body.model, [{"index": index, "delta": delta, "finish_reason": finish}])

        def usage_chunk(use: dict[str, int]) -> dict[str, Any]:
            return chat_chunk(rid, created, body.model, [], use)

        reqs, sink = _submit(engine, [ids], adapter, body, body.token_limit)
        if body.stream:
            first = chat_chunk(rid, created, body.model, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                           "finish_reason": None}])
            return _sse(_stream(sink, reqs, chunk, usage_chunk, body.include_usage, first=first))
        choices, use = await _gather(sink, reqs)
        return JSONResponse(chat_body(rid, created, body.model, choices, use))

    # --- models and adapters ----------------------------------------------------------------------------
    def cards() -> list[dict[str, Any]]:
        base = model_card(engine.base_name, engine.created, engine.base_path, None)
        return [base, *(model_card(n, engine.created, p, engine.base_name) for n, p in engine.adapters().items())]

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": cards()}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        engine.resolve(model)
        return next(c for c in cards() if c["id"] == model)

    async def load(name: str, path: str) -> dict[str, Any]:
        if not runtime_adapters:
            raise ServeError(403, "loading adapters at run time is disabled on this server")
        if not ADAPTER_NAME.match(name):
            raise ServeError(400, f"adapter name {name[:_ECHO]!r}: use letters, digits, '_' and '-' (at most 128, "
                             "starting with a letter or digit)")
        if roots is not None:
            path = str(roots.resolve(path))
        try:
            await engine.load_adapter(name, path)
        except ServeError:
            raise
        except (LorakitError, OSError, ValueError) as e:  # the adapter's own problem: name it
            raise ServeError(400, f"cannot load adapter {name!r} from {path}: {e}", code="invalid_adapter") from None
        return model_card(name, engine.created, path, engine.base_name)

    async def unload(name: str) -> dict[str, Any]:
        if not runtime_adapters:
            raise ServeError(403, "unloading adapters at run time is disabled on this server")
        await engine.unload_adapter(name)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterLoad) -> dict[str, Any]:
        return await load(body.name, body.path)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        return await unload(name)

    @app.post("/v1/load_lora_adapter")
    async def vllm_load(body: VllmAdapterLoad) -> PlainTextResponse:
        await load(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def vllm_unload(body: VllmAdapterUnload) -> PlainTextResponse:
        await unload(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.running
        return JSONResponse({"status": "ok" if ok else "stopped", "models": 1 + len(engine.adapters()),
                             "waiting": engine.waiting, "batches": asdict(engine.stats)},
                            status_code=200 if ok else 503)

    return app


# --- helpers -----------------------------------------------------------------------------------------------
def _error(status: int, message: str, *, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code=code, param=param), status_code=status)


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    """One readable line for the first problem of a request body."""
    errors = list(e.errors())
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({(first.get('ctx') or {}).get('error', 'decode error')})", None
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object (send Content-Type: application/json)", None
    # union members (prompt: str | list[str] ...) add their type's name to the location: leave those out
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and (isinstance(p, int) or _FIELD.match(str(p)))]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = ".".join(loc)
    return (f"{where}: {msg}" if where else msg), (loc[0] if loc else None)


def _submit(engine: Engine, encoded: list[list[int]], adapter: str | None, body: GenerationRequest,
            max_tokens: int | None) -> tuple[list[Request], Sink]:
    """Check every prompt's length, then queue them all (one choice each) on one sink."""
    params = [SamplingParams(max_tokens=engine.check_length(len(ids), max_tokens),
                             temperature=1.0 if body.temperature is None else body.temperature,
                             top_p=1.0 if body.top_p is None else body.top_p,
                             seed=body.seed, stop=body.stop_strings()) for ids in encoded]
    sink = Sink()
    reqs: list[Request] = []
    try:
        for i, (ids, p) in enumerate(zip(encoded, params, strict=True)):
            reqs.append(engine.submit(Request(ids, adapter, p, sink, i)))
    except ServeError:
        for r in reqs:
            r.cancel()
        raise
    return reqs, sink


async def _gather(sink: Sink, reqs: list[Request]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Wait for every choice; ``(choices, usage)``. An error event fails the whole request."""
    texts = [""] * len(reqs)
    finish: list[str | None] = [None] * len(reqs)
    tokens = 0
    try:
        pending = len(reqs)
        while pending:
            ev = await sink.get()
            if ev.error is not None:
                raise ev.error
            texts[ev.index] += ev.text
            if ev.finish_reason is not None:
                finish[ev.index] = ev.finish_reason
                tokens += ev.completion_tokens
                pending -= 1
    finally:
        for r in reqs:
            r.cancel()  # a no-op for finished ones; stops the rest if this handler was cancelled
    choices = [{"index": i, "text": t, "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish, strict=True))]
    return choices, usage(sum(len(r.prompt_ids) for r in reqs), tokens)


async def _stream(sink: Sink, reqs: list[Request], chunk: Callable[[int, str, str | None], dict[str, Any]],
                  usage_chunk: Callable[[dict[str, int]], dict[str, Any]], include_usage: bool,
                  first: dict[str, Any] | None = None) -> AsyncIterator[str]:
    """Server-sent events: a chunk per text delta, one with each choice's ``finish_reason``, then ``[DONE]``.

    The status line (200) is already sent when generation fails, so an error becomes a last ``{"error"}``
    event. A client that disconnects cancels this generator, which stops its rows.
    """
    tokens = 0
    try:
        if first is not None:
            yield _event(first)
        pending = len(reqs)
        while pending:
            ev: Event = await sink.get()
            if ev.error is not None:
                yield _event(error_body(ev.error.status, str(ev.error), code=ev.error.code))
                break
            if ev.text:
                yield _event(chunk(ev.index, ev.text, None))
            if ev.finish_reason is not None:
                tokens += ev.completion_tokens
                pending -= 1
                yield _event(chunk(ev.index, "", ev.finish_reason))
        else:
            if include_usage:
                yield _event(usage_chunk(usage(sum(len(r.prompt_ids) for r in reqs), tokens)))
        yield "data: [DONE]\n\n"
    finally:
        for r in reqs:
            r.cancel()


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one); ``OSError`` names what the system refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


def run_server(app: FastAPI, sock: socket.socket, *, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn on an already bound socket until Ctrl-C (a normal stop: no error)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    # uvicorn shuts down gracefully on SIGINT, then raises it again for the caller
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])


__all__ = ["bind", "create_app", "run_server"]
