"""GGUF export on a real model: SmolLM2-135M-Instruct with a LoRA, merged and written as GGUF, read back by an
independent reader (transformers' GGUF loader) and compared with the merged model on real text.

    .venv/bin/python scripts/gguf_smollm2.py --out benchmarks/results/gguf-smollm2.json      (~2 min, 1 thread)

The LoRA (r 8, alpha 16, on every linear) gets seeded random factors (every entry N(0, 0.02)), so the export carries
a non-zero update of every adapted weight. For each type
(f32, f16, q8_0): the file's size, the largest logit difference from the merged model over the first 16 eval
prompts of ``definitions_eval.jsonl`` (relative to the largest logit), and how often the greedy next token agrees.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorakit
from lorakit.evaluation.compare_config import resolve_data_path
from lorakit.formats.gguf_export import export_gguf
from lorakit.train.config import resolve_model_path
from lorakit.train.data import read_jsonl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/gguf-smollm2.json")
    p.add_argument("--prompts", type=int, default=16)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    where = resolve_model_path("bundled://smollm2-135m")
    tok = AutoTokenizer.from_pretrained(where)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32).eval()
    lorakit.attach(model, "lora", r=8, alpha=16, targets="all-linear")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.02)
    merged = lorakit.detach(model, merge=True)
    rows = [r for _, r in read_jsonl(resolve_data_path("bundled://data/definitions_eval.jsonl"))][:a.prompts]
    batch = [tok.encode(r["prompt"] + r["completion"]) for r in rows]
    results = []
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        want = [merged(input_ids=torch.tensor([ids])).logits[0] for ids in batch]
        for outtype in ("f32", "f16", "q8_0"):
            path = Path(d) / f"smollm2-{outtype}.gguf"
            t0 = time.perf_counter()
            report = export_gguf(merged, tok, path, outtype=outtype)
            export_s = time.perf_counter() - t0
            loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=path.name, dtype=torch.float32,
                                                          quantization_config=GgufConfig(dequantize=True)).eval()
            back = AutoTokenizer.from_pretrained(d, gguf_file=path.name)
            same_ids = all(back.encode(r["prompt"]) == tok.encode(r["prompt"]) for r in rows)
            diff, scale, agree, total = 0.0, 0.0, 0, 0
            for ids, w in zip(batch, want, strict=True):
                g = loaded(input_ids=torch.tensor([ids])).logits[0]
                diff, scale = max(diff, (g - w).abs().max().item()), max(scale, w.abs().max().item())
                agree += int((g.argmax(-1) == w.argmax(-1)).sum())
                total += len(ids)
            results.append({"outtype": outtype, "bytes": report["bytes"], "tensors": report["tensors"],
                            "export_s": round(export_s, 1), "max_logit_diff": diff,
                            "max_logit_diff_relative": diff / scale, "greedy_agreement": agree / total,
                            "tokenizer_same_ids": same_ids, "chat_template": back.chat_template == tok.chat_template})
            print(json.dumps(results[-1]), file=sys.stderr)
            del loaded
    out = {"command": "python scripts/gguf_smollm2.py --out " + a.out, "model": "bundled://smollm2-135m",
           "adapter": "lora r 8 alpha 16, all linears, seeded random factors (every entry N(0, 0.02))",
           "prompts": len(rows), "tokens": sum(len(b) for b in batch), "torch": torch.__version__,
           "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
