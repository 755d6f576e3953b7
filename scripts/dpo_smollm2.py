"""DPO on a real pretrained model and real text: SmolLM2-135M-Instruct learns to prefer a WordNet word's own
gloss to another word's, 3 seeds; held-out preference before and after, and what it does to the supervised task.

    python scripts/dpo_smollm2.py --out benchmarks/results/dpo-smollm2.json          (~40 min on 1 core)
    python scripts/dpo_smollm2.py --pairs-only && lorakit train configs/dpo-smollm2.yaml   (seed 0 from the CLI)

Data (built here from the bundled WordNet task, docs/text-task.md; nothing downloaded):
- training pairs: every line of definitions_train.jsonl, ``prompt`` = "Word: W (pos)\\nDefinition:", ``chosen`` = its
  gloss, ``rejected`` = the gloss of another training word of the same part of speech (a seeded draw);
- held-out pairs: the first ``--heldout`` words of definitions_choice.jsonl (words no training line has), ``chosen``
  = the right gloss, ``rejected`` = one of its three distractors (same part of speech, seeded).
Training: ``lorakit.Trainer`` with ``training.objective: dpo`` (beta 0.1, TRL's default), LoRA r 8 / alpha 16 on
every linear layer, ``--steps`` steps of 8 pairs, warm-up 10%, cosine, lr ``--lr``. The learning rate and beta were
fixed before the run (not tuned: one value each, on no data), so the held-out pairs decide nothing they helped set.
The policy is the new adapter; the reference is the base model (the run's starting model), its log-probabilities
cached by the trainer.

Measured per seed, on the same held-out pairs (paired by pair):
- implicit-reward accuracy (the share of pairs with beta [log pi/pi_ref (chosen) - log pi/pi_ref (rejected)] > 0;
  0.5 at the start by construction, ties counting one half);
- likelihood preference accuracy (log pi(chosen) > log pi(rejected)), base vs after: the same question asked of
  the base model and of the trained one, pair by pair;
- the supervised task's loss (definitions_eval.jsonl, the right gloss's loss per token), base vs after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lorakit.adapt.model import set_active  # noqa: E402
from lorakit.evaluation.stats import paired_difference  # noqa: E402
from lorakit.train.data import dataset_from  # noqa: E402
from lorakit.train.preference import REFERENCE_FILE, load_reference, reference_logprobs  # noqa: E402
from lorakit.train.trainer import Trainer  # noqa: E402
from lorakit.util import resources  # noqa: E402

DATA = Path(resources.resolve("bundled://data/definitions_train.jsonl", what="data")).parent


def _rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (DATA / name).read_text().splitlines() if x.strip()]


def build_pairs(out: Path, heldout: int, seed: int = 0) -> tuple[Path, Path]:
    """The training and held-out pair files (module docstring)."""
    rng = random.Random(seed)
    train = _rows("definitions_train.jsonl")
    by_pos: dict[str, list[str]] = defaultdict(list)
    for r in train:
        by_pos[r["pos"]].append(r["completion"])
    pairs = []
    for r in train:
        others = [g for g in by_pos[r["pos"]] if g != r["completion"]]
        pairs.append({"prompt": r["prompt"], "chosen": r["completion"], "rejected": rng.choice(others)})
    held = []
    for r in _rows("definitions_choice.jsonl")[:heldout]:
        wrong = [c for i, c in enumerate(r["choices"]) if i != r["answer"]]
        held.append({"prompt": r["prompt"], "chosen": r["completion"], "rejected": rng.choice(wrong)})
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "pairs_train.jsonl", out / "pairs_heldout.jsonl"
    for path, rows in zip(paths, (pairs, held), strict=True):
        path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return paths


def run_seed(seed: int, args: argparse.Namespace, train: Path, held: Path, work: Path) -> dict[str, Any]:
    cfg = {"model": {"path": "bundled://smollm2-135m", "dtype": "float32"},
           "adapter": {"method": "lora", "r": 8, "alpha": 16, "targets": "all-linear"},
           "data": {"train": str(train), "eval": str(held), "max_length": 96},
           "training": {"objective": "dpo", "beta": args.beta, "max_steps": args.steps, "batch_size": 8,
                        "lr": args.lr, "warmup_ratio": 0.1, "schedule": "cosine", "device": "cpu", "seed": seed,
                        "eval_batch_size": 16},
           "output": {"dir": str(work / f"seed-{seed}"), "progress": False, "plot": False, "tensorboard": False}}
    trainer = Trainer(None, cfg, log=lambda m: print(f"[seed {seed}] {m}", file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    result = trainer.fit(overwrite=True).finished()
    train_s = time.perf_counter() - t0
    model, tok = trainer.model, trainer.tokenizer
    assert trainer.eval_data is not None
    held_ex = trainer.eval_data.examples
    ref = load_reference(Path(cfg["output"]["dir"]) / REFERENCE_FILE, {"train": len(trainer.train_data),
                                                                        "eval": len(held_ex)})["eval"][1]
    policy = reference_logprobs(model, held_ex, batch_size=16, pad_id=tok.pad_token_id, device=torch.device("cpu"),
                                autocast=contextlib.nullcontext, fused=True, progress=False)
    margin = args.beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
    reward_acc = [(1.0 if m > 0 else 0.5 if m == 0 else 0.0) for m in margin.tolist()]
    like_after = [float(c > r) for c, r in policy.tolist()]
    like_base = [float(c > r) for c, r in ref.tolist()]
    sft = dataset_from(str(DATA / "definitions_eval.jsonl"), trainer.config.data.model_copy(update={"format": "auto"}),
                       tok, task="causal-lm")
    sft_after = trainer.evaluate(sft)["eval_loss"]
    set_active(model, [])
    sft_base = trainer.evaluate(sft)["eval_loss"]
    set_active(model, [trainer.name])
    return {"seed": seed, "train_s": round(train_s, 1), "steps": result.step,
            "eval_start": result.eval_start, "eval_end": result.eval_end,
            "reward_accuracy": statistics.fmean(reward_acc), "likelihood_accuracy_base": statistics.fmean(like_base),
            "likelihood_accuracy_after": statistics.fmean(like_after), "sft_loss_base": sft_base,
            "sft_loss_after": sft_after, "per_pair": {"reward_accuracy": reward_acc, "likelihood_base": like_base,
                                                      "likelihood_after": like_after}}


def _diff(a: Any, b: Any) -> dict[str, Any]:
    """``A - B`` paired by seed (and pair): mean, 95% interval (seed-t and bootstrap union), p (lorakit.stats)."""
    d = paired_difference(a, b)
    return {"difference": round(d.diff, 4), "ci95": [round(d.ci95[0], 4), round(d.ci95[1], 4)],
            "p": float(f"{d.p:.3g}"), "seeds": d.seeds, "items": d.items}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/dpo-smollm2.json")
    ap.add_argument("--work", type=Path, default=Path("runs/dpo-smollm2"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--pairs-only", action="store_true", help="only write the pair files into --work (what "
                    "configs/dpo-smollm2.yaml trains on: lorakit train configs/dpo-smollm2.yaml)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, held = build_pairs(args.work, args.heldout)
    if args.pairs_only:
        print(f"wrote {train} and {held}")
        return
    runs = [run_seed(s, args, train, held, args.work) for s in args.seeds]
    per = {k: [r["per_pair"][k] for r in runs] for k in runs[0]["per_pair"]}
    chance = [[0.5] * len(x) for x in per["reward_accuracy"]]
    summary = {
        "reward_accuracy_vs_chance": _diff(per["reward_accuracy"], chance),
        "likelihood_accuracy_after_vs_base": _diff(per["likelihood_after"], per["likelihood_base"]),
        "sft_loss_after_minus_base": _diff([r["sft_loss_after"] for r in runs], [r["sft_loss_base"] for r in runs]),
    }
    for r in runs:
        del r["per_pair"]
    report = {"command": "python scripts/dpo_smollm2.py " + " ".join(sys.argv[1:]), "model": "bundled://smollm2-135m",
              "threads": 1, "setup": {"steps": args.steps, "batch_pairs": 8, "lr": args.lr, "beta": args.beta,
                                      "adapter": "lora r8 alpha16 all-linear", "heldout_pairs": args.heldout,
                                      "train_pairs": sum(1 for _ in train.open())},
              "runs": runs, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
