"""Crash-safe training checkpoints and run directories.

A checkpoint is a directory ``OUTPUT/checkpoints/ckpt-00000120/`` holding

- ``adapter/``: the adapter, written by :func:`lorakit.save` (``head/`` too for a trained task head);
- ``state.pt``: optimizer, scheduler, grad-scaler and callback states plus every RNG state, a dict of
  tensors and plain Python values only, read back with ``torch.load(weights_only=True)`` (no pickle
  code runs on load);
- ``trainer.json``: step, data position and counters.

It is written into ``ckpt-00000120.tmp/`` and renamed when complete, so a run killed at any moment (even
SIGKILL mid-write) leaves only complete checkpoints under their final names; :func:`latest_checkpoint`
ignores (and :func:`clean_incomplete` deletes) the leftovers. Old checkpoints are renamed to ``*.del``
before deletion for the same reason.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit._version import __version__
from lorakit.core.callbacks import TrainingCallback
from lorakit.errors import LorakitError
from lorakit.formats.native import save
from lorakit.util import files

CKPT_DIR = "checkpoints"
STATE_FILE = "state.pt"
TRAINER_FILE = "trainer.json"
RUN_FILE = "run.json"
_NAME = re.compile(r"ckpt-(\d+)")


class RunDirError(LorakitError, FileExistsError):
    """The output directory holds a different run (or a finished one) and ``--overwrite`` was not given."""


def checkpoint_root(output_dir: str | os.PathLike[str]) -> Path:
    return Path(output_dir) / CKPT_DIR


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _NAME.fullmatch(p.name)
        if m and p.is_dir() and (p / TRAINER_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint, or ``None``."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def clean_incomplete(output_dir: str | os.PathLike[str]) -> None:
    """Delete what an interrupted write or delete left behind (``*.tmp``, ``*.del``)."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.suffix in (".tmp", ".del"):
                shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    """Flush files to disk so a rename never publishes data that a power loss could still lose."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def write_checkpoint(output_dir: str | os.PathLike[str], step: int, write: Callable[[Path], None],
                     *, keep: int) -> Path:
    """Write a checkpoint atomically and keep only the ``keep`` newest.

    Args:
        write: fills the (temporary) directory it is given.
        keep: number of complete checkpoints to keep, this one included.

    Returns:
        The final checkpoint directory.
    """
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    _fsync_tree(tmp)
    if final.exists():  # the same step saved twice (e.g. a final save right after a periodic one)
        _delete(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(output_dir)[:-keep]:
        _delete(old)
    return final


def _delete(path: Path) -> None:
    doomed = path.with_name(path.name + ".del")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)  # atomically stop being a complete checkpoint, then delete at leisure
    shutil.rmtree(doomed, ignore_errors=True)


# --- state files ----------------------------------------------------------------------------------------------
def save_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """``torch.save`` a dict of tensors and plain values (no custom classes, loadable with weights_only)."""
    torch.save(state, path)


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a :func:`save_state` file safely (``weights_only=True``: no code runs while loading)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise LorakitError(f"{path}: unreadable checkpoint state ({e})") from None


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Atomically write a run's JSON file (sorted keys)."""
    files.write_json(path, data, sort_keys=True)


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A run's JSON file; :class:`LorakitError` if it is missing or malformed."""
    return files.read_json(path, "run file")


# --- a training run's state ----------------------------------------------------------------------------------
def save_training_checkpoint(output_dir: str | os.PathLike[str], step: int, *, model: nn.Module,
                             adapters: list[str], optimizer: torch.optim.Optimizer, scheduler: Any,
                             scaler: torch.amp.GradScaler, callbacks: list[TrainingCallback],
                             position: dict[str, int], keep: int, rng: list[dict[str, Any]] | None = None) -> Path:
    """Write everything a resumed run needs, atomically (see the module docstring).

    Args:
        adapters: adapter names to save; the first goes to ``adapter/``, the others to ``adapter/<name>/``.
        position: ``step``, ``micro`` (micro-batches consumed) and ``tokens``, written to ``trainer.json``.
        rng: every process's :func:`rng_state` by rank, in a multi-process run (default: this process's).
    """
    def write(d: Path) -> None:
        save(model, d / "adapter", adapters[0])
        for name in adapters[1:]:
            save(model, d / "adapter" / name, name)
        save_state(d / STATE_FILE, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                    "scaler": scaler.state_dict(), "rng": rng_state() if rng is None else rng,
                                    "callbacks": [cb.state_dict() for cb in callbacks]})
        write_json(d / TRAINER_FILE, {**position, "lorakit_version": __version__})  # last: trainer.json marks it

    return write_checkpoint(output_dir, step, write, keep=keep)


