"""Experiment tracking: a run's config, metrics and final adapter sent to TensorBoard, Weights & Biases or MLflow,
each through its own client (``output.report_to``).

* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` in ``<output.dir>/tensorboard``.
* ``wandb``: ``wandb.init`` in ``<output.dir>/wandb``, **offline** unless the environment sets ``WANDB_MODE`` (so
  nothing leaves the machine unless the user asked for it; ``wandb sync <dir>`` uploads an offline run later).
* ``mlflow``: the tracking store MLflow itself resolves (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in
  the working directory: local files, what ``mlflow ui`` opens there), experiment ``output.project``.

Every record of ``metrics.jsonl`` goes to every tracker as ``<kind>/<name>`` at its step (``train/loss``,
``eval/eval_loss``, ``ranks/total_rank`` and one ``ranks/<layer>`` per adapted layer of a dynamic-rank method);
the ``info`` record and the flattened run config become the run's config (W&B) or parameters (MLflow); the final
adapter folder is logged as an artifact (W&B artifact of type ``model``, MLflow artifacts under ``adapter/``).

A resumed run continues the same tracker runs (their ids are kept in ``<output.dir>/tracking.json``). Steps
between the checkpoint and the interruption are logged again; lorakit's resume is bit-exact, so they carry the
same values (MLflow keeps both, W&B keeps the first). A tracker that fails while logging (a full disk, a network
error online) is reported once and switched off: tracking never stops a training run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from lorakit.errors import ConfigError
from lorakit.util.files import write_text

TRACKERS = ("tensorboard", "wandb", "mlflow")
STATE_FILE = "tracking.json"
# the module each tracker needs, and what installs it
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
_INSTALL = "pip install 'lorakit[tracking]'"


class Tracker(Protocol):
    """One tracking backend of a run."""

    name: str

    def log(self, kind: str, step: int, values: Mapping[str, float]) -> None:
        """Numeric values of one ``metrics.jsonl`` record, named ``<kind>/<name>``."""

    def params(self, values: Mapping[str, Any]) -> None:
        """Run-level values: the flattened config and the ``info`` record."""

    def artifact(self, path: Path, name: str) -> None:
        """A folder (the final adapter)."""

    def finish(self, status: str) -> None:
        """``finished``, ``interrupted`` (resumable) or ``failed``."""


def installed(name: str) -> bool:
    """Whether the client library of tracker ``name`` can be imported."""
    return importlib.util.find_spec(_MODULES[name]) is not None


def check_report_to(names: Sequence[str]) -> list[str]:
    """``output.report_to`` validated: known names, each once, each installed (:class:`ConfigError` otherwise)."""
    out: list[str] = []
    for n in names:
        if n not in TRACKERS:
            raise ConfigError(f"output.report_to: unknown tracker {n!r} (known: {', '.join(TRACKERS)})")
        if n in out:
            raise ConfigError(f"output.report_to: {n!r} is listed twice")
        if not installed(n):
            raise ConfigError(f"output.report_to: {n} is not installed ({_INSTALL})")
        out.append(n)
    return out


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``a.b.c`` keys (scalars and lists kept as they are)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def numeric(kind: str, values: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one metrics record as ``<kind>/<name>``; a mapping value (per-layer ranks) gives one entry
    per key; booleans, strings and non-finite values are left out."""
    out: dict[str, float] = {}
    for k, v in values.items():
        items = v.items() if isinstance(v, Mapping) else [("", v)]
        for sub, x in items:
            if isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf"):
                out[f"{kind}/{k}" + (f"/{sub}" if sub else "")] = float(x)
    return out


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, out: Path, state: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(str(out / "tensorboard"))

    def log(self, kind: str, step: int, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self._w.add_scalar(k, v, step)

    def params(self, values: Mapping[str, Any]) -> None:
        self._w.add_text("config", "\n".join(f"    {k}: {v}" for k, v in values.items()), 0)

    def artifact(self, path: Path, name: str) -> None:  # TensorBoard keeps no files
        pass

    def finish(self, status: str) -> None:
        self._w.close()


class _Wandb:
    name = "wandb"

    def __init__(self, out: Path, state: dict[str, Any], project: str, run_name: str) -> None:
        import wandb

        self._wandb = wandb
        mode = os.environ.get("WANDB_MODE") or "offline"
        # console="off": W&B would otherwise wrap this process's stdout/stderr (the progress bar, the log)
        self._run = wandb.init(project=project, name=run_name, dir=str(out), mode=mode, id=state.get("id"),
                               resume="allow" if state.get("id") else None, reinit="create_new",
                               settings=wandb.Settings(console="off", silent=True))
        state["id"] = self._run.id
        self.where = f"{mode} run {self._run.id} in {out / 'wandb'}" + (
            f" (upload: wandb sync {out / 'wandb'})" if mode == "offline" else "")

    def log(self, kind: str, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=step)

    def params(self, values: Mapping[str, Any]) -> None:
        self._run.config.update(dict(values), allow_val_change=True)

    def artifact(self, path: Path, name: str) -> None:
        art = self._wandb.Artifact(name, type="model")
        art.add_dir(str(path))
        self._run.log_artifact(art)

    def finish(self, status: str) -> None:
        self._run.finish(exit_code=0 if status != "failed" else 1)


class _Mlflow:
    name = "mlflow"
    _STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}

    def __init__(self, out: Path, state: dict[str, Any], project: str, run_name: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = state.get("tracking_uri") or mlflow.get_tracking_uri()
        self._client = MlflowClient(uri)
        if state.get("run_id"):
            self._id = state["run_id"]
            self._client.update_run(self._id, status="RUNNING")
        else:
            exp = self._client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(project)
            self._id = self._client.create_run(exp_id, run_name=run_name).info.run_id
        state.update(run_id=self._id, tracking_uri=uri)
        self.where = f"run {self._id} in {uri} (experiment {project})"

    def log(self, kind: str, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._id, metrics=[Metric(_mlflow_key(k), v, now, step) for k, v in values.items()])

    def params(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        have = {p for p in self._client.get_run(self._id).data.params}  # a resumed run keeps its parameters
        new = [Param(_mlflow_key(k), str(v)[:6000]) for k, v in values.items() if _mlflow_key(k) not in have]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 parameters per batch
            self._client.log_batch(self._id, params=new[i:i + 100])

    def artifact(self, path: Path, name: str) -> None:
        self._client.log_artifacts(self._id, str(path), artifact_path=name)

    def finish(self, status: str) -> None:
        self._client.set_terminated(self._id, status=self._STATUS[status])


def _mlflow_key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / :`` and spaces; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./: " else "_" for c in key)


class Tracking:
    """The run's trackers, with failures contained: a tracker that raises is reported once and dropped.

    Args:
        names: ``output.report_to`` (validated by :func:`check_report_to`).
        out: the run directory (where ``tracking.json`` keeps the trackers' run ids for a resume).
        project: W&B project / MLflow experiment.
        run_name: the run's name in the trackers.
        resume: continue the tracker runs recorded in ``tracking.json`` (a resumed training run).
        log: where to report where each tracker writes, and failures.
    """

    def __init__(self, names: Iterable[str], out: Path, *, project: str, run_name: str, resume: bool,
                 log: Callable[[str], None] = print) -> None:
        self.out, self._log = Path(out), log
        path = self.out / STATE_FILE
        saved = json.loads(path.read_text()) if resume and path.is_file() else {}
        self._state: dict[str, dict[str, Any]] = {}
        self.trackers: list[Tracker] = []
        makers: dict[str, Callable[[dict[str, Any]], Tracker]] = {
            "tensorboard": lambda s: _TensorBoard(self.out, s),
            "wandb": lambda s: _Wandb(self.out, s, project, run_name),
            "mlflow": lambda s: _Mlflow(self.out, s, project, run_name)}
        for name in names:
            state = dict(saved.get(name) or {})
            try:
                tracker = makers[name](state)
            except Exception as e:  # a tracker that cannot start must not stop the run: say so, go on
                log(f"tracking: {name} could not start ({type(e).__name__}: {e}); going on without it")
                continue
            self.trackers.append(tracker)
            self._state[name] = state
            if hasattr(tracker, "where"):
                log(f"tracking: {name} {tracker.where}")
        if self._state:
            write_text(path, json.dumps(self._state, indent=1) + "\n")

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for t in list(self.trackers):
            try:
                call(t)
            except Exception as e:
                self.trackers.remove(t)
                self._log(f"tracking: {t.name} failed on {what} ({type(e).__name__}: {e}); switched off for this run")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        t.finish("failed")
                    except Exception:
                        pass

    def log(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        """One metrics record: ``info`` goes to the run's parameters, every other kind to its metrics."""
        if kind == "info":
            self._each("parameters", lambda t: t.params({f"info.{k}": v for k, v in values.items()}))
            return
        nums = numeric(kind, values)
        if nums:
            self._each("metrics", lambda t: t.log(kind, step, nums))

    def params(self, values: Mapping[str, Any]) -> None:
        self._each("parameters", lambda t: t.params(flatten(values)))

    def artifact(self, path: Path, name: str = "adapter") -> None:
        self._each("the artifact", lambda t: t.artifact(Path(path), name))

    def finish(self, status: str) -> None:
        for t in self.trackers:
            try:
                t.finish(status)
            except Exception as e:
                self._log(f"tracking: {t.name} failed to finish ({type(e).__name__}: {e})")
        self.trackers = []


def start_tracking(names: Sequence[str], out: Path, config: Mapping[str, Any], *, resume: bool,
                   log: Callable[[str], None]) -> Tracking | None:
    """The trackers of a training run (``None`` when it has none), its config already logged: ``config`` is the
    run's whole config (``TrainConfig.to_dict()``; its ``output`` section names the project and run)."""
    if not names:
        return None
    output = config.get("output") or {}
    t = Tracking(names, out, project=output.get("project") or "lorakit", resume=resume, log=log,
                 run_name=output.get("run_name") or Path(out).resolve().name)
    t.params(config)
    return t


__all__ = ["STATE_FILE", "TRACKERS", "Tracker", "Tracking", "check_report_to", "flatten", "installed", "numeric",
           "start_tracking"]
