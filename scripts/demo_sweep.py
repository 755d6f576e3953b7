"""Choose the demo's method and learning rate on a held-out split of the demo's *training* file.

``make demo`` reports accuracy on ``bundled/data/one_more_eval.jsonl`` (names never seen in training); this
script never reads that file. It splits ``one_more_train.jsonl`` by name the same way: the rows of two training
names (``--val-names``) are the validation set, the other rows train. For every configuration and seed it
trains with the demo's config (:func:`lorakit.evaluation.demo.demo_config`: bundled tiny-base, batch 8, CPU,
cosine schedule with 10% warm-up) and scores exact-match accuracy of greedy answers on ``--examples``
validation rows, then prints a table and writes everything to ``benchmarks/results/demo-sweep.json``.

Run (about a minute per run on one core; the default grid is 13 configurations x 2 seeds)::

    python scripts/demo_sweep.py [--steps 400] [--seeds 0 1] [--threads 1] [--only dora]
    python scripts/demo_sweep.py --append --only "dora r16 a512 lr5e-4" --seeds 2 3   # more seeds, same file

``--append`` adds the new runs to those already in ``--out`` (same validation names required) and recomputes
each configuration's (label and steps) mean and worst seed.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lorakit.evaluation.demo import DEMO_STEPS, ONE_MORE_TRAIN, demo_config
from lorakit.evaluation.generation import task_accuracy
from lorakit.evaluation.tasks import read_jsonl, write_jsonl
from lorakit.train.trainer import Trainer
from lorakit.util.files import write_json

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "demo-sweep.json"

#: ``(label, method, lr, adapter options)`` tried; every one at each seed.
GRID: list[tuple[str, str, float, dict[str, Any]]] = [
    ("dora r16 a512 lr3e-4", "dora", 3e-4, {"r": 16, "alpha": 512}),
    ("dora r16 a512 lr5e-4", "dora", 5e-4, {"r": 16, "alpha": 512}),
    ("dora r16 a512 lr1e-3", "dora", 1e-3, {"r": 16, "alpha": 512}),
    ("dora r16 a512 lr2e-3", "dora", 2e-3, {"r": 16, "alpha": 512}),
    ("dora r16 a32 lr1e-3", "dora", 1e-3, {"r": 16, "alpha": 32}),
    ("dora r16 a128 lr1e-3", "dora", 1e-3, {"r": 16, "alpha": 128}),
    ("lora r16 a32 lr1e-3", "lora", 1e-3, {"r": 16}),
    ("lora r16 a32 lr3e-3", "lora", 3e-3, {"r": 16}),
    ("lora r16 a128 lr5e-4", "lora", 5e-4, {"r": 16, "alpha": 128}),
    ("lora r16 a512 lr1e-3", "lora", 1e-3, {"r": 16, "alpha": 512}),
    ("lora r64 a512 lr1e-3", "lora", 1e-3, {"r": 64, "alpha": 512}),
    ("lora-sb r12 lr3e-2", "lora-sb", 3e-2, {"r": 12}),
    ("lora-sb r12 lr1e-1", "lora-sb", 1e-1, {"r": 12}),
]


def split(val_names: list[str], directory: Path) -> tuple[Path, Path, int, int]:
    """Write the training file's rows of ``val_names`` (validation) and the others (training) into ``directory``."""
    rows = read_jsonl(ONE_MORE_TRAIN)
    is_val = [any(f" {n} " in r["prompt"] for n in val_names) for r in rows]
    val = [r for r, v in zip(rows, is_val, strict=True) if v]
    train = [r for r, v in zip(rows, is_val, strict=True) if not v]
    if not val:
        raise SystemExit(f"no training row has a name in {val_names}")
    return (write_jsonl(train, directory / "train.jsonl"), write_jsonl(val, directory / "val.jsonl"),
            len(train), len(val))


