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

import errno
import fcntl
import io
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
from lorakit.adapt.model import adapter_tensors
from lorakit.core.callbacks import TrainingCallback
from lorakit.errors import LorakitError
from lorakit.formats.native import save
from lorakit.util import files
from lorakit.util.files import sha256_file

CKPT_DIR = "checkpoints"
STATE_FILE = "state.pt"
TRAINER_FILE = "trainer.json"
RUN_FILE = "run.json"
_NAME = re.compile(r"ckpt-(\d+)")


class RunDirError(LorakitError, FileExistsError):
    """The output directory holds a different run (or a finished one) and ``--overwrite`` was not given, or
    another process is training in it."""


class CheckpointError(LorakitError, OSError):
    """A checkpoint could not be written (disk full...) or read back (failed checksum, non-finite values)."""


def _os_reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    return f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")


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


def verify_checkpoint(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be trusted (a file missing, or its checksum differs), or ``None`` if it is whole.

    Checkpoints written before checksums were recorded have nothing to verify and pass.
    """
    try:
        files = read_json(ckpt / TRAINER_FILE).get("files")
    except LorakitError as e:
        return str(e)
    if files is None:
        return None
    for rel, digest in files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        if sha256_file(f) != digest:
            return f"{rel} fails its checksum (corrupted)"
    return None


def latest_good_checkpoint(output_dir: str | os.PathLike[str],
                           log: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete checkpoint whose files pass their checksums; each one skipped is said in ``log``.

    Raises:
        CheckpointError: checkpoints exist but none passes (resuming would silently start over).
    """
    found = list_checkpoints(output_dir)
    for _, ckpt in reversed(found):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        if log is not None:
            log(f"skipping checkpoint {ckpt.name}: {problem}")
    if found:
        raise CheckpointError(f"no checkpoint in {checkpoint_root(output_dir)} passes its checksums; pass "
                              "--overwrite to start over")
    return None


def _non_finite(model: nn.Module, adapters: list[str], optimizer: torch.optim.Optimizer) -> str:
    """Which of the adapters' tensors and the optimizer state hold NaN or inf ('' if none)."""
    bad = [n for n in adapters if any(t.is_floating_point() and not bool(torch.isfinite(t).all())
                                      for t in adapter_tensors(model, n).values())]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.is_floating_point()]
    if state and not all(bool(torch.isfinite(v).all()) for v in state):
        bad.append("the optimizer state")
    return ", ".join(bad)


class RunLock:
    """An advisory lock on a run directory (``.lock``, ``flock``): one training process at a time.

    The kernel releases it when the process ends, however it ends (SIGKILL included), so a stale lock never
    blocks a resume. A second process is refused with a message naming the holder's pid.
    """

    FILE = ".lock"

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.path = Path(output_dir) / self.FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"{self.path.parent} is in use: another lorakit process (pid {holder}) is training "
                              "in it; wait for it to finish or choose another output.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


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
    try:
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial checkpoint (it also frees the space)
        last = latest_checkpoint(output_dir)
        raise CheckpointError(f"could not write checkpoint {final.name}: {_os_reason(e)}; "
                              + (f"the last complete checkpoint {last} is intact" if last else
                                 "no earlier checkpoint exists")) from e
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
    """``torch.save`` a dict of tensors and plain values (no custom classes, loadable with weights_only).

    Serialised in memory first, then written with a plain file write, so a full disk raises ``OSError``
    (``ENOSPC``) rather than torch's opaque ``basic_ios::clear: iostream error``.
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    with open(path, "wb") as f:
        f.write(buf.getbuffer())


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
    bad = _non_finite(model, adapters, optimizer)
    if bad:
        raise CheckpointError(f"refusing to write checkpoint {step}: {bad} hold non-finite values; the last "
                              f"complete checkpoint is {latest_checkpoint(output_dir)}")

    def write(d: Path) -> None:
        save(model, d / "adapter", adapters[0])
        for name in adapters[1:]:
            save(model, d / "adapter" / name, name)
        save_state(d / STATE_FILE, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                    "scaler": scaler.state_dict(), "rng": rng_state() if rng is None else rng,
                                    "callbacks": [cb.state_dict() for cb in callbacks]})
        # last: trainer.json marks the checkpoint complete and holds the checksum of every other file in it
        files = {str(f.relative_to(d)): sha256_file(f) for f in sorted(d.rglob("*")) if f.is_file()}
        write_json(d / TRAINER_FILE, {**position, "lorakit_version": __version__, "files": files})

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


#: Settings a resumed run may change (e.g. after a NaN stop: a lower learning rate); the rest define the run.
RESUMABLE_CHANGES = ("training.lr", "training.max_grad_norm")


def prepare_run_dir(output_dir: str | os.PathLike[str], fingerprint: str, config: dict[str, Any], *,
                    resume: bool, overwrite: bool, log: Callable[[str], None] | None = None) -> bool:
    """Check the output directory against this run and make it ready; returns whether to resume.

    - Empty or new directory: start fresh.
    - ``overwrite``: delete the previous run's files and start fresh.
    - Same run (same fingerprint) and ``resume``: continue from the latest checkpoint (fresh if none).
    - ``resume`` with only :data:`RESUMABLE_CHANGES` changed (what a NaN stop advises): continue with the new
      values, noted in the log and in ``run.json``'s ``changes``.
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
        if not (resume and diff and set(diff) <= set(RESUMABLE_CHANGES)):
            shown = ", ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
            allowed = f" (--resume may change only {', '.join(RESUMABLE_CHANGES)})" if resume else ""
            raise RunDirError(f"{out} already holds a different run (differs in: {shown or 'unknown'}){allowed}; "
                              "pass --overwrite to replace it or choose another output.dir")
        changes = {k: [_get(prev.get("config", {}), k), _get(config, k)] for k in diff}
        if log is not None:
            log("resuming with changed settings: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()))
        write_json(run_file, {**prev, "fingerprint": fingerprint, "config": config,
                              "changes": [*prev.get("changes", []), changes]})
    elif not resume:
        raise RunDirError(f"{out} already holds this run; pass --resume to continue it or --overwrite to "
                          "start over")
    clean_incomplete(out)
    return latest_checkpoint(out) is not None


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


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


__all__ = ["CheckpointError", "RunDirError", "RunLock", "clean_incomplete", "latest_checkpoint", "latest_good_checkpoint",
           "list_checkpoints", "load_state", "verify_checkpoint",
           "load_training_checkpoint", "prepare_run_dir", "rng_state", "save_state", "save_training_checkpoint",
           "set_rng_state", "write_checkpoint"]
