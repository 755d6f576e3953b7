"""The ``lorakit compare`` config: which methods run, on what, and the rules that keep the comparison fair.

A compare config is a training config (``model``, ``adapter``, ``data``, ``training``; see
:mod:`lorakit.train.config`) plus two sections::

    compare:
      seeds: [0, 1, 2]                  # every method runs once per seed; the report gives mean and spread
      accuracy: {examples: 200, max_new_tokens: 48}   # greedy exact match on data.eval rows with an "answer"
      f1: {examples: 150, max_new_tokens: 32}         # token F1 of greedy generations vs "completion" (free text)
      forgetting: bundled://data/pretrain_heldout.jsonl  # loss on this text after minus before (null: off)
    methods:                            # per-method options; a label that is not a method names its method
      lora:  {r: 8, alpha: 16}
      lora+: {method: lora, r: 8, alpha: 16, training: {loraplus_ratio: 16}}
      vera:  {r: 256, training: {lr: 1.0e-2}}

Rules that keep the comparison fair: every run gets the same model, data, ``training.seed``, ``max_steps``,
``epochs``, ``batch_size`` and ``grad_accum`` (a method may override other training keys, such as ``lr``, and
:data:`FAIR_KEYS` are refused). Options in the shared ``adapter`` section go to every method whose config has
that field (so ``r`` is not handed to ``full``). ``lora+`` is LoRA with ``training.loraplus_ratio: 16``
(unless its entry sets a ratio) and ``qlora`` is LoRA on the base quantized to NF4 (``model.quantize: nf4``,
the one ``model`` key a method's entry may set); without an entry of their own they take ``methods.lora``'s
options. Data paths
may be ``bundled://data/NAME.jsonl``; the ``output`` section is ignored (each run writes ``OUT/runs/LABEL-sSEED``).

The runs themselves: :mod:`lorakit.evaluation.compare` (orchestration) and
:mod:`lorakit.evaluation.compare_worker` (one run, in its own process).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lorakit.errors import ConfigError
from lorakit.methods import METHODS, get_method
from lorakit.train.config import ADAPTER_KEYS, TrainConfig, apply_override, read_yaml
from lorakit.util import resources
from lorakit.util.validation import parse

#: ``training`` keys every method must share; a per-method override of one of them is an error.
FAIR_KEYS = ("seed", "max_steps", "epochs", "batch_size", "grad_accum")
#: Labels that name a variant of a registered method: ``label -> (method, default per-method section)``.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora+": ("lora", {"training": {"loraplus_ratio": 16.0}}),
    "qlora": ("lora", {"model": {"quantize": "nf4"}}),
}
#: Experiments a comparison can carry the results of (``compare.experiments``).
EXPERIMENTS = ("latency", "swapping", "rank_allocation")
#: ``model`` keys a method's entry may set (everything else about the model is shared).
MODEL_KEYS = ("quantize",)
RESULT_SUFFIX = ".result.json"


def budgets_path(result: str | os.PathLike[str]) -> Path:
    """Next to a run's result file (``NAME.result.json``): its budget measurements (``NAME.budgets.jsonl``), one
    JSON line each, written as they are made, so a run that times out or crashes keeps its learning curve."""
    return Path(str(result).removesuffix(RESULT_SUFFIX) + ".budgets.jsonl")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccuracySpec(_Strict):
    """Task accuracy by greedy generation and exact match of :func:`lorakit.evaluation.tasks.extract_answer`.

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


class F1Spec(_Strict):
    """Token F1 of greedy generations against the rows' ``completion``
    (:func:`lorakit.evaluation.generation.completion_f1`): for tasks whose answers are free text.

    Attributes:
        data: JSONL rows with ``prompt`` and ``completion`` (default: ``data.eval``).
        examples: how many rows to score (the first ones; ``None``: all).
        max_new_tokens: generation length cap (a generation is cut at its first line break).
        batch_size: prompts generated together.
    """

    data: str | None = None
    examples: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(32, ge=1)


