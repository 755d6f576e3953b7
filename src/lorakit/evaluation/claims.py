"""Summary statistics of a comparison and the verdicts on the method papers' claims.

Every claim is checked with the numbers of ``results.json`` and gets a verdict: ``supported``,
``refuted`` or ``inconclusive (why)``. The decision rules are fixed here, before any run, and printed in the
report next to each verdict, so a claim our numbers refute is reported as refuted:

* **Task quality** is judged on exact-match accuracy (higher is better), token F1 of greedy generations when
  measured (higher is better; free-text tasks) and the eval loss on the completions (lower is better). A
  difference counts only beyond its noise margin, which comes from the measured seed-to-seed spread:
  ``t95(df) sqrt(s1^2/k1 + s2^2/k2)`` (Welch's two-sided 95% interval of the difference of two means over ``k``
  seeds each, ``s`` their sample standard deviations), at least 1% of the loss; for accuracy at least the
  binomial ``2 sqrt(p1 (1-p1)/n1 + p2 (1-p2)/n2)`` too (``n`` = examples x seeds, ``p`` smoothed as
  ``(correct+1)/(n+2)``), for token F1 at least 0.01. With one seed the spread is unmeasured and no quality
  verdict is given. Accuracy is left out when both are below 5% (floor).
* "A beats B": supported if a metric is better beyond noise and none is worse; refuted if one is worse and
  none better; otherwise inconclusive. "A matches B": the same, except that both metrics within noise is
  supported (a match).
* **Setting**: a paper's claim our numbers contradict on a model more than 10x smaller than the paper's
  smallest is reported as "not reproduced in this setting", not "refuted": the claim was not tested where
  it was made.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

#: Logged training losses averaged for "final train loss", and the smoothing window of the LoRA+ check.
TAIL = 10
ACC_FLOOR = 0.05
LOSS_REL_TOL = 0.01
#: The smallest token-F1 difference that counts (absolute).
F1_TOL = 0.01
#: Two-sided 95% critical values of Student's t by degrees of freedom (the largest tabulated df <= the actual one
#: is used: conservative); beyond 30, 2.0.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
#: A model this many times smaller than the paper's smallest turns "refuted" into "not reproduced in this setting".
SCALE_GAP = 10
UNMEASURED = ("inconclusive (one seed per method: the seed-to-seed spread is unmeasured; run compare.seeds "
              "with 3 or more)")


def t95(df: float) -> float:
    """Two-sided 95% critical value of Student's t with ``df`` degrees of freedom (see :data:`_T95`)."""
    if df >= 31:
        return 2.0
    return _T95[max(k for k in _T95 if k <= max(1.0, df))]


def welch_margin(sa: dict[str, Any], sb: dict[str, Any]) -> float | None:
    """Half-width of Welch's 95% interval of ``mean_a - mean_b`` from two :func:`_stat` entries, or ``None`` when
    either has fewer than two values (no spread measured)."""
    if sa["n"] < 2 or sb["n"] < 2:
        return None
    va, vb = sa["std"] ** 2 / sa["n"], sb["std"] ** 2 / sb["n"]
    se2 = va + vb
    if se2 == 0:
        return 0.0
    df = se2 ** 2 / ((va ** 2 / (sa["n"] - 1)) + (vb ** 2 / (sb["n"] - 1)))
    return t95(df) * math.sqrt(se2)


# --- summary --------------------------------------------------------------------------------------------------
def _stat(values: Sequence[float]) -> dict[str, Any] | None:
    vals = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


def final_train_loss(run: dict[str, Any]) -> float | None:
    """Mean of the last :data:`TAIL` logged training losses (one step's loss is one batch's noise)."""
    losses = [loss for _, loss in run.get("train_loss") or []]
    return statistics.fmean(losses[-TAIL:]) if losses else None


