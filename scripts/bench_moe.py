"""Expert adapters on a mixture-of-experts model: lorakit's per-expert low-rank path vs PEFT's dense expert delta.

    python scripts/bench_moe.py --out benchmarks/results/moe-experts-cpu.json        (~1 min on 1 core)

Workload: a Mixtral of random weights (transformers' MixtralForCausalLM: 4 layers, hidden 512, 8 experts of
intermediate 1024, top-2; 75M parameters, fp32), LoRA r 16 / alpha 32 on q/k/v/o and on every expert's gate_up and
down projections, AdamW, batches of 4 x 128 random tokens, one thread.

- lorakit: ``lorakit.attach(model, "lora", targets="all-linear")``: each expert's projection is a layer of its own
  (``lorakit.core.experts``), computed as ``W[e] x + s B_e (A_e x)`` by the fused low-rank op: no expert delta.
- PEFT 0.21: ``LoraConfig(target_modules=[q,k,v,o], target_parameters=[experts.gate_up_proj, experts.down_proj])``:
  ``lora.ParamWrapper`` forms the dense delta ``einsum(B, A)`` of every expert (``E x d_out x d_in``) and adds it
  to the weight for the forward (the "dense-delta reference").

Both start from the same weights with B = 0, so their step-0 losses are equal (checked). Each run is its own
process, the two alternating ``--repeats`` times; reported per run: the median step time over steps 3..
(the first two warm up), the process's peak RSS (``ru_maxrss``), and the largest single tensor a training step
allocates (a dispatch-mode probe: the dense delta shows up there as ``E x 2f x d`` values).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
TOOLS = ("lorakit", "peft")


def build(seed: int = 0):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=256, tie_word_embeddings=False)
    return MixtralForCausalLM(cfg)


def largest_allocation(step) -> int:
    """The largest tensor (values) any op of ``step()`` allocates, views of an input's storage excluded."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Probe(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    Probe.numel = max(Probe.numel, t.numel())
            return out

    with Probe():
        step()
    return Probe.numel


def run(tool: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    model = build()
    if tool == "lorakit":
        import lorakit

        lorakit.attach(model, "lora", r=16, alpha=32, targets="all-linear")
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                          "o_proj"],
                                                 target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 2048, (args.batch, args.seq), generator=g) for _ in range(args.steps)]
    losses, times = [], []

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for ids in batches:
        t0 = time.perf_counter()
        losses.append(step(ids))
        times.append(time.perf_counter() - t0)
    largest = largest_allocation(lambda: step(batches[0]))
    return {"tool": tool, "trainable": sum(p.numel() for p in params), "step0_loss": losses[0],
            "step_s": statistics.median(times[2:]), "times": [round(t, 3) for t in times],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "largest_tensor_values": largest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/moe-experts-cpu.json")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", choices=TOOLS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run(args.child, args)))
        return
    runs = []
    for _ in range(args.repeats):
        for tool in TOOLS:
            cmd = [sys.executable, __file__, "--child", tool, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--seq", str(args.seq)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    summary = {}
    for tool in TOOLS:
        mine = [r for r in runs if r["tool"] == tool]
        summary[tool] = {"step_s": statistics.median(r["step_s"] for r in mine),
                         "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine),
                         "largest_tensor_values": mine[0]["largest_tensor_values"], "trainable": mine[0]["trainable"],
                         "step0_loss": mine[0]["step0_loss"]}
    same_start = abs(summary["lorakit"]["step0_loss"] - summary["peft"]["step0_loss"]) < 1e-5
    report = {"command": "python scripts/bench_moe.py " + " ".join(sys.argv[1:]), "device": "cpu, 1 thread",
              "model": "MixtralForCausalLM random, 4 layers, hidden 512, 8 experts x 1024, top-2, fp32",
              "adapter": "LoRA r 16 alpha 32 on q/k/v/o + every expert's gate_up/down",
              "batch": [args.batch, args.seq], "steps": args.steps, "same_step0_loss": same_start,
              "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"same_step0_loss": same_start, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
