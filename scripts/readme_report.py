"""Regenerate the README's comparison section from a comparison's ``results.json``: nothing is quoted by hand.

    .venv/bin/python scripts/readme_report.py reports/smollm2-text/results.json        # rewrites README.md in place

The section lies between ``<!-- report:begin -->`` and ``<!-- report:end -->``: a table of every method (mean ±
standard deviation over seeds at the last budget) and one line per claim with its verdict, from the report's own
summary and claims (``lorakit compare`` wrote them into results.json). ``--marker report-epoch`` writes another
comparison into its own section, between ``<!-- report-epoch:begin -->`` and ``<!-- report-epoch:end -->``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from lorakit.evaluation.report import plateau_note


def markers(name: str = "report") -> tuple[str, str]:
    """The comments that open and close the README section ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


COLUMNS = [("trainable_params", "trainable", "{:,.0f}"), ("choice_loss", "choice-set loss", "{:.3f}"),
           ("choice_accuracy", "choice accuracy", "{:.3f}"), ("eval_loss", "eval loss", "{:.3f}"),
           ("forgetting", "forgetting (nats)", "{:+.3f}"), ("step_time_s", "step (s)", "{:.2f}")]


def _cell(stat: dict[str, Any] | None, fmt: str) -> str:
    if not stat:
        return "–"
    one = fmt.format(stat["mean"])
    if stat["n"] > 1 and stat["std"] > 0 and "," not in fmt:
        return f"{one} ± {fmt.replace('+', '').format(stat['std'])}"
    return one


def section(results: dict[str, Any], path: str) -> str:
    summary, claims = results["summary"], results["claims"]
    cols = [c for c in COLUMNS if any((summary[lab].get(c[0]) or {}).get("n") for lab in results["labels"])]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for lab in results["labels"]:
        lines.append(f"| {lab} | " + " | ".join(_cell(summary[lab].get(k), f) for k, _, f in cols) + " |")
    base = results.get("base") or {}
    b0 = (base.get("budgets") or [{}])[0]
    vals = {"trainable_params": 0, "choice_loss": b0.get("choice_loss"), "choice_accuracy": b0.get("choice_accuracy"),
            "eval_loss": base.get("eval_loss")}
    lines.append("| base model | " + " | ".join(f.format(vals[k]) if vals.get(k) is not None else ""
                                                 for k, _, f in cols) + " |")
    verdicts = [f"- **{c['claim']}**: {c['verdict']}." for c in claims]
    steps = (results.get("compare") or {}).get("budgets") or []
    return "\n".join([
        f"Mean ± standard deviation over seeds {results.get('seeds')} at {steps[-1] if steps else 'the last'} steps "
        f"(from `{path}`, made by `{results.get('command')}`):", "", *lines, "",
        *([plateau, ""] if (plateau := plateau_note(results)) else []),
        f"Verdicts ({claims[0].get('tests', 0) if claims else 0} tests, Holm-corrected; the rules, every interval "
        f"and the learning curves are in [the report]({Path(path).parent}/report.md)):", "", *verdicts])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results")
    p.add_argument("--readme", default="README.md")
    p.add_argument("--marker", default="report", help="the section's name: <!-- NAME:begin --> ... <!-- NAME:end -->")
    a = p.parse_args(argv)
    results = json.loads(Path(a.results).read_text())
    if "summary" not in results or "claims" not in results:
        print(f"{a.results}: no summary/claims (run `lorakit compare ... --report-only` first)", file=sys.stderr)
        return 1
    begin, end = markers(a.marker)
    readme = Path(a.readme)
    text = readme.read_text()
    if begin not in text or end not in text:
        print(f"{readme}: no {begin} ... {end} section", file=sys.stderr)
        return 1
    new = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda m: f"{begin}\n{section(results, a.results)}\n{end}",
                 text, flags=re.S)
    readme.write_text(new)
    print(f"rewrote the comparison section of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
