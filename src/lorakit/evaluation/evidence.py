"""What a comparison's ``results.json`` shows, as numbers the claims can use: per-label summaries, and paired
differences between two labels at each budget, decided together under Holm's correction.

The quality rules (fixed here, before any run; the report prints them):

* **Metrics.** When the comparison measured the choice set (``compare.choice``): the multiple-choice accuracy
  (higher is better) and the right answer's loss per token (lower is better), per item, at each budget. Otherwise
  the final exact-match accuracy and eval loss, per seed. Both kinds are paired by seed (the same seed gives every
  method the same batches) and by item (:func:`lorakit.evaluation.stats.paired_difference`).
* **"A beats B"**: supported when a metric is better with a significant difference (Holm-corrected, 5% family-wise
  over every test of the report) and none is significantly worse.
* **"A matches B"**: supported when every metric is equivalent within its margin (``compare.margins``: TOST,
  Holm-corrected). A difference that is not significant is not a match.
* **A gap against the claim** (a significant difference the wrong way; for "matches", worse by more than the
  margin) gives "refuted" only when it held across budgets (significant the wrong way at the last two budgets, and
  no more than 20% smaller at the last than at the one before) and the setting matches the paper's (the model at
  most :data:`SCALE_GAP` x smaller than the paper's smallest for the same kind of task). A gap that shrinks is "not
  reproduced at this budget"; one on a much smaller model "not reproduced in this setting".
* With fewer than two seeds no quality verdict is given.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.evaluation.stats import ALPHA, Difference, holm, paired_difference, t_test

#: The quality rules in one paragraph, as the report prints them.
RULES = ("quality is the choice accuracy (higher is better) and the choice-set loss (lower is better) per held-out "
         "item when measured, else the final accuracy and eval loss per seed; every difference A - B is paired by "
         "seed and item (paired t over seeds; hierarchical bootstrap over seeds and items; the wider interval and the "
         "larger p-value decide). \"Beats\": a metric significantly better and none significantly worse. "
         "\"Matches\": every metric equivalent within its margin by TOST (90% interval inside ±margin); a "
         "non-significant difference is not a match. Every test of the report is Holm-corrected (5% family-wise). A "
         "gap against a claim is \"refuted\" only when it held across budgets (significant at the last two, no more "
         "than 20% smaller at the last) on a model at most 10x smaller than the paper's for this kind of task; "
         "otherwise \"not reproduced at this budget\" or \"not reproduced in this setting\". With one seed no quality "
         "verdict is given.")

#: Logged training losses averaged for "final train loss", and the smoothing window of the LoRA+ check.
TAIL = 10
#: A model this many times smaller than the paper's smallest turns "refuted" into "not reproduced in this setting".
SCALE_GAP = 10
#: A gap against a claim "held" when the last budget's is at least this share of the budget before's.
HELD = 0.8
UNMEASURED = ("inconclusive (one seed per method: the seed-to-seed spread is unmeasured; run compare.seeds "
              "with 3 or more)")


# --- summaries ----------------------------------------------------------------------------------------------------
def stat(values: Sequence[float]) -> dict[str, Any] | None:
    vals = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


def final_train_loss(run: dict[str, Any]) -> float | None:
    """Mean of the last :data:`TAIL` logged training losses (one step's loss is one batch's noise)."""
    losses = [loss for _, loss in run.get("train_loss") or []]
    return statistics.fmean(losses[-TAIL:]) if losses else None


def _last_budget(run: dict[str, Any]) -> dict[str, Any]:
    budgets = run.get("budgets") or []
    return budgets[-1] if budgets else {}


def _last_with(run: dict[str, Any], key: str) -> Any:
    for b in reversed(run.get("budgets") or []):
        if b.get(key) is not None:
            return b[key]
    return None


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
        "choice_loss": _last_budget(run).get("choice_loss"),
        "choice_accuracy": _last_with(run, "choice_accuracy"),
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
            entry[key] = stat([m[key] for m in per_run if m[key] is not None])
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


def model_params(results: dict[str, Any]) -> int | None:
    """The compared model's parameter count (the largest ``total_params`` a run reported)."""
    counts = [r.get("total_params") for r in results.get("runs", []) if r.get("total_params")]
    return max(counts) if counts else None


def in_setting(verdict: str, results: dict[str, Any], paper_params: float, paper: str) -> str:
    """``verdict``, except that "refuted" on a model :data:`SCALE_GAP` x smaller than ``paper_params`` (the
    smallest model the claim was shown on, for this kind of task) becomes "not reproduced in this setting"."""
    n = model_params(results)
    if verdict != "refuted" or not n or n * SCALE_GAP > paper_params:
        return verdict
    return (f"not reproduced in this setting (a {n / 1e6:.1f}M-parameter model; the claim was shown on "
            f"{paper}, {paper_params / 1e6:,.0f}M and larger)")


