"""Task-specific adapters on one base: each task's quality alone, after a hot-swap, mixed per row, and combined.

    .venv/bin/python scripts/swapping.py --out reports/smollm2-text/experiments/swapping.json     (~8 min, 1 thread)

LoRA's claim: task-specific adapters can be swapped quickly on one base model. Two LoRA adapters are trained on
``bundled://smollm2-135m`` for two different tasks (WordNet definitions; one-step word problems), each on its own
data with ``lorakit train`` and the comparison's LoRA options. Then, on one loaded base:

* **alone**: each task's eval loss (mean per-token loss over its eval rows) with only its own adapter;
* **hot-swap**: one adapter slot ``live``, holding definitions, then hot-swapped to word problems and back
  (``lorakit.hot_swap``: weights copied in place, no new modules), each task measured while its weights are in;
* **per-row**: both adapters loaded, every eval row of both tasks in mixed batches, each row through its own adapter
  (``lorakit.per_row``);
* **combined**: one adapter made of both (``lorakit.combine``, how=cat: ``dW_a + dW_b`` exactly), measured on both
  tasks (what merging two tasks into one model costs each).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import lorakit
from lorakit.evaluation.compare import host_info
from lorakit.evaluation.compare_config import load_compare_config
from lorakit.train.batching import collate
from lorakit.train.data import IGNORE, encode_record
from lorakit.train.loading import load_model, load_tokenizer
from lorakit.train.trainer import Trainer
from lorakit.util import resources
from lorakit.util.files import write_json

TASKS = {"definitions": ("bundled://data/definitions_train.jsonl", "bundled://data/definitions_eval.jsonl"),
         "word_problems": ("bundled://data/one_more_train.jsonl", "bundled://data/one_more_eval.jsonl")}


def _rows(path: str, tok: Any, limit: int) -> list[Any]:
    out = []
    for line in Path(resources.resolve(path, what="data")).read_text().splitlines()[:limit]:
        obj = json.loads(line)
        out.append(encode_record(tok, obj, "prompt_completion", add_eos=True, where=path))
    return out


def _losses(model: torch.nn.Module, tok: Any, examples: list[Any], names: list[str | None] | None = None,
            batch_size: int = 16) -> list[float]:
    """Mean per-token loss of each example (``names``: each row's adapter, through ``lorakit.per_row``)."""
    out = []
    model.eval()
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        b = collate(chunk, int(tok.pad_token_id))
        ctx = lorakit.per_row(model, names[i:i + batch_size]) if names is not None else torch.no_grad()
        with torch.no_grad(), ctx:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        labels = b["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        mask = labels != IGNORE
        out += ((nll * mask).sum(1) / mask.sum(1)).tolist()
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/compare-smollm2-text.yaml")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--eval-rows", type=int, default=150)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="reports/smollm2-text/experiments/swapping.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cc = load_compare_config(a.config)
    work = Path(tempfile.mkdtemp())
    adapters: dict[str, Path] = {}
    for name, (train, evalf) in TASKS.items():  # one adapter per task, the comparison's LoRA
        cfg = cc.run_config("lora", 0, work / name).to_dict()
        cfg["data"].update(train=resources.resolve(train, what="data"), eval=resources.resolve(evalf, what="data"))
        cfg["training"].update(max_steps=a.steps, eval_every=None)
        cfg["output"].update(plot=False)
        t0 = time.perf_counter()
        res = Trainer(None, cfg, log=lambda m: None).fit(overwrite=True).finished()
        adapters[name] = Path(res.adapter_dir)
        print(f"{name}: trained {a.steps} steps in {time.perf_counter() - t0:.0f} s, eval loss "
              f"{res.eval_start.get('eval_loss'):.4f} -> {res.eval_end.get('eval_loss'):.4f}", flush=True)
    cfg0 = cc.run_config("lora", 0, work / "x")
    tok = load_tokenizer(cfg0.model)
    model = load_model(cfg0.model)
    evals = {name: _rows(evalf, tok, a.eval_rows) for name, (_, evalf) in TASKS.items()}
    names = list(TASKS)
    for n in names:
        lorakit.load(model, adapters[n], name=n)
    result: dict[str, Any] = {"tasks": {}}
    alone = {}
    for n in names:
        lorakit.set_active(model, [n])
        alone[n] = _losses(model, tok, evals[n])
    # per row: both tasks' rows mixed in every batch, each through its own adapter
    order = [(n, i) for i in range(a.eval_rows) for n in names]
    mixed = _losses(model, tok, [evals[n][i] for n, i in order], [n for n, _ in order])
    per_row = {n: [v for (m, _), v in zip(order, mixed, strict=True) if m == n] for n in names}
    # combined: dW_a + dW_b in one adapter
    lorakit.combine(model, {n: 1.0 for n in names}, how="cat", name="combined")
    lorakit.set_active(model, ["combined"])
    combined = {n: _losses(model, tok, evals[n]) for n in names}
    for n in [*names, "combined"]:
        lorakit.remove(model, n)
    # hot-swap: one slot, definitions in, then word problems, then definitions again
    lorakit.load(model, adapters[names[0]], name="live")
    swapped = {names[0]: _losses(model, tok, evals[names[0]])}
    t0 = time.perf_counter()
    lorakit.hot_swap(model, "live", adapters[names[1]])
    swap_ms = 1000 * (time.perf_counter() - t0)
    swapped[names[1]] = _losses(model, tok, evals[names[1]])
    lorakit.hot_swap(model, "live", adapters[names[0]])
    back = _losses(model, tok, evals[names[0]])
    for n in names:
        ref = alone[n]
        tol = 1e-5 * max(1.0, max(abs(x) for x in ref))
        result["tasks"][n] = {
            "metric": "eval loss (mean per-token loss per row, then mean over rows)", "rows": len(ref),
            "alone": _mean(ref), "swapped": _mean(swapped[n]), "per_row": _mean(per_row[n]),
            "combined": _mean(combined[n]),
            "swap_equal": max(abs(x - y) for x, y in zip(swapped[n], ref, strict=True)) <= tol,
            "per_row_equal": max(abs(x - y) for x, y in zip(per_row[n], ref, strict=True)) <= tol,
            "max_abs_diff_swap": max(abs(x - y) for x, y in zip(swapped[n], ref, strict=True)),
            "max_abs_diff_per_row": max(abs(x - y) for x, y in zip(per_row[n], ref, strict=True))}
        print(f"{n}: {json.dumps({k: v for k, v in result['tasks'][n].items() if k != 'metric'})}", flush=True)
    result["tasks"][names[0]]["swap_equal"] &= max(abs(x - y) for x, y in zip(back, alone[names[0]],
                                                                               strict=True)) <= 1e-5 * 10
    command = "python scripts/swapping.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result.update(command=command.strip(), host=host_info(), model=cfg0.model.path, steps=a.steps,
                  combine="cat", swap_ms=swap_ms, adapters={n: str(adapters[n]) for n in names})
    write_json(a.out, result, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
