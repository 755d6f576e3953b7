"""A stream of updates of different material, five ways of keeping a model current, several seeds.

    python scripts/update_stream.py --out reports/update-stream                 (SmolLM2: ~2 h on 1 core)
    python scripts/update_stream.py --model bundled://tiny-base --steps 4 --examples 32 --out /tmp/stream  (a dry run)

The stream: WordNet definitions of nouns, then verbs, then adjectives (``--examples`` training definitions of each,
the held-out definitions of definitions_eval.jsonl of the same part of speech; docs/text-task.md). Arms, each
trained ``--steps`` steps of 8 per update at the learning rate the SmolLM2 sweep chose for its method on held-out
training words (configs/compare-smollm2-text.yaml; never on these held-out sets):

- ``fresh-lora``: a new LoRA (r 4) from the base for every update;
- ``lora``: one LoRA (r 4) continued on each update (``adapter.continue_from``);
- ``rank1-sum-grow``: one rank1-sum adapter (8 components a layer, budget 4) continued with ``adapter.grow``;
- ``rank1-sum-grow-replay``: the same with ``data.replay: 0.2`` (earlier updates' examples replayed);
- ``full``: full fine-tuning continued.

After each update: the held-out loss (per token) of every update so far (the newest: what it learned; the earlier
ones: what it kept), trainable parameters, steps and wall time. Verdicts are paired by seed (lorakit's statistics,
as the comparison report uses): retention (the mean held-out loss of the earlier updates after the last one) of
``rank1-sum-grow`` vs ``lora`` (equal budgets: rank 4 a layer) and of the replay arm vs without.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lorakit.adapt.model import trainable_parameters  # noqa: E402
from lorakit.evaluation.stats import paired_difference  # noqa: E402
from lorakit.train.data import dataset_from  # noqa: E402
from lorakit.train.trainer import Trainer  # noqa: E402
from lorakit.util import resources  # noqa: E402

PARTS = (("nouns", "noun"), ("verbs", "verb"), ("adjectives", "adjective"))
ARMS: dict[str, dict[str, Any]] = {
    "fresh-lora": {"adapter": {"method": "lora", "r": 4, "alpha": 8}, "lr": 3e-3, "continue": False},
    "lora": {"adapter": {"method": "lora", "r": 4, "alpha": 8}, "lr": 3e-3, "continue": True},
    "rank1-sum-grow": {"adapter": {"method": "rank1-sum", "r_init": 8, "target_rank": 4}, "lr": 1e-2,
                       "continue": True, "grow": 16},
    "rank1-sum-grow-replay": {"adapter": {"method": "rank1-sum", "r_init": 8, "target_rank": 4}, "lr": 1e-2,
                              "continue": True, "grow": 16, "replay": 0.2},
    "full": {"adapter": {"method": "full"}, "lr": 1e-4, "continue": True},
}


def split(work: Path, examples: int) -> dict[str, tuple[Path, Path]]:
    """The stream's files: per part of speech, ``examples`` training and every held-out definition."""
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for part, pos in PARTS:
        paths = []
        for src, suffix, cap in (("definitions_train.jsonl", "", examples), ("definitions_eval.jsonl", "-eval", None)):
            rows = [r for r in map(json.loads, open(resources.resolve(f"bundled://data/{src}", what="data")))
                    if r["pos"] == pos][:cap]
            path = work / f"{part}{suffix}.jsonl"
            path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n"
                                    for r in rows))
            paths.append(path)
        out[part] = (paths[0], paths[1])
    return out


