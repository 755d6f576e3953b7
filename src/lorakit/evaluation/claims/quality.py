"""Quality claims: a method matches or beats another on the task (paired evidence, :mod:`lorakit.evaluation.evidence`),
with budgets checked; forgetting; LoRA+'s faster convergence."""

from __future__ import annotations

import math
import statistics
from typing import Any

from lorakit.evaluation.claims.common import (
    LOSS_REL_TOL,
    QUALITY_RULE,
    budget_differs,
    claim,
    mean_of,
    missing,
    quality_lines,
)
from lorakit.evaluation.evidence import (
    TAIL,
    UNMEASURED,
    Evidence,
    combine,
    in_setting,
    mean_curve,
    quality,
    smooth,
)


# --- quality claims -------------------------------------------------------------------------------------------------
def claim_lora_sb(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    labels = ["lora", "lora-xs", "lora-sb"]
    title = ("LoRA-SB matches or beats LoRA with 27-90x fewer trainable parameters, and beats LoRA-XS at the "
             "same parameter count")
    src = "Ponkshe, Singhal et al. 2024, https://arxiv.org/abs/2411.19557 (abstract)"
    rule = f"LoRA-SB matches LoRA and beats LoRA-XS ({QUALITY_RULE}); the parameter ratio must lie in 27-90x"
    why = missing(s, labels)
    if why:
        return claim("lora-sb", title, src, rule, why, [])
    p = {lab: mean_of(s, lab, "trainable_params") or 0.0 for lab in labels}
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
            *quality_lines(s, labels), f"matches LoRA: {v1}", *t1, f"beats LoRA-XS: {v2}", *t2]
    return claim("lora-sb", title, src, rule, verdict, nums)


def claim_vera(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    title = "VeRA trains 10x fewer parameters than LoRA while matching its quality"
    src = "Kopiczko et al. 2023, https://arxiv.org/abs/2310.11454 (abstract: 10x fewer trainable parameters)"
    rule = ("count: per layer LoRA trains r (d_in + d_out) and VeRA r_vera + d_out, so the ratio is a function of "
            "the layer widths: supported if >= 10 at this model's widths, 'not reproduced in this setting' if the "
            f"widths are below those where the formula reaches 10; quality: VeRA matches LoRA ({QUALITY_RULE})")
    why = missing(s, ["lora", "vera"])
    if why:
        return claim("vera", title, src, rule, why, [])
    results = ev.results
    pl, pv = mean_of(s, "lora", "trainable_params") or 0.0, mean_of(s, "vera", "trainable_params") or 0.0
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
            *quality_lines(s, ["lora", "vera"]), f"matches LoRA: {v}", *t]
    return claim("vera", title, src, rule, combine([count, v]), nums)


