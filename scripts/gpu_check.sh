#!/usr/bin/env bash
# The first GPU run of lorakit, as ONE device call that ends inside 9 minutes on a cold H200 and writes JSON to
# $OUT as each phase finishes (a cut-off run still returns what it measured):
#   env -> import -> pytest -m cuda -> a 30-step `lorakit train` with the GPU defaults (adapter then loaded on the
#   CPU) -> 20 DPO steps (the reference cached, the per-token log-prob head in bf16 vs fp32) -> `lorakit bench
#   --device cuda --methods lora --compare-peft --quantize nf4,bnb-nf4` on docs/performance.md's workload -> the
#   other methods as time allows -> Unsloth's step in its own process if its bundle was carried.
#
# Here, first (a machine that reaches PyPI):   bash scripts/gpu_wheels.sh          # -> .whl/site.tgz
#   optional, the Unsloth peer:               sh ../shared/anchors/unsloth/unsloth_bundle.sh && \
#                                             mv .whl/site.tgz .whl/unsloth.tgz && bash scripts/gpu_wheels.sh
#                                             (and copy anchor_unsloth_gpu.py into .whl/)
# Then one device call:  run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=570)
# Dry run on a CPU (what `make test` does):    GPU_CHECK_DEVICE=cpu OUT=/tmp/gpu-check bash scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && [ "${GPU_CHECK_DEVICE:-cuda}" = cpu ] && PY=.venv/bin/python

# what travels in the call: the tracked tree, untracked files git does not ignore, and the carried .whl (64 MiB)
tree=$( (git ls-files -z --cached --others --exclude-standard 2>/dev/null | xargs -0 -r du -cb 2>/dev/null \
         | tail -n 1 | cut -f1) || echo 0)
carried=$(du -cb .whl 2>/dev/null | tail -n 1 | cut -f1)
echo "carried set: tree ${tree:-0} B + .whl ${carried:-0} B = $(( ${tree:-0} + ${carried:-0} )) B (limit 67108864)"

site=""
if [ -f .whl/site.tgz ]; then
    site=$(mktemp -d)
    tar xzf .whl/site.tgz -C "$site" || echo "could not unpack .whl/site.tgz"
    if [ "${GPU_CHECK_DEVICE:-cuda}" = cpu ]; then  # its wheels are the GPU machine's (Python 3.12)
        echo "dry run: .whl/site.tgz unpacks ($(ls "$site" | wc -l) entries); not used here"
        site=""
    fi
else
    echo "no .whl/site.tgz: the GPU image lacks pydantic, torchao, bitsandbytes and liger-kernel (bash scripts/gpu_wheels.sh)"
fi
export PYTHONPATH="${site:+$site:}$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/gpu_check.py run --out "$OUT" --device "${GPU_CHECK_DEVICE:-cuda}" \
    --budget "${GPU_CHECK_BUDGET:-520}" --tree-bytes "${tree:-0}" --carried-bytes "${carried:-0}"
