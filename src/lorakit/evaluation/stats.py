"""The statistics behind the comparison's verdicts: paired differences, equivalence tests, multiplicity.

Every method of a comparison sees the same batches for a given seed and is scored on the same eval items, so the
design is paired twice over: by seed and by item. A difference ``A - B`` is therefore estimated from

* the **paired seed differences** ``d_s = mean_i a_{s,i} - mean_i b_{s,i}``: a Student-t interval with ``k - 1``
  degrees of freedom (``k`` seeds): the training randomness;
* a **paired hierarchical bootstrap**: resample seeds, then items, with replacement, the same draws for ``A`` and
  ``B``; percentile interval of the mean difference: the item sampling on top of the seeds (a fixed generator, so
  a report is reproducible).

The decision interval is the wider of the two (the union of their ends), and a test's p-value the larger of the
two (conservative: each source of noise alone can be the larger).

* **Superiority** (``A`` better than ``B``): two-sided test of ``diff = 0``.
* **Equivalence** (``A`` matches ``B``): TOST, two one-sided tests against a margin ``delta`` declared before the
  run: equivalent when the 90% interval lies inside ``(-delta, delta)``; ``p = max`` of the two one-sided p-values.
  A non-significant difference is never read as a match.
* **Multiplicity**: Holm's step-down correction over every test of a report (family-wise error 5%).

Tests on constructed data: ``tests/test_stats.py``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

ALPHA = 0.05
BOOTSTRAP = 2000
#: The bootstrap's generator seed (fixed: the same results give the same report).
BOOT_SEED = 0


# --- Student's t ------------------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`)."""
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# --- one difference -----------------------------------------------------------------------------------------------
@dataclass
class Difference:
    """``A - B`` on one metric, paired by seed (and by item when items are given).

    Attributes:
        diff: the mean difference over seeds (and items).
        seed_diffs: the per-seed differences.
        ci95, ci90: the decision intervals (the union of the seed-t and the bootstrap intervals).
        p: two-sided p-value of ``diff = 0`` (the larger of the two methods').
        p_less, p_greater: one-sided p-values of ``diff >= -delta`` and ``diff <= delta`` (TOST), with ``delta``.
        delta: the equivalence margin, if one was given.
        seeds, items: how many seeds and items the difference rests on.
    """

    diff: float
    seed_diffs: list[float]
    ci95: tuple[float, float]
    ci90: tuple[float, float]
    p: float
    seeds: int
    items: int | None
    delta: float | None = None
    p_tost: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _t_interval(d: Sequence[float], level: float) -> tuple[float, float]:
    k = len(d)
    m = statistics.fmean(d)
    if k < 2:
        return (-math.inf, math.inf)
    se = statistics.stdev(d) / math.sqrt(k)
    q = t_quantile(1 - (1 - level) / 2, k - 1)
    return (m - q * se, m + q * se)


def t_test(d: Sequence[float], shift: float = 0.0, side: str = "two") -> float:
    """p-value of the mean of ``d`` against ``shift``: ``two``-sided, or one-sided that it is ``greater``/``less``."""
    k = len(d)
    if k < 2:
        return 1.0
    m, sd = statistics.fmean(d), statistics.stdev(d)
    if sd == 0:
        stat = math.inf if m > shift else -math.inf if m < shift else 0.0
    else:
        stat = (m - shift) / (sd / math.sqrt(k))
    if side == "greater":  # H1: mean > shift
        return 1.0 - t_cdf(stat, k - 1) if not math.isinf(stat) else (0.0 if stat > 0 else 1.0)
    if side == "less":
        return t_cdf(stat, k - 1) if not math.isinf(stat) else (0.0 if stat < 0 else 1.0)
    if stat == 0:
        return 1.0
    return min(1.0, 2 * (1.0 - t_cdf(abs(stat), k - 1))) if not math.isinf(stat) else 0.0


