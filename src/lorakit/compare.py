"""``lorakit compare``: train several methods on the same data, steps, seed and budget, and report.

A compare config is a training config (``model``, ``adapter``, ``data``, ``training``; see
:mod:`lorakit.config`) plus two sections::

    compare:
      seeds: [0]                        # every method runs once per seed; the report gives mean and spread
      accuracy: {examples: 200, max_new_tokens: 48}   # greedy exact match on data.eval rows with an "answer"
      forgetting: bundled://data/pretrain_heldout.jsonl  # loss on this text after minus before (null: off)
    methods:                            # per-method options; a label that is not a method names its method
      lora:  {r: 8, alpha: 16}
      lora+: {method: lora, r: 8, alpha: 16, training: {loraplus_ratio: 16}}
      vera:  {r: 256, training: {lr: 1.0e-2}}

Rules that keep the comparison fair: every run gets the same model, data, ``training.seed``, ``max_steps``,
``epochs``, ``batch_size`` and ``grad_accum`` (a method may override other training keys, such as ``lr``, and
:data:`FAIR_KEYS` are refused). Options in the shared ``adapter`` section go to every method whose config has
that field (so ``r`` is not handed to ``full``). ``lora+`` is LoRA with ``training.loraplus_ratio: 16``
(unless its entry sets a ratio); without an entry of its own it takes ``methods.lora``'s options. Data paths
may be ``bundled://data/NAME.jsonl``; the ``output`` section is ignored (each run writes ``OUT/runs/LABEL-sSEED``).

Each run is a fresh child process (``python -m lorakit.compare JOB.json``), so its peak memory and step time
are its own and a failing method is recorded in ``results.json`` instead of stopping the comparison.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import __version__
from .adapters import METHODS, get_method
from .callbacks import TrainingCallback
from .config import ADAPTER_KEYS, BUNDLED_DIR, BUNDLED_SCHEME, TrainConfig, TrainingConfig, apply_override, read_yaml
from .errors import ConfigError
from .report import CONTENDED, cpu_use

#: ``training`` keys every method must share; a per-method override of one of them is an error.
FAIR_KEYS = ("seed", "max_steps", "epochs", "batch_size", "grad_accum")
#: Labels that name a variant of a registered method: ``label -> (method, default per-method section)``.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"lora+": ("lora", {"training": {"loraplus_ratio": 16.0}})}
RESULTS_FILE = "results.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccuracySpec(_Strict):
    """Task accuracy by greedy generation and exact match of :func:`lorakit.tasks.extract_answer`.

    Attributes:
        data: JSONL rows with ``prompt`` and ``answer`` (default: ``data.eval``).
        examples: how many rows to score (the first ones; ``None``: all).
        max_new_tokens: generation length cap.
        batch_size: prompts generated together.
    """

    data: str | None = None
    examples: int | None = Field(200, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(50, ge=1)


class CompareSection(_Strict):
    """The ``compare`` section.

    Attributes:
        seeds: one run per method per seed (``training.seed``); several give mean and spread.
        accuracy: task accuracy settings (``null``: no accuracy).
        forgetting: text the base model knows (``{"text"}`` rows); forgetting = loss on it after training
            minus before. ``null``: not measured.
        forgetting_max_length: token cap per forgetting text.
        timeout_s: wall-clock limit of one run (the run is recorded as failed past it).
        threads: torch CPU threads per run (``None``: torch's default).
        contention_retries: on CPU, run a method again (up to this many times) when it got under 70% of its
            threads' CPU time while training: another job shared the cores and its step time is inflated.
    """

    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    accuracy: AccuracySpec | None = AccuracySpec()
    forgetting: str | None = "bundled://data/pretrain_heldout.jsonl"
    forgetting_max_length: int = Field(256, ge=2)
    timeout_s: float = Field(3600, gt=0)
    threads: int | None = Field(None, ge=1)
    contention_retries: int = Field(1, ge=0)


class CompareConfig(_Strict):
    """A parsed compare config: the shared training sections, the ``compare`` section, per-method options."""

    base: dict[str, Any]
    compare: CompareSection
    methods: dict[str, dict[str, Any]]

    def labels(self) -> list[str]:
        """The runs a plain ``lorakit compare`` does: the ``methods`` keys, else every registered method."""
        return list(self.methods) or sorted(METHODS)

    def method_of(self, label: str) -> str:
        """The registered method a label runs (``methods.LABEL.method``, a variant's, or the label itself)."""
        spec = self.methods.get(label, {})
        if "method" in spec:
            return str(spec["method"])
        if label in VARIANTS:
            return VARIANTS[label][0]
        if label in METHODS:
            return label
        raise ConfigError(f"--methods: {label!r} is neither a method ({', '.join(sorted(METHODS))}), a variant "
                          f"({', '.join(VARIANTS)}) nor a key of the config's methods section")

    def run_config(self, label: str, seed: int, out_dir: Path) -> TrainConfig:
        """The validated training config of one run (:class:`ConfigError` names the label on bad input)."""
        method = self.method_of(label)
        spec = copy.deepcopy(self.methods.get(label))
        if spec is None:  # a variant without an entry of its own inherits its method's entry
            spec = copy.deepcopy(self.methods.get(method, {})) if label in VARIANTS else {}
        spec.pop("method", None)
        training_over = spec.pop("training", None) or {}
        if not isinstance(training_over, dict):
            raise ConfigError(f"methods.{label}.training: must be a mapping")
        if label in VARIANTS:  # the variant's defining training keys, unless the entry sets them itself
            training_over = {**VARIANTS[label][1].get("training", {}), **training_over}
        unfair = sorted(set(training_over) & set(FAIR_KEYS))
        if unfair:
            raise ConfigError(f"methods.{label}.training: {', '.join(unfair)} must be the same for every method; "
                              "set them in the shared training section")
        fields = get_method(method).config_cls.model_fields
        shared = {k: v for k, v in (self.base.get("adapter") or {}).items() if k in fields or k in ADAPTER_KEYS}
        shared.pop("method", None)
        d = copy.deepcopy(self.base)
        d["adapter"] = {**shared, **spec, "method": method}
        d["training"] = {**(d.get("training") or {}), **training_over, "seed": seed}
        d["output"] = {"dir": str(out_dir), "progress": False, "tensorboard": False, "plot": True}
        try:
            return TrainConfig.parse(d)
        except ConfigError as e:
            raise ConfigError(f"methods.{label}: {e}") from None


def resolve_data_path(path: str) -> str:
    """``bundled://data/NAME`` -> the file shipped with lorakit; other paths become absolute."""
    if path.startswith(BUNDLED_SCHEME):
        target = BUNDLED_DIR / path[len(BUNDLED_SCHEME):].strip("/")
        if not target.is_file():
            raise ConfigError(f"{path!r}: no such bundled file under {BUNDLED_DIR}")
        return str(target)
    return str(Path(path).resolve())


def load_compare_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> CompareConfig:
    """Read a compare config (YAML), apply dotted overrides (``compare.seeds=[0,1]``), and validate it."""
    data = read_yaml(path)
    for item in overrides:
        apply_override(data, item)
    methods = data.pop("methods", None) or {}
    section = data.pop("compare", None) or {}
    data.pop("output", None)  # each run writes OUT/runs/LABEL-sSEED
    if not isinstance(methods, dict) or not all(isinstance(v, dict | None) for v in methods.values()):
        raise ConfigError("methods: must map each label to a mapping of options")
    try:
        cmp = CompareSection.model_validate(section)
    except ValidationError as e:
        raise ConfigError("compare: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}"
                                                 for x in e.errors())) from None
    if isinstance(data.get("data"), dict):
        for key in ("train", "eval"):
            if isinstance(data["data"].get(key), str):
                data["data"][key] = resolve_data_path(data["data"][key])
    if cmp.forgetting:
        cmp.forgetting = resolve_data_path(cmp.forgetting)
    if cmp.accuracy is not None and cmp.accuracy.data:
        cmp.accuracy.data = resolve_data_path(cmp.accuracy.data)
    return CompareConfig(base=data, compare=cmp, methods={k: dict(v or {}) for k, v in methods.items()})


# --- orchestration ---------------------------------------------------------------------------------------------
def run_compare(cc: CompareConfig, labels: Sequence[str], out: str | os.PathLike[str], *,
                log: Callable[[str], None] = print, command: str | None = None) -> dict[str, Any]:
    """Run every ``(label, seed)`` in its own process, then write ``results.json`` and the report.

    Every run config is validated before the first run starts. A run that fails (exit status, timeout) is
    recorded with its error and the rest go on. ``results.json`` is rewritten after each run.
    """
    from .report import display_path, write_report

    out = Path(out)
    runs_dir = out / "runs"
    labels = list(dict.fromkeys(labels))
    if not labels:
        raise ConfigError("--methods: no methods given")
    shared = set((cc.base.get("adapter") or {})) - set(ADAPTER_KEYS)
    unused = sorted(k for k in shared
                    if not any(k in get_method(cc.method_of(lab)).config_cls.model_fields for lab in labels))
    if unused:
        raise ConfigError(f"adapter: {', '.join(unused)} is an option of none of the compared methods")
    jobs = [(lab, seed) for seed in cc.compare.seeds for lab in labels]
    configs = {job: cc.run_config(job[0], job[1], runs_dir / _run_name(*job)) for job in jobs}
    base_cfg = configs[jobs[0]]
    try:
        shared_training = TrainingConfig.model_validate(cc.base.get("training") or {}).model_dump(mode="json")
    except ValidationError as e:
        raise ConfigError(f"training: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
    runs_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "lorakit_version": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
        "host": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "labels": labels, "seeds": cc.compare.seeds,
        "compare": {**cc.compare.model_dump(), "forgetting": display_path(cc.compare.forgetting)},
        "methods": {lab: {"method": cc.method_of(lab), **configs[(lab, cc.compare.seeds[0])].adapter.options,
                          "training": _training_diff(configs[(lab, cc.compare.seeds[0])], shared_training)}
                    for lab in labels},
        "training": {k: v for k, v in shared_training.items() if k != "seed"},
        "model": base_cfg.model.path,
        "data": {**base_cfg.data.model_dump(mode="json"), "train": display_path(base_cfg.data.train),
                 "eval": display_path(base_cfg.data.eval)},
        "base": None, "runs": []}
    for i, (lab, seed) in enumerate(jobs):
        with_base = results["base"] is None  # the first run that succeeds also evaluates the base model
        log(f"[{i + 1}/{len(jobs)}] {lab} (seed {seed})" + (", after evaluating the base model" if with_base else ""))
        for attempt in range(cc.compare.contention_retries + 1):
            run = _run_job(cc, lab, configs[(lab, seed)], runs_dir / _run_name(lab, seed), base=with_base, log=log)
            if with_base and run.get("base"):
                results["base"], with_base = run.pop("base"), False
            use = cpu_use(run)
            if use is None or use >= CONTENDED or attempt == cc.compare.contention_retries:
                break
            log(f"  the CPU was shared while training ({use:.0%} of {run['threads']} threads' time): running "
                f"{lab} again for a clean step time")
        results["runs"].append({"label": lab, "method": cc.method_of(lab), "seed": seed, **run})
        _write_json(out / RESULTS_FILE, results)
    write_report(results, out)
    return results


def _run_name(label: str, seed: int) -> str:
    return f"{label}-s{seed}"


def _training_diff(cfg: TrainConfig, shared: dict[str, Any]) -> dict[str, Any]:
    """The training keys a run sets differently from the shared section (its per-method overrides)."""
    return {k: v for k, v in cfg.training.model_dump(mode="json").items() if k != "seed" and shared.get(k) != v}


def _run_job(cc: CompareConfig, label: str, cfg: TrainConfig, run_dir: Path, *, base: bool,
             log: Callable[[str], None]) -> dict[str, Any]:
    """Run one job in a child process; its result dict, or ``{"ok": False, "error": ...}``."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg_path = run_dir.with_name(run_dir.name + ".yaml")
    cfg_path.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    c = cc.compare
    acc = c.accuracy.model_dump() if c.accuracy is not None else None
    if acc is not None:
        acc["data"] = acc["data"] or cfg.data.eval
    job = {"label": label, "config": str(cfg_path), "result": str(run_dir.with_name(run_dir.name + ".result.json")),
           "base": base, "accuracy": acc, "forgetting": c.forgetting,
           "forgetting_max_length": c.forgetting_max_length, "threads": c.threads}
    job_path = run_dir.with_name(run_dir.name + ".job.json")
    _write_json(job_path, job)
    log_path = run_dir.with_name(run_dir.name + ".log")
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as fh:
            proc = subprocess.run([sys.executable, "-m", "lorakit.compare", str(job_path)], stdout=fh,
                                  stderr=subprocess.STDOUT, timeout=c.timeout_s,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        rc = None
    wall = time.perf_counter() - t0
    result_path = Path(job["result"])
    if rc == 0 and result_path.is_file():
        res = {"ok": True, **json.loads(result_path.read_text()), "wall_s": round(wall, 1)}
        if res.get("base"):
            log("  base model: " + _one_line(res["base"]))
        log("  " + _one_line(res))
        return res
    tail = log_path.read_text(errors="replace").strip().splitlines()[-15:] if log_path.is_file() else []
    error = (f"timed out after {c.timeout_s:.0f} s" if rc is None else f"exit status {rc}") + \
        (": " + _last_error(tail) if tail else "")
    log(f"  FAILED: {error} (log: {log_path})")
    return {"ok": False, "error": error, "log_tail": tail, "wall_s": round(wall, 1)}


def _last_error(lines: list[str]) -> str:
    """The most telling line of a failed run's output: the last ``error:``/exception line."""
    for line in reversed(lines):
        s = line.strip()
        if s.startswith("error:") or "Error" in s.split(":")[0]:
            return s
    return lines[-1].strip()


def _one_line(r: dict[str, Any]) -> str:
    parts = []
    for key, fmt in (("trainable_params", "{:,} trainable"), ("accuracy", "accuracy {:.3f}"),
                     ("eval_loss", "eval loss {:.4f}"), ("heldout_loss", "held-out loss {:.4f}"),
                     ("step_time_s", "{:.3f} s/step"), ("wall_s", "{:.0f} s")):
        if isinstance(r.get(key), int | float):
            parts.append(fmt.format(r[key]))
    return ", ".join(parts)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default, allow_nan=False))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# --- the child process ------------------------------------------------------------------------------------------
