"""What LoRA's own GEMMs cost on this machine, for the CPU workload of ``lorakit bench``.

Each adapted linear ``(d_in -> d_out)`` adds six rank-r GEMMs per training step, each of ``2 N r d`` FLOPs:
``x A^T`` (d_in), the rank-r epilogue ``u B^T`` (d_out), ``gy B`` (d_out), B's gradient ``gy^T u`` (d_out),
A's gradient ``gh^T x`` (d_in) and the input-gradient term ``gh A`` (d_in). A frozen base does two GEMMs of
``2 N d_in d_out`` per linear (forward and input gradient). This script times every one of those shapes with
the bench's thread count and prints the time LoRA's GEMMs add per step: the least any exact LoRA can add
to the frozen floor.

Run: ``python scripts/lora_gemm_cost.py`` (about 20 s).
"""

from __future__ import annotations

import time

import torch

from lorakit.evaluation.bench_results import WORKLOADS


def _best_ms(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    w = WORKLOADS["cpu"]
    torch.set_num_threads(w.threads or 2)
    n, r = w.batch * w.seq, 16
    kv = w.hidden // w.heads * w.kv_heads
    shapes = [(w.hidden, w.hidden), (w.hidden, kv), (w.hidden, kv), (w.hidden, w.hidden),
              (w.hidden, w.mlp), (w.hidden, w.mlp), (w.mlp, w.hidden)]  # q, k, v, o, gate, up, down
    base_ms = lora_ms = lora_flops = 0.0
    print(f"{'d_in':>6}{'d_out':>7}{'base 2 GEMMs ms':>17}{'LoRA 6 GEMMs ms':>17}{'LoRA GFLOP/s':>14}")
    for d_in, d_out in shapes:
        x, gy = torch.randn(n, d_in), torch.randn(n, d_out)
        wt, a, b = torch.randn(d_out, d_in), torch.randn(r, d_in), torch.randn(d_out, r)
        h, gh, y, gx = torch.randn(n, r), torch.randn(n, r), torch.randn(n, d_out), torch.randn(n, d_in)
        base = _best_ms(lambda: x @ wt.t()) + _best_ms(lambda: gy @ wt)
        lora = sum(_best_ms(f) for f in (lambda: x @ a.t(), lambda: y.addmm_(h, b.t()), lambda: gy @ b,
                                         lambda: gy.t() @ h, lambda: gh.t() @ x, lambda: gx.addmm_(gh, a)))
        flops = 3 * 2 * n * r * (d_in + d_out)
        print(f"{d_in:>6}{d_out:>7}{base:>17.2f}{lora:>17.2f}{flops / lora / 1e6:>14.1f}")
        base_ms, lora_ms, lora_flops = base_ms + base, lora_ms + lora, lora_flops + flops
    layers = w.layers
    print(f"per step ({layers} layers): LoRA GEMMs {layers * lora_flops / 1e9:.2f} GFLOP in "
          f"{layers * lora_ms:.0f} ms ({lora_flops / lora_ms / 1e6:.1f} GFLOP/s); the base linears' GEMMs "
          f"{layers * base_ms:.0f} ms")


if __name__ == "__main__":
    main()
