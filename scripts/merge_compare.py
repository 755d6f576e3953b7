"""Merge the results of one comparison run in parts (disjoint ``--methods`` lists, e.g. on two machines or as two
processes) into one ``results.json`` and report.

    .venv/bin/python scripts/merge_compare.py --out reports/smollm2-text/lr-sweep /tmp/sweep/a /tmp/sweep/b

Only results.json and the report are written (the parts' runs/ folders, with their adapters, stay where they are).
The parts must share model, data, training section and seeds (checked); labels keep the parts' order; the base
model's numbers come from the first part (each part evaluates the same base with the same seed). The merged
``command`` lists every part's command, and ``note`` says it was merged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lorakit.evaluation.compare import RESULTS_FILE
from lorakit.evaluation.report import write_report
from lorakit.util.files import write_json

SHARED = ("model", "data", "training", "seeds")


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    first = parts[0]
    for p in parts[1:]:
        for key in SHARED:
            if p.get(key) != first.get(key):
                raise SystemExit(f"parts differ in {key!r}: {p.get(key)!r} vs {first.get(key)!r}")
    labels = [lab for p in parts for lab in p["labels"]]
    if len(set(labels)) != len(labels):
        raise SystemExit("a label occurs in more than one part")
    out = {**first, "labels": labels, "methods": {k: v for p in parts for k, v in p["methods"].items()},
           "runs": [r for p in parts for r in p["runs"]],
           "command": " ; ".join(str(p.get("command")) for p in parts),
           "note": f"merged from {len(parts)} parts run at the same time (scripts/merge_compare.py); same config, "
                   "disjoint methods"}
    out.pop("claims", None)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("parts", nargs="+", help="output directories of the parts")
    a = ap.parse_args(argv)
    parts = [json.loads((Path(d) / RESULTS_FILE).read_text()) for d in a.parts]
    merged = merge(parts)
    out = Path(a.out)
    write_json(out / RESULTS_FILE, merged, indent=1, allow_nan=False)
    files = write_report(merged, out)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
