"""A stream of updates of different material, five ways of keeping a model current, several seeds.

    python scripts/update_stream.py --out reports/update-stream --jobs 2        (SmolLM2: ~75 min on 2 cores)
    python scripts/update_stream.py --out reports/update-stream --render-only   (report.md and the plot again)
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
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lorakit.adapt.model import trainable_parameters  # noqa: E402
from lorakit.evaluation.stats import holm_adjusted, paired_difference  # noqa: E402
from lorakit.train.data import dataset_from  # noqa: E402
from lorakit.train.lineage import example_nll  # noqa: E402
from lorakit.train.trainer import Trainer  # noqa: E402
from lorakit.util import resources  # noqa: E402

PARTS = (("nouns", "noun"), ("verbs", "verb"), ("adjectives", "adjective"))
ARMS: dict[str, dict[str, Any]] = {
    "fresh-lora": {"adapter": {"method": "lora", "r": 4, "alpha": 8}, "lr": 3e-3, "continue": False},
    "lora": {"adapter": {"method": "lora", "r": 4, "alpha": 8}, "lr": 3e-3, "continue": True},
    "rank1-sum-grow": {"adapter": {"method": "rank1-sum", "r_init": 8, "target_rank": 4}, "lr": 3e-2,
                       "continue": True, "grow": 16},
    "rank1-sum-grow-replay": {"adapter": {"method": "rank1-sum", "r_init": 8, "target_rank": 4}, "lr": 3e-2,
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
    """One arm, one seed, the whole stream; cached in ``<work>/<arm>/s<seed>/stream.json`` (a rerun with the same
    settings reads it back, so an interrupted report loses at most the arm in flight)."""
    import torch

    torch.set_num_threads(1)
    spec = ARMS[arm]
    cache = args.work / arm / f"s{seed}" / "stream.json"
    key = {"model": args.model, "steps": args.steps, "examples": args.examples, "spec": spec}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["updates"]
    steps: list[dict] = []
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
        trainer.fit(overwrite=True).finished()
        wall = time.perf_counter() - t0
        losses, items = {}, {}
        for k in range(u + 1):  # every update so far, on its own held-out definitions
            held = dataset_from(str(files[PARTS[k][0]][1]), trainer.config.data, trainer.tokenizer,
                                task="causal-lm")
            losses[PARTS[k][0]] = trainer.evaluate(held)["eval_loss"]
            items[PARTS[k][0]] = [round(v, 5) for v in example_nll(trainer.model, held, 32, trainer._pad_id,
                                                                   trainer.device)]
        steps.append({"update": u + 1, "part": part, "heldout_loss": losses, "newest": losses[part],
                      "earlier_mean": statistics.fmean([losses[p] for p, _ in PARTS[:u]]) if u else None,
                      "trainable_params": trainable_parameters(trainer.model), "steps": args.steps,
                      "wall_s": round(wall, 1), "growth": _growth(out), "item_nll": items})
        print(f"{arm} seed {seed} update {u + 1} ({part}, {wall:.0f} s): "
              + ", ".join(f"{p} {v:.4f}" for p, v in losses.items()), file=sys.stderr, flush=True)
        parent = out
    cache.write_text(json.dumps({"key": key, "updates": steps}) + "\n")
    return steps


def _growth(run: Path) -> dict[str, Any] | None:
    """What the update added (``extra.update.growth``: components in all, the unknown share), if it grew."""
    meta = json.loads((run / "adapter" / "adapter.json").read_text())
    growth = ((meta.get("extra") or {}).get("update") or {}).get("growth")
    if not growth:
        return None
    return {k: v for k, v in growth.items() if not isinstance(v, dict)}


def _items(runs: dict[int, list[dict]], seeds: list[int], parts: list[str]) -> list[list[float]]:
    """Per seed, the per-example held-out NLL after the last update over ``parts`` (items in a fixed order)."""
    return [[v for p in parts for v in runs[s][-1]["item_nll"][p]] for s in seeds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "reports/update-stream")
    ap.add_argument("--work", type=Path, default=Path("runs/update-stream"))
    ap.add_argument("--model", default="bundled://smollm2-135m")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--jobs", type=int, default=1, help="arm/seed streams run at once, one thread each")
    ap.add_argument("--render-only", action="store_true", help="rewrite report.md and the plot from results.json")
    args = ap.parse_args()
    if args.render_only:
        report = json.loads((args.out / "results.json").read_text())
        plot(report["results"], args.out / "retention.png")
        (args.out / "report.md").write_text(render(report))
        print(render(report))
        return
    files = split(args.work / "data", args.examples)
    tasks = [(arm, seed) for arm in args.arms for seed in args.seeds]
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = dict(zip(tasks, pool.map(run_arm, *zip(*[(a, s, files, args) for a, s in tasks])), strict=True))
    else:
        done = {(a, s): run_arm(a, s, files, args) for a, s in tasks}
    results = {arm: {seed: done[arm, seed] for seed in args.seeds} for arm in args.arms}
    report = summarize(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(results, args.out / "retention.png")
    (args.out / "report.md").write_text(render(report))
    print(json.dumps({k: report[k] for k in ("retention_after_last", "newest_after_last", "verdicts")}, indent=1))


#: The equivalence margin of every comparison (nats per token): the comparison report's ``compare.margins.loss``.
MARGIN = 0.03
#: The paired comparisons, each on the earlier updates (retention) and on the newest one, after the last update.
PAIRS = (("rank1-sum-grow", "lora"), ("rank1-sum-grow-replay", "rank1-sum-grow"), ("lora", "fresh-lora"),
         ("lora", "full"))


def summarize(results: dict[str, dict[int, list[dict]]], args: argparse.Namespace) -> dict[str, Any]:
    """Means per arm and the paired verdicts (per seed and per held-out example, TOST at :data:`MARGIN`, Holm)."""
    seeds, parts = args.seeds, [p for p, _ in PARTS]
    final = {arm: [runs[s][-1]["earlier_mean"] for s in seeds] for arm, runs in results.items()}
    newest = {arm: [runs[s][-1]["newest"] for s in seeds] for arm, runs in results.items()}
    tests: dict[str, Any] = {}
    for a, b in PAIRS:
        if a not in results or b not in results or len(seeds) < 2:
            continue
        for what, sel in (("earlier updates", parts[:-1]), ("newest update", parts[-1:])):
            d = paired_difference(_items(results[a], seeds, sel), _items(results[b], seeds, sel), delta=MARGIN,
                                  higher_better=False)
            tests[f"{a} - {b}: held-out NLL of the {what} after the last update"] = d
    adj = holm_adjusted({k: d.p for k, d in tests.items()})
    adj_eq = holm_adjusted({k: d.p_tost for k, d in tests.items()})
    verdicts = {}
    for k, d in tests.items():
        if adj[k] <= 0.05:
            word = "lower (better)" if d.diff < 0 else "higher (worse)"
        elif adj_eq[k] <= 0.05:
            word = f"equivalent within ±{MARGIN}"
        else:
            word = "inconclusive"
        verdicts[k] = {"difference": round(d.diff, 4), "seed_differences": [round(x, 4) for x in d.seed_diffs],
                       "ci95": [round(x, 4) for x in d.ci95], "p": float(f"{d.p:.3g}"),
                       "p_holm": float(f"{adj[k]:.3g}"), "p_tost_holm": float(f"{adj_eq[k]:.3g}"), "verdict": word}
    slim = {arm: {s: [{k: v for k, v in u.items() if k != "item_nll"} for u in runs[s]] for s in seeds}
            for arm, runs in results.items()}
    return {"command": "python scripts/update_stream.py " + " ".join(sys.argv[1:]), "model": args.model,
            "steps": args.steps, "examples": args.examples, "seeds": seeds, "arms": ARMS, "margin": MARGIN,
            "rule": "A - B of the per-example held-out NLL (mean per token), paired by seed and example (seed t and "
                    "paired bootstrap, the larger p); a difference where the Holm-adjusted p <= 0.05, equivalence "
                    f"where the Holm-adjusted TOST p <= 0.05 at ±{MARGIN} nats, otherwise inconclusive",
            "results": slim, "retention_after_last": final, "newest_after_last": newest, "verdicts": verdicts}


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: per arm, the means over seeds after the last update, then every paired verdict."""
    def mean_sd(xs: list[float]) -> str:
        return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    jobs = re.search(r"--jobs[ =](\d+)", report["command"])
    jobs = jobs.group(1) if jobs else "1"
    lines = [f"# Update stream: {report['model']}", "",
             f"`{report['command']}`: nouns, then verbs, then adjectives (WordNet definitions), {report['examples']} "
             f"training examples and {report['steps']} steps of 8 per update, seeds {report['seeds']}. Held-out "
             "loss per token (lower is better), mean ± sd over seeds, after the last update.", "",
             "| arm | newest update (adjectives) | earlier updates (nouns, verbs) | trainable parameters "
             f"| s per update ({jobs} stream(s) at once, 1 thread each) |", "|---|---|---|---|---|"]
    for arm, runs in report["results"].items():
        last = [ups[-1] for ups in runs.values()]
        params = statistics.fmean(u["trainable_params"] for u in last)
        wall = statistics.fmean(u["wall_s"] for ups in runs.values() for u in ups)
        lines.append(f"| {arm} | {mean_sd(report['newest_after_last'][arm])} "
                     f"| {mean_sd(report['retention_after_last'][arm])} | {params:,.0f} | {wall:.0f} |")
    lines += ["", f"Verdicts ({report['rule']}; Holm over the {len(report['verdicts'])} tests):", ""]
    for name, v in report["verdicts"].items():
        lines.append(f"- {name}: {v['difference']:+.4f} (per seed {', '.join(f'{x:+.4f}' for x in v['seed_differences'])}; "
                     f"95% CI {v['ci95'][0]:+.4f} to {v['ci95'][1]:+.4f}; p {v['p']}, Holm {v['p_holm']}, "
                     f"TOST Holm {v['p_tost_holm']}): **{v['verdict']}**")
    return "\n".join(lines) + "\n"


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
