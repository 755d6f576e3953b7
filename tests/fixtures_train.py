"""Fixtures for the training pipeline tests: a tiny saved Llama + tokenizer and small JSONL files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorakit.core.callbacks import TrainingCallback
from lorakit.testing import DEMO_DATA, build_tiny_llama, build_tokenizer, record_texts
from lorakit.train.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"base", "train", "eval", "cls_base", "cls_train"}``: a tiny causal Llama and a tiny classifier saved
    with a word-level tokenizer, 64 training and 16 eval prompt/completion lines, 48 labelled lines."""
    root = tmp_path_factory.mktemp("tiny_run")
    lines = DEMO_DATA.read_text().splitlines()
    train = root / "train.jsonl"
    train.write_text("\n".join(lines[:64]) + "\n")
    evalf = root / "eval.jsonl"
    evalf.write_text("\n".join(lines[64:80]) + "\n")
    cls_rows = [{"text": f"the {w} is {'good great fine' if i % 2 else 'bad awful poor'}", "label": i % 2}
                for i, w in enumerate(["cat", "dog", "tree", "house", "car", "book", "bird", "cup"] * 6)]
    cls_train = write_jsonl(root / "cls.jsonl", cls_rows)
    tok = build_tokenizer(record_texts(train) + record_texts(evalf) + record_texts(cls_train))
    base = root / "base"
    build_tiny_llama(len(tok), hidden=32).save_pretrained(base)
    tok.save_pretrained(base)
    cls_base = root / "cls_base"
    build_tiny_llama(len(tok), hidden=32, classification=True, num_labels=2).save_pretrained(cls_base)
    tok.save_pretrained(cls_base)
    return {"base": base, "train": train, "eval": evalf, "cls_base": cls_base, "cls_train": cls_train}


def make_config(tiny_run: dict[str, Path], out: Path, *, method: str = "lora", options: dict[str, Any] | None = None,
                **sections: dict[str, Any]) -> Path:
    """Write a small run config for ``tiny_run`` into ``out/../<out.name>.yaml`` and return its path."""
    cfg: dict[str, Any] = {
        "model": {"path": str(tiny_run["base"]), "dtype": "float32"},
        "adapter": {"method": method, **(options if options is not None else {"r": 4})},
        "data": {"train": str(tiny_run["train"]), "eval": str(tiny_run["eval"]), "max_length": 48},
        "training": {"max_steps": 6, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1, "device": "cpu",
                     "seed": 0},
        "output": {"dir": str(out), "progress": False, "tensorboard": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = out.with_name(out.name + ".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def kill_when_checkpointed(cfg: Path, out: Path, step: int, timeout: float = 120) -> bool:
    """Run ``lorakit train CFG`` in a subprocess and SIGKILL it once a checkpoint of ``step`` or later exists;
    returns whether it was still running when killed (``False``: it finished or died first)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "train", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            found = list_checkpoints(out)
            if found and found[-1][0] >= step:
                break
            time.sleep(0.01)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        return alive
    finally:
        proc.kill()
        proc.wait()


class CtrlCAfter(TrainingCallback):
    """A training callback that sends this process SIGINT (Ctrl-C) after ``steps`` optimizer steps: the loop
    finishes the step, checkpoints and returns an interrupted result."""

    def __init__(self, steps: int) -> None:
        self.at, self.steps = steps, 0

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.at:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine thread barriers dominate their ops."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
