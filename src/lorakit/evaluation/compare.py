"""``lorakit compare``: train several methods on the same data, steps, seed and budget, and report.

The config (:mod:`lorakit.evaluation.compare_config`) says which methods run and on what. Each run is a fresh
child process (``python -m lorakit.evaluation.compare_worker JOB.json``), so its peak memory and step time are its
own and a failing method is recorded in ``results.json`` instead of stopping the comparison.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import torch

from lorakit._version import __version__
from lorakit.errors import ConfigError
from lorakit.evaluation.claims import lr_grid
from lorakit.evaluation.compare_config import RESULT_SUFFIX, CompareConfig, budgets_path
from lorakit.evaluation.report import CONTENDED, cpu_use, display_path, write_report
from lorakit.methods import get_method
from lorakit.train.config import ADAPTER_KEYS, TrainConfig, TrainingConfig
from lorakit.util.files import write_json
from lorakit.util.validation import parse

RESULTS_FILE = "results.json"


# --- orchestration ---------------------------------------------------------------------------------------------
def host_info() -> dict[str, Any]:
    """Where the numbers were made. The same seed gives the same run on the same machine and software
    (bit-identical losses across processes and thread counts); another CPU model or torch build may round a
    kernel differently and drift by ~1e-7 per step, so both are recorded."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or None)
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "cpu_model": cpu, "torch": torch.__version__, "transformers": _version("transformers"),
            "lorakit": __version__}


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError:
        return []


def _version(pkg: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def run_compare(cc: CompareConfig, labels: Sequence[str], out: str | os.PathLike[str], *,
                log: Callable[[str], None] = print, command: str | None = None, resume: bool = False
                ) -> dict[str, Any]:
    """Run every ``(label, seed)`` in its own process, then write ``results.json`` and the report.

    Every run config is validated before the first run starts. A run that fails (exit status, timeout) is
    recorded with its error and the rest go on. ``results.json`` is rewritten after each run. ``resume`` keeps
    the result of every run already finished in ``out`` with exactly this job (the same run config and the same
    measurements asked), so an interrupted comparison, or a grid given more points, runs only what is missing.
    Ctrl-C or SIGTERM kills the running workers (their runs give no result and are not failures), starts no other,
    writes the report of what finished (it names what has not run) and raises ``KeyboardInterrupt``.
    """
    out = Path(out)
    runs_dir = out / "runs"
    labels = list(dict.fromkeys(labels))
    if not labels:
        raise ConfigError("--methods: no methods given")
    shared = set(cc.base.get("adapter") or {}) - set(ADAPTER_KEYS)
    unused = sorted(k for k in shared
                    if not any(k in get_method(cc.method_of(lab)).config_cls.model_fields for lab in labels))
    if unused:
        raise ConfigError(f"adapter: {', '.join(unused)} is an option of none of the compared methods")
    jobs = [(lab, seed) for seed in cc.compare.seeds for lab in labels]
    configs = {job: cc.run_config(job[0], job[1], runs_dir / _run_name(*job)) for job in jobs}
    base_cfg = configs[jobs[0]]
    shared_training = parse(TrainingConfig, cc.base.get("training") or {}, "training").model_dump(mode="json")
    runs_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "lorakit_version": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
        "host": host_info(),
        "labels": labels, "seeds": cc.compare.seeds,
        "compare": _compare_section(cc),
        "methods": {lab: {"method": cc.method_of(lab), **configs[(lab, cc.compare.seeds[0])].adapter.options,
                          **_model_diff(configs[(lab, cc.compare.seeds[0])]),
                          "training": _training_diff(configs[(lab, cc.compare.seeds[0])], shared_training)}
                    for lab in labels},
        "training": {k: v for k, v in shared_training.items() if k != "seed"},
        "model": base_cfg.model.path,
        "data": {**base_cfg.data.model_dump(mode="json"), "train": display_path(base_cfg.data.train),
                 "eval": display_path(base_cfg.data.eval)},
        "base": None, "runs": []}
    if cc.compare.lr_sweep:
        results["lr_sweep"] = sweep_summary(cc.compare.lr_sweep)
        results["compare"]["lr_sweep"] = results["lr_sweep"]["path"]
    results["experiments"] = experiments(cc.compare.experiments)
    results["compare"]["experiments"] = {k: v["path"] for k, v in results["experiments"].items()}
    done: dict[int, dict[str, Any]] = {}
    lock = threading.Lock()
    evaluating_base = True  # a started job is to evaluate the base model: the first
    workers = _Workers()

    def run_one(i: int, base: bool | None = None) -> None:
        nonlocal evaluating_base
        lab, seed = jobs[i]
        with lock:  # the first job to start while nobody has evaluated the base model (or is at it) does
            if base is None:
                base = results["base"] is None and not evaluating_base
            evaluating_base = evaluating_base or base
        try:
            log(f"[{i + 1}/{len(jobs)}] {lab} (seed {seed})" + (", after evaluating the base model" if base else ""))
            run = _run_with_retries(cc, lab, configs[(lab, seed)], runs_dir / _run_name(lab, seed), base=base,
                                    log=log, resume=resume, workers=workers)
        except _Stopped:  # killed by the comparison's own stop, or never started: no failure of the method
            return
        with lock:
            if base:
                evaluating_base = False  # if it failed, the next job to start evaluates the base model
            if run.get("base") is not None:
                base_result = run.pop("base")
                if results["base"] is None:
                    results["base"] = base_result
            done[i] = {"label": lab, "method": cc.method_of(lab), "seed": seed, **run}
            results["runs"] = [done[k] for k in sorted(done)]
            write_json(out / RESULTS_FILE, results, indent=1, allow_nan=False)
            log("  " + _progress(list(done.values()), len(jobs), cc.compare.parallel))

    # every job runs at once up to compare.parallel (the first also evaluates the base model: no core waits for
    # it); Ctrl-C or SIGTERM kills the running workers, starts no more, and writes the report of what finished
    pool = ThreadPoolExecutor(max_workers=cc.compare.parallel) if cc.compare.parallel > 1 and len(jobs) > 1 else None
    try:
        with _signals_interrupt():
            try:
                if pool is not None:
                    log(f"running {cc.compare.parallel} jobs at a time")
                    for fut in [pool.submit(run_one, k, k == 0 or None) for k in range(len(jobs))]:
                        fut.result()
                else:
                    for k in range(len(jobs)):
                        run_one(k, k == 0 or None)
                first_ok = next((k for k in sorted(done) if done[k].get("ok")), None)
                if results["base"] is None and first_ok is not None:
                    # every job that was to evaluate the base model failed, after the others had started: one
                    # finished job runs again (the same config and seed: the same result) and evaluates it this time
                    log("the base model is not evaluated yet: its job failed")
                    run_one(first_ok, base=True)
            except BaseException:
                workers.stop()
                raise
            finally:
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
    except KeyboardInterrupt:
        log(f"interrupted: {len(done)} of {len(jobs)} runs have results in {out / RESULTS_FILE}; the same command "
            "with --resume runs only the others")
        write_report(results, out)
        raise
    write_report(results, out)
    return results


