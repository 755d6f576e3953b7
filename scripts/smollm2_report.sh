#!/usr/bin/env bash
# The committed SmolLM2 report, every piece, in order (about 22 hours on 2 cores; each step can also run alone):
#   1. the learning-rate sweep (held-out 5% of the training words)            reports/smollm2-text/lr-sweep
#   2. a check that the comparison config uses the sweep's best rates         scripts/pick_lrs.py
#   3. the experiments some claims rest on: latency, swapping, rank allocation
#   4. the comparison (3 seeds, learning curves, paired statistics)           reports/smollm2-text
#   5. the README's comparison section, regenerated from its results.json     scripts/readme_report.py
#   6. the budget probe: LoRA alone, one seed, 960 steps (~55 min), measured at 80..960 steps (where its held-out
#      loss flattens: the budget a longer comparison needs)                    reports/smollm2-text/budget-probe
#   7. the learning-rate sweep at that budget, one epoch (375 steps; ~10 h)   reports/smollm2-text-epoch/lr-sweep
#   8. a check that the one-epoch comparison uses that sweep's best rates     .../lr-sweep/pick_lrs.txt
#   9. the one-epoch comparison (3 seeds, measured at 188 and 375 steps; ~7 h) reports/smollm2-text-epoch
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
$PY -m lorakit compare configs/lr-sweep-smollm2-text.yaml --out reports/smollm2-text/lr-sweep
$PY scripts/pick_lrs.py reports/smollm2-text/lr-sweep/results.json --check configs/compare-smollm2-text.yaml
$PY scripts/latency.py --out reports/smollm2-text/experiments/latency.json
$PY scripts/swapping.py --out reports/smollm2-text/experiments/swapping.json
$PY scripts/rank_allocation.py --out reports/rank-allocation
$PY -m lorakit compare configs/compare-smollm2-text.yaml --out reports/smollm2-text
$PY scripts/readme_report.py reports/smollm2-text/results.json
$PY -m lorakit compare configs/compare-smollm2-text.yaml --methods lora --seeds 0 --out reports/smollm2-text/budget-probe \
    training.max_steps=960 training.warmup_steps=96 "compare.budgets=[80,160,320,480,640,960]" \
    "compare.choice_at=[960]" compare.parallel=1 compare.timeout_s=10800
$PY -m lorakit compare configs/lr-sweep-smollm2-text-epoch.yaml --out reports/smollm2-text-epoch/lr-sweep
$PY scripts/pick_lrs.py reports/smollm2-text-epoch/lr-sweep/results.json \
    --check configs/compare-smollm2-text-epoch.yaml | tee reports/smollm2-text-epoch/lr-sweep/pick_lrs.txt
$PY -m lorakit compare configs/compare-smollm2-text-epoch.yaml --out reports/smollm2-text-epoch