class ChoiceSpec(_Strict):
    """Multiple-choice accuracy by likelihood (:func:`lorakit.evaluation.scoring.choice_eval`): no generation noise,
    and a per-item loss (the right answer's negative log-likelihood per token) for paired statistics.

    Attributes:
        data: JSONL rows with ``prompt``, ``choices`` and ``answer`` (e.g. ``bundled://data/definitions_choice.jsonl``).
        examples: how many rows to score (the first ones; ``None``: all).
        batch_size: rows scored together.
    """

    data: str
    examples: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)


class Margins(_Strict):
    """Equivalence margins, declared before a run: "A matches B" holds when the 90% interval of ``A - B`` lies within
    ``(-margin, margin)`` (TOST).

    Attributes:
        loss: on a per-token loss, in nats.
        accuracy: on an accuracy, as a share (0.03 = 3 points).
    """

    loss: float = Field(0.03, gt=0)
    accuracy: float = Field(0.03, gt=0)


class CompareSection(_Strict):
    """The ``compare`` section.

    Attributes:
        seeds: one run per method per seed (``training.seed``); default three, the fewest that give a spread
            the verdicts can use (with one seed no quality verdict is given).
        accuracy: task accuracy settings (``null``: no accuracy).
        f1: token F1 of greedy generations (``null``, the default: not measured).
        forgetting: text the base model knows (``{"text"}`` rows); forgetting = loss on it after training
            minus before. ``null``: not measured.
        forgetting_max_length: token cap per forgetting text.
        timeout_s: wall-clock limit of one run (the run is recorded as failed past it).
        threads: torch CPU threads per run (``None``: torch's default).
        contention_retries: on CPU, run a method again (up to this many times) when it got under 70% of its
            threads' CPU time while training: another job shared the cores and its step time is inflated.
        lr_sweep: the ``results.json`` of the learning-rate sweep the methods' learning rates came from: its
            grid is copied into this comparison's results (the report names it, and the LoRA-SB learning-rate
            sensitivity claim is judged on it). ``null``: none.
        parallel: runs at once, each in its own process (after the first, which also evaluates the base model).
            On CPU set ``threads`` too, with ``parallel x threads`` at most the cores: the runs then share
            memory bandwidth, not cores, and every method's step time is measured under the same load.
        budgets: optimizer steps at which each run is measured on the way (a learning curve in one run; the last
            is the run's length); the verdicts are taken at each. ``None``: at the end only.
        choice: multiple-choice accuracy and per-item losses (``null``: not measured).
        choice_at: the budgets at which the choice accuracy is measured (the per-item loss is measured at every
            budget); ``None``: the last two budgets.
        margins: the equivalence margins of the "matches" claims.
        experiments: results of the experiments some claims rest on, by name (``latency``, ``swapping``,
            ``rank_allocation``): JSON files written by ``scripts/latency.py``, ``scripts/swapping.py`` and
            ``scripts/rank_allocation.py``, copied into this comparison's results.
    """

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    accuracy: AccuracySpec | None = AccuracySpec()
    f1: F1Spec | None = None
    forgetting: str | None = "bundled://data/pretrain_heldout.jsonl"
    forgetting_max_length: int = Field(256, ge=2)
    timeout_s: float = Field(3600, gt=0)
    threads: int | None = Field(None, ge=1)
    contention_retries: int = Field(1, ge=0)
    parallel: int = Field(1, ge=1)
    lr_sweep: str | None = None
    budgets: list[int] | None = Field(None, min_length=1)
    choice: ChoiceSpec | None = None
    choice_at: list[int] | None = None
    margins: Margins = Margins()
    experiments: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _budgets_sorted(self) -> CompareSection:
        if self.budgets is not None:
            if sorted(set(self.budgets)) != self.budgets or self.budgets[0] < 1:
                raise ValueError(f"budgets must be increasing positive step counts, got {self.budgets}")
            if self.choice_at is not None and not set(self.choice_at) <= set(self.budgets):
                raise ValueError(f"choice_at {self.choice_at} must be among the budgets {self.budgets}")
        elif self.choice_at is not None:
            raise ValueError("choice_at needs budgets")
        return self

    def choice_steps(self) -> list[int]:
        """The budgets at which the choice accuracy is measured."""
        if self.budgets is None:
            return []
        return list(self.choice_at) if self.choice_at is not None else self.budgets[-2:]

    @model_validator(mode="after")
    def _parallel_needs_threads(self) -> CompareSection:
        if self.parallel > 1 and self.threads is None:
            raise ValueError(f"parallel={self.parallel} needs threads (runs x threads at most the cores; e.g. "
                             "threads: 1), or the runs fight over every core")
        return self


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
        model_over = spec.pop("model", None) or {}
        if not isinstance(model_over, dict):
            raise ConfigError(f"methods.{label}.model: must be a mapping")
        if label in VARIANTS:  # the variant's defining keys, unless the entry sets them itself
            training_over = {**VARIANTS[label][1].get("training", {}), **training_over}
            model_over = {**VARIANTS[label][1].get("model", {}), **model_over}
        bad_model = sorted(set(model_over) - set(MODEL_KEYS))
        if bad_model:
            raise ConfigError(f"methods.{label}.model: {', '.join(bad_model)} must be the same for every method "
                              f"(a method may set only {', '.join(MODEL_KEYS)})")
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
        if model_over:
            d["model"] = {**(d.get("model") or {}), **model_over}
        d["output"] = {"dir": str(out_dir), "progress": False, "tensorboard": False, "plot": True}
        try:
            return TrainConfig.parse(d)
        except ConfigError as e:
            raise ConfigError(f"methods.{label}: {e}") from None


