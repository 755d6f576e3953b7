"""Each method's learning rate from the sweep (its best eval loss on the held-out split of the training words), and
a check that the comparison config uses exactly those: the rates are chosen by a rule, never on the eval data.

    .venv/bin/python scripts/pick_lrs.py reports/smollm2-text/lr-sweep/results.json \
        --check configs/compare-smollm2-text.yaml

A label of the comparison takes the best rate of its sweep family (same method, LoRA+ ratio and quantization);
``DERIVED`` labels take another label's rate times a factor, stated here. Exit status 1 if the config differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from lorakit.evaluation.compare_config import load_compare_config

#: Comparison labels whose rate is another label's times a factor (they share its parametrisation).
DERIVED = {"rank1-sum-adalora": ("rank1-sum", 1.0),  # the same adapter, only the masking differs
           "lora-hot": ("lora", 3.0),  # the forgetting setting: 3x LoRA's best
           "full-hot": ("full", 10.0)}  # and 10x full fine-tuning's: where full fine-tuning forgets


def family(entry: dict[str, Any]) -> str:
    """The comparison label a sweep point belongs to."""
    method = entry.get("method")
    training = entry.get("training") or {}
    if entry.get("quantize"):
        return "qlora"
    if method == "lora" and training.get("loraplus_ratio"):
        return "lora+"
    return str(method)


def best_rates(sweep: dict[str, Any]) -> dict[str, tuple[float, dict[float, float]]]:
    """``{family: (best lr, {lr: eval loss})}`` (a failed or diverged point counts as infinite)."""
    grid: dict[str, dict[float, float]] = {}
    for run in sweep["runs"]:
        entry = sweep["methods"][run["label"]]
        lr = float((entry.get("training") or {}).get("lr", sweep["training"]["lr"]))
        loss = run.get("eval_loss") if run.get("ok") else None
        grid.setdefault(family(entry), {})[lr] = loss if isinstance(loss, int | float) and math.isfinite(loss) \
            else math.inf
    return {f: (min(g, key=lambda k: (g[k], k)), g) for f, g in grid.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep")
    p.add_argument("--check", help="a compare config whose methods' training.lr must be the picked ones")
    a = p.parse_args(argv)
    best = best_rates(json.loads(Path(a.sweep).read_text()))
    for fam, (lr, g) in sorted(best.items()):
        edge = " (at the edge of its grid)" if lr in (min(g), max(g)) else ""
        print(f"{fam:12s} best lr {lr:g}{edge}: " + ", ".join(f"{k:g} -> {v:.4f}" for k, v in sorted(g.items())))
    if not a.check:
        return 0
    cc = load_compare_config(a.check)
    bad = 0
    for label in cc.labels():
        source, factor = DERIVED.get(label, (label, 1.0))
        if source not in best:
            print(f"{label}: no sweep family {source!r}")
            bad += 1
            continue
        want = best[source][0] * factor
        got = cc.run_config(label, 0, Path("/tmp/unused")).training.lr
        ok = math.isclose(got, want, rel_tol=1e-9)
        bad += not ok
        print(f"{label:18s} lr {got:g} {'ok' if ok else f'!= {want:g}'}"
              + (f" ({factor:g} x {source}'s)" if label in DERIVED else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