def _bootstrap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n: int, seed: int) -> list[float]:
    """Mean differences of ``n`` paired hierarchical resamples (seeds, then items) of ``a - b``, sorted."""
    import numpy as np

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)  # (k, m)
    k, m = d.shape
    rng = np.random.Generator(np.random.PCG64(seed))
    seeds = rng.integers(0, k, size=(n, k))  # (n, k): which seed each resampled seed is
    items = rng.integers(0, m, size=(n, k, m))  # (n, k, m): the items drawn within it
    means = d[seeds[:, :, None], items].mean(axis=(1, 2))  # (n,)
    return sorted(means.tolist())


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _boot_p(boot: Sequence[float], shift: float = 0.0, side: str = "two") -> float:
    """Bootstrap p-value of the centred statistic: the share of resamples beyond ``shift`` the wrong way."""
    n = len(boot)
    below = (sum(v <= shift for v in boot) + 1) / (n + 1)
    above = (sum(v >= shift for v in boot) + 1) / (n + 1)
    if side == "greater":
        return below
    if side == "less":
        return above
    return min(1.0, 2 * min(below, above))


def paired_difference(a: Sequence[float] | Sequence[Sequence[float]], b: Sequence[float] | Sequence[Sequence[float]],
                      *, delta: float | None = None, higher_better: bool = True, n_boot: int = BOOTSTRAP,
                      seed: int = BOOT_SEED) -> Difference:
    """``A - B`` with its intervals and tests (see the module docstring).

    Args:
        a, b: per-seed values (``[seed]``), or per-seed per-item values (``[seed][item]``), in the same seed and
            item order (the pairing).
        delta: the equivalence margin (the TOST p-value is computed when given).
        higher_better: only documents the metric's direction; the difference is always ``A - B``.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need the same seeds on both sides ({len(a)} vs {len(b)})")
    itemized = isinstance(a[0], Sequence)
    if itemized:
        if any(len(x) != len(y) or not x for x, y in zip(a, b, strict=True)):  # type: ignore[arg-type]
            raise ValueError("paired items need the same items on both sides")
        seed_d = [statistics.fmean(x) - statistics.fmean(y) for x, y in zip(a, b, strict=True)]  # type: ignore[arg-type]
    else:
        seed_d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]  # type: ignore[arg-type]
    diff = statistics.fmean(seed_d)
    t95, t90 = _t_interval(seed_d, 0.95), _t_interval(seed_d, 0.90)
    p = t_test(seed_d)
    boot = _bootstrap(a, b, n_boot, seed) if itemized else None  # type: ignore[arg-type]
    if boot is not None:
        b95 = (_quantile(boot, 0.025), _quantile(boot, 0.975))
        b90 = (_quantile(boot, 0.05), _quantile(boot, 0.95))
        t95 = (min(t95[0], b95[0]), max(t95[1], b95[1]))
        t90 = (min(t90[0], b90[0]), max(t90[1], b90[1]))
        p = max(p, _boot_p(boot))
    out = Difference(diff, seed_d, t95, t90, p, len(seed_d), len(a[0]) if itemized else None)  # type: ignore[arg-type]
    if delta is not None:
        out.delta = delta
        # H0: diff <= -delta (rejected when diff is clearly above -delta), and H0: diff >= delta
        p_lo, p_hi = t_test(seed_d, -delta, "greater"), t_test(seed_d, delta, "less")
        if boot is not None:
            p_lo, p_hi = max(p_lo, _boot_p(boot, -delta, "greater")), max(p_hi, _boot_p(boot, delta, "less"))
        out.p_tost = max(p_lo, p_hi)
    return out


# --- many tests ---------------------------------------------------------------------------------------------------
def holm(pvalues: dict[str, float], alpha: float = ALPHA) -> dict[str, bool]:
    """Holm's step-down procedure: ``{test: rejected}`` with family-wise error ``alpha`` over all the tests."""
    order = sorted(pvalues, key=lambda k: (pvalues[k], k))
    m = len(order)
    out = {k: False for k in pvalues}
    for i, key in enumerate(order):
        if pvalues[key] <= alpha / (m - i):
            out[key] = True
        else:
            break
    return out


def holm_adjusted(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (``min(1, max over earlier of (m - i) p_(i))``): reject where ``<= alpha``."""
    order = sorted(pvalues, key=lambda k: (pvalues[k], k))
    m, running, out = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[key]))
        out[key] = running
    return out


__all__ = ["ALPHA", "Difference", "holm", "holm_adjusted", "paired_difference", "t_cdf", "t_quantile", "t_test"]