def resolve_data_path(path: str) -> str:
    """``bundled://data/NAME`` -> the file shipped with lorakit; other paths become absolute."""
    if resources.is_bundled(path):
        return resources.resolve(path, what="data path")
    return str(Path(path).resolve())


def _near(path: str, config: Path) -> str:
    """``path`` resolved from the working directory, or, where a relative path is not found there, from the first
    directory above the config file that holds it (a repository's config names repository paths)."""
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        for root in config.resolve().parents:
            if (root / p).exists():
                return str(root / p)
    return str(p.resolve())


def load_compare_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> CompareConfig:
    """Read a compare config (YAML), apply dotted overrides (``compare.seeds=[0,1]``), and validate it."""
    path_of_config = Path(path)
    data = read_yaml(path)
    for item in overrides:
        apply_override(data, item)
    methods = data.pop("methods", None) or {}
    section = data.pop("compare", None) or {}
    data.pop("output", None)  # each run writes OUT/runs/LABEL-sSEED
    if not isinstance(methods, dict) or not all(isinstance(v, dict | None) for v in methods.values()):
        raise ConfigError("methods: must map each label to a mapping of options")
    cmp = parse(CompareSection, section, "compare")
    if isinstance(data.get("data"), dict):
        for key in ("train", "eval"):
            if isinstance(data["data"].get(key), str):
                data["data"][key] = resolve_data_path(data["data"][key])
    if cmp.forgetting:
        cmp.forgetting = resolve_data_path(cmp.forgetting)
    for name, path in list(cmp.experiments.items()):
        if name not in EXPERIMENTS:
            raise ConfigError(f"compare.experiments: unknown experiment {name!r} (known: {', '.join(EXPERIMENTS)})")
        cmp.experiments[name] = _near(path, path_of_config)
    if cmp.lr_sweep:
        cmp.lr_sweep = _near(cmp.lr_sweep, path_of_config)
        if not Path(cmp.lr_sweep).is_file():
            raise ConfigError(f"compare.lr_sweep: {cmp.lr_sweep} is not a file (the sweep's results.json)")
    for spec in (cmp.accuracy, cmp.f1, cmp.choice):
        if spec is not None and spec.data:
            spec.data = resolve_data_path(spec.data)
    steps = (data.get("training") or {}).get("max_steps")
    if cmp.budgets is not None and steps is not None and cmp.budgets[-1] != steps:
        raise ConfigError(f"compare.budgets: the last budget ({cmp.budgets[-1]}) must be training.max_steps ({steps})")
    return CompareConfig(base=data, compare=cmp, methods={k: dict(v or {}) for k, v in methods.items()})
