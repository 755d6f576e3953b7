"""Inference latency of adapters: the base model, the merged model and the unmerged adapter, per method.

    .venv/bin/python scripts/latency.py --out reports/smollm2-text/experiments/latency.json     (~3 min, 1 thread)

LoRA's claim: merged, an adapter adds no inference latency. For each method (its options from the comparison
config), an adapter with non-zero weights is attached to ``bundled://smollm2-135m``; three models are timed on the
same prompts, greedy generation of ``--tokens`` new tokens at batch 1 and batch 8: the base model, the merged model
(``lorakit.detach(merge=True)``: a plain transformers model again) and the unmerged adapter (the adapter applied in
forward). Repetitions are interleaved (each round times every model once, in a rotating order) and the median
tokens/s is reported; the first round is a warm-up.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

import lorakit
from lorakit.evaluation.compare import host_info
from lorakit.evaluation.compare_config import load_compare_config
from lorakit.train.loading import load_model, load_tokenizer
from lorakit.util.files import write_json

PROMPTS = ["Word: harbor (noun)\nDefinition:", "Word: quick (adjective)\nDefinition:",
           "Word: assign (verb)\nDefinition:", "Word: lantern (noun)\nDefinition:"]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=g))


def _tok_s(model: torch.nn.Module, tok: object, batch: int, tokens: int) -> float:
    prompts = (PROMPTS * ((batch + len(PROMPTS) - 1) // len(PROMPTS)))[:batch]
    tok.padding_side = "left"  # type: ignore[attr-defined]
    enc = tok(prompts, return_tensors="pt", padding=True)  # type: ignore[operator]
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)  # type: ignore[attr-defined]
    new = (out.shape[1] - enc["input_ids"].shape[1]) * batch
    return new / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/compare-smollm2-text.yaml")
    p.add_argument("--methods", default="lora,lora-fa,vera,delta-lora,lora-xs,rank1-sum,dora")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="reports/smollm2-text/experiments/latency.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cc = load_compare_config(a.config)
    cfg0 = cc.run_config("lora", 0, Path("/tmp/unused"))
    tok = load_tokenizer(cfg0.model)
    base = load_model(cfg0.model).eval()
    rows = []
    for method in [m.strip() for m in a.methods.split(",") if m.strip()]:
        opts = cc.run_config(method, 0, Path("/tmp/unused")).adapter.options
        adapted = copy.deepcopy(base)
        lorakit.attach(adapted, method, **opts)
        _randomize(adapted, 0)
        adapted.eval()
        merged = lorakit.detach(copy.deepcopy(adapted), merge=True).eval()
        models = {"base": base, "merged": merged, "unmerged": adapted}
        for batch in a.batches:
            times: dict[str, list[float]] = {k: [] for k in models}
            for rnd in range(a.rounds + 1):
                order = list(models)[rnd % 3:] + list(models)[:rnd % 3]
                for name in order:
                    v = _tok_s(models[name], tok, batch, a.tokens)
                    if rnd:  # round 0 warms up
                        times[name].append(v)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"method": method, "batch": batch, "base_tok_s": med["base"], "merged_tok_s": med["merged"],
                   "unmerged_tok_s": med["unmerged"], "merged_vs_base": med["merged"] / med["base"],
                   "unmerged_vs_base": med["unmerged"] / med["base"], "all": times}
            rows.append(row)
            print(f"{method} batch {batch}: base {med['base']:.1f} tok/s, merged {med['merged']:.1f} "
                  f"({row['merged_vs_base']:.3f}x), unmerged {med['unmerged']:.1f} ({row['unmerged_vs_base']:.3f}x)",
                  flush=True)
        del adapted, merged
    command = "python scripts/latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json(a.out, {"command": command.strip(), "host": host_info(), "model": cfg0.model.path,
                       "tokens": a.tokens, "rounds": a.rounds, "threads": a.threads, "rows": rows}, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
