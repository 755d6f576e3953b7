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

from typing import Any

from lorakit.evaluation.claims.common import t95, welch_margin
from lorakit.evaluation.claims.costs import (
    claim_dynamic_rank,
    claim_latency,
    claim_lora_efficiency,
    claim_lora_fa,
    claim_lr_sensitivity,
    claim_rank_allocation,
    claim_swapping,
    lr_grid,
)
from lorakit.evaluation.claims.quality import (
    claim_delta_lora,
    claim_dora,
    claim_forgetting,
    claim_lora_sb,
    claim_loraplus,
    claim_qlora,
    claim_rank1_sum,
    claim_vera,
    vera_width_for,
)
from lorakit.evaluation.evidence import Evidence, in_setting, summarize


def evaluate_claims(results: dict[str, Any], summary: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every claim's ``{"id", "claim", "source", "rule", "verdict", "numbers"}`` (two passes: register, decide)."""
    s = summary if summary is not None else summarize(results)
    ev = Evidence(results)

    def run() -> list[dict[str, Any]]:
        return [claim_lora_sb(ev, s), claim_loraplus(results, s), claim_vera(ev, s), claim_lora_fa(s),
                claim_forgetting(ev, s), claim_rank1_sum(ev, s), claim_delta_lora(ev, s), claim_dora(ev, s),
                claim_lora_efficiency(results, s), claim_qlora(ev, s), claim_lr_sensitivity(results),
                claim_latency(ev, s), claim_swapping(ev, s), claim_dynamic_rank(ev, s)]

    run()  # registers every test
    ev.decide()
    out = run()
    tests = sorted(ev.tests.items(), key=lambda kv: kv[1])
    for c in out:
        c["tests"] = len(tests)
    return out


__all__ = ["claim_dynamic_rank", "claim_lr_sensitivity", "claim_rank_allocation", "evaluate_claims", "in_setting",
           "lr_grid", "summarize", "t95", "vera_width_for", "welch_margin"]
