"""What the claims share: the claim record, summary lookups and number formatting, and the unpaired t-margin
kept for the rank-allocation rule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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
def claim(cid: str, title: str, source: str, rule: str, verdict: str, numbers: list[str]) -> dict[str, Any]:
    return {"id": cid, "claim": title, "source": source, "rule": rule, "verdict": verdict, "numbers": numbers}


def mean_of(summary: dict[str, Any], label: str, key: str) -> float | None:
    s = summary.get(label, {}).get(key)
    return s["mean"] if s else None


def missing(summary: dict[str, Any], labels: Sequence[str]) -> str | None:
    """Why a claim cannot be checked: labels not compared or with no successful run."""
    absent = [lab for lab in labels if lab not in summary]
    failed = [lab for lab in labels if lab in summary and not summary[lab]["runs"]]
    if absent:
        return f"inconclusive (not compared: {', '.join(absent)})"
    if failed:
        return f"inconclusive (failed: {', '.join(failed)})"
    return None


def budget_differs(lora_params: float, params: float, tol: float) -> str | None:
    """The verdict when a method's trainable parameters are not within ``tol`` (a fraction) of LoRA's, else
    ``None``: a quality comparison at different budgets says nothing about the claim."""
    if lora_params and abs(params - lora_params) > tol * lora_params:
        return f"inconclusive (budgets differ: {params / lora_params:.2f}x LoRA's parameters)"
    return None


def fmt_means(summary: dict[str, Any], labels: Sequence[str], key: str, fmt: str) -> str:
    vals = []
    for lab in labels:
        m = mean_of(summary, lab, key)
        vals.append(f"{lab} {fmt.format(m) if m is not None else 'n/a'}")
    return ", ".join(vals)


def quality_lines(summary: dict[str, Any], labels: Sequence[str]) -> list[str]:
    out = []
    for key, name, fmt in (("choice_accuracy", "choice accuracy", "{:.3f}"), ("choice_loss", "choice-set loss",
                                                                              "{:.4f}"),
                           ("accuracy", "accuracy", "{:.3f}"), ("eval_loss", "eval loss", "{:.4f}")):
        if any(mean_of(summary, lab, key) is not None for lab in labels):
            out.append(f"{name} (mean over seeds): " + fmt_means(summary, labels, key, fmt))
    return out


QUALITY_RULE = "quality rules of the report (paired by seed and item, Holm-corrected; 'matches' by TOST)"