def run_metrics(run: dict[str, Any], base: dict[str, Any] | None) -> dict[str, float | None]:
    """The per-run numbers of the report table (``forgetting`` relative to the base model)."""
    base = base or {}
    heldout, base_heldout = run.get("heldout_loss"), base.get("heldout_loss")
    before, peak = run.get("rss_before_train_bytes"), run.get("peak_rss_bytes")
    return {
        "trainable_params": run.get("trainable_params"),
        "adapter_bytes": run.get("adapter_bytes"),
        "final_train_loss": final_train_loss(run),
        "eval_loss": run.get("eval_loss"),
        "accuracy": run.get("accuracy"),
        "token_f1": run.get("token_f1"),
        "correct": run.get("correct"),
        "examples": run.get("examples"),
        "forgetting": heldout - base_heldout if heldout is not None and base_heldout is not None else None,
        "heldout_loss": heldout,
        "step_time_s": run.get("step_time_s"),
        "peak_rss_bytes": run.get("peak_rss_bytes"),
        "train_rss_increase_bytes": peak - before if peak is not None and before is not None else None,
        "peak_gpu_bytes": run.get("peak_gpu_bytes"),
        "saved_activation_bytes": run.get("saved_activation_bytes"),
    }


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{label: {metric: stat or None, "runs": n_ok, "failed": [errors]}}`` over the seeds of each label."""
    out: dict[str, dict[str, Any]] = {}
    for label in results["labels"]:
        runs = [r for r in results["runs"] if r["label"] == label]
        ok = [r for r in runs if r.get("ok")]
        per_run = [run_metrics(r, results.get("base")) for r in ok]
        entry: dict[str, Any] = {"runs": len(ok), "failed": [r.get("error", "?") for r in runs if not r.get("ok")]}
        keys = per_run[0].keys() if per_run else run_metrics({}, None).keys()
        for key in keys:
            entry[key] = _stat([m[key] for m in per_run if m[key] is not None])
        out[label] = entry
    return out


def mean_curve(results: dict[str, Any], label: str) -> list[tuple[int, float]]:
    """The training-loss curve of ``label`` averaged over its seeds (steps every seed logged)."""
    curves = [dict((int(s), float(v)) for s, v in r.get("train_loss") or [])
              for r in results["runs"] if r["label"] == label and r.get("ok")]
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [(s, statistics.fmean(c[s] for c in curves)) for s in steps]


def smooth(curve: Sequence[tuple[int, float]], window: int = TAIL) -> list[tuple[int, float]]:
    """Trailing mean over ``window`` points (the first points average what exists)."""
    out, vals = [], [v for _, v in curve]
    for i, (s, _) in enumerate(curve):
        chunk = vals[max(0, i - window + 1):i + 1]
        out.append((s, statistics.fmean(chunk)))
    return out


# --- comparisons ------------------------------------------------------------------------------------------------
def _mean(summary: dict[str, Any], label: str, key: str) -> float | None:
    s = summary.get(label, {}).get(key)
    return s["mean"] if s else None


def compare_accuracy(summary: dict[str, Any], a: str, b: str) -> dict[str, Any] | None:
    """``a`` vs ``b`` in accuracy: ``{"diff", "margin", "outcome"}`` (better/worse/tie), ``None`` if unusable."""
    sa, sb = summary.get(a, {}), summary.get(b, {})
    if not (sa.get("accuracy") and sb.get("accuracy") and sa.get("correct") and sb.get("correct")):
        return None
    pa, pb = sa["accuracy"]["mean"], sb["accuracy"]["mean"]
    if max(pa, pb) < ACC_FLOOR:
        return {"diff": pa - pb, "margin": None, "outcome": "floor"}
    spread = welch_margin(sa["accuracy"], sb["accuracy"])
    if spread is None:
        return {"diff": pa - pb, "margin": None, "outcome": "unmeasured"}
    na = sum(sa["examples"]["values"])
    nb = sum(sb["examples"]["values"])
    qa = (sum(sa["correct"]["values"]) + 1) / (na + 2)
    qb = (sum(sb["correct"]["values"]) + 1) / (nb + 2)
    binomial = 2 * math.sqrt(qa * (1 - qa) / na + qb * (1 - qb) / nb)
    return _outcome(pa - pb, max(spread, binomial), higher_better=True)


def compare_loss(summary: dict[str, Any], a: str, b: str, key: str = "eval_loss") -> dict[str, Any] | None:
    """``a`` vs ``b`` on a loss (lower is better), margin ``max(Welch 95% half-width over seeds, 1%)``;
    outcome ``"unmeasured"`` with fewer than two seeds on either side."""
    sa, sb = summary.get(a, {}).get(key), summary.get(b, {}).get(key)
    if not sa or not sb:
        return None
    spread = welch_margin(sa, sb)
    if spread is None:
        return {"diff": sa["mean"] - sb["mean"], "margin": None, "outcome": "unmeasured"}
    margin = max(spread, LOSS_REL_TOL * abs(sb["mean"]))
    return _outcome(sa["mean"] - sb["mean"], margin, higher_better=False)


def compare_f1(summary: dict[str, Any], a: str, b: str) -> dict[str, Any] | None:
    """``a`` vs ``b`` in token F1 (higher is better), margin ``max(Welch 95% half-width over seeds,
    F1_TOL)``; ``"unmeasured"`` with fewer than two seeds on either side, ``None`` if either has no F1."""
    sa, sb = summary.get(a, {}).get("token_f1"), summary.get(b, {}).get("token_f1")
    if not sa or not sb:
        return None
    spread = welch_margin(sa, sb)
    if spread is None:
        return {"diff": sa["mean"] - sb["mean"], "margin": None, "outcome": "unmeasured"}
    return _outcome(sa["mean"] - sb["mean"], max(spread, F1_TOL), higher_better=True)


def _outcome(diff: float, margin: float, *, higher_better: bool) -> dict[str, Any]:
    signed = diff if higher_better else -diff
    outcome = "better" if signed > margin else "worse" if signed < -margin else "tie"
    return {"diff": diff, "margin": margin, "outcome": outcome}


def quality_verdict(summary: dict[str, Any], a: str, b: str, *, kind: str) -> tuple[str, str]:
    """``(verdict, numbers)`` for "``a`` beats ``b``" (``kind="beats"``) or "``a`` matches ``b``"."""
    acc, loss = compare_accuracy(summary, a, b), compare_loss(summary, a, b)
    parts, outcomes = [], []
    unmeasured = False
    if acc is not None and acc["outcome"] == "floor":
        parts.append(f"accuracy {100 * acc['diff']:+.1f} points (both below {ACC_FLOOR:.0%}: not used)")
    elif acc is not None and acc["outcome"] == "unmeasured":
        parts.append(f"accuracy {100 * acc['diff']:+.1f} points (one seed: no margin)")
        unmeasured = True
    elif acc is not None:
        parts.append(f"accuracy {100 * acc['diff']:+.1f} ± {100 * acc['margin']:.1f} points ({acc['outcome']})")
        outcomes.append(acc["outcome"])
    for name, res, fmt in (("token F1", compare_f1(summary, a, b), "{:+.3f}"), ("eval loss", loss, "{:+.4f}")):
        if res is None:
            continue
        if res["outcome"] == "unmeasured":
            parts.append(f"{name} {fmt.format(res['diff'])} (one seed: no margin)")
            unmeasured = True
        else:
            parts.append(f"{name} {fmt.format(res['diff'])} ± {fmt.format(res['margin']).lstrip('+')} "
                         f"({res['outcome']})")
            outcomes.append(res["outcome"])
    text = f"{a} vs {b}: " + "; ".join(parts) if parts else f"{a} vs {b}: no numbers"
    if unmeasured:
        return UNMEASURED, text
    if not outcomes:
        return "inconclusive (no usable numbers)", text
    if "better" in outcomes and "worse" in outcomes:
        return "inconclusive (the metrics disagree)", text
    if "worse" in outcomes:
        return "refuted", text
    if "better" in outcomes:
        return "supported", text
    return ("supported", text) if kind == "matches" else ("inconclusive (difference within noise)", text)


def combine(verdicts: Sequence[str]) -> str:
    """All supported -> supported; any refuted -> refuted; else the first inconclusive reason."""
    if any(v == "refuted" for v in verdicts):
        return "refuted"
    if all(v == "supported" for v in verdicts):
        return "supported"
    return next(v for v in verdicts if not v == "supported")


def model_params(results: dict[str, Any]) -> int | None:
    """The compared model's parameter count (the largest ``total_params`` a run reported)."""
    counts = [r.get("total_params") for r in results.get("runs", []) if r.get("total_params")]
    return max(counts) if counts else None


