"""Merge the results of one comparison run in parts (disjoint ``--methods`` lists, e.g. on two machines or as two
processes) into one ``results.json`` and report.

    .venv/bin/python scripts/merge_compare.py --config configs/lr-sweep-smollm2-text.yaml \
        --out reports/smollm2-text/lr-sweep /tmp/sweep/a /tmp/sweep/b /tmp/sweep/c

Only results.json and the report are written (the parts' runs/ folders, with their adapters, stay where they are).
The parts must share model, data and training section (checked), and their seeds are pooled; a label may be split
over parts by seed (``--methods lora --seeds 0,1`` in one, ``--seeds 2`` in another: the same method, disjoint
seeds; checked), so a long comparison can stop between any two runs and go on elsewhere; labels keep the parts'
order; the base model's numbers come from the first part (each part evaluates the same base with the same seed).
The merged ``command`` lists every part's command, and ``note`` says it was merged. A part may be a comparison
stopped before it ran every label (its results.json is rewritten after each run): the labels it never ran are left
out, and the note names the planned labels no part ran and those run for some seeds only (a single such part can be
"merged" alone, to give the report of what it finished). A part may itself be a merge (a report grown part by
part): it is flattened, so the note counts every run merged and never nests an earlier note.

A part may also be an earlier full comparison some of whose labels were rerun (new learning rates): ``--drop
vera,rank1-sum`` removes those labels from every part but the first, so the rerun replaces them; ``--lr-sweep``
attaches the learning-rate sweep the merged rates came from (as ``compare.lr_sweep`` does for one run).

    .venv/bin/python scripts/merge_compare.py --config configs/compare-smollm2-text.yaml \
        --lr-sweep reports/smollm2-text/lr-sweep/results.json --drop vera,rank1-sum \
        --out reports/smollm2-text /tmp/rerun reports/smollm2-text
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lorakit.evaluation.compare import RESULTS_FILE, sweep_summary
from lorakit.evaluation.compare_config import load_compare_config
from lorakit.evaluation.report import display_path, missing_runs, write_report
from lorakit.train.config import DataConfig, TrainingConfig
from lorakit.util.files import write_json

SHARED = ("model", "data", "training")
RERUN = "rerun in the first part, replacing the later parts' runs"  # the note's words for --drop, kept by later merges


def drop(part: dict[str, Any], labels: set[str]) -> dict[str, Any]:
    """``part`` without ``labels`` (their runs and method entries)."""
    return {**part, "labels": [lab for lab in part["labels"] if lab not in labels],
            "methods": {k: v for k, v in part["methods"].items() if k not in labels},
            "runs": [r for r in part["runs"] if r["label"] not in labels]}


def _same(a: Any, b: Any, section: str) -> bool:
    """Equal, where a key only one side has is at its default there: an option added to lorakit after one part ran
    (the defaults of lorakit's ``data`` and ``training`` sections)."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return a == b
    fields = {"data": DataConfig, "training": TrainingConfig}.get(section)
    defaults = {k: f.default for k, f in fields.model_fields.items()} if fields else {}
    missing = object()
    for k in a.keys() | b.keys():
        x, y = a.get(k, missing), b.get(k, missing)
        x = defaults.get(k) if x is missing else x
        y = defaults.get(k) if y is missing else y
        if x != y:
            return False
    return True


def unfinished(part: dict[str, Any]) -> dict[str, Any]:
    """``part`` without the labels it never ran (a comparison stopped before their turn: its results.json, rewritten
    after each run, lists every label)."""
    return drop(part, {lab for lab, m in missing_runs(part).items() if len(m) == len(part["seeds"])})


def _count(part: dict[str, Any]) -> int:
    """How many comparison runs ``part`` holds: 1, or the parts it was itself merged from."""
    if not str(part.get("note") or "").startswith("merged from"):
        return 1
    return int(part.get("merged_parts") or len(str(part.get("command")).split(" ; ")))


def merge(parts: list[dict[str, Any]], order: list[str] | None = None,
          seeds: list[int] | None = None) -> dict[str, Any]:
    """One comparison from ``parts``. A part that was itself merged is flattened: the note counts the runs it came
    from and says, for the merged result as a whole, which labels ran for some seeds only and which planned labels
    (``order``, else every part's labels) no part ran: never a note nested inside a note. The seeds are the parts'
    pooled with the planned ``seeds`` (the config's)."""
    planned = list(order) if order else list(dict.fromkeys(lab for p in parts for lab in p["labels"]))
    parts = [unfinished(p) for p in parts]
    first = parts[0]
    for p in parts[1:]:
        for key in SHARED:
            if not _same(p.get(key), first.get(key), key):
                raise SystemExit(f"parts differ in {key!r}: {p.get(key)!r} vs {first.get(key)!r}")
    runs = [(r["label"], r["seed"]) for p in parts for r in p["runs"]]
    if len(set(runs)) != len(runs):
        raise SystemExit("a label occurs in more than one part with the same seed")
    labels = list(dict.fromkeys(lab for p in parts for lab in p["labels"]))
    for lab in labels:  # a label split over parts by seed must be the same method in each
        if len({json.dumps(p["methods"][lab], sort_keys=True) for p in parts if lab in p["methods"]}) > 1:
            raise SystemExit(f"{lab!r} is configured differently in two parts")
    if order:  # the config's order; labels it does not list go last
        labels.sort(key=lambda lab: order.index(lab) if lab in order else len(order))
    count = sum(_count(p) for p in parts)
    seeds = sorted({s for p in parts for s in p["seeds"]} | set(seeds or []))
    out = {**first, "labels": labels, "seeds": seeds, "compare": {**first.get("compare", {}), "seeds": seeds},
           "methods": {k: v for p in parts for k, v in p["methods"].items()},
           "runs": sorted((r for p in parts for r in p["runs"]), key=lambda r: (r["seed"], labels.index(r["label"]))),
           "command": " ; ".join(str(p.get("command")) for p in parts), "merged_parts": count,
           "note": f"merged from {count} parts (scripts/merge_compare.py): the same model, data and training "
                   "section, disjoint runs"}
    partial = [f"{lab} ran for seeds {sorted(set(out['seeds']) - set(m))} only" for lab, m in missing_runs(out).items()]
    never = [lab for lab in planned if lab not in labels]
    reruns = [n for p in parts for n in str(p.get("note") or "").split("; ") if n.endswith(RERUN)]
    out["note"] += "".join(f"; {n}" for n in ([f"not run: {', '.join(never)}"] if never else []) + partial + reruns)
    out.pop("claims", None)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", help="the compare config: labels in the order of its methods section")
    ap.add_argument("--drop", default="", help="labels removed from every part but the first (rerun there)")
    ap.add_argument("--lr-sweep", help="the results.json of the learning-rate sweep the rates came from")
    ap.add_argument("parts", nargs="+", help="output directories of the parts")
    a = ap.parse_args(argv)
    parts = [json.loads((Path(d) / RESULTS_FILE).read_text()) for d in a.parts]
    dropped = {lab for lab in a.drop.split(",") if lab}
    parts = parts[:1] + [drop(p, dropped) for p in parts[1:]]
    config = load_compare_config(a.config) if a.config else None
    merged = merge(parts, list(config.methods) if config else None, list(config.compare.seeds) if config else None)
    choice = merged["compare"].get("choice")
    if choice and choice.get("data"):  # parts written before reports kept package-relative paths
        merged["compare"] = {**merged["compare"], "choice": {**choice, "data": display_path(choice["data"])}}
    if dropped:
        merged["note"] += f"; {', '.join(sorted(dropped))} {RERUN}"
    if a.lr_sweep:
        merged["lr_sweep"] = sweep_summary(a.lr_sweep)
        merged["compare"] = {**merged["compare"], "lr_sweep": merged["lr_sweep"]["path"]}
    out = Path(a.out)
    write_json(out / RESULTS_FILE, merged, indent=1, allow_nan=False)
    files = write_report(merged, out)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