def run_arm(arm: str, seed: int, files: dict[str, tuple[Path, Path]], args: argparse.Namespace) -> list[dict]:
    spec, steps = ARMS[arm], []
    parent: Path | None = None
    for u, (part, _) in enumerate(PARTS):
        out = args.work / arm / f"s{seed}" / part
        adapter = dict(spec["adapter"])
        data: dict[str, Any] = {"train": str(files[part][0]), "eval": str(files[part][1]), "max_length": 64}
        if parent is not None and spec["continue"]:
            adapter["continue_from"] = str(parent)
            if spec.get("grow"):
                adapter["grow"] = spec["grow"]
            if spec.get("replay"):
                data["replay"] = spec["replay"]
        cfg = {"model": {"path": args.model, "dtype": "float32"}, "adapter": adapter, "data": data,
               "training": {"max_steps": args.steps, "batch_size": 8, "lr": spec["lr"], "warmup_steps": max(
                   1, args.steps // 10), "schedule": "cosine", "device": "cpu", "seed": seed, "eval_batch_size": 32},
               "output": {"dir": str(out), "progress": False, "plot": False, "tensorboard": False}}
        trainer = Trainer(None, cfg, log=lambda m: None)
        t0 = time.perf_counter()
        trainer.fit(overwrite=True)
        wall = time.perf_counter() - t0
        losses = {}
        for k in range(u + 1):  # every update so far, on its own held-out definitions
            held = dataset_from(str(files[PARTS[k][0]][1]), trainer.config.data, trainer.tokenizer,
                                task="causal-lm")
            losses[PARTS[k][0]] = trainer.evaluate(held)["eval_loss"]
        steps.append({"update": u + 1, "part": part, "heldout_loss": losses, "newest": losses[part],
                      "earlier_mean": statistics.fmean([losses[p] for p, _ in PARTS[:u]]) if u else None,
                      "trainable_params": trainable_parameters(trainer.model), "steps": args.steps,
                      "wall_s": round(wall, 1)})
        print(f"{arm} seed {seed} update {u + 1} ({part}): " + ", ".join(f"{p} {v:.4f}" for p, v in losses.items()),
              file=sys.stderr, flush=True)
        parent = out
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "reports/update-stream")
    ap.add_argument("--work", type=Path, default=Path("runs/update-stream"))
    ap.add_argument("--model", default="bundled://smollm2-135m")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    files = split(args.work / "data", args.examples)
    results = {arm: {seed: run_arm(arm, seed, files, args) for seed in args.seeds} for arm in args.arms}
    final = {arm: [runs[s][-1]["earlier_mean"] for s in args.seeds] for arm, runs in results.items()}
    newest = {arm: [runs[s][-1]["newest"] for s in args.seeds] for arm, runs in results.items()}
    verdicts = {}
    for a, b in (("rank1-sum-grow", "lora"), ("rank1-sum-grow-replay", "rank1-sum-grow"), ("lora", "fresh-lora")):
        if a in final and b in final and len(args.seeds) > 1:
            d = paired_difference(final[a], final[b])
            verdicts[f"{a} - {b}: earlier updates' held-out loss after the last"] = {
                "difference": round(d.diff, 4), "ci95": [round(x, 4) for x in d.ci95], "p": float(f"{d.p:.3g}")}
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python scripts/update_stream.py " + " ".join(sys.argv[1:]), "model": args.model,
              "steps": args.steps, "examples": args.examples, "seeds": args.seeds, "arms": ARMS,
              "results": results, "retention_after_last": final, "newest_after_last": newest, "verdicts": verdicts}
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(results, args.out / "retention.png")
    print(json.dumps({"retention_after_last": final, "verdicts": verdicts}, indent=1))


def plot(results: dict[str, dict[int, list[dict]]], path: Path) -> None:
    """Held-out loss of the first update (nouns) after each update, per arm (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    first = PARTS[0][0]
    for arm, runs in results.items():
        ys = [statistics.fmean(r[u]["heldout_loss"][first] for r in runs.values()) for u in range(len(PARTS))]
        ax.plot(range(1, len(PARTS) + 1), ys, marker="o", label=arm)
    ax.set_xticks(range(1, len(PARTS) + 1), [p for p, _ in PARTS])
    ax.set_xlabel("after the update on")
    ax.set_ylabel(f"held-out loss of '{first}' (per token)")
    ax.set_title("retention of the first update over the stream")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