def in_setting(verdict: str, results: dict[str, Any], paper_params: float, paper: str) -> str:
    """``verdict``, except that "refuted" on a model :data:`SCALE_GAP` x smaller than ``paper_params`` (the
    smallest model the claim was shown on) becomes "not reproduced in this setting (...)"."""
    n = model_params(results)
    if verdict != "refuted" or not n or n * SCALE_GAP > paper_params:
        return verdict
    return (f"not reproduced in this setting (a {n / 1e6:.1f}M-parameter model; the claim was shown on "
            f"{paper}, {paper_params / 1e6:.0f}M and larger)")


# --- the claims -------------------------------------------------------------------------------------------------
def _claim(cid: str, title: str, source: str, rule: str, verdict: str, numbers: list[str]) -> dict[str, Any]:
    return {"id": cid, "claim": title, "source": source, "rule": rule, "verdict": verdict, "numbers": numbers}


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
    f1 = any(_mean(summary, lab, "token_f1") is not None for lab in labels)
    return ["accuracy: " + _fmt(summary, labels, "accuracy", "{:.3f}"),
            *(["token F1: " + _fmt(summary, labels, "token_f1", "{:.3f}")] if f1 else []),
            "eval loss: " + _fmt(summary, labels, "eval_loss", "{:.4f}")]


