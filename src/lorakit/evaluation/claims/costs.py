"""Cost claims and the experiments beside the comparison: activation memory (LoRA-FA), LoRA's efficiency against
full fine-tuning, learning-rate sensitivity, rank allocation, latency of merged and unmerged adapters, adapter
swapping, dynamic rank against a fixed rank."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from lorakit.evaluation.claims.common import (
    claim,
    mean_of,
    missing,
    welch_margin,
)
from lorakit.evaluation.evidence import (
    TAIL,
    UNMEASURED,
    Evidence,
    combine,
    mean_curve,
    smooth,
    stat,
)


def claim_lora_fa(s: dict[str, Any]) -> dict[str, Any]:
    title = "LoRA-FA needs less activation memory than LoRA (frozen A: only A x is kept for backward, not x)"
    src = "Zhang et al. 2023, https://arxiv.org/abs/2308.03303 (up to 1.4x less memory than LoRA)"
    rule = ("bytes saved for backward in one training step (saved_tensors_hooks): supported if LoRA-FA's are at "
            "least 5% below LoRA's, refuted if not below, inconclusive in between; process RSS shown for context")
    why = missing(s, ["lora", "lora-fa"])
    if why:
        return claim("lora-fa", title, src, rule, why, [])
    al, af = mean_of(s, "lora", "saved_activation_bytes"), mean_of(s, "lora-fa", "saved_activation_bytes")
    if not al or af is None:
        return claim("lora-fa", title, src, rule, "inconclusive (no activation measurement)", [])
    verdict = "supported" if af <= 0.95 * al else "refuted" if af >= al else "inconclusive (less than 5% lower)"
    mb = "{:.1f} MB"
    nums = [f"saved activations per step: lora {al / 2**20:.2f} MB, lora-fa {af / 2**20:.2f} MB "
            f"({al / af:.2f}x less)" if af else "saved activations: lora-fa 0",
            "training RSS increase over the loaded model: "
            + _fmt_mb(s, ["lora", "lora-fa", "full"], "train_rss_increase_bytes", mb),
            "peak RSS while training: " + _fmt_mb(s, ["lora", "lora-fa"], "peak_rss_bytes", mb)]
    if mean_of(s, "lora", "peak_gpu_bytes"):
        nums.append("peak GPU memory: " + _fmt_mb(s, ["lora", "lora-fa"], "peak_gpu_bytes", mb))
    return claim("lora-fa", title, src, rule, verdict, nums)


def _fmt_mb(s: dict[str, Any], labels: Sequence[str], key: str, fmt: str) -> str:
    return ", ".join(f"{lab} " + (fmt.format(m / 2**20) if (m := mean_of(s, lab, key)) is not None else "n/a")
                     for lab in labels if lab in s)



def _steps_to(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    return next((step for step, v in curve if v <= target), None)


def claim_lora_efficiency(results: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    title = "LoRA trains faster and with less memory than full fine-tuning"
    src = "Hu et al. 2021, https://arxiv.org/abs/2106.09685 (3x less GPU memory, 25% faster on GPT-3 175B)"
    rule = (f"time to a target loss: the training loss (smoothed over {TAIL} steps, mean over seeds) both reach, "
            "the higher of their final smoothed losses; time = steps to reach it x median step time (mean over "
            "seeds). Memory: the RSS increase over the loaded model while training, or peak GPU memory. Supported "
            "if LoRA's time and memory are both at least 5% below full fine-tuning's, refuted if either is not "
            "below, inconclusive in between")
    why = missing(s, ["lora", "full"])
    if why:
        return claim("lora-efficiency", title, src, rule, why, [])
    mem_key = "peak_gpu_bytes" if mean_of(s, "lora", "peak_gpu_bytes") else "train_rss_increase_bytes"
    tl, tf = mean_of(s, "lora", "step_time_s"), mean_of(s, "full", "step_time_s")
    ml, mf = mean_of(s, "lora", mem_key), mean_of(s, "full", mem_key)
    cl, cf = smooth(mean_curve(results, "lora")), smooth(mean_curve(results, "full"))
    if not (tl and tf and ml is not None and mf and cl and cf):
        return claim("lora-efficiency", title, src, rule, "inconclusive (no time, memory or loss measurement)", [])
    target = max(cl[-1][1], cf[-1][1])
    nl, nf = _steps_to(cl, target), _steps_to(cf, target)
    assert nl is not None and nf is not None  # each reaches its own final value at the latest
    time_l, time_f = nl * tl, nf * tf
    ratios = [time_l / time_f, ml / mf]
    verdict = "supported" if all(r <= 0.95 for r in ratios) else "refuted" if any(r >= 1 for r in ratios) else \
        "inconclusive (less than 5% below)"
    nums = [f"target training loss {target:.4f}: lora reaches it at step {nl} x {tl:.3f} s = {time_l:.1f} s, full at "
            f"step {nf} x {tf:.3f} s = {time_f:.1f} s ({time_l / time_f:.2f}x)",
            f"{mem_key.replace('_', ' ')}: lora {ml / 2**20:.1f} MB, full {mf / 2**20:.1f} MB ({ml / mf:.2f}x)"]
    return claim("lora-efficiency", title, src, rule, verdict, nums)



def lr_grid(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run of a comparison as a learning-rate grid point: ``{"label", "method", "lr", "loraplus_ratio",
    "quantize", "seed", "eval_loss"}`` (``eval_loss`` ``None`` for a failed or diverged run)."""
    shared = results.get("training") or {}
    out = []
    for r in results.get("runs") or []:
        entry = (results.get("methods") or {}).get(r["label"], {})
        training = entry.get("training") or {}
        out.append({"label": r["label"], "method": r.get("method"), "lr": training.get("lr", shared.get("lr")),
                    "loraplus_ratio": training.get("loraplus_ratio", shared.get("loraplus_ratio")),
                    "quantize": entry.get("quantize"),
                    "seed": r.get("seed"), "eval_loss": r.get("eval_loss") if r.get("ok") else None})
    return out