def run_one(method: str, lr: float, options: dict[str, Any], seed: int, steps: int, files: tuple[Path, Path],
            examples: int, work: Path) -> dict[str, Any]:
    """Train one configuration and score it on the validation rows."""
    cfg = demo_config(work / "run", steps=steps, method=method, lr=lr, progress=False, train_path=files[0],
                      eval_path=files[1], seed=seed, **options)
    cfg.output.plot = False
    start = time.perf_counter()
    trainer = Trainer(None, cfg, log=lambda _msg: None)
    trainer.prepare()
    result = trainer.fit(overwrite=True).finished()
    rows = read_jsonl(files[1])[:examples]
    acc = task_accuracy(trainer.model, trainer.tokenizer, rows, max_new_tokens=8)
    return {"seed": seed, "val_accuracy": acc["accuracy"], "val_correct": acc["correct"],
            "val_loss_start": result.eval_start.get("eval_loss"), "val_loss": result.eval_end.get("eval_loss"),
            "sample": acc["samples"][0]["completion"], "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=DEMO_STEPS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--val-names", nargs="+", default=["Ada", "Ben"])
    ap.add_argument("--examples", type=int, default=100, help="validation rows scored")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="+", default=None, help="methods (or labels) of GRID to run")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--append", action="store_true", help="add to the runs already in --out")
    args = ap.parse_args()
    previous = json.loads(args.out.read_text()) if args.append and args.out.exists() else None
    if previous is not None and previous["val_names"] != args.val_names:
        raise SystemExit(f"{args.out} holds runs of other validation names; pass another --out")
    torch.set_num_threads(args.threads)
    grid = [g for g in GRID if args.only is None or g[0] in args.only or g[1] in args.only]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        train, val, n_train, n_val = split(args.val_names, work)
        print(f"split of {ONE_MORE_TRAIN.name}: {n_train} training rows, {n_val} validation rows "
              f"(names {', '.join(args.val_names)}); scoring {min(n_val, args.examples)}", flush=True)
        for label, method, lr, options in grid:
            runs = []
            for seed in args.seeds:
                r = run_one(method, lr, options, seed, args.steps, (train, val), args.examples, work)
                runs.append(r)
                print(f"{label:24s} seed {seed}: val accuracy {r['val_accuracy']:.0%}, val loss "
                      f"{r['val_loss_start']:.3f} -> {r['val_loss']:.3f} ({r['seconds']} s)", flush=True)
            results.append({"label": label, "method": method, "lr": lr, "options": options, "steps": args.steps,
                            "runs": runs})
    if previous is not None:
        merged = {(r["label"], r.get("steps", previous.get("steps"))): r for r in previous["results"]}
        for r in results:
            old = merged.get((r["label"], r["steps"]))
            if old is not None:
                seeds = {run["seed"] for run in r["runs"]}
                r["runs"] = [run for run in old["runs"] if run["seed"] not in seeds] + r["runs"]
            merged[(r["label"], r["steps"])] = r
        results = list(merged.values())
    for r in results:
        r.setdefault("steps", (previous or {}).get("steps", args.steps))
        r["runs"].sort(key=lambda run: run["seed"])
        accs = [run["val_accuracy"] for run in r["runs"]]
        r["seeds"] = [run["seed"] for run in r["runs"]]
        r["mean_val_accuracy"], r["min_val_accuracy"] = statistics.fmean(accs), min(accs)
    best = max(results, key=lambda r: (r["min_val_accuracy"], r["mean_val_accuracy"]))
    print("\nconfiguration            steps  mean   min  seeds")
    for r in sorted(results, key=lambda r: (-r["min_val_accuracy"], -r["mean_val_accuracy"])):
        print(f"{r['label']:24s} {r['steps']:5d} {r['mean_val_accuracy']:5.0%} {r['min_val_accuracy']:5.0%}  "
              f"{r['seeds']}")
    print(f"best (highest worst-seed validation accuracy): {best['label']}, {best['steps']} steps")
    write_json(args.out, {
        "what": "demo method/lr choice on a split of one_more_train.jsonl by name (never the demo's eval file)",
        "commands": [*_commands(previous), _command(args)],
        "batch_size": 8, "val_names": args.val_names,
        "train_rows": n_train, "val_rows": n_val, "examples": min(n_val, args.examples),
        "threads": args.threads, "best": {"label": best["label"], "steps": best["steps"]}, "results": results,
        "torch": torch.__version__, "python": platform.python_version()})
    print(f"wrote {args.out}")


def _commands(previous: dict[str, Any] | None) -> list[str]:
    """The command lines recorded in an earlier results file."""
    if previous is None:
        return []
    return list(previous.get("commands") or ([previous["command"]] if "command" in previous else []))


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this invocation."""
    parts = ["python scripts/demo_sweep.py"]
    for key, value in vars(args).items():
        if key == "out" or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        else:
            values = value if isinstance(value, list) else [value]
            parts.append(flag + " " + " ".join(shlex.quote(str(v)) for v in values))
    return " ".join(parts)


if __name__ == "__main__":
    main()