def load_training_checkpoint(ckpt: Path, *, optimizer: torch.optim.Optimizer, scheduler: Any,
                             scaler: torch.amp.GradScaler, callbacks: list[TrainingCallback], rank: int = 0,
                             world: int = 1) -> dict[str, int]:
    """Restore optimizer, scheduler, scaler, callback and RNG states; returns the position (``step``...).

    ``rank``/``world``: this process in a multi-process run, which must have as many processes as the one
    that wrote the checkpoint (the global batch, and so the data position, depends on it).

    The adapter itself is restored separately (``lorakit.load`` of ``ckpt/adapter``) before the optimizer is
    built, since a method may have changed its shapes during training (rank pruning).
    """
    state = load_state(ckpt / STATE_FILE)
    if len(state["callbacks"]) != len(callbacks):
        raise LorakitError(f"{ckpt} holds {len(state['callbacks'])} training-callback states but the method "
                           f"now has {len(callbacks)}; it was written by a different setup")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    for cb, s in zip(callbacks, state["callbacks"], strict=True):
        cb.load_state_dict(s)
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per process
    if len(rngs) != world:
        raise LorakitError(f"{ckpt} was written by a run of {len(rngs)} process(es); resume it with as many "
                           f"(not {world}): the global batch is training.batch_size x processes")
    set_rng_state(rngs[rank])
    info = read_json(ckpt / TRAINER_FILE)
    return {k: int(info.get(k, 0)) for k in ("step", "micro", "tokens")}


# --- random number generators ---------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from: Python, NumPy, torch CPU and CUDA (if initialised)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:  # pragma: no cover - numpy ships with torch in practice
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                             n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    """Python's RNG state is nested tuples; serialisers may hand them back as lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# --- run directories ------------------------------------------------------------------------------------
#: What a run writes into its output directory (deleted by ``--overwrite``; other files are left alone).
RUN_ARTIFACTS = ("adapter", CKPT_DIR, "metrics.jsonl", "loss.png", "config.yaml", RUN_FILE, "tensorboard")


def prepare_run_dir(output_dir: str | os.PathLike[str], fingerprint: str, config: dict[str, Any], *,
                    resume: bool, overwrite: bool) -> bool:
    """Check the output directory against this run and make it ready; returns whether to resume.

    - Empty or new directory: start fresh.
    - ``overwrite``: delete the previous run's files and start fresh.
    - Same run (same fingerprint) and ``resume``: continue from the latest checkpoint (fresh if none).
    - Otherwise refuse with :class:`RunDirError`, naming the differing settings.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / RUN_FILE
    if overwrite:
        for name in RUN_ARTIFACTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        return False
    if not run_file.is_file():
        if latest_checkpoint(out) is not None or (out / "adapter").exists():
            raise RunDirError(f"{out} holds training output but no {RUN_FILE}; pass --overwrite to replace it")
        return False
    prev = read_json(run_file)
    if prev.get("fingerprint") != fingerprint:
        diff = _diff(prev.get("config", {}), config)
        shown = ", ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
        raise RunDirError(f"{out} already holds a different run (differs in: {shown or 'unknown'}); "
                          "pass --overwrite to replace it or choose another output.dir")
    if not resume:
        raise RunDirError(f"{out} already holds this run; pass --resume to continue it or --overwrite to "
                          "start over")
    clean_incomplete(out)
    return latest_checkpoint(out) is not None


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two nested dicts differ (the ``output`` section is not part of a run's identity)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if not prefix and k == "output":
                continue
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


__all__ = ["RunDirError", "clean_incomplete", "latest_checkpoint", "list_checkpoints", "load_state",
           "load_training_checkpoint", "prepare_run_dir", "rng_state", "save_state", "save_training_checkpoint",
           "set_rng_state", "write_checkpoint"]
