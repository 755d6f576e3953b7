"""``make demo``: fine-tune the bundled pretrained tiny Llama with LoRA-SB on arithmetic word problems, on CPU.

It measures exact-match accuracy on held-out problems and shows one generation before and after training,
writes the adapter, ``metrics.jsonl`` and ``loss.png`` into ``runs/demo/``, and prints what to run next.
Nothing is downloaded: the model (``bundled://tiny-base``) and the data (``lorakit/bundled/data``) ship with
lorakit.

LoRA-SB (Ponkshe, Singhal et al. 2024, https://arxiv.org/abs/2411.19557) trains only an ``r x r`` matrix per
layer, ``W = W0 + B R A``, with ``B`` and ``A`` fixed by the best rank-``r`` approximation of the first full
fine-tuning step (estimated from a few training batches before training starts).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.evaluation.generation import answer_rows, task_accuracy
from lorakit.train.config import TrainConfig
from lorakit.train.trainer import Trainer
from lorakit.util.resources import BUNDLED_DIR

ARITHMETIC_TRAIN = BUNDLED_DIR / "data" / "arithmetic_train.jsonl"
ARITHMETIC_EVAL = BUNDLED_DIR / "data" / "arithmetic_eval.jsonl"
#: LoRA-SB settings of the demo (those of the committed comparison, configs/compare-arithmetic.yaml).
DEMO_ADAPTER: dict[str, Any] = {"method": "lora-sb", "r": 12}
#: Learning rates per method on this task (the best of configs/lr-sweep-arithmetic.yaml, a property of the task
#: and the bundled model, not of the methods); others use 1e-2.
DEMO_LRS: dict[str, float] = {"lora-sb": 1e-1, "lora-xs": 1e-1, "lora-fa": 1e-1, "vera": 5e-1, "full": 2e-3,
                              "lora": 1e-2}


def demo_config(out: str | os.PathLike[str], *, steps: int, method: str = "lora-sb", lr: float | None = None,
                progress: bool = True, **adapter: Any) -> TrainConfig:
    """The demo's training config: bundled tiny-base, arithmetic data, ``steps`` steps on CPU."""
    options = {**DEMO_ADAPTER, **adapter} if method == "lora-sb" else dict(adapter)
    options["method"] = method
    return TrainConfig.parse({
        "model": {"path": "bundled://tiny-base", "dtype": "float32"},
        "adapter": options,
        "data": {"train": str(ARITHMETIC_TRAIN), "eval": str(ARITHMETIC_EVAL), "max_length": 96},
        "training": {"max_steps": steps, "batch_size": 8, "lr": lr if lr is not None else DEMO_LRS.get(method, 1e-2),
                     "warmup_steps": max(1, steps // 10), "device": "cpu", "eval_batch_size": 50},
        "output": {"dir": str(out), "progress": progress, "tensorboard": False},
    })


def run_bundled_demo(out: str | os.PathLike[str] = "runs/demo", *, steps: int = 150, method: str = "lora-sb",
                     examples: int = 100, log: Callable[[str], None] = print, progress: bool = True,
                     **adapter: Any) -> dict[str, Any]:
    """Train ``method`` (default LoRA-SB) on the bundled arithmetic task and report before/after.

    Args:
        out: the run directory (``adapter/``, ``metrics.jsonl``, ``loss.png``); replaced if it exists.
        steps: optimizer steps (batch 8).
        method: any name in :data:`lorakit.METHODS`.
        examples: held-out problems scored for accuracy (greedy decoding, exact match).
        adapter: extra method options.

    Returns:
        ``{"accuracy_before", "accuracy_after", "eval_loss_before", "eval_loss_after", "sample_before",
        "sample_after", "adapter", "plot"}``.
    """
    out = Path(out)
    cfg = demo_config(out, steps=steps, method=method, progress=progress, **adapter)
    trainer = Trainer(None, cfg, log=log)
    trainer.prepare()
    rows = answer_rows(ARITHMETIC_EVAL, examples)
    log(f"base model bundled://tiny-base; scoring {len(rows)} held-out arithmetic problems before training...")
    before = task_accuracy(trainer.model, trainer.tokenizer, rows, max_new_tokens=40)
    sample = before["samples"][0]
    log(f"before: accuracy {before['accuracy']:.1%} ({before['correct']}/{before['examples']})")
    log(_show(sample))
    result = trainer.fit(overwrite=True)
    after = task_accuracy(trainer.model, trainer.tokenizer, rows, max_new_tokens=40)
    log(f"after {result.step} steps of {method}: accuracy {after['accuracy']:.1%} "
        f"({after['correct']}/{after['examples']}); eval loss {result.eval_start.get('eval_loss', float('nan')):.3f}"
        f" -> {result.eval_end.get('eval_loss', float('nan')):.3f}")
    log(_show(after["samples"][0]))
    adapter_dir = result.adapter_dir or out / "adapter"
    log("")
    log(f"written: {adapter_dir} (adapter), {out / 'loss.png'} (loss curve), {out / 'metrics.jsonl'}")
    log("next:")
    log(f"  lorakit generate --adapter {adapter_dir} --prompt {_shell_quote(sample['prompt'])} --max-new-tokens 40")
    log(f"  lorakit inspect {adapter_dir}")
    log(f"  lorakit merge --adapter {adapter_dir} --out {out / 'merged'}")
    log("  lorakit compare configs/compare-arithmetic.yaml --out compare-out   # every method, same budget")
    log("  lorakit train CONFIG.yaml                                            # your own data")
    return {"accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
            "eval_loss_before": result.eval_start.get("eval_loss"), "eval_loss_after": result.eval_end.get("eval_loss"),
            "sample_before": sample["completion"], "sample_after": after["samples"][0]["completion"],
            "adapter": str(adapter_dir), "plot": str(out / "loss.png")}


def _show(sample: dict[str, Any], width: int = 150) -> str:
    """A sample generation on two indented lines (whitespace collapsed, long completions cut)."""
    prompt = " ".join(sample["prompt"].split())
    completion = " ".join(sample["completion"].split())
    if len(completion) > width:
        completion = completion[:width] + " ..."
    return (f"  prompt:     {prompt}\n  generation: {completion or '(nothing)'}\n"
            f"  (expected answer {sample['answer']}, extracted {sample['predicted']})")


def _shell_quote(text: str) -> str:
    """``$'...'`` quoting (bash, zsh) that keeps the prompt's newline."""
    return "$'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


__all__ = ["demo_config", "run_bundled_demo"]
