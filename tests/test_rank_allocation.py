"""The dynamic-rank allocation experiment runs end to end (tiny: 2 versions x 1 seed x 6 steps) and its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.filterwarnings("ignore")
def test_experiment_runs_and_reports(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("rank_allocation_script",
                                                  Path(__file__).parent.parent / "scripts" / "rank_allocation.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "ra"
    assert script.main(["--out", str(out), "--seeds", "0", "--steps", "6", "--length", "16"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["rank"], r["seed"]) for r in res["runs"]] == [(1, 0), (6, 0)]
    for r in res["runs"]:
        assert r["kl_before"] > 0 and r["budget"] == 2 * len(r["ranks"]) == 56  # target_rank 2 x 28 linears
        assert r["relevant_rank"] == sum(r["ranks"][m] for m in res["settings"]["relevant"])
    fixed = res["fixed_rank_runs"]
    assert [(r["rank"], r["seed"], r["method"], r["r"]) for r in fixed] == [(6, 0, "lora", 2)]
    # the same rank budget (2 x 28 linears); the parameters differ with where rank1-sum put its rank
    assert res["fixed_rank"]["lora_params"] > 0 and res["fixed_rank"]["rank1_sum_params"] > 0
    assert res["claim_fixed_rank"]["verdict"].startswith("inconclusive (one seed")
    assert res["claim"]["id"] == "rank-allocation"
    assert res["claim"]["verdict"].startswith("inconclusive (one seed")  # one seed per version: no spread
    assert "## Final rank per linear" in (out / "report.md").read_text()