def experiments(paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The experiments' results by name (``compare.experiments``), each with the ``path`` it came from. An
    experiment that has not run yet (no file) is left out, with a note, rather than stopping the comparison."""
    out = {}
    for name, path in paths.items():
        p = Path(path)
        if not p.is_file():
            continue
        try:
            out[name] = {**json.loads(p.read_text()), "path": display_path(str(p))}
        except (OSError, ValueError) as e:
            raise ConfigError(f"compare.experiments.{name}: {path}: unreadable ({e})") from None
    return out


def _compare_section(cc: CompareConfig) -> dict[str, Any]:
    """The ``compare`` settings as the report shows them: data paths relative to the repository or the package."""
    section = cc.compare.model_dump()
    section["forgetting"] = display_path(cc.compare.forgetting)
    if section.get("choice"):
        section["choice"] = {**section["choice"], "data": display_path(section["choice"]["data"])}
    return section


def sweep_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a comparison keeps of the learning-rate sweep its learning rates came from: where it is, the command
    that made it, its data and its grid (:func:`lorakit.evaluation.claims.lr_grid`)."""
    try:
        sweep = json.loads(Path(path).read_text())
        grid = lr_grid(sweep)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"compare.lr_sweep: {path}: not a lorakit compare results.json ({e})") from None
    return {"path": display_path(str(path)), "command": sweep.get("command"), "data": sweep.get("data"),
            "training": sweep.get("training"), "grid": grid}


class _Stopped(Exception):
    """The comparison is stopping: no new worker starts, and a killed one gives no result."""


