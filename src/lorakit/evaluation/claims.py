"""The method papers' claims, each checked against a comparison's numbers with a rule fixed before the run.

Every claim gets ``{"id", "claim", "source", "rule", "verdict", "numbers"}``; the verdict is ``supported``,
``refuted``, ``not reproduced at this budget (...)``, ``not reproduced in this setting (...)`` or ``inconclusive
(why)``. Quality comparisons follow :mod:`lorakit.evaluation.evidence` (paired by seed and item, equivalence by
TOST within declared margins, Holm's correction over the report's tests, "refuted" only for a gap that held across
budgets on a model of the paper's kind); cost claims (parameters, activation bytes, time, memory, latency) have
their own thresholds, stated in each rule.

:func:`evaluate_claims` evaluates every claim twice: the first pass registers the tests, Holm's procedure decides
them together, the second pass gives the verdicts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from lorakit.evaluation.evidence import (
    TAIL,
    UNMEASURED,
    Evidence,
    combine,
    in_setting,
    mean_curve,
    quality,
    smooth,
    stat,
    summarize,
)
from lorakit.evaluation.stats import t_quantile

LOSS_REL_TOL = 0.01
#: Two-sided 95% critical values of Student's t (kept for the unpaired rank-allocation rule).


def t95(df: float) -> float:
    """Two-sided 95% critical value of Student's t with ``df`` degrees of freedom."""
    return t_quantile(0.975, max(1.0, df))


def welch_margin(sa: dict[str, Any], sb: dict[str, Any]) -> float | None:
    """Half-width of Welch's 95% interval of ``mean_a - mean_b`` (unpaired: two different experiments), or ``None``
    when either side has fewer than two values."""
    if sa["n"] < 2 or sb["n"] < 2:
        return None
    va, vb = sa["std"] ** 2 / sa["n"], sb["std"] ** 2 / sb["n"]
    se2 = va + vb
    if se2 == 0:
        return 0.0
    df = se2 ** 2 / ((va ** 2 / (sa["n"] - 1)) + (vb ** 2 / (sb["n"] - 1)))
    return t95(df) * math.sqrt(se2)


# --- helpers ------------------------------------------------------------------------------------------------------
def _claim(cid: str, title: str, source: str, rule: str, verdict: str, numbers: list[str]) -> dict[str, Any]:
    return {"id": cid, "claim": title, "source": source, "rule": rule, "verdict": verdict, "numbers": numbers}


def _mean(summary: dict[str, Any], label: str, key: str) -> float | None:
    s = summary.get(label, {}).get(key)
    return s["mean"] if s else None


def _missing(summary: dict[str, Any], labels: Sequence[str]) -> str | None:
    """Why a claim cannot be checked: labels not compared or with no successful run."""
    absent = [lab for lab in labels if lab not in summary]
    failed = [lab for lab in labels if lab in summary and not summary[lab]["runs"]]
    if absent:
        return f"inconclusive (not compared: {', '.join(absent)})"
    if failed:
        return f"inconclusive (failed: {', '.join(failed)})"
    return None


def _fmt(summary: dict[str, Any], labels: Sequence[str], key: str, fmt: str) -> str:
    vals = []
    for lab in labels:
        m = _mean(summary, lab, key)
        vals.append(f"{lab} {fmt.format(m) if m is not None else 'n/a'}")
    return ", ".join(vals)


def _quality_lines(summary: dict[str, Any], labels: Sequence[str]) -> list[str]:
    out = []
    for key, name, fmt in (("choice_accuracy", "choice accuracy", "{:.3f}"), ("choice_loss", "choice-set loss",
                                                                              "{:.4f}"),
                           ("accuracy", "accuracy", "{:.3f}"), ("eval_loss", "eval loss", "{:.4f}")):
        if any(_mean(summary, lab, key) is not None for lab in labels):
            out.append(f"{name} (mean over seeds): " + _fmt(summary, labels, key, fmt))
    return out


QUALITY_RULE = "quality rules of the report (paired by seed and item, Holm-corrected; 'matches' by TOST)"


