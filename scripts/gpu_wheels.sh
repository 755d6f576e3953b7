#!/usr/bin/env bash
# Builds .whl/site.tgz: the Python packages lorakit needs that the GPU machine's image lacks (pydantic and its
# stack, torchao, bitsandbytes, liger-kernel), unpacked from their cp312 manylinux wheels, bitsandbytes cut to its
# CUDA 13.0 and CPU libraries (41 MiB -> ~4). Run here, on a machine that reaches PyPI, from the repository root;
# then `bash scripts/gpu_check.sh` on the GPU machine with `.whl` carried (see the header of gpu_check.sh).
#
#   bash scripts/gpu_wheels.sh            # -> .whl/site.tgz (about 8 MiB)
#   GPU_WHEELS_EXTRA="gguf==0.19.0" bash scripts/gpu_wheels.sh    # and more
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
# versions that work with torch 2.11 (the GPU image's) and 2.13 (this project's CPU build)
PACKAGES="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
typing-extensions==4.16.0 torchao==0.18.0 bitsandbytes==0.50.2 liger-kernel==0.8.5 ${GPU_WHEELS_EXTRA:-}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$tmp/wheels" $PACKAGES
mkdir -p "$tmp/site" .whl
for f in "$tmp"/wheels/*.whl; do
    "$PY" -m zipfile -e "$f" "$tmp/site"
done
# the GPU image runs CUDA 13.0: every other build of bitsandbytes' library is dead weight in the 64 MiB budget
find "$tmp/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cuda130.so' ! -name '*_cpu.so' -delete
tar czf .whl/site.tgz -C "$tmp/site" .
ls -l .whl/site.tgz
grep -qs '^/.whl/$' .git/info/exclude || grep -qs '^\.whl/$' .gitignore || echo "/.whl/" >> .git/info/exclude
