"""``lorakit serve``: the OpenAI-compatible server (:mod:`lorakit.serve`) from the command line."""

from __future__ import annotations

from typing import Annotated

import typer

from lorakit.adapt.quantize import SCHEMES as QUANT_SCHEMES
from lorakit.cli.common import DTYPES, app, finite, one_of, say
from lorakit.errors import ConfigError
from lorakit.train.loading import resolve_device


# --- serve ----------------------------------------------------------------------------------------------------
@app.command()
def serve(
    base: Annotated[str, typer.Option(help="Base model: a local directory, hub id or bundled://NAME.",
                                      show_default=False)],
    adapter: Annotated[list[str] | None, typer.Option(help="NAME=DIR: serve the adapter in DIR (lorakit or PEFT) "
                                                      "as model NAME; repeat for several.", show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 exposes the server, and its adapter "
                                      "loading endpoint, to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free one).")] = 8000,
    base_name: Annotated[str | None, typer.Option(help="The `model` value that selects the base model "
                                                  "(default: the --base value, as vLLM does).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(parser=one_of(*DTYPES), help="Weight dtype: auto, float32, bfloat16, "
                                     "float16.")] = "auto",
    quantize: Annotated[str, typer.Option(parser=one_of("none", *QUANT_SCHEMES), help="Serve on a quantized "
                                          "base: none, nf4, int8, bnb-nf4, bnb-fp4, bnb-int8 (as model.quantize; "
                                          "QLoRA adapters on the base they were trained on).")] = "none",
    max_model_len: Annotated[int | None, typer.Option(min=1, help="Prompt + completion tokens allowed per request "
                                                      "(default: the model's maximum positions).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Rows per batch at most.")] = 32,
    batch_window_ms: Annotated[float, typer.Option(parser=finite(low=0.0, high=60_000.0), help="How long a "
                                                   "batch waits for more requests to join after its first "
                                                   "one.")] = 8.0,
    max_waiting: Annotated[int, typer.Option(min=1, help="Queued requests at most; more get 503.")] = 1024,
    mixed: Annotated[bool, typer.Option("--mixed/--no-mixed", help="Batch requests for different adapters "
                                        "together (--no-mixed: one batch per adapter).")] = True,
    runtime_adapters: Annotated[bool | None, typer.Option(
        "--runtime-adapters/--no-runtime-adapters", help="Allow POST/DELETE /v1/adapters (default: on when the "
        "server listens on loopback only, or when --adapter-root is given).", show_default=False)] = None,
    adapter_root: Annotated[list[str] | None, typer.Option(
        help="Runtime adapter loads may only read directories inside DIR (links resolved; others get 403); "
        "repeat for several. Required for runtime loading beyond loopback.", show_default=False)] = None,
    api_key: Annotated[str | None, typer.Option(
        envvar="LORAKIT_API_KEY", help="Require 'Authorization: Bearer KEY' on every endpoint but /health "
        "(prefer the LORAKIT_API_KEY variable: a command line is visible to other users).",
        show_default=False)] = None,
    log_level: Annotated[str, typer.Option(parser=one_of("critical", "error", "warning", "info", "debug", "trace"),
                                           help="uvicorn log level: critical, error, warning, info, debug, "
                                           "trace.")] = "info",
) -> int:
    """OpenAI-compatible HTTP server (completions, chat completions, streaming) for a base model and adapters.

    The request's `model` field picks the adapter (its NAME) or the base model (--base-name); concurrent
    requests for different adapters are batched together. Ctrl-C stops it.
    """
    from lorakit.serve import Engine, bind, create_app, run_server
    from lorakit.serve.protocol import ADAPTER_NAME
    from lorakit.serve.security import API_KEY_ENV, AdapterRoots, is_loopback

    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    adapters: dict[str, str] = {}
    for item in adapter or []:
        name, sep, path = item.partition("=")
        if not sep or not path or not ADAPTER_NAME.match(name):
            raise ConfigError(f"--adapter {item!r}: expected NAME=DIR with a NAME of letters, digits, '_' and '-'")
        if name in adapters:
            raise ConfigError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = path
    resolve_device(device, what="--device")
    if api_key is not None and not api_key.strip():
        raise ConfigError("--api-key (or LORAKIT_API_KEY) is empty")
    roots = AdapterRoots(adapter_root) if adapter_root else None  # each must exist
    local = is_loopback(host)  # a host name counts as reachable from elsewhere
    runtime = runtime_adapters if runtime_adapters is not None else (local or roots is not None)
    if runtime and not local and roots is None:
        raise ConfigError(f"--runtime-adapters on --host {host}, reachable beyond this machine, needs --adapter-root "
                          "DIR: clients could otherwise make the server read any directory it can")
    sock = bind(host, port)  # before loading the model: a busy port fails at once
    try:
        if not local and api_key is None:
            say(f"warning: {host} is reachable beyond this machine and no --api-key (or {API_KEY_ENV}) is set: "
                 "anyone who reaches the port can use the server")
        engine = Engine.from_pretrained(base, adapters, device=device, dtype=dtype, base_name=base_name,
                                        quantize=quantize,
                                        max_model_len=max_model_len, max_batch=max_batch,
                                        batch_window_ms=batch_window_ms, max_waiting=max_waiting, mixed=mixed)
        bound_host, bound_port = sock.getsockname()[:2]
        say(f"serving {', '.join([engine.base_name, *adapters])} on http://{bound_host}:{bound_port}/v1")
        loading = "off" if not runtime else "any directory" if roots is None else \
            "inside " + ", ".join(map(str, roots.roots))
        say(f"API key: {'required' if api_key else 'none'}; runtime adapter loading: {loading}")
        run_server(create_app(engine, runtime_adapters=runtime, api_key=api_key,
                              adapter_roots=roots.roots if roots is not None else None), sock, log_level=log_level)
    finally:
        sock.close()
    return 0