def claim_lora_sb(results: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    labels = ["lora", "lora-xs", "lora-sb"]
    title = ("LoRA-SB matches or beats LoRA with 27-90x fewer trainable parameters, and beats LoRA-XS at the "
             "same parameter count")
    src = "Ponkshe, Singhal et al. 2024, https://arxiv.org/abs/2411.19557 (abstract)"
    rule = "LoRA-SB matches LoRA and beats LoRA-XS (quality rules above); the parameter ratio must lie in 27-90x"
    why = _missing(s, labels)
    if why:
        return _claim("lora-sb", title, src, rule, why, [])
    p = {lab: _mean(s, lab, "trainable_params") or 0.0 for lab in labels}
    ratio = p["lora"] / p["lora-sb"] if p["lora-sb"] else math.inf
    v1, t1 = quality_verdict(s, "lora-sb", "lora", kind="matches")
    v2, t2 = quality_verdict(s, "lora-sb", "lora-xs", kind="beats")
    verdict = in_setting(combine([v1, v2]), results, 355e6, "RoBERTa-large to Mistral-7B")
    if not 27 <= ratio <= 90 and verdict == "supported":
        verdict = f"inconclusive (parameter ratio {ratio:.1f}x is outside 27-90x)"
    nums = [f"trainable parameters: {', '.join(f'{lab} {p[lab]:,.0f}' for lab in labels)} "
            f"(LoRA / LoRA-SB = {ratio:.1f}x)", *_quality_lines(s, labels),
            f"{t1} -> matches LoRA: {v1}", f"{t2} -> beats LoRA-XS: {v2}"]
    return _claim("lora-sb", title, src, rule, verdict, nums)


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
            "eval loss: " + _fmt(s, ["lora", "lora+"], "eval_loss", "{:.4f}"),
            "accuracy: " + _fmt(s, ["lora", "lora+"], "accuracy", "{:.3f}")]
    if reach_plus is None or reach_plus >= 1.1 * reach_lora:
        nums.append("LoRA+ never reached it" if reach_plus is None else
                    f"LoRA+ reached it at step {reach_plus} ({reach_plus / reach_lora:.2f}x LoRA's steps)")
        return _claim("lora+", title, src, rule, in_setting("refuted", results, 124e6, "GPT-2 to Llama-7B"), nums)
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


