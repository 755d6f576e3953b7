"""How much of the NF4 base's loss gap LoftQ's init closes at step 0, on SmolLM2-135M.

Eval loss (token-weighted, ``lorakit.Trainer.evaluate``) on the held-out definitions file
(``bundled/data/definitions_eval.jsonl``, max_length 64, as ``configs/compare-smollm2-text.yaml``) of:
the dense float32 base; the same base quantized to NF4 by ``lorakit.quantize`` (QLoRA's base, where LoRA starts:
``B = 0``); and that NF4 base with a LoftQ adapter (all linear layers, rank ``r``) initialised from the dense
checkpoint, before any training, with the share of the quantization error's energy ``||W - Q||_F^2`` the
rank-``r`` fit removes. Writes ``benchmarks/results/loftq-smollm2.json``.

Run: ``python scripts/loftq_gap.py [--ranks 8 16 64] [--scheme nf4]`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

import lorakit
from lorakit.core.layers import base_weight
from lorakit.evaluation.compare import host_info
from lorakit.train.config import TrainConfig, resolve_model_path
from lorakit.train.loading import load_model
from lorakit.train.trainer import Trainer
from lorakit.util.dense_weights import DenseWeights
from lorakit.util.files import write_json

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "loftq-smollm2.json"
MODEL = "bundled://smollm2-135m"


def config(quantize: str = "none") -> TrainConfig:
    return TrainConfig.parse({
        "model": {"path": MODEL, "dtype": "float32", "quantize": quantize},
        "adapter": {"method": "lora"},
        "data": {"train": "bundled://data/definitions_eval.jsonl", "eval": "bundled://data/definitions_eval.jsonl",
                 "max_length": 64},
        "training": {"device": "cpu", "eval_batch_size": 32},
        "output": {"dir": "unused", "progress": False}})


def eval_loss(model: torch.nn.Module, cfg: TrainConfig) -> float:
    return Trainer(model, cfg, log=lambda _: None).evaluate()["eval_loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--scheme", default="nf4", choices=["nf4", "int8"])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.manual_seed(0)
    dense_cfg = config()
    res: dict[str, Any] = {"model": MODEL, "scheme": args.scheme, "eval": "bundled://data/definitions_eval.jsonl",
                           "host": host_info()}
    res["dense"] = eval_loss(load_model(dense_cfg.model), dense_cfg)
    print(f"dense float32: eval loss {res['dense']:.4f}", flush=True)
    q_cfg = config(args.scheme)
    model = load_model(q_cfg.model)
    res["quantized"] = eval_loss(model, q_cfg)
    print(f"{args.scheme} (LoRA's start): {res['quantized']:.4f}", flush=True)
    dense = DenseWeights(resolve_model_path(MODEL))
    res["loftq"] = {}
    for r in args.ranks:
        t = time.perf_counter()
        lorakit.attach(model, "loftq", name=f"r{r}", r=r, targets="all-linear", dense_weights=dense)
        init_s = time.perf_counter() - t
        # the share of the quantization error's energy ||W - Q||_F^2 the rank-r fit removes (over all layers)
        fit = err = 0.0
        for name, ad in lorakit.adapter_modules(model, f"r{r}").items():
            q = base_weight(model.get_submodule(name)).float()
            fit += float(ad.delta_weight(q).detach().norm() ** 2)
            err += float((dense.weight(name) - q).norm() ** 2)
        loss = eval_loss(model, q_cfg)
        closed = (res["quantized"] - loss) / (res["quantized"] - res["dense"])
        res["loftq"][str(r)] = {"eval_loss": loss, "gap_closed": closed, "init_s": round(init_s, 1),
                                "error_energy_removed": fit / err,
                                "trainable": lorakit.trainable_parameters(model)}
        print(f"{args.scheme} + loftq r{r}: {loss:.4f} ({100 * closed:.0f}% of the gap closed; "
              f"{100 * fit / err:.1f}% of ||W - Q||^2 fitted; init {init_s:.0f} s)", flush=True)
        lorakit.remove(model, f"r{r}")
    write_json(args.out, res, indent=1)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