def combine(verdicts: Sequence[str]) -> str:
    """All supported -> supported; any refuted -> refuted; else the first other verdict."""
    if any(v == "refuted" for v in verdicts):
        return "refuted"
    if all(v == "supported" for v in verdicts):
        return "supported"
    return next(v for v in verdicts if v != "supported")


# --- paired evidence --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """A quality metric: its name in the report, its direction, and the margin key of its equivalence test."""

    key: str
    name: str
    higher_better: bool
    margin: str  # "loss" | "accuracy"


ITEM_METRICS = (Metric("choice_correct", "choice accuracy", True, "accuracy"),
                Metric("item_loss", "choice-set loss", False, "loss"))
RUN_METRICS = (Metric("accuracy", "accuracy", True, "accuracy"), Metric("eval_loss", "eval loss", False, "loss"))


class Evidence:
    """Paired differences between labels at each budget, and the report's family of tests.

    Claims are evaluated twice (:func:`lorakit.evaluation.claims.evaluate_claims`): the first pass registers every
    test the verdicts rest on (at the last budget), Holm's correction then decides them together, and the second
    pass reads the decisions.
    """

    def __init__(self, results: dict[str, Any]) -> None:
        self.results = results
        margins = (results.get("compare") or {}).get("margins") or {}
        self.margins = {"loss": float(margins.get("loss", 0.03)), "accuracy": float(margins.get("accuracy", 0.03))}
        self.tests: dict[str, float] = {}
        self.rejected: dict[str, bool] | None = None
        self._cache: dict[tuple[Any, ...], Difference | None] = {}

    # what was measured
    def runs(self, label: str) -> dict[int, dict[str, Any]]:
        return {int(r["seed"]): r for r in self.results.get("runs", []) if r["label"] == label and r.get("ok")}

    def steps(self) -> list[int]:
        """The budgets every run measured (the learning curve), or ``[]``."""
        budgets = (self.results.get("compare") or {}).get("budgets")
        return list(budgets) if budgets else []

    def metrics(self) -> tuple[Metric, ...]:
        runs = [r for r in self.results.get("runs", []) if r.get("ok")]
        return ITEM_METRICS if runs and all(r.get("budgets") for r in runs) else RUN_METRICS

    def _values(self, run: dict[str, Any], metric: Metric, step: int | None) -> Any:
        if metric in ITEM_METRICS:
            b = next((b for b in run.get("budgets") or [] if b["step"] == step), None)
            return None if b is None else b.get(metric.key)
        return run.get(metric.key)

    def diff(self, a: str, b: str, metric: Metric, step: int | None = None) -> Difference | None:
        """``a - b`` on ``metric`` at budget ``step`` (default: the last), paired over the seeds both have."""
        step = step if step is not None else (self.steps()[-1] if self.steps() else None)
        key = (a, b, metric.key, step)
        if key not in self._cache:
            ra, rb = self.runs(a), self.runs(b)
            seeds = sorted(set(ra) & set(rb))
            va = [self._values(ra[s], metric, step) for s in seeds]
            vb = [self._values(rb[s], metric, step) for s in seeds]
            ok = len(seeds) >= 2 and all(v is not None for v in va + vb)
            self._cache[key] = paired_difference(va, vb, delta=self.margins[metric.margin]) if ok else None
        return self._cache[key]

    def seeds(self, a: str, b: str) -> int:
        return len(set(self.runs(a)) & set(self.runs(b)))

    # the family of tests
    def register(self, test: str, p: float | None) -> None:
        if p is not None and self.rejected is None:
            self.tests[test] = p

    def decide(self) -> None:
        self.rejected = holm(self.tests)

    def significant(self, test: str, p: float | None) -> bool:
        """Whether ``test`` is significant: Holm's decision once made, the unadjusted ``p <= 0.05`` before."""
        if p is None:
            return False
        return self.rejected.get(test, False) if self.rejected is not None else p <= ALPHA


def _fmt_metric(metric: Metric, v: float) -> str:
    return f"{100 * v:+.1f} points" if metric.margin == "accuracy" else f"{v:+.4f}"


def _interval(metric: Metric, ci: tuple[float, float]) -> str:
    scale = 100 if metric.margin == "accuracy" else 1
    fmt = "{:+.1f}" if metric.margin == "accuracy" else "{:+.4f}"
    return f"[{fmt.format(scale * ci[0])}, {fmt.format(scale * ci[1])}]"


