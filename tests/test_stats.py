"""The comparison's statistics on constructed data whose answers are known."""

from __future__ import annotations

import math
import random

import pytest

from lorakit.evaluation.stats import holm, holm_adjusted, paired_difference, t_cdf, t_quantile


def test_student_t_against_tabulated_values() -> None:
    assert t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert t_quantile(0.95, 2) == pytest.approx(2.920, abs=1e-3)
    assert t_cdf(2.0, 5) == pytest.approx(0.94903, abs=1e-5)
    assert t_cdf(0.0, 3) == pytest.approx(0.5) and t_cdf(-1.0, 10) == pytest.approx(1 - t_cdf(1.0, 10))


def _items(seed: int, shift: float, noise: float, seeds: int = 3, items: int = 500) -> tuple[list, list]:
    """``a`` and ``b``: the same items and seeds, ``a`` better by ``shift`` plus noise per item."""
    r = random.Random(seed)
    b = [[r.gauss(2.0, 0.5) for _ in range(items)] for _ in range(seeds)]
    a = [[x + shift + r.gauss(0.0, noise) for x in row] for row in b]
    return a, b


def test_an_equivalence_that_holds() -> None:
    a, b = _items(0, shift=0.002, noise=0.02)
    d = paired_difference(a, b, delta=0.02)
    assert d.ci90[0] > -0.02 and d.ci90[1] < 0.02 and d.p_tost < 0.05
    assert d.p > 0.05  # and no difference shown either


def test_an_equivalence_that_does_not_hold_although_nothing_is_significant() -> None:
    """A noisy comparison: no significant difference, and no equivalence either (absence of evidence)."""
    a, b = _items(1, shift=0.01, noise=0.6)
    d = paired_difference(a, b, delta=0.02)
    assert d.p > 0.05 and d.p_tost > 0.05
    assert d.ci90[0] < -0.02 or d.ci90[1] > 0.02


def test_a_real_difference_is_significant_and_not_equivalent() -> None:
    a, b = _items(2, shift=0.08, noise=0.05)
    d = paired_difference(a, b, delta=0.02)
    assert d.diff == pytest.approx(0.08, abs=0.01) and d.p < 0.05 and d.ci95[0] > 0
    assert d.p_tost > 0.5


def test_seed_only_pairs_use_the_paired_t() -> None:
    """Per-seed values only: the paired t of the differences (the unpaired spread would hide it)."""
    b = [2.90, 2.95, 3.00]
    a = [2.93, 2.984, 3.023]  # +0.030, +0.034, +0.023: consistent, as VeRA vs LoRA was
    d = paired_difference(a, b)
    assert d.seed_diffs == pytest.approx([0.03, 0.034, 0.023])
    assert d.p == pytest.approx(0.014, abs=0.003) and d.items is None
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [1.0])


def test_the_bootstrap_is_reproducible() -> None:
    a, b = _items(3, shift=0.01, noise=0.1)
    assert paired_difference(a, b, delta=0.05) == paired_difference(a, b, delta=0.05)


def test_holm_rejects_step_down() -> None:
    p = {"t1": 0.001, "t2": 0.011, "t3": 0.03, "t4": 0.04}
    # thresholds 0.05/4, 0.05/3, 0.05/2, 0.05: t1 and t2 pass, t3 (0.03 > 0.025) stops the procedure, so t4 is not
    # rejected although 0.04 < 0.05
    assert holm(p) == {"t1": True, "t2": True, "t3": False, "t4": False}
    adj = holm_adjusted(p)
    assert adj["t1"] == pytest.approx(0.004) and adj["t2"] == pytest.approx(0.033)
    assert adj["t3"] == pytest.approx(0.06) and adj["t4"] == pytest.approx(0.06)
    assert holm({"only": 0.049}) == {"only": True}
    assert not any(holm({f"t{i}": 0.02 for i in range(5)}).values())  # five at 0.02: none survives
    assert all(math.isfinite(v) for v in adj.values())