def _grid_of(grid: Sequence[dict[str, Any]], method: str) -> dict[float, list[float | None]]:
    """``lr -> eval losses`` of ``method``'s plain runs (LoRA+ runs, with a ratio, and QLoRA runs, on a quantized
    base, are not LoRA's grid)."""
    out: dict[float, list[float | None]] = {}
    for g in grid:
        if g["method"] == method and not g.get("loraplus_ratio") and not g.get("quantize") \
                and isinstance(g.get("lr"), int | float):
            out.setdefault(float(g["lr"]), []).append(g.get("eval_loss"))
    return out


def claim_lr_sensitivity(results: dict[str, Any]) -> dict[str, Any]:
    """LoRA-SB vs LoRA: the range of the eval loss over a learning-rate grid of the same shape."""
    title = "LoRA-SB is less sensitive to the learning rate than LoRA"
    src = ("the seed article, after Ponkshe, Singhal et al. 2024, https://arxiv.org/abs/2411.19557 (an init that "
           "starts from the first full fine-tuning step)")
    rule = ("over a learning-rate sweep (the compare config's compare.lr_sweep, or this comparison if it is one): "
            "on the learning rates both methods' grids share when there are at least 3 (the same place and shape; "
            "points only one grid has are left out), else on grids of at least 3 rates each spanning about the same "
            "factor (max/min within 25%: half-decade grids such as 1, 3, 10, 30 and 3, 10, 30, 100 x 1e-4): "
            "range = max - min of the final eval loss on the sweep's held-out split (a diverged run counts as "
            "infinite); supported if LoRA-SB's range is at most half of LoRA's, refuted if it is at least LoRA's, "
            "inconclusive in between")
    sweep = results.get("lr_sweep") or {}
    grid = sweep.get("grid") or lr_grid(results)
    where = f"sweep `{sweep['path']}`" if sweep.get("path") else "this comparison's runs"
    lora, sb = _grid_of(grid, "lora"), _grid_of(grid, "lora-sb")
    if len(lora) < 3 or len(sb) < 3:
        return claim("lr-sensitivity", title, src, rule,
                      f"inconclusive (no learning-rate grid: {len(lora)} LoRA and {len(sb)} LoRA-SB learning rates "
                      "in " + where + "; set compare.lr_sweep)", [])

    def final(vals: list[float | None]) -> float:
        ok = [v for v in vals if isinstance(v, int | float) and math.isfinite(v)]
        return statistics.fmean(ok) if len(ok) == len(vals) else math.inf

    shared, on_shared = set(lora) & set(sb), []
    if len(shared) >= 3:  # the same rates for both: neither range gains from points the other grid lacks
        on_shared = [f"on the {len(shared)} learning rates both grids share" + "".join(
            f"; {name}'s lr {', '.join(f'{lr:g}' for lr in sorted(set(g) - shared))} left out"
            for name, g in (("lora", lora), ("lora-sb", sb)) if set(g) - shared)]
        lora, sb = ({lr: v for lr, v in g.items() if lr in shared} for g in (lora, sb))
    curves = {name: {lr: final(v) for lr, v in sorted(g.items())} for name, g in (("lora", lora), ("lora-sb", sb))}
    spans = {name: max(c) / min(c) for name, c in curves.items()}
    ranges = {name: max(c.values()) - min(c.values()) for name, c in curves.items()}
    nums = [f"{name}: " + ", ".join(f"lr {lr:g} -> {v:.4f}" for lr, v in c.items())
            + f" (span {spans[name]:.0f}x, range {ranges[name]:.4f})" for name, c in curves.items()]
    nums += [*on_shared, f"from {where}"]
    if not 0.8 <= spans["lora-sb"] / spans["lora"] <= 1.25:
        return claim("lr-sensitivity", title, src, rule, f"inconclusive (the grids span {spans['lora']:.0f}x and "
                      f"{spans['lora-sb']:.0f}x: not the same shape)", nums)
    rl, rs = ranges["lora"], ranges["lora-sb"]
    verdict = "supported" if rs <= 0.5 * rl else "refuted" if rs >= rl else \
        "inconclusive (LoRA-SB's range is below LoRA's but above half of it)"
    nums.append(f"range ratio LoRA-SB / LoRA = {rs / rl:.2f}" if rl > 0 else "LoRA's range is 0")
    return claim("lr-sensitivity", title, src, rule, verdict, nums)