class _Workers:
    """The comparison's running worker processes: when it is interrupted, :meth:`stop` kills them and no other
    starts (a killed run gives no result; ``--resume`` runs it again)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen[bytes]] = set()
        self.stopped = False

    def run(self, args: list[str], *, stdout: IO[str], timeout: float | None, env: dict[str, str]) -> int | None:
        """Run one worker to its end: its exit status, or ``None`` if it ran past ``timeout`` (it is killed)."""
        with self.lock:
            if self.stopped:
                raise _Stopped
            proc = subprocess.Popen(args, stdout=stdout, stderr=subprocess.STDOUT, env=env)
            self.running.add(proc)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:  # a worker past its time, or whose wait was interrupted, does not outlive this call
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            with self.lock:
                self.running.discard(proc)

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            running = list(self.running)
        for proc in running:
            proc.kill()


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM stops the comparison as Ctrl-C does (``KeyboardInterrupt`` in the main thread), so that its workers
    are killed and the report of what finished is written, rather than the parent dying alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_with_retries(cc: CompareConfig, label: str, cfg: TrainConfig, run_dir: Path, *, base: bool,
                      log: Callable[[str], None], workers: _Workers, resume: bool = False) -> dict[str, Any]:
    """One job, run again (``compare.contention_retries`` times at most) while the CPU was shared; with
    ``resume``, the finished result of the same job if ``run_dir``'s siblings hold one."""
    if resume:
        kept = _finished(cc, label, cfg, run_dir, base=base)
        if kept is not None:
            log(f"  {_who(label, cfg)} kept (--resume): " + _one_line(kept))
            return kept
    run: dict[str, Any] = {}
    for attempt in range(cc.compare.contention_retries + 1):
        run = _run_job(cc, label, cfg, run_dir, base=base, log=log, workers=workers)
        use = cpu_use(run)
        if use is None or use >= CONTENDED or attempt == cc.compare.contention_retries:
            break
        log(f"  the CPU was shared while training ({use:.0%} of {run['threads']} threads' time): running "
            f"{label} again for a clean step time")
    return run


def _run_name(label: str, seed: int) -> str:
    return f"{label}-s{seed}"


def _model_diff(cfg: TrainConfig) -> dict[str, Any]:
    """The model keys a run sets for itself (``quantize``, e.g. the ``qlora`` variant)."""
    return {"quantize": cfg.model.quantize} if cfg.model.quantize != "none" else {}


def _training_diff(cfg: TrainConfig, shared: dict[str, Any]) -> dict[str, Any]:
    """The training keys a run sets differently from the shared section (its per-method overrides)."""
    return {k: v for k, v in cfg.training.model_dump(mode="json").items() if k != "seed" and shared.get(k) != v}


def _job(cc: CompareConfig, label: str, cfg: TrainConfig, run_dir: Path, *, base: bool) -> dict[str, Any]:
    """What the worker of one run is asked to do (``runs/NAME.job.json``)."""
    c = cc.compare
    acc = c.accuracy.model_dump() if c.accuracy is not None else None
    if acc is not None:
        acc["data"] = acc["data"] or cfg.data.eval
    f1 = c.f1.model_dump() if c.f1 is not None else None
    if f1 is not None:
        f1["data"] = f1["data"] or cfg.data.eval
    cfg_path = run_dir.with_name(run_dir.name + ".yaml")
    job = {"label": label, "config": str(cfg_path), "result": str(run_dir.with_name(run_dir.name + RESULT_SUFFIX)),
           "base": base, "accuracy": acc, "f1": f1, "forgetting": c.forgetting,
           "forgetting_max_length": c.forgetting_max_length, "threads": c.threads,
           "budgets": c.budgets, "choice": c.choice.model_dump() if c.choice is not None else None,
           "choice_at": c.choice_steps()}
    return job


def _same_config(saved: dict[str, Any], cfg: TrainConfig) -> bool:
    """Whether a run's saved config is ``cfg``: the same run identity (:meth:`TrainConfig.fingerprint`, which a
    config written before an option existed keeps while the option is at its default) and the same output."""
    try:
        old = TrainConfig.parse(saved)
    except Exception:
        return False
    return old.fingerprint() == cfg.fingerprint() and old.output == cfg.output


def _finished(cc: CompareConfig, label: str, cfg: TrainConfig, run_dir: Path, *, base: bool) -> dict[str, Any] | None:
    """The result a finished earlier run of exactly this job left (same config, same measurements; the base
    model's evaluation too when this job must give it), or ``None``."""
    job_path, cfg_path = run_dir.with_name(run_dir.name + ".job.json"), run_dir.with_name(run_dir.name + ".yaml")
    result_path = run_dir.with_name(run_dir.name + RESULT_SUFFIX)
    try:
        old = json.loads(job_path.read_text())
        same = _same_config(json.loads(cfg_path.read_text()), cfg) and \
            {k: v for k, v in old.items() if k != "base"} == \
            {k: v for k, v in _job(cc, label, cfg, run_dir, base=base).items() if k != "base"}
        res = json.loads(result_path.read_text()) if same else None
    except (OSError, ValueError):
        return None
    if res is None or (base and not res.get("base")) or not (run_dir / "adapter").is_dir():
        return None
    if not base:
        res.pop("base", None)
    return {"ok": True, **res, "kept": True}


