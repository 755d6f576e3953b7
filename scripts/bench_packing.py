"""Tokens per second of LoRA training on padded batches versus leak-free packed blocks, on data whose lengths
spread like chat data (log-uniform between --min-len and --max-len tokens).

    python scripts/bench_packing.py --out benchmarks/results/packing-cpu.json

Both arms train the same Llama-shaped model (random weights, LoRA r=16 on every projection, AdamW) on the same
examples in the same order for the same number of real tokens: ``padded`` batches ``--batch`` examples padded
to the longest; ``packed`` is ``lorakit.train.data.pack`` into ``--block``-token blocks (positions restart,
block-diagonal mask), ``--batch-blocks`` blocks per step. Tokens/s counts real (non-padding) tokens only. The
arms alternate step by step so machine noise hits both alike; the ratio compares medians of tokens/s per step.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import lorakit  # noqa: E402
from lorakit.fast import speed  # noqa: E402
from lorakit.train.batching import collate  # noqa: E402
from lorakit.train.data import IGNORE, Dataset, Example, pack  # noqa: E402
from lorakit.util.files import write_json  # noqa: E402


def _examples(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        out.append(Example(ids, list(ids)))
    return out


def _model(vocab: int, hidden: int, layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=4096, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).train()
    lorakit.attach(model, "lora", r=16, alpha=32)
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--min-len", type=int, default=20)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="examples per padded batch")
    p.add_argument("--block", type=int, default=1024, help="tokens per packed block")
    p.add_argument("--batch-blocks", type=int, default=2, help="packed blocks per step")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    examples = _examples(a.examples, a.min_len, min(a.max_len, a.block), a.vocab, a.seed)
    data = Dataset(examples, "text")
    padded = [collate(examples[i:i + a.batch], 0) for i in range(0, len(examples), a.batch)]
    blocks = pack(data, a.block).examples
    packed = [collate(blocks[i:i + a.batch_blocks], 0) for i in range(0, len(blocks), a.batch_blocks)]
    model = _model(a.vocab, a.hidden, a.layers)
    opt = lorakit.optimizer(model, 1e-4, loraplus_ratio=None)

    def step(batch: dict[str, torch.Tensor]) -> float:
        t = time.perf_counter()
        loss = speed.causal_lm_loss(model, batch["input_ids"], batch["labels"],
                                    attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def real_tokens(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    step(padded[0]), step(packed[0])  # warm-up
    rates: dict[str, list[float]] = {"padded": [], "packed": []}
    totals = {"padded": [0, 0.0], "packed": [0, 0.0]}
    for i in range(max(len(padded), len(packed))):  # alternate arms: noise hits both alike
        for name, batches in (("padded", padded), ("packed", packed)):
            if i < len(batches):
                s, n = step(batches[i]), real_tokens(batches[i])
                rates[name].append(n / s)
                totals[name][0] += n
                totals[name][1] += s
    res = {
        "settings": vars(a) | {"out": str(a.out) if a.out else None},
        "host": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
        "tokens": sum(len(e.input_ids) for e in examples),
        "padded": {"steps": len(padded), "tokens_per_s_median": statistics.median(rates["padded"]),
                   "tokens_per_s_overall": totals["padded"][0] / totals["padded"][1],
                   "padding_share": 1 - sum(int(b["attention_mask"].sum()) for b in padded)
                   / sum(b["input_ids"].numel() for b in padded)},
        "packed": {"steps": len(packed), "blocks": len(blocks), "tokens_per_s_median": statistics.median(rates["packed"]),
                   "tokens_per_s_overall": totals["packed"][0] / totals["packed"][1]},
    }
    res["packed_vs_padded_tokens_per_s"] = res["packed"]["tokens_per_s_overall"] / res["padded"]["tokens_per_s_overall"]
    print(json.dumps({k: res[k] for k in ("tokens", "padded", "packed", "packed_vs_padded_tokens_per_s")}, indent=1))
    if a.out is not None:
        write_json(a.out, res, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
