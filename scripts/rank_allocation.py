"""The dynamic-rank allocation experiment (lorakit.evaluation.rank_allocation) and its verdict.

    .venv/bin/python scripts/rank_allocation.py --out reports/rank-allocation     (~5 min on 1 CPU thread)

Writes OUT/results.json (every run's final rank per linear, KL before/after) and OUT/report.md (the claim's
rule, verdict and numbers, from lorakit.evaluation.claims.claim_rank_allocation, and the comparison with a uniform
fixed-rank LoRA at the same budget, claim_dynamic_rank).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lorakit.evaluation import rank_allocation as ra
from lorakit.evaluation.claims import claim_dynamic_rank, claim_rank_allocation
from lorakit.evaluation.compare import host_info
from lorakit.evaluation.evidence import Evidence
from lorakit.util.files import write_json, write_text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/rank-allocation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true",
                   help="rewrite report.md (and the verdicts in results.json) from OUT/results.json, running nothing")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    if a.report_only:
        res = json.loads((out / "results.json").read_text())
    else:
        t0 = time.perf_counter()
        res = ra.run(seeds=a.seeds, steps=a.steps, length=a.length, log=lambda m: print(m, flush=True))
        command = "python scripts/rank_allocation.py " + " ".join(argv if argv is not None else sys.argv[1:])
        res.update(command=command.strip(), host=host_info(), wall_s=round(time.perf_counter() - t0, 1))
    claim = claim_rank_allocation(res)
    versus = claim_dynamic_rank(Evidence({"experiments": {"rank_allocation": res}}), {})
    res.update(claim=claim, claim_fixed_rank=versus)
    write_json(out / "results.json", res, indent=1, allow_nan=False)
    st = res["settings"]
    lines = [f"# {claim['claim']}", "", f"Made by `{res['command']}` ({res['wall_s']:.0f} s).", "",
             f"Model `{st['model']}` (its {len(res['runs'][0]['ranks'])} linears adapted), text `{st['text']}` "
             f"in rows of {st['length']} tokens, {st['steps']} steps per run, seeds {st['seeds']}; the teacher "
             f"changes {', '.join(f'`{m}`' for m in st['relevant'])} by rank {st['easy_rank']} or "
             f"{st['hard_rank']} (eps {st['eps']}). Experiment: `lorakit/evaluation/rank_allocation.py`.", "",
             f"**Verdict: {claim['verdict']}**", "", f"Source: {claim['source']}.", "", f"Rule: {claim['rule']}.", "",
             *[f"- {n}" for n in claim["numbers"]], "", "## Final rank per linear", "",
             "| teacher rank | seed | " + " | ".join(m.replace("model.layers.", "") for m in st["relevant"])
             + " | every other linear (mean) | budget |", "|---|---|" + "---|" * (len(st["relevant"]) + 2)]
    for r in res["runs"]:
        lines.append(f"| {r['rank']} | {r['seed']} | " + " | ".join(str(r["ranks"][m]) for m in st["relevant"])
                     + f" | {r['other_mean_rank']:.2f} | {r['budget']} |")
    lines += ["", f"# {versus['claim']}", "", f"**Verdict: {versus['verdict']}**", "", f"Rule: {versus['rule']}.",
              "", *[f"- {n}" for n in versus["numbers"]]]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    print(f"{claim['verdict']}\n{versus['verdict']}\nwrote {out / 'results.json'}, {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