def quality(ev: Evidence, a: str, b: str, *, kind: str, paper_params: float, paper: str) -> tuple[str, list[str]]:
    """``(verdict, numbers)`` of "``a`` beats ``b``" (``kind="beats"``) or "``a`` matches ``b``" under the rules of
    the module docstring."""
    if ev.seeds(a, b) < 2:
        return UNMEASURED, [f"{a} vs {b}: fewer than two common seeds"]
    lines, better, worse, equivalent, usable = [], [], [], [], []
    steps = ev.steps()
    for m in ev.metrics():
        d = ev.diff(a, b, m)
        if d is None:
            continue
        usable.append(m)
        sign = 1 if m.higher_better else -1  # sign * diff > 0: a is better
        delta = ev.margins[m.margin]
        if kind == "beats":
            test = f"{a} vs {b}: {m.name} differs"
            ev.register(test, d.p)
            sig = ev.significant(test, d.p)
            if sig:
                (better if sign * d.diff > 0 else worse).append(m)
            what = f"p {d.p:.3g}" + (" (significant after Holm)" if sig else "")
            if sig and -delta < d.ci95[0] and d.ci95[1] < delta:
                what += (f"; negligible: the whole 95% interval lies inside ±{_delta(m, delta)}, the margin declared "
                         "as no practical difference (an annotation added after the first one-epoch runs; the "
                         "verdict follows the rule above)")
        else:
            test_eq, test_bad = f"{a} ~ {b}: {m.name} within ±{_delta(m, delta)}", f"{a} < {b}: {m.name} beyond margin"
            p_bad = _p_beyond(d, sign, delta)
            ev.register(test_eq, d.p_tost)
            ev.register(test_bad, p_bad)
            if ev.significant(test_eq, d.p_tost):
                equivalent.append(m)
            if ev.significant(test_bad, p_bad):
                worse.append(m)
            what = f"TOST p {d.p_tost:.3g}" + (" (equivalent after Holm)" if m in equivalent else "") \
                + (f"; worse beyond the margin, p {p_bad:.3g}" if m in worse else "")
        lines.append(f"{m.name}: {a} - {b} = {_fmt_metric(m, d.diff)}, 95% {_interval(m, d.ci95)}, 90% "
                     f"{_interval(m, d.ci90)} over {d.seeds} seeds" + (f" x {d.items} items" if d.items else "")
                     + f"; {what}")
        if len(steps) > 1:
            lines.append(f"  {m.name} by budget (steps): " + ", ".join(
                f"{s}: {_fmt_metric(m, x.diff)}" for s in steps if (x := ev.diff(a, b, m, s)) is not None))
    if not usable:
        return "inconclusive (no usable numbers)", lines
    if worse:
        return _gap(ev, a, b, worse, kind, paper_params, paper), lines
    if kind == "beats":
        return ("supported" if better else "inconclusive (no significant difference)"), lines
    if len(equivalent) == len(usable):
        return "supported", lines
    return "inconclusive (neither equivalence within the margins nor a difference beyond them shown)", lines


def _delta(m: Metric, delta: float) -> str:
    return f"{100 * delta:.0f} points" if m.margin == "accuracy" else f"{delta:g} nats"


def _p_beyond(d: Difference, sign: int, delta: float) -> float:
    """One-sided p that ``a`` is worse than ``b`` by more than ``delta`` (the bad side of the equivalence test)."""
    bad = [-sign * x for x in d.seed_diffs]  # how much worse a is, per seed
    return t_test(bad, delta, "greater")


def _gap(ev: Evidence, a: str, b: str, worse: list[Metric], kind: str, paper_params: float, paper: str) -> str:
    """"refuted", or why not, for a gap against the claim on ``worse``."""
    steps = ev.steps()
    if len(steps) >= 2:
        for m in worse:
            last, prev = ev.diff(a, b, m, steps[-1]), ev.diff(a, b, m, steps[-2])
            if last is None or prev is None:
                continue
            sign = 1 if m.higher_better else -1
            gap_last, gap_prev = -sign * last.diff, -sign * prev.diff
            held = prev.p <= ALPHA and gap_prev > 0 and gap_last >= HELD * gap_prev
            if not held:
                return (f"not reproduced at this budget ({m.name}: the gap was {_fmt_metric(m, -sign * gap_prev)} at "
                        f"{steps[-2]} steps and {_fmt_metric(m, -sign * gap_last)} at {steps[-1]}: not held across "
                        "budgets)")
    return in_setting("refuted", ev.results, paper_params, paper)


__all__ = ["RULES", "Evidence", "ITEM_METRICS", "Metric", "RUN_METRICS", "SCALE_GAP", "TAIL", "UNMEASURED", "combine",
           "final_train_loss", "in_setting", "mean_curve", "model_params", "quality", "run_metrics", "smooth",
           "stat", "summarize"]