def _run_job(cc: CompareConfig, label: str, cfg: TrainConfig, run_dir: Path, *, base: bool,
             log: Callable[[str], None], workers: _Workers) -> dict[str, Any]:
    """Run one job in a child process; its result dict, or ``{"ok": False, "error": ...}``."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    result_path = run_dir.with_name(run_dir.name + RESULT_SUFFIX)
    # a run that dies leaves nothing a resume could mistake for done
    for stale in (result_path, budgets_path(result_path), run_dir.with_name(run_dir.name + ".job.json")):
        stale.unlink(missing_ok=True)
    cfg_path = run_dir.with_name(run_dir.name + ".yaml")
    cfg_path.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    c = cc.compare
    job = _job(cc, label, cfg, run_dir, base=base)
    job_path = run_dir.with_name(run_dir.name + ".job.json")
    write_json(job_path, job, indent=1, allow_nan=False)
    log_path = run_dir.with_name(run_dir.name + ".log")
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        rc = workers.run([sys.executable, "-m", "lorakit.evaluation.compare_worker", str(job_path)], stdout=fh,
                         timeout=c.timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if workers.stopped and rc != 0:
        raise _Stopped  # killed by the comparison's stop: not the method's failure, nothing recorded
    progress = budgets_path(result_path)
    if rc == 0 and result_path.is_file():
        progress.unlink(missing_ok=True)  # the result holds them
        res = {**json.loads(result_path.read_text()), "wall_s": round(wall, 1)}
        write_json(result_path, res, indent=1, allow_nan=False)  # what a --resume keeps
        res = {"ok": True, **res}
        if res.get("base"):
            log("  base model: " + _one_line(res["base"]))
        log(f"  {_who(label, cfg)} done: " + _one_line(res))
        return res
    tail = log_path.read_text(errors="replace").strip().splitlines()[-15:] if log_path.is_file() else []
    error = (f"timed out after {c.timeout_s:.0f} s" if rc is None else f"exit status {rc}") + \
        (": " + _last_error(tail) if tail else "")
    log(f"  {_who(label, cfg)} FAILED: {error} (log: {log_path})")
    failed: dict[str, Any] = {"ok": False, "error": error, "log_tail": tail, "wall_s": round(wall, 1)}
    partial = _partial_budgets(progress)
    if partial:  # the learning curve up to the failure is kept (the run stays out of every verdict)
        failed["budgets"] = partial
        log(f"  kept its measurements at steps {', '.join(str(b['step']) for b in partial)} ({progress})")
    return failed


def _partial_budgets(path: Path) -> list[dict[str, Any]]:
    """The budget measurements a failed run wrote before it stopped (a torn last line is dropped)."""
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def _last_error(lines: list[str]) -> str:
    """The most telling line of a failed run's output: the last ``error:``/exception line."""
    for line in reversed(lines):
        s = line.strip()
        if s.startswith("error:") or "Error" in s.split(":")[0]:
            return s
    return lines[-1].strip()


def _progress(done: Sequence[dict[str, Any]], total: int, parallel: int) -> str:
    """``"3/34 done, about 2 h 10 min left"``: the jobs left times the mean wall time of the jobs run so far (kept
    ones took none), shared among ``parallel`` at a time."""
    walls = [r["wall_s"] for r in done if isinstance(r.get("wall_s"), int | float) and not r.get("kept")]
    text = f"{len(done)}/{total} done"
    left = total - len(done)
    if not walls or not left:
        return text
    minutes = round(statistics.fmean(walls) * left / min(parallel, left) / 60)
    return text + ", about " + (f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else
                                f"{max(minutes, 1)} min") + " left"


def _who(label: str, cfg: TrainConfig) -> str:
    """A finished job's name in the log: with several at a time, jobs end in another order than they start."""
    return f"{label} (seed {cfg.training.seed})"


def _one_line(r: dict[str, Any]) -> str:
    parts = []
    for key, fmt in (("trainable_params", "{:,} trainable"), ("accuracy", "accuracy {:.3f}"),
                     ("token_f1", "token F1 {:.3f}"),
                     ("eval_loss", "eval loss {:.4f}"), ("heldout_loss", "held-out loss {:.4f}"),
                     ("step_time_s", "{:.3f} s/step"), ("wall_s", "{:.0f} s")):
        if isinstance(r.get(key), int | float):
            parts.append(fmt.format(r[key]))
    return ", ".join(parts)


__all__ = ["RESULTS_FILE", "run_compare", "sweep_summary"]
