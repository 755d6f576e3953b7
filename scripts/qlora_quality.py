"""QLoRA quality on the bundled model: LoRA's eval loss on a dense base vs on quantized bases, same budget.

Runs the demo's task (bundled tiny-base, arithmetic word problems, 150 steps of batch 8, LoRA r 8, lr 1e-2: the
demo's learning rate for LoRA, chosen on that task before this script existed) for each base quantization and
seed, and writes the final held-out eval losses with their mean and sample standard deviation per base to
``benchmarks/results/qlora-quality-cpu.json``. A quantized base is "within seed noise" of the dense one when the
difference of the means is at most twice the larger of the two standard deviations.

Run: ``python scripts/qlora_quality.py [--steps 150] [--seeds 0 1 2] [--bases none nf4 int8 bnb-nf4]``.

``--task definitions`` runs the real LLM instead: ``bundled://smollm2-135m`` (fetched once, see docs/models.md)
defining held-out WordNet words (``bundled/data/definitions_*.jsonl``), LoRA r 8, lr 1e-3 (a standard LoRA
learning rate, not tuned on this eval file), batch 8, max_length 64, writing
``benchmarks/results/qlora-quality-smollm2.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lorakit.evaluation.demo import demo_config
from lorakit.train.config import TrainConfig
from lorakit.train.trainer import Trainer
from lorakit.util.files import write_json
from lorakit.util.resources import BUNDLED_DIR

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "qlora-quality-cpu.json"


def run(base: str, seed: int, steps: int, task: str = "arithmetic") -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        cfg = demo_config(Path(d) / "run", steps=steps, method="lora", lr=1e-2, progress=False, task="arithmetic",
                          r=8).to_dict()
        if task == "definitions":
            data = BUNDLED_DIR / "data"
            cfg["model"]["path"] = "bundled://smollm2-135m"
            cfg["data"].update(train=str(data / "definitions_train.jsonl"), eval=str(data / "definitions_eval.jsonl"),
                               max_length=64)
            cfg["training"].update(lr=1e-3)
        cfg["model"]["quantize"] = base
        cfg["training"]["seed"] = seed
        cfg["output"].update(plot=False)
        t = time.perf_counter()
        result = Trainer(None, TrainConfig.parse(cfg), log=lambda _: None).fit(overwrite=True).finished()
        return {"eval_loss_start": result.eval_start["eval_loss"], "eval_loss": result.eval_end["eval_loss"],
                "seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bases", nargs="+", default=["none", "nf4", "int8", "bnb-nf4"])
    ap.add_argument("--task", choices=["arithmetic", "definitions"], default="arithmetic")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or (OUT if args.task == "arithmetic" else OUT.with_name("qlora-quality-smollm2.json"))
    torch.set_num_threads(2)
    runs: dict[str, list[dict[str, float]]] = {}
    for base in args.bases:
        for seed in args.seeds:
            r = run(base, seed, args.steps, args.task)
            runs.setdefault(base, []).append({"seed": seed, **r})
            print(f"{base:8s} seed {seed}: eval loss {r['eval_loss_start']:.4f} -> {r['eval_loss']:.4f} "
                  f"({r['seconds']} s)", flush=True)
    summary = {}
    for base, rs in runs.items():
        losses = [r["eval_loss"] for r in rs]
        summary[base] = {"mean": statistics.mean(losses), "sd": statistics.stdev(losses) if len(losses) > 1 else 0.0}
    dense = summary.get("none")
    verdicts = {}
    if dense is not None:
        for base, s in summary.items():
            if base == "none":
                continue
            margin = 2 * max(s["sd"], dense["sd"])
            diff = s["mean"] - dense["mean"]
            verdicts[base] = {"diff_vs_dense": diff, "margin": margin, "within_seed_noise": abs(diff) <= margin}
            print(f"{base}: {s['mean']:.4f} +- {s['sd']:.4f} vs dense {dense['mean']:.4f} +- {dense['sd']:.4f}: "
                  f"diff {diff:+.4f}, margin {margin:.4f} -> {'within' if abs(diff) <= margin else 'OUTSIDE'} seed noise")
    task = ("bundled arithmetic (demo), tiny-base, LoRA r 8, lr 1e-2, batch 8" if args.task == "arithmetic" else
            "WordNet definitions, smollm2-135m, LoRA r 8, lr 1e-3, batch 8, max_length 64")
    write_json(out, {"task": task, "steps": args.steps,
                          "seeds": args.seeds, "runs": runs, "summary": summary, "verdicts": verdicts,
                          "rule": "within seed noise: |mean_q - mean_dense| <= 2 * max(sd_q, sd_dense)",
                          "torch": torch.__version__})


if __name__ == "__main__":
    main()