class StepTimer(TrainingCallback):
    """Wall-clock time between consecutive optimizer steps (its median ignores evaluation and checkpoints)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def step(self) -> None:
        self.times.append(time.perf_counter())

    def median(self) -> float | None:
        gaps = sorted(b - a for a, b in zip(self.times, self.times[1:], strict=False))
        return gaps[len(gaps) // 2] if gaps else None


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one run in this process; returns its measurements.

    With ``job["base"]`` the base model is evaluated first (before the adapter is attached), and its numbers
    are returned under ``"base"``; memory is then measured from a reset peak, so that evaluation does not
    count against the method.
    """
    import torch

    from . import evaluate as ev
    from .config import load_config
    from .metrics import METRICS_FILE, read_metrics
    from .model import trainable_parameters
    from .trainer import Trainer

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    cfg = load_config(job["config"])
    timer = StepTimer()
    trainer = Trainer(None, cfg, callbacks=[timer], log=lambda m: print(m, file=sys.stderr, flush=True))
    trainer.prepare()
    assert trainer.model is not None and trainer.train_data is not None
    res: dict[str, Any] = {"threads": torch.get_num_threads()}
    if job.get("base"):
        res["base"] = {"ok": True, "eval_loss": trainer.evaluate().get("eval_loss"), **_quality(trainer, job)}
    cuda = trainer.device.type == "cuda"
    res["rss_before_train_bytes"] = ev.rss_bytes()
    windowed = ev.reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    fit = trainer.fit(overwrite=True)
    res["train_s"] = round(time.perf_counter() - t0, 2)
    res["train_cpu_s"] = round(_cpu_seconds() - cpu0, 2)  # far below train_s x threads: the CPU was shared
    res["peak_rss_bytes"] = ev.window_peak_rss() if windowed else ev.peak_rss_bytes()
    res["process_peak_rss_bytes"] = ev.peak_rss_bytes()  # ru_maxrss: loading + training (+ base evaluation)
    if cuda:
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(trainer.device)
    res["step_time_s"] = timer.median()
    res["steps"] = fit.step
    records = read_metrics(Path(cfg.output.dir) / METRICS_FILE)
    info = next((r for r in records if r.get("kind") == "info"), {})
    res["trainable_params_start"] = info.get("trainable_params")
    res["trainable_params"] = trainable_parameters(trainer.model)  # after any pruning
    res["total_params"] = info.get("total_params")
    res["train_loss"] = [[r["step"], r["loss"]] for r in records
                         if r.get("kind") == "train" and isinstance(r.get("loss"), float)]
    res["eval_loss_start"] = fit.eval_start.get("eval_loss")
    res["eval_loss"] = fit.eval_end.get("eval_loss")
    assert fit.adapter_dir is not None
    res["adapter_bytes"] = ev.dir_bytes(fit.adapter_dir)
    shutil.rmtree(Path(cfg.output.dir) / "checkpoints", ignore_errors=True)  # only needed to resume
    res["saved_activation_bytes"] = _activation_bytes(trainer)
    res.update(_quality(trainer, job))
    return res


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _quality(trainer: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Task accuracy and the loss on the forgetting text, for the model as it is now."""
    from . import evaluate as ev

    res: dict[str, Any] = {}
    acc = job.get("accuracy")
    if acc:
        rows = ev.answer_rows(acc["data"], acc["examples"])
        res.update(ev.task_accuracy(trainer.model, trainer.tokenizer, rows, max_new_tokens=acc["max_new_tokens"],
                                    batch_size=acc["batch_size"]))
    if job.get("forgetting"):
        data = ev.text_dataset(job["forgetting"], trainer.tokenizer, job["forgetting_max_length"])
        res["heldout_loss"] = trainer.evaluate(data).get("eval_loss")
    return res


def _activation_bytes(trainer: Any) -> int | None:
    """Saved-for-backward bytes of one training micro-batch, computed as the trainer computes its loss."""
    import contextlib

    import torch

    from . import evaluate as ev
    from . import kernels, speed

    cfg = trainer.config
    if cfg.model.task != "causal-lm":
        return None
    batch = ev.training_batch(trainer.train_data, cfg.training.batch_size, int(trainer.tokenizer.pad_token_id),
                              trainer.device)
    model = trainer.model
    model.train()
    amp = torch.autocast(trainer.device.type, dtype=trainer.amp_dtype) if trainer.amp_dtype is not None \
        else contextlib.nullcontext()

    def step() -> torch.Tensor:
        with amp:
            return speed.causal_lm_loss(model, batch["input_ids"], batch["labels"],
                                        attention_mask=batch["attention_mask"])

    with kernels.fused(cfg.training.fused):
        return ev.saved_activation_bytes(model, step)


def _worker(argv: Sequence[str]) -> int:
    """``python -m lorakit.compare JOB.json``: run the job and write its result file."""
    job = json.loads(Path(argv[0]).read_text())
    res = run_job(job)
    _write_json(Path(job["result"]), _finite(res))
    return 0


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: turn them into ``None`` (a diverged run shows as missing, not as a number)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# --- command line -----------------------------------------------------------------------------------------------
def compare_command(
    config: Annotated[Path, typer.Argument(help="Compare config: a training config plus `compare:` and "
                                           "`methods:` sections (see `lorakit.compare`).", show_default=False)],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="Dotted overrides, e.g. training.max_steps=50 compare.seeds=[0,1] methods.vera.training.lr=0.02.",
        show_default=False)] = None,
    methods: Annotated[str | None, typer.Option(
        help="Comma-separated methods or labels (lora,lora+,lora-fa,vera,...); default: the config's "
             "methods section, else every registered method.")] = None,
    out: Annotated[Path, typer.Option(help="Output directory: results.json, report.md, report.html, PNG "
                                      "plots, runs/.", show_default=False)] = Path("compare-out"),
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds (overrides compare.seeds); "
                                              "several give mean and spread.")] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="Only rebuild the report from "
                                              "OUT/results.json.")] = False,
) -> int:
    """Fine-tune several methods with the same data, steps, seed and budget, and write a comparison report.

    Every (method, seed) runs in its own process; a failing method is recorded and the others go on.
    """
    from .report import write_report

    say: Callable[[str], None] = lambda m: typer.echo(m, err=True)  # noqa: E731
    if report_only:
        path = out / RESULTS_FILE
        if not path.is_file():
            raise ConfigError(f"--report-only: {path} does not exist")
        files = write_report(json.loads(path.read_text()), out)
        say("report written: " + ", ".join(str(f) for f in files))
        return 0
    extra = list(overrides or [])
    if seeds:
        try:
            extra.append("compare.seeds=[" + ",".join(str(int(s)) for s in seeds.split(",") if s.strip()) + "]")
        except ValueError:
            raise ConfigError(f"--seeds {seeds!r}: expected comma-separated integers") from None
    cc = load_compare_config(config, extra)
    labels = [m.strip() for m in methods.split(",") if m.strip()] if methods else cc.labels()
    command = " ".join(["lorakit compare", str(config), "--methods", ",".join(labels), "--out", str(out),
                        *(["--seeds", seeds] if seeds else []), *(overrides or [])])
    results = run_compare(cc, labels, out, log=say, command=command)
    failed = [f"{r['label']} (seed {r['seed']})" for r in results["runs"] if not r["ok"]]
    say(f"report: {out / 'report.md'}, {out / 'report.html'}")
    if failed:
        say("failed runs (see report): " + ", ".join(failed))
        return 1
    return 0


__all__ = ["CompareConfig", "CompareSection", "StepTimer", "compare_command", "load_compare_config", "run_compare",
           "run_job"]

if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