# --- quality claims -------------------------------------------------------------------------------------------------
def claim_lora_sb(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    labels = ["lora", "lora-xs", "lora-sb"]
    title = ("LoRA-SB matches or beats LoRA with 27-90x fewer trainable parameters, and beats LoRA-XS at the "
             "same parameter count")
    src = "Ponkshe, Singhal et al. 2024, https://arxiv.org/abs/2411.19557 (abstract)"
    rule = f"LoRA-SB matches LoRA and beats LoRA-XS ({QUALITY_RULE}); the parameter ratio must lie in 27-90x"
    why = _missing(s, labels)
    if why:
        return _claim("lora-sb", title, src, rule, why, [])
    p = {lab: _mean(s, lab, "trainable_params") or 0.0 for lab in labels}
    ratio = p["lora"] / p["lora-sb"] if p["lora-sb"] else math.inf
    paper = (3e9, "Llama-3.2-3B, Mistral-7B and Gemma-2-9B (its generative tasks)")
    v1, t1 = quality(ev, "lora-sb", "lora", kind="matches", paper_params=paper[0], paper=paper[1])
    v2, t2 = quality(ev, "lora-sb", "lora-xs", kind="beats", paper_params=paper[0], paper=paper[1])
    verdict = combine([v1, v2])
    if not 27 <= ratio <= 90 and verdict == "supported":
        verdict = f"inconclusive (parameter ratio {ratio:.1f}x is outside 27-90x)"
    eta = (ev.results.get("methods") or {}).get("lora-sb", {}).get("eta")
    nums = [f"trainable parameters: {', '.join(f'{lab} {p[lab]:,.0f}' for lab in labels)} "
            f"(LoRA / LoRA-SB = {ratio:.1f}x); LoRA-SB eta {eta if eta is not None else 'lr / warmup steps'}",
            *_quality_lines(s, labels), f"matches LoRA: {v1}", *t1, f"beats LoRA-XS: {v2}", *t2]
    return _claim("lora-sb", title, src, rule, verdict, nums)


def claim_vera(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    title = "VeRA trains 10x fewer parameters than LoRA while matching its quality"
    src = "Kopiczko et al. 2023, https://arxiv.org/abs/2310.11454 (abstract: 10x fewer trainable parameters)"
    rule = ("count: per layer LoRA trains r (d_in + d_out) and VeRA r_vera + d_out, so the ratio is a function of "
            "the layer widths: supported if >= 10 at this model's widths, 'not reproduced in this setting' if the "
            f"widths are below those where the formula reaches 10; quality: VeRA matches LoRA ({QUALITY_RULE})")
    why = _missing(s, ["lora", "vera"])
    if why:
        return _claim("vera", title, src, rule, why, [])
    results = ev.results
    pl, pv = _mean(s, "lora", "trainable_params") or 0.0, _mean(s, "vera", "trainable_params") or 0.0
    ratio = pl / pv if pv else math.inf
    r_lora = int(results["methods"].get("lora", {}).get("r") or 8)
    r_vera = int(results["methods"].get("vera", {}).get("r") or 256)
    width = vera_width_for(10, r_lora, r_vera)
    here = vera_width_for(ratio, r_lora, r_vera) if ratio < 2 * r_lora else None
    if ratio >= 10:
        count = "supported"
    elif width is None:
        count = "refuted"
    else:
        count = (f"not reproduced in this setting (ratio {ratio:.1f}x at this model's widths, about {here:.0f} "
                 f"wide as square layers; with LoRA r={r_lora} and VeRA r={r_vera} it reaches 10x from "
                 f"{width:.0f} wide)" if here is not None else "refuted")
    v, t = quality(ev, "vera", "lora", kind="matches", paper_params=355e6, paper="GPT-2 Medium (its E2E generation)")
    nums = [f"trainable parameters: lora {pl:,.0f}, vera {pv:,.0f} (ratio {ratio:.1f}x)",
            f"formula, square d x d layers: ratio = {r_lora} 2d / ({r_vera} + d): 10x from d = "
            + (f"{width:.0f}" if width is not None else "never") + "; e.g. "
            + ", ".join(f"{2 * r_lora * d / (r_vera + d):.1f}x at {d}" for d in (256, 768, 4096)),
            *_quality_lines(s, ["lora", "vera"]), f"matches LoRA: {v}", *t]
    return _claim("vera", title, src, rule, combine([count, v]), nums)


def claim_rank1_sum(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    title = "Rank-1 Sum LoRA (pruned to an average rank r) matches fixed-rank LoRA with rank r"
    src = "the seed article (dynamic rank), with AdaLoRA (https://arxiv.org/abs/2303.10512) as the reference"
    rule = f"rank1-sum matches LoRA ({QUALITY_RULE}) with final trainable parameters within 10% of LoRA's"
    why = _missing(s, ["lora", "rank1-sum"])
    if why:
        return _claim("rank1-sum", title, src, rule, why, [])
    pl, pr = _mean(s, "lora", "trainable_params") or 0.0, _mean(s, "rank1-sum", "trainable_params") or 0.0
    m = ev.results["methods"]
    v, t = quality(ev, "rank1-sum", "lora", kind="matches", paper_params=406e6,
                   paper="BART-large (AdaLoRA's summarization)")
    r1 = m["rank1-sum"]
    nums = [f"final trainable parameters: lora {pl:,.0f} (r={m['lora'].get('r')}), rank1-sum {pr:,.0f} "
            f"(r_init={r1.get('r_init')}, target_rank={r1.get('target_rank')}, mode={r1.get('mode', 'prune')})",
            *_quality_lines(s, ["lora", "rank1-sum"]), *t]
    if pl and abs(pr - pl) > 0.1 * pl:
        return _claim("rank1-sum", title, src, rule,
                      f"inconclusive (budgets differ: {pr / pl:.2f}x LoRA's parameters)", nums)
    return _claim("rank1-sum", title, src, rule, v, nums)


def claim_delta_lora(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    title = "Delta-LoRA improves on LoRA's quality at the same number of trainable parameters"
    src = "Zi et al. 2023, https://arxiv.org/abs/2309.02411 (abstract)"
    rule = f"Delta-LoRA beats LoRA ({QUALITY_RULE}) with trainable parameters within 1% of LoRA's"
    why = _missing(s, ["lora", "delta-lora"])
    if why:
        return _claim("delta-lora", title, src, rule, why, [])
    pl, pd = _mean(s, "lora", "trainable_params") or 0.0, _mean(s, "delta-lora", "trainable_params") or 0.0
    v, t = quality(ev, "delta-lora", "lora", kind="beats", paper_params=355e6,
                   paper="GPT-2 Medium (its E2E generation)")
    m = ev.results["methods"].get("delta-lora", {})
    nums = [f"trainable parameters: lora {pl:,.0f}, delta-lora {pd:,.0f}; delta_start "
            f"{m.get('delta_start', 'default (10% of the run)')}, delta_lambda {m.get('delta_lambda', 0.5)}",
            *_quality_lines(s, ["lora", "delta-lora"]), *t]
    if pl and abs(pd - pl) > 0.01 * pl:
        return _claim("delta-lora", title, src, rule, f"inconclusive (budgets differ: {pd / pl:.2f}x)", nums)
    return _claim("delta-lora", title, src, rule, v, nums)


def claim_qlora(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    title = "QLoRA (LoRA on a 4-bit NF4 frozen base) matches 16-bit LoRA's quality"
    src = ("Dettmers et al. 2023, https://arxiv.org/abs/2305.14314 (4-bit NormalFloat QLoRA replicates 16-bit LoRA "
           "and full fine-tuning)")
    rule = f"qlora matches lora ({QUALITY_RULE}) with the same adapter and learning rate"
    why = _missing(s, ["lora", "qlora"])
    if why:
        return _claim("qlora", title, src, rule, why, [])
    v, t = quality(ev, "qlora", "lora", kind="matches", paper_params=80e6,
                   paper="T5 (80M-11B, generative Super-NaturalInstructions) and LLaMA 7B-65B")
    q = ev.results["methods"].get("qlora", {}).get("quantize", "?")
    return _claim("qlora", title, src, rule, v, [f"qlora: base quantized to {q}",
                                                   *_quality_lines(s, ["lora", "qlora"]), *t])


def claim_forgetting(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    title = "LoRA forgets less of the base model's pretraining than full fine-tuning"
    src = "Biderman et al. 2024, \"LoRA Learns Less and Forgets Less\", https://arxiv.org/abs/2405.09673"
    rule = ("forgetting = loss on general text no run trains on, after minus before. In a setting where full "
            "fine-tuning measurably forgets (the `-hot` labels: higher learning rates; its forgetting significantly "
            "above 0 by the paired seed t-test), and where LoRA's in-task quality matches full fine-tuning's "
            "(choice-set loss equivalent within its margin, TOST), LoRA forgets less (paired difference of the "
            "forgetting, significant, Holm-corrected); refuted if it forgets significantly more. The same pair at the "
            "tuned learning rates is reported beside it")
    pair = ("lora-hot", "full-hot") if "lora-hot" in s and "full-hot" in s else ("lora", "full")
    why = _missing(s, list(pair))
    if why:
        return _claim("forgetting", title, src, rule, why, [])
    a, b = pair
    ra, rb = ev.runs(a), ev.runs(b)
    seeds = sorted(set(ra) & set(rb))
    base = (ev.results.get("base") or {}).get("heldout_loss")
    fa = [ra[k].get("heldout_loss") for k in seeds]
    fb = [rb[k].get("heldout_loss") for k in seeds]
    if len(seeds) < 2 or None in fa + fb or base is None:
        return _claim("forgetting", title, src, rule, UNMEASURED if len(seeds) < 2 else
                      "inconclusive (forgetting not measured)", [])
    from lorakit.evaluation.stats import paired_difference, t_test

    d = paired_difference(fa, fb)
    test = f"{a} vs {b}: forgetting differs"
    ev.register(test, d.p)
    forgets = t_test([x - base for x in fb], 0.0, "greater")
    measurable = forgets <= 0.05
    matched, tl = quality(ev, a, b, kind="matches", paper_params=7e9, paper="Llama-2-7B")
    nums = [f"setting: {a} vs {b}; forgetting (nats/token): {a} {statistics.fmean(fa) - base:+.4f}, "
            f"{b} {statistics.fmean(fb) - base:+.4f}; difference {d.diff:+.4f}, 95% [{d.ci95[0]:+.4f}, "
            f"{d.ci95[1]:+.4f}], p {d.p:.3g}",
            f"{b} forgets measurably: one-sided p {forgets:.3g}", f"in-task quality matched: {matched}", *tl]
    for x, y in (("lora", "full"),) if pair != ("lora", "full") and "lora" in s and "full" in s else ():
        rx, ry = ev.runs(x), ev.runs(y)
        common = sorted(set(rx) & set(ry))
        vx = [rx[k].get("heldout_loss") for k in common]
        vy = [ry[k].get("heldout_loss") for k in common]
        if len(common) >= 2 and None not in vx + vy:
            dd = paired_difference(vx, vy)
            nums.append(f"at the tuned learning rates: {x} - {y} forgetting {dd.diff:+.4f}, 95% [{dd.ci95[0]:+.4f}, "
                        f"{dd.ci95[1]:+.4f}]")
    if not measurable:
        return _claim("forgetting", title, src, rule, "inconclusive (full fine-tuning does not measurably forget in "
                      "this setting)", nums)
    sig = ev.significant(test, d.p)
    if sig and d.diff > 0:
        return _claim("forgetting", title, src, rule, in_setting("refuted", ev.results, 7e9, "Llama-2-7B"), nums)
    if matched != "supported":
        return _claim("forgetting", title, src, rule, "inconclusive (in-task quality not shown matched: "
                      + matched + ")", nums)
    return _claim("forgetting", title, src, rule, "supported" if sig and d.diff < 0 else
                  "inconclusive (no significant difference in forgetting)", nums)


def claim_loraplus(results: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    title = "LoRA+ (B's learning rate = ratio x A's) reaches LoRA's final training loss in fewer steps"
    src = "Hayou et al. 2024, https://arxiv.org/abs/2402.12354 (up to ~2x faster fine-tuning)"
    rule = (f"training loss smoothed over {TAIL} steps and averaged over seeds; L = LoRA's final smoothed loss, "
            "reached when within a tolerance of it (the seed spread of the final smoothed losses, at least 1%); "
            "supported if LoRA+ reaches L in at most 90% of the steps LoRA needs, refuted if it never does or "
            "needs at least 110%, inconclusive in between")
    why = _missing(s, ["lora", "lora+"])
    if why:
        return _claim("lora+", title, src, rule, why, [])
    lora, plus = smooth(mean_curve(results, "lora")), smooth(mean_curve(results, "lora+"))
    if not lora or not plus:
        return _claim("lora+", title, src, rule, "inconclusive (no training-loss curves)", [])
    target = lora[-1][1]
    finals = [smooth(c)[-1][1] for c in _seed_curves(results, "lora") + _seed_curves(results, "lora+") if c]
    spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
    tol = max(spread, LOSS_REL_TOL * abs(target))
    reach_lora = next(step for step, v in lora if v <= target + tol)
    reach_plus = next((step for step, v in plus if v <= target + tol), None)
    ratio = results["methods"].get("lora+", {}).get("training", {}).get("loraplus_ratio")
    nums = [f"LoRA+ ratio {ratio}; LoRA's final smoothed training loss {target:.4f} (tolerance {tol:.4f}), "
            f"reached at step {reach_lora}; LoRA+'s final smoothed loss {plus[-1][1]:.4f}",
            *_quality_lines(s, ["lora", "lora+"])]
    if reach_plus is None or reach_plus >= 1.1 * reach_lora:
        nums.append("LoRA+ never reached it" if reach_plus is None else
                    f"LoRA+ reached it at step {reach_plus} ({reach_plus / reach_lora:.2f}x LoRA's steps)")
        return _claim("lora+", title, src, rule, in_setting("refuted", results, 7e9, "LLaMA-7B (its generative "
                                                             "fine-tuning; GPT-2 and RoBERTa on GLUE)"), nums)
    nums.append(f"LoRA+ reached it at step {reach_plus}: {reach_lora / reach_plus:.2f}x fewer steps")
    verdict = "supported" if reach_plus <= 0.9 * reach_lora else \
        "inconclusive (within 10% of LoRA's steps, inside the tolerance of this rule)"
    return _claim("lora+", title, src, rule, verdict, nums)


def _seed_curves(results: dict[str, Any], label: str) -> list[list[tuple[int, float]]]:
    return [[(int(st), float(v)) for st, v in r.get("train_loss") or []]
            for r in results["runs"] if r["label"] == label and r.get("ok")]



def vera_width_for(ratio: float, r_lora: int, r_vera: int) -> float | None:
    """Width ``d`` of square layers at which LoRA / VeRA trainable parameters equal ``ratio``: per layer
    ``r_lora 2d / (r_vera + d)`` (``None`` if no width reaches it: ``2 r_lora <= ratio``)."""
    return ratio * r_vera / (2 * r_lora - ratio) if 2 * r_lora > ratio else None



def claim_lora_fa(s: dict[str, Any]) -> dict[str, Any]:
    title = "LoRA-FA needs less activation memory than LoRA (frozen A: only A x is kept for backward, not x)"
    src = "Zhang et al. 2023, https://arxiv.org/abs/2308.03303 (up to 1.4x less memory than LoRA)"
    rule = ("bytes saved for backward in one training step (saved_tensors_hooks): supported if LoRA-FA's are at "
            "least 5% below LoRA's, refuted if not below, inconclusive in between; process RSS shown for context")
    why = _missing(s, ["lora", "lora-fa"])
    if why:
        return _claim("lora-fa", title, src, rule, why, [])
    al, af = _mean(s, "lora", "saved_activation_bytes"), _mean(s, "lora-fa", "saved_activation_bytes")
    if not al or af is None:
        return _claim("lora-fa", title, src, rule, "inconclusive (no activation measurement)", [])
    verdict = "supported" if af <= 0.95 * al else "refuted" if af >= al else "inconclusive (less than 5% lower)"
    mb = "{:.1f} MB"
    nums = [f"saved activations per step: lora {al / 2**20:.2f} MB, lora-fa {af / 2**20:.2f} MB "
            f"({al / af:.2f}x less)" if af else "saved activations: lora-fa 0",
            "training RSS increase over the loaded model: "
            + _fmt_mb(s, ["lora", "lora-fa", "full"], "train_rss_increase_bytes", mb),
            "peak RSS while training: " + _fmt_mb(s, ["lora", "lora-fa"], "peak_rss_bytes", mb)]
    if _mean(s, "lora", "peak_gpu_bytes"):
        nums.append("peak GPU memory: " + _fmt_mb(s, ["lora", "lora-fa"], "peak_gpu_bytes", mb))
    return _claim("lora-fa", title, src, rule, verdict, nums)


def _fmt_mb(s: dict[str, Any], labels: Sequence[str], key: str, fmt: str) -> str:
    return ", ".join(f"{lab} " + (fmt.format(m / 2**20) if (m := _mean(s, lab, key)) is not None else "n/a")
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
    why = _missing(s, ["lora", "full"])
    if why:
        return _claim("lora-efficiency", title, src, rule, why, [])
    mem_key = "peak_gpu_bytes" if _mean(s, "lora", "peak_gpu_bytes") else "train_rss_increase_bytes"
    tl, tf = _mean(s, "lora", "step_time_s"), _mean(s, "full", "step_time_s")
    ml, mf = _mean(s, "lora", mem_key), _mean(s, "full", mem_key)
    cl, cf = smooth(mean_curve(results, "lora")), smooth(mean_curve(results, "full"))
    if not (tl and tf and ml is not None and mf and cl and cf):
        return _claim("lora-efficiency", title, src, rule, "inconclusive (no time, memory or loss measurement)", [])
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
    return _claim("lora-efficiency", title, src, rule, verdict, nums)



def lr_grid(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run of a comparison as a learning-rate grid point: ``{"label", "method", "lr", "loraplus_ratio",
    "seed", "eval_loss"}`` (``eval_loss`` ``None`` for a failed or diverged run)."""
    shared = results.get("training") or {}
    out = []
    for r in results.get("runs") or []:
        training = (results.get("methods") or {}).get(r["label"], {}).get("training") or {}
        out.append({"label": r["label"], "method": r.get("method"), "lr": training.get("lr", shared.get("lr")),
                    "loraplus_ratio": training.get("loraplus_ratio", shared.get("loraplus_ratio")),
                    "seed": r.get("seed"), "eval_loss": r.get("eval_loss") if r.get("ok") else None})
    return out


def _grid_of(grid: Sequence[dict[str, Any]], method: str) -> dict[float, list[float | None]]:
    """``lr -> eval losses`` of ``method``'s plain runs (LoRA+ runs, with a ratio, are not LoRA's grid)."""
    out: dict[float, list[float | None]] = {}
    for g in grid:
        if g["method"] == method and not g.get("loraplus_ratio") and isinstance(g.get("lr"), int | float):
            out.setdefault(float(g["lr"]), []).append(g.get("eval_loss"))
    return out


def claim_lr_sensitivity(results: dict[str, Any]) -> dict[str, Any]:
    """LoRA-SB vs LoRA: the range of the eval loss over a learning-rate grid of the same shape."""
    title = "LoRA-SB is less sensitive to the learning rate than LoRA"
    src = ("the seed article, after Ponkshe, Singhal et al. 2024, https://arxiv.org/abs/2411.19557 (an init that "
           "starts from the first full fine-tuning step)")
    rule = ("over a learning-rate sweep (the compare config's compare.lr_sweep, or this comparison if it is one) with "
            "at least 3 learning rates per method spanning about the same factor (max/min within 25%: half-decade "
            "grids such as 1, 3, 10, 30 and 3, 10, 30, 100 x 1e-4): range = max - min "
            "of the final eval loss on the sweep's held-out split (a diverged run counts as infinite); supported if "
            "LoRA-SB's range is at most half of LoRA's, refuted if it is at least LoRA's, inconclusive in between")
    sweep = results.get("lr_sweep") or {}
    grid = sweep.get("grid") or lr_grid(results)
    where = f"sweep `{sweep['path']}`" if sweep.get("path") else "this comparison's runs"
    lora, sb = _grid_of(grid, "lora"), _grid_of(grid, "lora-sb")
    if len(lora) < 3 or len(sb) < 3:
        return _claim("lr-sensitivity", title, src, rule,
                      f"inconclusive (no learning-rate grid: {len(lora)} LoRA and {len(sb)} LoRA-SB learning rates "
                      "in " + where + "; set compare.lr_sweep)", [])

    def final(vals: list[float | None]) -> float:
        ok = [v for v in vals if isinstance(v, int | float) and math.isfinite(v)]
        return statistics.fmean(ok) if len(ok) == len(vals) else math.inf

    curves = {name: {lr: final(v) for lr, v in sorted(g.items())} for name, g in (("lora", lora), ("lora-sb", sb))}
    spans = {name: max(c) / min(c) for name, c in curves.items()}
    ranges = {name: max(c.values()) - min(c.values()) for name, c in curves.items()}
    nums = [f"{name}: " + ", ".join(f"lr {lr:g} -> {v:.4f}" for lr, v in c.items())
            + f" (span {spans[name]:.0f}x, range {ranges[name]:.4f})" for name, c in curves.items()]
    nums.append(f"from {where}")
    if not 0.8 <= spans["lora-sb"] / spans["lora"] <= 1.25:
        return _claim("lr-sensitivity", title, src, rule, f"inconclusive (the grids span {spans['lora']:.0f}x and "
                      f"{spans['lora-sb']:.0f}x: not the same shape)", nums)
    rl, rs = ranges["lora"], ranges["lora-sb"]
    verdict = "supported" if rs <= 0.5 * rl else "refuted" if rs >= rl else \
        "inconclusive (LoRA-SB's range is below LoRA's but above half of it)"
    nums.append(f"range ratio LoRA-SB / LoRA = {rs / rl:.2f}" if rl > 0 else "LoRA's range is 0")
    return _claim("lr-sensitivity", title, src, rule, verdict, nums)



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
        return _claim("rank-allocation", title, src, rule, "inconclusive (the experiment has not run both versions)",
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
    return _claim("rank-allocation", title, src, rule, verdict, nums)




def claim_latency(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    """"No additional inference latency" (LoRA's merged weights), from the latency experiment."""
    title = "A merged adapter adds no inference latency; an unmerged one's overhead, measured"
    src = "Hu et al. 2021, https://arxiv.org/abs/2106.09685 (no additional inference latency once merged)"
    rule = ("generation tokens/s of the base model, the merged model and the unmerged adapter, batch 1 and 8, each "
            "method, interleaved repetitions: supported if every merged model is within 5% of the base model's "
            "tokens/s (the median of its repetitions) at both batch sizes, refuted if one is more than 10% slower")
    exp = (ev.results.get("experiments") or {}).get("latency")
    if not exp:
        return _claim("latency", title, src, rule, "inconclusive (the latency experiment was not run)", [])
    rows = exp.get("rows") or []
    ratios = [r["merged_vs_base"] for r in rows if r.get("merged_vs_base")]
    if not ratios:
        return _claim("latency", title, src, rule, "inconclusive (no measurement)", [])
    worst = min(ratios)
    verdict = "supported" if worst >= 0.95 else "refuted" if worst < 0.9 else "inconclusive (within 5-10%)"
    nums = [f"{r['method']} batch {r['batch']}: base {r['base_tok_s']:.1f} tok/s, merged {r['merged_tok_s']:.1f} "
            f"({r['merged_vs_base']:.3f}x), unmerged {r['unmerged_tok_s']:.1f} ({r['unmerged_vs_base']:.3f}x)"
            for r in rows]
    return _claim("latency", title, src, rule, verdict, [*nums, f"from `{exp.get('path')}`"])


def claim_swapping(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    title = "Task-specific adapters swap quickly on one base, each keeping its own quality"
    src = "Hu et al. 2021, https://arxiv.org/abs/2106.09685 (quick task switching by swapping LoRA weights)"
    rule = ("two adapters trained for two different tasks on one base: each task's metric after swapping (hot_swap "
            "into one loaded adapter) and when the two are mixed per row in one batch must equal the adapter alone "
            "(within 1e-6 of its loss, the same answers): supported if both hold for both tasks, refuted if either "
            "does not; combining the two into one adapter is reported beside it (its cost on each task)")
    exp = (ev.results.get("experiments") or {}).get("swapping")
    if not exp:
        return _claim("swapping", title, src, rule, "inconclusive (the swapping experiment was not run)", [])
    tasks = exp.get("tasks") or {}
    ok = all(t.get("swap_equal") and t.get("per_row_equal") for t in tasks.values()) and bool(tasks)
    nums = []
    for name, t in tasks.items():
        nums.append(f"{name}: alone {t['alone']:.4f}, after hot-swap {t['swapped']:.4f}, per-row mixed "
                    f"{t['per_row']:.4f}, combined ({exp.get('combine', 'cat')}) {t['combined']:.4f} "
                    f"[{t.get('metric', 'loss')}]")
    nums.append(f"hot-swap time {exp.get('swap_ms', float('nan')):.1f} ms; from `{exp.get('path')}`")
    return _claim("swapping", title, src, rule, "supported" if ok else "refuted", nums)


def claim_dynamic_rank(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    """Dynamic rank vs a uniform fixed rank at the same parameter budget, on the rank-allocation experiment."""
    title = "Dynamic rank (rank1-sum) is more efficient than a fixed rank at the same parameter budget"
    src = "the seed article (dynamic rank), with AdaLoRA (https://arxiv.org/abs/2303.10512) as the reference"
    rule = ("on the rank-allocation experiment's harder teacher: rank1-sum pruned to its budget against LoRA with a "
            "uniform rank giving the same total rank (target_rank on every linear: about the same trainable "
            "parameters, both counts shown), same steps, learning rate and batches, paired by "
            "seed: supported if rank1-sum's final KL to the teacher is significantly lower (paired t, 5%), refuted if "
            "significantly higher, else inconclusive")
    alloc = (ev.results.get("experiments") or {}).get("rank_allocation")
    if not alloc:
        return _claim("dynamic-rank", title, src, rule, "inconclusive (the rank-allocation experiment was not run)",
                      [])
    st = alloc.get("settings") or {}
    hard = st.get("hard_rank")
    dyn = {r["seed"]: r["kl_after"] for r in alloc.get("runs") or [] if r.get("rank") == hard}
    fixed = {r["seed"]: r["kl_after"] for r in alloc.get("fixed_rank_runs") or [] if r.get("rank") == hard}
    seeds = sorted(set(dyn) & set(fixed))
    if len(seeds) < 2:
        return _claim("dynamic-rank", title, src, rule, UNMEASURED, [])
    from lorakit.evaluation.stats import paired_difference

    d = paired_difference([dyn[k] for k in seeds], [fixed[k] for k in seeds])
    verdict = "supported" if d.p <= 0.05 and d.diff < 0 else "refuted" if d.p <= 0.05 else \
        "inconclusive (no significant difference)"
    fr = alloc.get("fixed_rank") or {}
    nums = [f"final KL per token: rank1-sum " + ", ".join(f"{dyn[k]:.4f}" for k in seeds)
            + "; fixed-rank LoRA " + ", ".join(f"{fixed[k]:.4f}" for k in seeds),
            f"difference {d.diff:+.4f}, 95% [{d.ci95[0]:+.4f}, {d.ci95[1]:+.4f}], p {d.p:.3g}",
            f"budgets: the same total rank; trainable parameters rank1-sum {fr.get('rank1_sum_params') or 0:,} "
            f"(first seed) vs LoRA r={fr.get('r', '?')} {fr.get('lora_params') or 0:,}"]
    return _claim("dynamic-rank", title, src, rule, verdict, nums)





def evaluate_claims(results: dict[str, Any], summary: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every claim's ``{"id", "claim", "source", "rule", "verdict", "numbers"}`` (two passes: register, decide)."""
    s = summary if summary is not None else summarize(results)
    ev = Evidence(results)

    def run() -> list[dict[str, Any]]:
        return [claim_lora_sb(ev, s), claim_loraplus(results, s), claim_vera(ev, s), claim_lora_fa(s),
                claim_forgetting(ev, s), claim_rank1_sum(ev, s), claim_delta_lora(ev, s),
                claim_lora_efficiency(results, s), claim_qlora(ev, s), claim_lr_sensitivity(results),
                claim_latency(ev, s), claim_swapping(ev, s), claim_dynamic_rank(ev, s)]

    run()  # registers every test
    ev.decide()
    out = run()
    tests = sorted(ev.tests.items(), key=lambda kv: kv[1])
    for c in out:
        c["tests"] = len(tests)
    return out


__all__ = ["claim_rank_allocation", "evaluate_claims", "in_setting", "lr_grid", "summarize", "t95",
           "vera_width_for", "welch_margin"]
