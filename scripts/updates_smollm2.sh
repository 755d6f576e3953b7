#!/usr/bin/env bash
# Three updates of one adapter from the command line on the bundled model (configs/update-smollm2.yaml):
# nouns, then verbs, then adjectives of the WordNet task (200 training and the held-out definitions of each part of
# speech). Each update after the first continues the previous adapter, grows rank where the new words are unknown and
# replays 20% of the earlier updates; `lorakit inspect` then shows the lineage, the growth and the retention.
#   bash scripts/updates_smollm2.sh                  (~12 min on 1 core)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p runs/updates
$PY - <<'PY'
import json
from lorakit.util import resources
for part, pos in (("nouns", "noun"), ("verbs", "verb"), ("adjectives", "adjective")):
    for src, suffix, cap in (("definitions_train.jsonl", "", 200), ("definitions_eval.jsonl", "-eval", 30)):
        rows = [r for r in map(json.loads, open(resources.resolve(f"bundled://data/{src}", what="data")))
                if r["pos"] == pos][:cap]
        with open(f"runs/updates/{part}{suffix}.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in rows)
PY
$PY -m lorakit train configs/update-smollm2.yaml --overwrite
prev=runs/updates/v1
for part in verbs adjectives; do
  out=runs/updates/$part
  $PY -m lorakit train configs/update-smollm2.yaml --overwrite adapter.continue_from=$prev adapter.grow=16 \
      data.replay=0.2 data.train=runs/updates/$part.jsonl data.eval=runs/updates/$part-eval.jsonl output.dir=$out
  prev=$out
done
$PY -m lorakit inspect runs/updates/adjectives/adapter