def claim_vera(results: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    title = "VeRA trains 10x fewer parameters than LoRA while matching its quality"
    src = "Kopiczko et al. 2023, https://arxiv.org/abs/2310.11454 (abstract: 10x fewer trainable parameters)"
    rule = ("count: per layer LoRA trains r (d_in + d_out) and VeRA r_vera + d_out, so the ratio is a function of "
            "the layer widths: supported if >= 10 at this model's widths, 'not reproduced in this setting' if the "
            "widths are below those where the formula reaches 10; quality: VeRA matches LoRA (rules above)")
    why = _missing(s, ["lora", "vera"])
    if why:
        return _claim("vera", title, src, rule, why, [])
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
    v, t = quality_verdict(s, "vera", "lora", kind="matches")
    v = in_setting(v, results, 125e6, "RoBERTa-base to Llama-2-13B")
    nums = [f"trainable parameters: lora {pl:,.0f}, vera {pv:,.0f} (ratio {ratio:.1f}x)",
            f"formula, square d x d layers: ratio = {r_lora} 2d / ({r_vera} + d): 10x from d = "
            + (f"{width:.0f}" if width is not None else "never") + "; e.g. "
            + ", ".join(f"{2 * r_lora * d / (r_vera + d):.1f}x at {d}" for d in (256, 768, 4096)),
            "adapter file: " + _fmt(s, ["lora", "vera"], "adapter_bytes", "{:,.0f} bytes")
            + " (VeRA's file includes its shared frozen projections when save_projections is on)",
            *_quality_lines(s, ["lora", "vera"]), f"{t} -> matches LoRA: {v}"]
    return _claim("vera", title, src, rule, combine([count, v]), nums)


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


def claim_forgetting(results: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    title = "LoRA forgets less of the base model's pretraining than full fine-tuning"
    src = "Biderman et al. 2024, \"LoRA Learns Less and Forgets Less\", https://arxiv.org/abs/2405.09673"
    rule = ("forgetting = loss on general text no run trains on (pretraining-like text the base model knows), "
            "after minus before; supported if LoRA's is lower than "
            "full fine-tuning's by more than max(Welch 95% half-width over seeds, 0.01 nats), refuted if higher by "
            "as much; one seed: inconclusive")
    why = _missing(s, ["lora", "full"])
    if why:
        return _claim("forgetting", title, src, rule, why, [])
    fl, ff = s["lora"].get("forgetting"), s["full"].get("forgetting")
    if not fl or not ff:
        return _claim("forgetting", title, src, rule, "inconclusive (forgetting not measured)", [])
    spread = welch_margin(fl, ff)
    diff = fl["mean"] - ff["mean"]
    margin = max(spread or 0.0, 0.01)
    verdict = "supported" if diff < -margin else "refuted" if diff > margin else \
        "inconclusive (difference within noise)"
    verdict = UNMEASURED if spread is None else in_setting(verdict, results, 6.7e9, "Llama-2-7B")
    nums = [f"forgetting (nats/token): lora {fl['mean']:+.4f}, full {ff['mean']:+.4f} "
            f"(difference {diff:+.4f} ± {margin:.4f})",
            "learning side, accuracy: " + _fmt(s, ["lora", "full"], "accuracy", "{:.3f}")
            + "; eval loss: " + _fmt(s, ["lora", "full"], "eval_loss", "{:.4f}")]
    return _claim("forgetting", title, src, rule, verdict, nums)


def claim_rank1_sum(results: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    title = "Rank-1 Sum LoRA (pruned to an average rank r) matches fixed-rank LoRA with rank r"
    src = "the seed article (dynamic rank), with AdaLoRA (https://arxiv.org/abs/2303.10512) as the reference"
    rule = "rank1-sum matches LoRA (quality rules above) with final trainable parameters within 10% of LoRA's"
    why = _missing(s, ["lora", "rank1-sum"])
    if why:
        return _claim("rank1-sum", title, src, rule, why, [])
    pl, pr = _mean(s, "lora", "trainable_params") or 0.0, _mean(s, "rank1-sum", "trainable_params") or 0.0
    m = results["methods"]
    v, t = quality_verdict(s, "rank1-sum", "lora", kind="matches")
    v = in_setting(v, results, 184e6, "DeBERTaV3-base (AdaLoRA)")
    nums = [f"final trainable parameters: lora {pl:,.0f} (r={m['lora'].get('r')}), rank1-sum {pr:,.0f} "
            f"(r_init={m['rank1-sum'].get('r_init')}, target_rank={m['rank1-sum'].get('target_rank')})",
            *_quality_lines(s, ["lora", "rank1-sum"]), t]
    if pl and abs(pr - pl) > 0.1 * pl:
        return _claim("rank1-sum", title, src, rule,
                      f"inconclusive (budgets differ: {pr / pl:.2f}x LoRA's parameters)", nums)
    return _claim("rank1-sum", title, src, rule, v, nums)


def claim_delta_lora(results: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    title = "Delta-LoRA improves on LoRA's quality at the same number of trainable parameters"
    src = "Zi et al. 2023, https://arxiv.org/abs/2309.02411 (abstract)"
    rule = "Delta-LoRA beats LoRA (quality rules above) with trainable parameters within 1% of LoRA's"
    why = _missing(s, ["lora", "delta-lora"])
    if why:
        return _claim("delta-lora", title, src, rule, why, [])
    pl, pd = _mean(s, "lora", "trainable_params") or 0.0, _mean(s, "delta-lora", "trainable_params") or 0.0
    v, t = quality_verdict(s, "delta-lora", "lora", kind="beats")
    m = results["methods"].get("delta-lora", {})
    nums = [f"trainable parameters: lora {pl:,.0f}, delta-lora {pd:,.0f}; delta_start "
            f"{m.get('delta_start', 'default (10% of the run)')}, delta_lambda {m.get('delta_lambda', 0.5)}",
            *_quality_lines(s, ["lora", "delta-lora"]), t]
    if pl and abs(pd - pl) > 0.01 * pl:
        return _claim("delta-lora", title, src, rule, f"inconclusive (budgets differ: {pd / pl:.2f}x)", nums)
    return _claim("delta-lora", title, src, rule, in_setting(v, results, 125e6, "RoBERTa-base to BART-large"),
                  nums)


def claim_qlora(results: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    title = "QLoRA (LoRA on a 4-bit NF4 frozen base) matches 16-bit LoRA's quality"
    src = ("Dettmers et al. 2023, https://arxiv.org/abs/2305.14314 (4-bit NormalFloat QLoRA replicates 16-bit LoRA "
           "and full fine-tuning)")
    rule = "qlora matches lora (quality rules above) with the same adapter and learning rate"
    why = _missing(s, ["lora", "qlora"])
    if why:
        return _claim("qlora", title, src, rule, why, [])
    v, t = quality_verdict(s, "qlora", "lora", kind="matches")
    q = results["methods"].get("qlora", {}).get("quantize", "?")
    nums = [f"qlora: base quantized to {q}", *_quality_lines(s, ["lora", "qlora"]), t]
    return _claim("qlora", title, src, rule, in_setting(v, results, 80e6, "T5 80M-11B and LLaMA 7B-65B"), nums)


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
    sh, se = (_stat([r["relevant_share"] for r in rs]) for rs in (hard_runs, easy_runs))
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


def evaluate_claims(results: dict[str, Any], summary: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every claim's ``{"id", "claim", "source", "rule", "verdict", "numbers"}``."""
    s = summary if summary is not None else summarize(results)
    return [claim_lora_sb(results, s), claim_loraplus(results, s), claim_vera(results, s), claim_lora_fa(s),
            claim_forgetting(results, s), claim_rank1_sum(results, s), claim_delta_lora(results, s),
            claim_lora_efficiency(results, s), claim_qlora(results, s), claim_lr_sensitivity(results)]


__all__ = ["claim_rank_allocation", "combine", "compare_accuracy", "compare_loss", "evaluate_claims",
           "final_train_loss", "in_setting", "lr_grid", "mean_curve", "model_params", "quality_verdict",
           "run_metrics", "smooth", "summarize", "t95", "vera_width_for", "welch_margin"]
