"""``scripts/gpu_check.sh``, the one prepared device call, dry-run on the CPU: every phase runs (tiny workloads) and
reports, the results land in $OUT as JSON, and what the call carries fits the device tool's 64 MiB."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2**20
#: what scripts/gpu_wheels.sh builds (.whl/site.tgz, measured: 10.1 MB): the tree must leave room for it
BUNDLE = 11 * 2**20


def test_the_gpu_check_dry_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "OUT": str(out), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "GPU_CHECK_BUDGET": "300"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sizes = re.search(r"carried set: tree (\d+) B \+ \.whl (\d+) B = (\d+) B", proc.stdout)
    assert sizes, proc.stdout
    tree, whl, total = map(int, sizes.groups())
    assert total == tree + whl < LIMIT and tree + BUNDLE < LIMIT

    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["finished"] and summary["device"] == "cpu"
    phases = summary["phases"]
    assert list(phases) == ["env", "import", "pytest_cuda", "train", "dpo", "bench_lora", "bench_methods", "unsloth"]
    for name in ("env", "import", "pytest_cuda", "train", "dpo", "bench_lora", "bench_methods"):
        assert phases[name]["status"] == "ok", (name, phases[name].get("output"))
    assert phases["import"]["result"]["lorakit"] and phases["import"]["result"]["cross_entropy_kernel"] == "chunked"
    assert re.search(r"\b[1-9]\d* passed", phases["pytest_cuda"]["output"])
    train = phases["train"]["result"]
    assert train["steps"] == 3 and train["cpu_load_ok"] and train["logits_rel_diff_device_vs_cpu"] < 1e-3
    assert train["fused_calls_under_bf16_autocast"] == train["adapted_layers"] > 0
    assert train["runtime"]["cross_entropy"] == "chunked"
    dpo = phases["dpo"]["result"]
    assert dpo["steps"] == 3 and dpo["reference_cached"] and dpo["kernel_max_abs_diff_vs_fp32"] < 1e-4
    bench = json.loads((out / "bench-lora.json").read_text())
    names = [r["name"] for r in bench["rows"]]
    assert {"floor", "lora", "peft:lora", "qlora:nf4", "qlora:bnb-nf4", "peft:qlora:bnb-nf4"} <= set(names)
    assert not bench["failed_rows"] and all(r["loss"] for r in bench["rows"])
    assert sorted(p.name for p in out.iterdir()) == ["bench-lora.json", "bench-methods.json", "gpu_check.json"]