def claim_rank_allocation(alloc: dict[str, Any]) -> dict[str, Any]:
    """The dynamic-rank claim on the controlled experiment of :mod:`lorakit.evaluation.rank_allocation`."""
    title = ("The dynamic-rank method (rank1-sum) gives more rank to the layers and the data that need it")
    src = "the seed article (dynamic rank), with AdaLoRA (https://arxiv.org/abs/2303.10512) as the reference"
    st = alloc.get("settings") or {}
    easy, hard = st.get("easy_rank"), st.get("hard_rank")
    rule = (f"a teacher changes only {len(st.get('relevant') or [])} linears, by rank {easy} (easier) or {hard} "
            "(harder); rank1-sum on every linear learns to match it under one global budget. Layers: in the harder "
            "version the changed linears' mean final rank is >= 2x the other linears' (mean over seeds of the "
            "per-seed ratio, and above 1x in every seed); refuted if the mean ratio is <= 1x. Data: the changed "
            "linears' share of the budget is higher in the harder version by more than max(Welch 95% half-width "
            "over seeds, 2 points); refuted if lower by as much. Supported if both hold, refuted if either is "
            "refuted, else inconclusive")
    runs = alloc.get("runs") or []
    hard_runs = [r for r in runs if r.get("rank") == hard]
    easy_runs = [r for r in runs if r.get("rank") == easy]
    if not hard_runs or not easy_runs or easy == hard:
        return claim("rank-allocation", title, src, rule, "inconclusive (the experiment has not run both versions)",
                      [])
    ratios = [r["relevant_mean_rank"] / r["other_mean_rank"] if r["other_mean_rank"] else math.inf
              for r in hard_runs]
    mean_ratio = statistics.fmean(ratios)
    v_layers = "supported" if mean_ratio >= 2 and min(ratios) > 1 else "refuted" if mean_ratio <= 1 else \
        "inconclusive (changed linears get more, but not 2x in the mean or not in every seed)"
    sh, se = (stat([r["relevant_share"] for r in rs]) for rs in (hard_runs, easy_runs))
    assert sh is not None and se is not None
    spread = welch_margin(sh, se)
    diff = sh["mean"] - se["mean"]
    margin = max(spread or 0.0, 0.02)
    v_data = UNMEASURED if spread is None else "supported" if diff > margin else "refuted" if diff < -margin \
        else "inconclusive (share difference within noise)"
    verdict = UNMEASURED if spread is None else combine([v_layers, v_data])
    nums = [f"harder version (rank {hard}): changed linears' mean rank / other linears' = "
            + ", ".join(f"{x:.2f}x" for x in ratios) + f" over seeds (mean {mean_ratio:.2f}x) -> layers: {v_layers}",
            f"changed linears' share of the budget: easier {se['mean']:.1%}, harder {sh['mean']:.1%} (difference "
            f"{100 * diff:+.1f} ± {100 * margin:.1f} points) -> data: {v_data}",
            "KL(teacher || student) per token, before -> after: "
            + "; ".join(f"rank {r['rank']} seed {r['seed']} {r['kl_before']:.4f} -> {r['kl_after']:.4f}"
                        for r in runs)]
    return claim("rank-allocation", title, src, rule, verdict, nums)




