"""``make demo``: fine-tune the bundled pretrained tiny Llama on one-step word problems, on CPU, in about a minute.

The task (:func:`lorakit.evaluation.tasks.generate_one_more`)::

    Question: Zoe has 4 shells and finds one more. How many shells does Zoe have now?
    Answer: 5

It measures exact-match accuracy (greedy decoding) on 100 held-out problems before and after training, shows
one held-out problem's generation before and after, writes the adapter, ``metrics.jsonl`` and ``loss.png``
into ``runs/demo/``, and prints what to run next. Nothing is downloaded: the model (``bundled://tiny-base``)
and the data (``lorakit/bundled/data/one_more_*.jsonl``) ship with lorakit.

Why this model: ``bundled://tiny-base`` (5M parameters, pretrained by ``scripts/pretrain_base.py``) is the only
model that ships inside the package (``make demo`` runs offline on a fresh machine), and a training step of
batch 8 takes about 0.1 s on two CPU cores.

Why this task: the held-out problems are new sentences (all with names that never occur in the training
file), so the model has to read them: find the number, tell a gain from a loss, and add or take away one.
The base model scores 0% (it writes Python-documentation prose); always answering the most common number
would score 12%; 600 steps of DoRA (about a minute) take it to 100% (``docs/demo.md`` has the measured
run). The earlier demo task, multi-step arithmetic (``arithmetic_*.jsonl``, still ``--task arithmetic``),
stays near 5% for every method at this model size and budget, so nothing visibly changed. What the held-out
problems do *not* test: numbers, objects and verbs outside those of training (1-9 things, 12 objects, 4 ways
each to gain or lose one).

Why DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353), r 16, alpha 512, lr 5e-4, 600 steps:
``scripts/demo_sweep.py`` (``benchmarks/results/demo-sweep.json``) trained DoRA, LoRA and LoRA-SB on the
training file split by name (validation: the rows of two training names; never the eval file) at several
learning rates, alphas, step counts and seeds, and keeps the configuration with the best worst seed. LoRA-SB
(the earlier demo's method) reached at most 27% validation accuracy and LoRA at its default alpha at most
49% in 400 steps: on this small model they mostly learn the answers' distribution. LoRA with alpha 128, lr
5e-4 reached 96%, 86%, 60% at seeds 0, 1, 2 in 600 steps; DoRA with alpha 512 (scale ``alpha / r = 32``; its
per-row magnitude keeps the weight norms in check) reached 100%, 100%, 99%.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.evaluation.generation import answer_rows, task_accuracy
from lorakit.methods import get_method
from lorakit.train.config import TrainConfig
from lorakit.train.trainer import Trainer
from lorakit.util.resources import BUNDLED_DIR

DATA_DIR = BUNDLED_DIR / "data"
#: ``task -> (train file, eval file)`` of the bundled tasks the demo can run.
DEMO_TASKS: dict[str, tuple[Path, Path]] = {
    "one_more": (DATA_DIR / "one_more_train.jsonl", DATA_DIR / "one_more_eval.jsonl"),
    "arithmetic": (DATA_DIR / "arithmetic_train.jsonl", DATA_DIR / "arithmetic_eval.jsonl"),
}
#: The demo's task.
DEMO_TASK = "one_more"
ONE_MORE_TRAIN, ONE_MORE_EVAL = DEMO_TASKS["one_more"]
ARITHMETIC_TRAIN, ARITHMETIC_EVAL = DEMO_TASKS["arithmetic"]
#: The demo's method and its options (chosen by scripts/demo_sweep.py, see the module docstring).
DEMO_METHOD = "dora"
DEMO_ADAPTER: dict[str, Any] = {"r": 16, "alpha": 512}

#: Optimizer steps (batch 8) of the demo.
DEMO_STEPS = 600
#: Per task, per method learning rates tuned on each task's training data (the file says how), shipped with it.
DEMO_LRS_FILE = DATA_DIR / "demo_lrs.json"


def demo_options(method: str) -> dict[str, Any]:
    """The adapter options ``method`` gets in the demo unless the caller passes others: the demo's own for
    :data:`DEMO_METHOD`, those shipped in :data:`DEMO_LRS_FILE` for the others (else the method's defaults)."""
    if method == DEMO_METHOD:
        return dict(DEMO_ADAPTER)
    return dict(json.loads(DEMO_LRS_FILE.read_text()).get("options", {}).get(method, {}))


def demo_lr(task: str, method: str) -> float:
    """The demo's learning rate for ``method`` on ``task``: the tuned one (:data:`DEMO_LRS_FILE`), else the task's
    LoRA rate times the method's :attr:`~lorakit.Method.relative_lr`."""
    tuned = json.loads(DEMO_LRS_FILE.read_text())[task]
    return float(tuned[method]) if method in tuned else float(tuned["lora"]) * get_method(method).relative_lr


#: Tokens generated per problem when scoring (the answers are one or two tokens, then ``</s>``).
MAX_NEW_TOKENS = {"one_more": 8, "arithmetic": 40}


def demo_config(out: str | os.PathLike[str], *, steps: int = DEMO_STEPS, method: str = DEMO_METHOD,
                lr: float | None = None, progress: bool = True, task: str = DEMO_TASK,
                train_path: str | os.PathLike[str] | None = None, eval_path: str | os.PathLike[str] | None = None,
                seed: int = 0, **adapter: Any) -> TrainConfig:
    """The demo's training config: bundled tiny-base, ``task``'s bundled data, ``steps`` steps of batch 8 on CPU.

    Args:
        out: the run directory.
        method: any name in :data:`lorakit.METHODS`; its options start from :func:`demo_options`.
        lr: learning rate (default: :func:`demo_lr` of ``task`` and ``method``).
        task: a key of :data:`DEMO_TASKS`.
        train_path, eval_path: other data files (the sweep's split of the training file); default ``task``'s.
        seed: training seed.
        adapter: method options.
    """
    if task not in DEMO_TASKS:
        raise ConfigError(f"unknown demo task {task!r}; choose: {', '.join(DEMO_TASKS)}")
    train_file, eval_file = DEMO_TASKS[task]
    options = {**demo_options(method), **adapter}
    options["method"] = method
    return TrainConfig.parse({
        "model": {"path": "bundled://tiny-base", "dtype": "float32"},
        "adapter": options,
        "data": {"train": str(train_path or train_file), "eval": str(eval_path or eval_file),
                 "max_length": 48 if task == "one_more" else 96},
        "training": {"max_steps": steps, "batch_size": 8,
                     "lr": lr if lr is not None else demo_lr(task, method),
                     "warmup_steps": max(1, steps // 10), "device": "cpu", "eval_batch_size": 50, "seed": seed},
        "output": {"dir": str(out), "progress": progress, "tensorboard": False},
    })


def run_bundled_demo(out: str | os.PathLike[str] = "runs/demo", *, steps: int = DEMO_STEPS,
                     method: str = DEMO_METHOD, examples: int = 100, log: Callable[[str], None] = print,
                     progress: bool = True, task: str = DEMO_TASK, **adapter: Any) -> dict[str, Any]:
    """Train ``method`` (default DoRA) on the bundled ``task`` and report accuracy before and after.

    Args:
        out: the run directory (``adapter/``, ``metrics.jsonl``, ``loss.png``); replaced if it exists.
        steps: optimizer steps (batch 8).
        method: any name in :data:`lorakit.METHODS`.
        examples: held-out problems scored for accuracy (greedy decoding, exact match).
        task: a key of :data:`DEMO_TASKS` (``"arithmetic"``: the multi-step word problems of the method
            comparison).
        adapter: extra method options.

    Returns:
        ``{"task", "method", "steps", "examples", "accuracy_before", "accuracy_after", "eval_loss_before",
        "eval_loss_after", "sample_before", "sample_after", "adapter", "plot", "seconds"}``.
    """
    start = time.perf_counter()
    out = Path(out)
    cfg = demo_config(out, steps=steps, method=method, progress=progress, task=task, **adapter)
    train_file, eval_file = DEMO_TASKS[task]
    options = cfg.adapter.method_config()
    described = method + "".join(f" {k} {getattr(options, k):g}" for k in ("r", "alpha")
                                 if isinstance(getattr(options, k, None), int | float))
    log(f"lorakit demo: fine-tune bundled://tiny-base (a 5M-parameter Llama pretrained on Python docs) with "
        f"{described}, lr {cfg.training.lr:g}, on CPU")
    trainer = Trainer(None, cfg, log=log)
    trainer.prepare()
    rows = answer_rows(eval_file, examples)
    with train_file.open(encoding="utf-8") as f:
        n_train = sum(1 for line in f if line.strip())
    log(f"task: {_TASK_LINES.get(task, task)}")
    log(f"data: {n_train} training problems ({train_file.name})")
    log(f"score: exact match of the greedy answer on {len(rows)} held-out problems ({eval_file.name})")
    tokens = MAX_NEW_TOKENS.get(task, 40)
    before = task_accuracy(trainer.model, trainer.tokenizer, rows, max_new_tokens=tokens)
    log("")
    log(f"before training: {before['correct']}/{before['examples']} correct ({before['accuracy']:.0%})")
    log(_show(before["samples"][0]))
    log("")
    log(f"training: {steps} steps of batch {cfg.training.batch_size}...")
    result = trainer.fit(overwrite=True).finished()  # Ctrl-C: nothing to score or show
    after = task_accuracy(trainer.model, trainer.tokenizer, rows, max_new_tokens=tokens)
    loss_before = result.eval_start.get("eval_loss", float("nan"))
    loss_after = result.eval_end.get("eval_loss", float("nan"))
    log("")
    log(f"after {result.step} steps: {after['correct']}/{after['examples']} correct ({after['accuracy']:.0%}); "
        f"held-out loss {loss_before:.2f} -> {loss_after:.2f}")
    log(_show(after["samples"][0]))
    seconds = time.perf_counter() - start
    adapter_dir = result.adapter_dir or out / "adapter"
    log("")
    log(f"result: held-out accuracy {before['accuracy']:.0%} -> {after['accuracy']:.0%} "
        f"({len(rows)} problems, {seconds:.0f} s)")
    log(f"written: {adapter_dir} (the adapter), {out / 'loss.png'} (loss curve), {out / 'metrics.jsonl'}")
    log("next:")
    sample = before["samples"][0]
    log(f"  lorakit generate --adapter {adapter_dir} --prompt {_shell_quote(sample['prompt'])} "
        f"--max-new-tokens {tokens}")
    log(f"  lorakit inspect {adapter_dir}                      # what was trained")
    log(f"  lorakit merge --adapter {adapter_dir} --out {out / 'merged'}   # one plain checkpoint")
    log("  lorakit demo --method lora                                  # plain LoRA, same task and budget")
    log("  lorakit compare configs/compare-arithmetic.yaml --out compare-out   # every method, same budget")
    log("  lorakit train CONFIG.yaml                                   # your own data")
    return {"task": task, "method": method, "steps": result.step, "examples": len(rows),
            "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
            "eval_loss_before": result.eval_start.get("eval_loss"), "eval_loss_after": result.eval_end.get("eval_loss"),
            "sample_before": sample["completion"], "sample_after": after["samples"][0]["completion"],
            "adapter": str(adapter_dir), "plot": str(out / "loss.png"), "seconds": seconds}


_TASK_LINES = {
    "one_more": "someone has 1-9 things and gains or loses one; how many now? (held-out problems use names "
                "never seen in training)",
    "arithmetic": "2-3 step arithmetic word problems (held-out problems are new number and wording draws)",
}


def _show(sample: dict[str, Any], width: int = 150) -> str:
    """A sample generation on indented lines (whitespace collapsed, long completions cut)."""
    prompt = " ".join(sample["prompt"].split())
    completion = " ".join(sample["completion"].split())
    if len(completion) > width:
        completion = completion[:width] + " ..."
    verdict = "correct" if sample["predicted"] == sample["answer"] else "wrong"
    return (f"  prompt:     {prompt}\n  generation: {completion or '(nothing)'}\n"
            f"  expected {sample['answer']}, got {sample['predicted'] or 'no number'}: {verdict}")


def _shell_quote(text: str) -> str:
    """``$'...'`` quoting (bash, zsh) that keeps the prompt's newline."""
    return "$'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


__all__ = ["DEMO_ADAPTER", "DEMO_LRS_FILE", "DEMO_METHOD", "DEMO_STEPS", "DEMO_TASK", "DEMO_TASKS", "demo_lr", "demo_options",
           "demo_config", "run_bundled_demo"]
