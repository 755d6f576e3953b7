"""``lorakit train``, ``eval``, ``merge``, ``generate``, ``inspect`` and ``export``: the commands that make, use
and convert adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from lorakit.adapt.model import detach
from lorakit.adapt.quantize import dequantize, quantized_layers
from lorakit.cli.common import DTYPES, ConfigPath, Overrides, app, finite, one_of, say
from lorakit.errors import ConfigError
from lorakit.formats.describe import describe, format_description
from lorakit.formats.gguf_export import OUTTYPES, export_gguf, export_gguf_adapter
from lorakit.formats.layout import PEFT_CONFIG_FILE
from lorakit.formats.native import read_adapter
from lorakit.formats.peft_export import export_peft, format_report
from lorakit.inference.decode import Completion, SamplingParams, run_rows
from lorakit.train.config import load_config
from lorakit.train.data import render_chat
from lorakit.train.distributed import is_main_process
from lorakit.train.lineage import adapter_dir
from lorakit.train.loading import HEAD_ADAPTER, load_adapter_dir, load_trained, resolve_device
from lorakit.train.trainer import Trainer

AdapterDir = Annotated[Path, typer.Option("--adapter", help="Adapter directory written by `lorakit train` or "
                                          "lorakit.save.", show_default=False)]
BaseModel = Annotated[str | None, typer.Option("--base", help="Base model path or hub id (default: the one "
                                               "recorded in the adapter).")]
Force = Annotated[bool, typer.Option("--force", help="Go on even if the base weights differ from the ones the "
                                     "adapter was trained on.")]


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
    result = Trainer(None, cfg, log=say).fit(resume=resume, overwrite=overwrite)
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
    trainer = Trainer(None, cfg, log=say)
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
    adapter: AdapterDir,
    out: Annotated[Path, typer.Option(help="Directory for the merged model (a standard Hugging Face "
                                      "checkpoint, loadable with from_pretrained).", show_default=False)],
    base: BaseModel = None,
    dtype: Annotated[str | None, typer.Option(parser=one_of(*DTYPES), help="Weight dtype of the merged "
                                              "model: auto, float32, bfloat16, float16 (default: as trained).")] = None,
    force: Force = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into OUT even if it already holds "
                                            "a model.")] = False,
) -> int:
    """Fold an adapter into its base model's weights and save a plain Hugging Face checkpoint.

    An adapter trained on a quantized base (model.quantize) is merged into the dequantized base weights."""

    if (out / "config.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a model; pass --overwrite to replace it")
    model, tokenizer = _merged(adapter, base=base, dtype=dtype, force=force)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    say(f"merged model written to {out}")
    return 0


def _merged(adapter: Path, *, base: str | None, dtype: str | None, force: bool) -> tuple[Any, Any]:
    """The trained model with its adapter folded in (a quantized base dequantized first), and its tokenizer."""
    model, tokenizer = load_trained(adapter, base=base, dtype=dtype, force=force)
    quantized = quantized_layers(model)
    if quantized:  # QLoRA: W0 + dW does not fit in 4/8 bits; the merged model is dense, W = dequant(Q) + dW
        dequantize(model)
        say(f"base is quantized ({', '.join(sorted(set(quantized.values())))}): merging into its dequantized "
             "weights (the model the adapter was trained and evaluated with)")
    return detach(model, merge=True), tokenizer


# --- generate -------------------------------------------------------------------------------------------------
@app.command()
def generate(
    adapter: AdapterDir,
    prompt: Annotated[list[str], typer.Option(help="Prompt text; repeat for several prompts.",
                                              show_default=False)],
    base: BaseModel = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate per prompt.")] = 64,
    temperature: Annotated[float, typer.Option(parser=finite(low=0.0), help="Sampling temperature; 0 is "
                                               "greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(parser=finite(low=0.0, high=1.0, low_open=True),
                                         help="Nucleus sampling threshold, in (0, 1].")] = 1.0,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap each prompt as a user message with the "
                                       "tokenizer's chat template.")] = False,
    seed: Annotated[int, typer.Option(min=0, help="Random seed for sampling.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
) -> int:
    """Generate text from a base model with an adapter; prints each completion (prompt excluded)."""


    dev = resolve_device(device, what="--device")  # before the model loads: a typo fails at once
    model, tokenizer = load_trained(adapter, base=base)
    model.to(dev)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    for text in prompt:
        if chat:
            text = render_chat(tokenizer, [{"role": "user", "content": text}], True)
            ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        # streamed: each piece of text is printed as it is decoded
        run_rows(model, tokenizer, [Completion(list(ids), params, on_text=lambda t: typer.echo(t, nl=False))])
        typer.echo()
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
    path = adapter_dir(path)

    d = describe(path)
    typer.echo(json.dumps(d, indent=2, default=str) if as_json else format_description(d))
    return 0


# --- export ---------------------------------------------------------------------------------------------------
@app.command()
def export(
    adapter: AdapterDir,
    out: Annotated[Path, typer.Option(help="Directory for the exported adapter (peft), or the .gguf file to write "
                                      "(gguf, gguf-lora).", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", parser=one_of("peft", "gguf", "gguf-lora"), help="Output format. "
                                     "peft: adapter_config.json + adapter_model.safetensors, as Hugging Face PEFT "
                                     "and vLLM load them. gguf: the merged model as one GGUF file for llama.cpp and "
                                     "Ollama (tokenizer and chat template included). gguf-lora: the adapter as "
                                     "llama.cpp's LoRA GGUF (--lora), applied to a GGUF of its base.")] = "peft",
    outtype: Annotated[str, typer.Option(parser=one_of(*OUTTYPES), help="gguf: the type of the 2-D weights "
                                         "(f32, f16, bf16, q8_0); norms stay f32.")] = "f16",
    rank: Annotated[int | None, typer.Option(min=1, help="Export at most this rank, by truncated SVD where the "
                                             "update's rank is higher (required for methods with no exact "
                                             "LoRA form); the approximation error is printed.")] = None,
    base: BaseModel = None,
    force: Force = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write OUT even if it already holds "
                                            "an adapter or a file.")] = False,
) -> int:
    """Convert a trained adapter to another format: PEFT LoRA (DoRA stays DoRA, other methods become LoRA), a
    merged GGUF model, or a llama.cpp LoRA GGUF."""

    adapter = adapter_dir(adapter)  # a run directory names its adapter/
    if fmt in ("gguf", "gguf-lora"):
        return _export_gguf(adapter, out, fmt, outtype=outtype, rank=rank, base=base, force=force,
                            overwrite=overwrite)
    if (out / PEFT_CONFIG_FILE).exists() and not overwrite:
        raise ConfigError(f"{out} already holds an adapter; pass --overwrite to replace it")
    if (adapter / HEAD_ADAPTER).is_dir():
        raise ConfigError(f"{adapter} also trained a task head, which a PEFT LoRA adapter cannot hold; "
                          "use `lorakit merge` to get a full checkpoint instead")
    meta, _ = read_adapter(adapter, tensors=False)
    model, _ = load_trained(adapter, base=base, force=force)
    report = export_peft(model, out, meta.get("name") or "default", rank=rank,
                         base_model_name_or_path=base or (meta.get("extra") or {}).get("base_model"))
    say(format_report(report))
    return 0


def _export_gguf(adapter: Path, out: Path, fmt: str, *, outtype: str, rank: int | None, base: str | None,
                 force: bool, overwrite: bool) -> int:
    if out.suffix != ".gguf":
        raise ConfigError(f"--out {out}: --format {fmt} writes one file; name it <something>.gguf")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
    if (adapter / HEAD_ADAPTER).is_dir():
        raise ConfigError(f"{adapter} also trained a task head; GGUF holds causal language models only")
    if fmt == "gguf":
        model, tokenizer = _merged(adapter, base=base, dtype="float32", force=force)
        report = export_gguf(model, tokenizer, out, outtype=outtype)
        say(f"wrote {report['path']}: {report['architecture']}, {outtype}, {report['tensors']} tensors, "
            f"{report['bytes'] / 1e6:.1f} MB (llama-cli -m {out})")
        return 0
    meta, _ = read_adapter(adapter, tensors=False)
    model, _ = load_trained(adapter, base=base, force=force)
    report = export_gguf_adapter(model, out, meta.get("name") or "default", rank=rank)
    say(f"wrote {report['path']}: llama.cpp LoRA, r={report['r']}, {report['layers']} layers, max relative error "
        f"{report['max_error']:.3e}{'' if report['exact'] else ' (rank cut: approximate)'} "
        f"(llama-cli -m BASE.gguf --lora {out})")
    return 0