def claim_latency(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    """"No additional inference latency" (LoRA's merged weights), from the latency experiment."""
    title = "A merged adapter adds no inference latency; an unmerged one's overhead, measured"
    src = "Hu et al. 2021, https://arxiv.org/abs/2106.09685 (no additional inference latency once merged)"
    rule = ("generation tokens/s of the base model, the merged model and the unmerged adapter, batch 1 and 8, each "
            "method, interleaved repetitions: supported if every merged model is within 5% of the base model's "
            "tokens/s (the median of its repetitions) at both batch sizes, refuted if one is more than 10% slower")
    exp = (ev.results.get("experiments") or {}).get("latency")
    if not exp:
        return claim("latency", title, src, rule, "inconclusive (the latency experiment was not run)", [])
    rows = exp.get("rows") or []
    ratios = [r["merged_vs_base"] for r in rows if r.get("merged_vs_base")]
    if not ratios:
        return claim("latency", title, src, rule, "inconclusive (no measurement)", [])
    worst = min(ratios)
    verdict = "supported" if worst >= 0.95 else "refuted" if worst < 0.9 else "inconclusive (within 5-10%)"
    nums = [f"{r['method']} batch {r['batch']}: base {r['base_tok_s']:.1f} tok/s, merged {r['merged_tok_s']:.1f} "
            f"({r['merged_vs_base']:.3f}x), unmerged {r['unmerged_tok_s']:.1f} ({r['unmerged_vs_base']:.3f}x)"
            for r in rows]
    return claim("latency", title, src, rule, verdict, [*nums, f"from `{exp.get('path')}`"])


def claim_swapping(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    title = "Task-specific adapters swap quickly on one base, each keeping its own quality"
    src = "Hu et al. 2021, https://arxiv.org/abs/2106.09685 (quick task switching by swapping LoRA weights)"
    rule = ("two adapters trained for two different tasks on one base: each task's metric after swapping (hot_swap "
            "into one loaded adapter) and when the two are mixed per row in one batch must equal the adapter alone "
            "(within 1e-6 of its loss, the same answers): supported if both hold for both tasks, refuted if either "
            "does not; combining the two into one adapter is reported beside it (its cost on each task)")
    exp = (ev.results.get("experiments") or {}).get("swapping")
    if not exp:
        return claim("swapping", title, src, rule, "inconclusive (the swapping experiment was not run)", [])
    tasks = exp.get("tasks") or {}
    ok = all(t.get("swap_equal") and t.get("per_row_equal") for t in tasks.values()) and bool(tasks)
    nums = []
    for name, t in tasks.items():
        nums.append(f"{name}: alone {t['alone']:.4f}, after hot-swap {t['swapped']:.4f}, per-row mixed "
                    f"{t['per_row']:.4f}, combined ({exp.get('combine', 'cat')}) {t['combined']:.4f} "
                    f"[{t.get('metric', 'loss')}]")
    nums.append(f"hot-swap time {exp.get('swap_ms', float('nan')):.1f} ms; from `{exp.get('path')}`")
    return claim("swapping", title, src, rule, "supported" if ok else "refuted", nums)


def claim_dynamic_rank(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    """Dynamic rank vs a uniform fixed rank at the same parameter budget, on the rank-allocation experiment."""
    title = "Dynamic rank (rank1-sum) is more efficient than a fixed rank at the same parameter budget"
    src = "the seed article (dynamic rank), with AdaLoRA (https://arxiv.org/abs/2303.10512) as the reference"
    rule = ("on the rank-allocation experiment's harder teacher: rank1-sum pruned to its budget against LoRA with a "
            "uniform rank giving the same total rank (target_rank on every linear: about the same trainable "
            "parameters, both counts shown), same steps, learning rate and batches, paired by "
            "seed: supported if rank1-sum's final KL to the teacher is significantly lower (paired t, 5%); if "
            "significantly higher, not reproduced in this setting (never refuted: one budget, a 5M model and a "
            "synthetic teacher, not the setting of the article); else inconclusive")
    alloc = (ev.results.get("experiments") or {}).get("rank_allocation")
    if not alloc:
        return claim("dynamic-rank", title, src, rule, "inconclusive (the rank-allocation experiment was not run)",
                      [])
    st = alloc.get("settings") or {}
    hard = st.get("hard_rank")
    dyn = {r["seed"]: r["kl_after"] for r in alloc.get("runs") or [] if r.get("rank") == hard}
    fixed = {r["seed"]: r["kl_after"] for r in alloc.get("fixed_rank_runs") or [] if r.get("rank") == hard}
    seeds = sorted(set(dyn) & set(fixed))
    if len(seeds) < 2:
        return claim("dynamic-rank", title, src, rule, UNMEASURED, [])
    from lorakit.evaluation.stats import paired_difference

    d = paired_difference([dyn[k] for k in seeds], [fixed[k] for k in seeds])
    verdict = "supported" if d.p <= 0.05 and d.diff < 0 else \
        "not reproduced in this setting (fixed rank significantly better at the one budget measured)" \
        if d.p <= 0.05 else "inconclusive (no significant difference)"
    fr = alloc.get("fixed_rank") or {}
    nums = ["final KL per token: rank1-sum " + ", ".join(f"{dyn[k]:.4f}" for k in seeds)
            + "; fixed-rank LoRA " + ", ".join(f"{fixed[k]:.4f}" for k in seeds),
            f"difference {d.diff:+.4f}, 95% [{d.ci95[0]:+.4f}, {d.ci95[1]:+.4f}], p {d.p:.3g}",
            f"budgets: the same total rank; trainable parameters rank1-sum {fr.get('rank1_sum_params') or 0:,} "
            f"(first seed) vs LoRA r={fr.get('r', '?')} {fr.get('lora_params') or 0:,}"]
    return claim("dynamic-rank", title, src, rule, verdict, nums)
