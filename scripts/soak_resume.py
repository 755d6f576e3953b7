"""Soak test of crash safety: SIGKILL `lorakit train` at random moments, resume, and compare with a run that
was never interrupted. Prints how many resumes ended bit-identical.

    python scripts/soak_resume.py --kills 20 --methods lora,delta-lora,rank1-sum,lora-fa,lora-sb --out /tmp/soak

Each trial: a tiny Llama and tokenizer built on the bundled demo data (lorakit.testing), one uninterrupted
reference run per method, then a run killed 1-3 times at random times (some of them while a checkpoint is
being written: every step saves one) and resumed with ``--resume`` until it finishes. A trial is
bit-identical when the final adapter tensors equal the reference's exactly and the logged training losses
match step for step. The script exits 1 if any trial differs or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lorakit.testing import DEMO_DATA, build_tiny_llama, build_tokenizer, record_texts  # noqa: E402
from lorakit.train.metrics import read_metrics  # noqa: E402

OPTIONS = {"lora": {"r": 4, "dropout": 0.1}, "delta-lora": {"r": 4, "delta_start": 2}, "rank1-sum": {"r_init": 4, "target_rank": 2},
           "lora-fa": {"r": 4, "projected_grad": True, "dropout": 0.1}, "lora-sb": {"r": 4}, "vera": {"r": 16},
           "dora": {"r": 4, "dropout": 0.1}, "lora-xs": {"r": 4, "init_std": 0.0}, "full": {}}
LRS = {"vera": 1e-1, "lora-xs": 3e-1, "lora-sb": 3e-2, "full": 1e-3}


def _config(root: Path, out: Path, method: str, steps: int) -> Path:
    cfg = {"model": {"path": str(root / "base"), "dtype": "float32"},
           "adapter": {"method": method, **OPTIONS[method]},
           "data": {"train": str(DEMO_DATA), "eval_fraction": 0, "max_length": 48},
           # as real runs are: a warm-up (kills land inside and after it), accumulation, a cosine schedule
           "training": {"max_steps": steps, "batch_size": 4, "grad_accum": 2, "lr": LRS.get(method, 1e-2),
                        "warmup_ratio": 0.25, "schedule": "cosine", "device": "cpu", "seed": 0, "eval_every": None},
           "output": {"dir": str(out), "progress": False, "tensorboard": False, "save_every": 1, "plot": False}}
    path = out.with_name(out.name + ".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cfg: Path, *, resume: bool, kill_after: float | None) -> int | None:
    """Run `lorakit train`; kill it after ``kill_after`` seconds (returns None then), else its exit status."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lorakit", "train", str(cfg), *(["--resume"] if resume else [])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=kill_after)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.returncode != 0:
            print(err[-2000:], file=sys.stderr)
        return proc.returncode
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="killed-and-resumed trials in all")
    p.add_argument("--methods", default="lora,delta-lora,rank1-sum,lora-fa,lora-sb")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("/tmp/lorakit-soak"))
    a = p.parse_args()
    rng = random.Random(a.seed)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    tok = build_tokenizer(record_texts(DEMO_DATA))
    build_tiny_llama(len(tok), hidden=32).save_pretrained(a.out / "base")
    tok.save_pretrained(a.out / "base")

    refs = {}
    for m in methods:
        ref = a.out / f"ref-{m}"
        t0 = time.perf_counter()
        assert _train(_config(a.out, ref, m, a.steps), resume=False, kill_after=None) == 0, m
        refs[m] = (load_file(ref / "adapter" / "adapter.safetensors"), _losses(ref), time.perf_counter() - t0)

    identical, results = 0, []
    for trial in range(a.kills):
        m = methods[trial % len(methods)]
        out = a.out / f"trial{trial:03d}-{m}"
        cfg = _config(a.out, out, m, a.steps)
        kills, rc, resume = 0, None, False
        for _ in range(rng.randint(1, 3)):  # 1-3 kills, each at a random moment of the remaining run
            rc = _train(cfg, resume=resume, kill_after=rng.uniform(0.5, refs[m][2]))
            resume = True
            if rc is not None:
                break
            kills += 1
        if rc != 0:  # killed (or failed): one last resume to the end
            rc = _train(cfg, resume=True, kill_after=None)
        ok = rc == 0 and (out / "adapter").is_dir()
        same = False
        if ok:
            got = load_file(out / "adapter" / "adapter.safetensors")
            same = got.keys() == refs[m][0].keys() and all(torch.equal(got[k], refs[m][0][k]) for k in got) \
                and _losses(out) == refs[m][1]
        identical += same
        results.append({"trial": trial, "method": m, "kills": kills, "finished": ok, "bit_identical": same})
        print(f"trial {trial:3d} {m:10s} kills {kills} -> {'bit-identical' if same else 'DIFFERS' if ok else 'FAILED'}",
              flush=True)
    (a.out / "soak.json").write_text(json.dumps(results, indent=1))
    print(f"{identical} of {a.kills} killed-and-resumed runs ended bit-identical to the uninterrupted run "
          f"({', '.join(methods)}; {a.steps} steps, a checkpoint every step)")
    return 0 if identical == a.kills else 1


if __name__ == "__main__":
    sys.exit(main())
