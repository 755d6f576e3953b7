"""DPO step time and peak memory, lorakit vs TRL + PEFT, side by side on the CPU, same model, data and adapter.

    python scripts/bench_dpo_trl.py --out benchmarks/results/dpo-trl-cpu.json        (~12 min on 1 core)

Workload: SmolLM2-135M-Instruct (fp32), LoRA r 8 / alpha 16 / no dropout on every linear layer, DPO (beta 0.1)
on 4 WordNet preference pairs per step (scripts/dpo_smollm2.py's training pairs), ``--steps`` steps, one thread.
Each run is its own process (its peak RSS is its own), the two tools alternating ``--repeats`` times.

- TRL: ``trl.DPOTrainer`` on a ``peft`` LoRA model, fp32 (``bf16=False``; TRL's default is bf16 autocast), its
  reference the same model with the adapter switched off, computed in every step (TRL's default for PEFT);
  and ``trl-precompute``: the same with ``precompute_ref_log_probs=True`` (TRL computes the reference over the
  whole training set before the first step, the way lorakit does for the pairs a run draws).
- lorakit: ``lorakit.Trainer`` with ``training.objective: dpo``; its reference log-probabilities are computed once
  before the first step for the pairs the run draws (timed apart: ``reference_s``) and read from the batch after.

Reported per run: the median step time over steps 3.. (the first two warm up), the wall time of the whole
training including lorakit's reference pass, and the process's peak RSS (``ru_maxrss``: model, data, optimizer,
activations; no second model for either tool).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
TOOLS = ("lorakit", "trl", "trl-precompute")


def _pairs(n: int) -> list[dict[str, str]]:
    sys.path.insert(0, str(REPO / "scripts"))
    from dpo_smollm2 import build_pairs

    train, _ = build_pairs(Path("/tmp/lorakit-bench-dpo"), heldout=1)
    return [json.loads(x) for x in train.read_text().splitlines()][:n]


def run_lorakit(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lorakit.core.callbacks import TrainingCallback
    from lorakit.train.trainer import Trainer

    rows = _pairs(args.steps * args.batch)
    stamps: list[float] = []

    class Clock(TrainingCallback):
        def step(self) -> None:
            stamps.append(time.perf_counter())

    cfg = {"model": {"path": "bundled://smollm2-135m", "dtype": "float32"},
           "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear"},
           "data": {"train": "unused.jsonl", "eval": None, "eval_fraction": 0.0, "max_length": args.max_length},
           "training": {"objective": "dpo", "beta": 0.1, "max_steps": args.steps, "batch_size": args.batch,
                        "lr": 1e-4, "device": "cpu", "compile": False},
           "output": {"dir": f"/tmp/lorakit-bench-dpo/run-{os.getpid()}", "progress": False, "plot": False,
                      "tensorboard": False, "save_every": None}}
    marks: dict[str, float] = {}

    def log(msg: str) -> None:
        if msg.startswith("DPO reference:"):
            marks["reference_done"] = time.perf_counter()

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    trainer = Trainer(None, cfg, train_data=rows, callbacks=[Clock()], log=log)
    trainer.prepare()
    t_ready = time.perf_counter()
    trainer.fit(overwrite=True).finished()
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"step_s": statistics.median(steps[1:]), "train_s": stamps[-1] - t_ready,
            "reference_s": marks.get("reference_done", t_ready) - t_ready, "setup_s": t_ready - t0}


def run_trl(args: argparse.Namespace, precompute: bool = False) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lorakit.train.config import resolve_model_path

    torch.set_num_threads(1)
    path = resolve_model_path("bundled://smollm2-135m")
    rows = _pairs(args.steps * args.batch)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    cfg = DPOConfig(output_dir=f"/tmp/lorakit-bench-dpo/trl-{os.getpid()}", per_device_train_batch_size=args.batch,
                    max_steps=args.steps, beta=0.1, learning_rate=1e-4, max_length=args.max_length, use_cpu=True,
                    bf16=False, report_to=[], save_strategy="no", logging_steps=args.steps, disable_dropout=True,
                    dataloader_num_workers=0, precompute_ref_log_probs=precompute)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Clock()])
    t_ready = time.perf_counter()
    trainer.train()
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"step_s": statistics.median(steps[1:]), "train_s": stamps[-1] - t_ready, "reference_s": None,
            "setup_s": t_ready - t0}


def child(tool: str, args: argparse.Namespace) -> None:
    res = run_lorakit(args) if tool == "lorakit" else run_trl(args, precompute=tool == "trl-precompute")
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/dpo-trl-cpu.json")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", choices=TOOLS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in TOOLS}
    for r in range(args.repeats):
        for tool in TOOLS if r % 2 == 0 else TOOLS[::-1]:
            cmd = [sys.executable, __file__, "--child", tool, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--max-length", str(args.max_length)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{tool} failed:\n{proc.stderr[-3000:]}")
            runs[tool].append(json.loads(line.removeprefix("RESULT ")))
            print(tool, runs[tool][-1], file=sys.stderr, flush=True)
    med = {t: {k: statistics.median(x[k] for x in v) for k in ("step_s", "train_s", "peak_rss_mb")}
           for t, v in runs.items()}
    import torch
    import trl

    report = {"command": "python scripts/bench_dpo_trl.py " + " ".join(sys.argv[1:]), "device": "cpu, 1 thread",
              "workload": {"model": "bundled://smollm2-135m fp32", "adapter": "lora r8 alpha16 all-linear",
                           "pairs_per_step": args.batch, "steps": args.steps, "max_length": args.max_length},
              "versions": {"torch": torch.__version__, "trl": trl.__version__}, "runs": runs, "median": med,
              "lorakit_over": {t: {k: round(med["lorakit"][k] / med[t][k], 3) for k in ("step_s", "train_s",
                                                                                      "peak_rss_mb")}
                               for t in TOOLS[1:]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["median"], indent=2), json.dumps(report["lorakit_over"]))


if __name__ == "__main__":
    main()
