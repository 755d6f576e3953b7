"""Peak memory of training on a JSONL file larger than memory, through ``data.cache_dir``.

    python scripts/bench_large_data.py --gb 2 --out benchmarks/results/large-data-cpu.json

Writes a JSONL file of ``--gb`` gigabytes (prompt/completion rows of 20-2,000 characters, seeded), then runs
``lorakit train`` on it with the bundled tiny model and ``data.cache_dir`` in a child process: the first run
streams the file into the token store and trains ``--steps`` steps; a second run (``--resume`` of the same
run with more steps) reuses the store. Peak RSS (the kernel's ``VmHWM`` of the child) and wall time are
recorded for both.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lorakit.util.files import write_json  # noqa: E402

WORDS = ("the cat sat on a mat while dogs ran past old houses near green hills and rivers under bright "
         "stars so people wrote long letters about quiet towns busy markets small boats").split()


def write_jsonl(path: Path, gb: float, seed: int) -> int:
    rng = random.Random(seed)
    target, n = int(gb * 2**30), 0
    with open(path, "w") as f:
        size = 0
        while size < target:
            rows = []
            for _ in range(1000):
                words = rng.choices(WORDS, k=int(2 ** rng.uniform(2, 8.5)))
                cut = max(1, len(words) // 3)
                rows.append(json.dumps({"prompt": " ".join(words[:cut]) + "?", "completion": " " +
                                        " ".join(words[cut:])}) + "\n")
            chunk = "".join(rows)
            f.write(chunk)
            size += len(chunk)
            n += len(rows)
    return n


def run(cfg: Path, *, resume: bool) -> dict[str, float]:
    code = ("import sys, resource; from lorakit.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "train", str(cfg), *(["--resume"] if resume else [])],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    peak_kb = int(next(ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK_KB")).split()[1])
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(peak_kb / 1024, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=Path("/tmp/lorakit-large-data"))
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    data = a.dir / "train.jsonl"
    t = time.perf_counter()
    rows = write_jsonl(data, a.gb, a.seed)
    written = time.perf_counter() - t
    cfg_dict = {"model": {"path": "bundled://tiny-base", "dtype": "float32"}, "adapter": {"method": "lora", "r": 8},
                "data": {"train": str(data), "eval_fraction": 0.0, "max_length": 256,
                         "cache_dir": str(a.dir / "cache")},
                "training": {"max_steps": a.steps, "batch_size": 8, "lr": 1e-3, "device": "cpu"},
                "output": {"dir": str(a.dir / "run"), "progress": False, "tensorboard": False, "plot": False}}
    cfg = a.dir / "run.yaml"
    cfg.write_text(yaml.safe_dump(cfg_dict))
    first = run(cfg, resume=False)
    cfg_dict["training"]["max_steps"] = a.steps * 2
    cfg.write_text(yaml.safe_dump(cfg_dict))
    res = {"file_gb": round(data.stat().st_size / 2**30, 3), "rows": rows, "write_s": round(written, 1),
           "first_run_tokenize_and_train": first}
    # a fresh run on the same data: the store is reused (no tokenizing), memory stays the same
    cfg_dict["output"]["dir"] = str(a.dir / "run2")
    cfg.write_text(yaml.safe_dump(cfg_dict))
    res["second_run_reuses_store"] = run(cfg, resume=False)
    res["store_bytes"] = sum(f.stat().st_size for f in (a.dir / "cache").rglob("*") if f.is_file())
    print(json.dumps(res, indent=1))
    if a.out is not None:
        write_json(a.out, res, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