def claim_rank1_sum(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    title = "Rank-1 Sum LoRA (pruned to an average rank r) matches fixed-rank LoRA with rank r"
    src = "the seed article (dynamic rank), with AdaLoRA (https://arxiv.org/abs/2303.10512) as the reference"
    rule = f"rank1-sum matches LoRA ({QUALITY_RULE}) with final trainable parameters within 10% of LoRA's"
    why = missing(s, ["lora", "rank1-sum"])
    if why:
        return claim("rank1-sum", title, src, rule, why, [])
    pl, pr = mean_of(s, "lora", "trainable_params") or 0.0, mean_of(s, "rank1-sum", "trainable_params") or 0.0
    m = ev.results["methods"]
    v, t = quality(ev, "rank1-sum", "lora", kind="matches", paper_params=406e6,
                   paper="BART-large (AdaLoRA's summarization)")
    r1 = m["rank1-sum"]
    nums = [f"final trainable parameters: lora {pl:,.0f} (r={m['lora'].get('r')}), rank1-sum {pr:,.0f} "
            f"(r_init={r1.get('r_init')}, target_rank={r1.get('target_rank')}, mode={r1.get('mode', 'prune')})",
            *quality_lines(s, ["lora", "rank1-sum"]), *t]
    nums += _adalora_mode(ev, s, pl)
    return claim("rank1-sum", title, src, rule, budget_differs(pl, pr, 0.1) or v, nums)


def _adalora_mode(ev: Evidence, s: dict[str, Any], lora_params: float) -> list[str]:
    """The AdaLoRA-style mode (``rank1-sum-adalora``: masked components keep training and can return) beside the
    default physical pruning: its own "matches LoRA" test and the two modes' paired difference (both in Holm's
    family); the claim's verdict stays the default mode's."""
    lab = "rank1-sum-adalora"
    if lab not in s or not s[lab]["runs"]:
        return ["AdaLoRA-style mode (masked components keep training): not compared (label rank1-sum-adalora)"]
    pa = mean_of(s, lab, "trainable_params") or 0.0
    v, t = quality(ev, lab, "lora", kind="matches", paper_params=406e6,
                   paper="BART-large (AdaLoRA's summarization)")
    v = budget_differs(lora_params, pa, 0.1) or v
    vm, tm = quality(ev, lab, "rank1-sum", kind="beats", paper_params=406e6, paper="AdaLoRA's BART-large")
    mode = (vm if vm.startswith("inconclusive") else "the AdaLoRA-style mode is better" if vm == "supported"
            else f"physical pruning is better ({vm})")
    return [f"AdaLoRA-style mode: final trainable parameters {pa:,.0f}; matches LoRA: {v}", *t,
            f"AdaLoRA-style mode vs physical pruning (two-sided): {mode}", *tm]


def _beats_lora(ev: Evidence, s: dict[str, Any], label: str, title: str, src: str, *, tol: float,
                paper_params: float, paper: str, detail: str = "") -> dict[str, Any]:
    """"``label`` beats LoRA" with trainable parameters within ``tol`` (a fraction) of LoRA's."""
    rule = f"{label} beats lora ({QUALITY_RULE}) with trainable parameters within {tol:.0%} of LoRA's{detail}"
    why = missing(s, ["lora", label])
    if why:
        return claim(label, title, src, rule, why, [])
    pl, pm = mean_of(s, "lora", "trainable_params") or 0.0, mean_of(s, label, "trainable_params") or 0.0
    v, t = quality(ev, label, "lora", kind="beats", paper_params=paper_params, paper=paper)
    m = ev.results["methods"]
    opts = ", ".join(f"{k} {m[label][k]}" for k in ("r", "delta_start", "delta_lambda") if k in m[label])
    nums = [f"trainable parameters: lora {pl:,.0f} (r {m['lora'].get('r')}), {label} {pm:,.0f} ({opts or 'defaults'})",
            *quality_lines(s, ["lora", label]), *t]
    return claim(label, title, src, rule, budget_differs(pl, pm, tol) or v, nums)


def claim_delta_lora(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    return _beats_lora(ev, s, "delta-lora",
                       "Delta-LoRA improves on LoRA's quality at the same number of trainable parameters",
                       "Zi et al. 2023, https://arxiv.org/abs/2309.02411 (abstract)", tol=0.01,
                       paper_params=355e6, paper="GPT-2 Medium (its E2E generation)")


def claim_dora(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    return _beats_lora(ev, s, "dora", "DoRA outperforms LoRA at the same rank",
                       "Liu et al. 2024, https://arxiv.org/abs/2402.09353 (abstract: DoRA consistently outperforms "
                       "LoRA on LLaMA, LLaVA and VL-BART)", tol=0.1, paper_params=7e9,
                       paper="LLaMA-7B (its commonsense-reasoning fine-tuning)",
                       detail=" at the same rank (DoRA adds one magnitude per output row)")


def claim_qlora(ev: Evidence, s: dict[str, Any]) -> dict[str, Any]:
    title = "QLoRA (LoRA on a 4-bit NF4 frozen base) matches 16-bit LoRA's quality"
    src = ("Dettmers et al. 2023, https://arxiv.org/abs/2305.14314 (4-bit NormalFloat QLoRA replicates 16-bit LoRA "
           "and full fine-tuning)")
    rule = f"qlora matches lora ({QUALITY_RULE}) with the same adapter and learning rate"
    why = missing(s, ["lora", "qlora"])
    if why:
        return claim("qlora", title, src, rule, why, [])
    v, t = quality(ev, "qlora", "lora", kind="matches", paper_params=80e6,
                   paper="T5 (80M-11B, generative Super-NaturalInstructions) and LLaMA 7B-65B")
    q = ev.results["methods"].get("qlora", {}).get("quantize", "?")
    return claim("qlora", title, src, rule, v, [f"qlora: base quantized to {q}",
                                                   *quality_lines(s, ["lora", "qlora"]), *t])


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
    why = missing(s, list(pair))
    if why:
        return claim("forgetting", title, src, rule, why, [])
    a, b = pair
    ra, rb = ev.runs(a), ev.runs(b)
    seeds = sorted(set(ra) & set(rb))
    base = (ev.results.get("base") or {}).get("heldout_loss")
    fa = [ra[k].get("heldout_loss") for k in seeds]
    fb = [rb[k].get("heldout_loss") for k in seeds]
    if len(seeds) < 2 or None in fa + fb or base is None:
        return claim("forgetting", title, src, rule, UNMEASURED if len(seeds) < 2 else
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
        return claim("forgetting", title, src, rule, "inconclusive (full fine-tuning does not measurably forget in "
                      "this setting)", nums)
    sig = ev.significant(test, d.p)
    if sig and d.diff > 0:
        return claim("forgetting", title, src, rule, in_setting("refuted", ev.results, 7e9, "Llama-2-7B"), nums)
    if matched != "supported":
        return claim("forgetting", title, src, rule, "inconclusive (in-task quality not shown matched: "
                      + matched + ")", nums)
    return claim("forgetting", title, src, rule, "supported" if sig and d.diff < 0 else
                  "inconclusive (no significant difference in forgetting)", nums)


def claim_loraplus(results: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    title = "LoRA+ (B's learning rate = ratio x A's) reaches LoRA's final training loss in fewer steps"
    src = "Hayou et al. 2024, https://arxiv.org/abs/2402.12354 (up to ~2x faster fine-tuning)"
    rule = (f"training loss smoothed over {TAIL} steps and averaged over seeds; L = LoRA's final smoothed loss, "
            "reached when within a tolerance of it (the seed spread of the final smoothed losses, at least 1%); "
            "supported if LoRA+ reaches L in at most 90% of the steps LoRA needs, refuted if it never does or "
            "needs at least 110%, inconclusive in between")
    why = missing(s, ["lora", "lora+"])
    if why:
        return claim("lora+", title, src, rule, why, [])
    lora, plus = smooth(mean_curve(results, "lora")), smooth(mean_curve(results, "lora+"))
    if not lora or not plus:
        return claim("lora+", title, src, rule, "inconclusive (no training-loss curves)", [])
    target = lora[-1][1]
    finals = [smooth(c)[-1][1] for c in _seed_curves(results, "lora") + _seed_curves(results, "lora+") if c]
    spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
    tol = max(spread, LOSS_REL_TOL * abs(target))
    reach_lora = next(step for step, v in lora if v <= target + tol)
    reach_plus = next((step for step, v in plus if v <= target + tol), None)
    ratio = results["methods"].get("lora+", {}).get("training", {}).get("loraplus_ratio")
    nums = [f"LoRA+ ratio {ratio}; LoRA's final smoothed training loss {target:.4f} (tolerance {tol:.4f}), "
            f"reached at step {reach_lora}; LoRA+'s final smoothed loss {plus[-1][1]:.4f}",
            *quality_lines(s, ["lora", "lora+"])]
    if reach_plus is None or reach_plus >= 1.1 * reach_lora:
        nums.append("LoRA+ never reached it" if reach_plus is None else
                    f"LoRA+ reached it at step {reach_plus} ({reach_plus / reach_lora:.2f}x LoRA's steps)")
        return claim("lora+", title, src, rule, in_setting("refuted", results, 7e9, "LLaMA-7B (its generative "
                                                             "fine-tuning; GPT-2 and RoBERTa on GLUE)"), nums)
    nums.append(f"LoRA+ reached it at step {reach_plus}: {reach_lora / reach_plus:.2f}x fewer steps")
    verdict = "supported" if reach_plus <= 0.9 * reach_lora else \
        "inconclusive (within 10% of LoRA's steps, inside the tolerance of this rule)"
    return claim("lora+", title, src, rule, verdict, nums)


def _seed_curves(results: dict[str, Any], label: str) -> list[list[tuple[int, float]]]:
    return [[(int(st), float(v)) for st, v in r.get("train_loss") or []]
            for r in results["runs"] if r["label"] == label and r.get("ok")]


def vera_width_for(ratio: float, r_lora: int, r_vera: int) -> float | None:
    """Width ``d`` of square layers at which LoRA / VeRA trainable parameters equal ``ratio``: per layer
    ``r_lora 2d / (r_vera + d)`` (``None`` if no width reaches it: ``2 r_lora <= ratio``)."""
    return ratio * r_vera / (2 * r_lora - ratio) if 2 * r_lora > ratio else None
