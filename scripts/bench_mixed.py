"""Forward tokens/s of a mixed-adapter batch (``lorakit.per_row``) versus one adapter for the whole batch.

    python scripts/bench_mixed.py --out benchmarks/results/mixed-cpu.json

The bundled tiny base model (``bundled://tiny-base``: Llama, hidden 256, 4 layers) with ``--adapters`` LoRA adapters
(r 16, alpha 32, every linear layer), a batch of ``--batch`` rows x ``--seq`` tokens, forward only, no grad:

- ``base``: no adapter (reference);
- ``single``: one adapter active for every row (``set_active``; lorakit's fused low-rank linear);
- ``mixed``: ``per_row`` with the adapters spread over the rows round-robin (row ``i`` -> adapter ``i % n``), so
  every layer gathers and scatters non-contiguous rows.

The arms alternate repeat by repeat so machine noise hits all alike; each number is the median over ``--repeats``,
for each ``--threads`` count (on a shared machine two OpenMP threads suffer from other processes far more than one,
and the many small ops of the mixed arm most; the 1-minute load average is recorded with each run).
Target (issue 17): ``mixed >= 0.8 x single``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import lorakit
from lorakit.util.files import write_json
from lorakit.util.resources import BUNDLED_DIR


def _model(adapters: int, r: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(BUNDLED_DIR / "tiny-base"), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    for i in range(adapters):
        lorakit.attach(model, "lora", name=f"a{i}", r=r, alpha=2.0 * r)
        with torch.no_grad():  # B starts at zero: give every adapter a real update
            for ad in lorakit.adapter_modules(model, f"a{i}").values():
                ad.lora_B.normal_(0.0, 0.02, generator=g)
    return model


def _measure(model: torch.nn.Module, ids: torch.Tensor, names: list[str], repeats: int) -> dict[str, Any]:
    """Median tokens/s of each arm, the arms alternating repeat by repeat."""

    def base() -> None:
        lorakit.set_active(model, [])
        model(ids)

    def single() -> None:
        lorakit.set_active(model, "a0")
        model(ids)

    def mixed() -> None:
        with lorakit.per_row(model, names):
            model(ids)

    arms: dict[str, Callable[[], None]] = {"base": base, "single": single, "mixed": mixed}
    rates: dict[str, list[float]] = {k: [] for k in arms}
    with torch.no_grad():
        for fn in arms.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in arms.items():
                t = time.perf_counter()
                fn()
                rates[name].append(ids.numel() / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"tokens_per_s_median": med, "mixed_vs_single": med["mixed"] / med["single"],
            "single_vs_base": med["single"] / med["base"], "tokens_per_s_all": rates}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, one run each")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    model = _model(a.adapters, a.r)
    ids = torch.randint(4, model.config.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    names = [f"a{i % a.adapters}" for i in range(a.batch)]
    runs = {}
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        load = os.getloadavg()[0]
        runs[f"threads={threads}"] = {"load_average_1min_before": load} | _measure(model, ids, names, a.repeats)
    res = {
        "settings": vars(a) | {"out": str(a.out) if a.out else None, "model": "bundled://tiny-base",
                               "method": "lora", "alpha": 2.0 * a.r, "rows_per_adapter": a.batch // a.adapters,
                               "tokens_per_forward": ids.numel()},
        "host": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                 "cpus": os.cpu_count()},
        "target_mixed_vs_single": 0.8,
        "runs": runs,
    }
    print(json.dumps({k: {m: v[m] for m in ("load_average_1min_before", "tokens_per_s_median", "mixed_vs_single",
                                            "single_vs_base")} for k, v in runs.items()}, indent=1))
    if a.out is not None:
        write_json(a.out, res, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
