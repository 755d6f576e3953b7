"""The training run's configuration: typed sections validated at the boundary, read from YAML.

A run is described by one YAML file with five sections::

    model:    {path: bundled://tiny-base, dtype: auto}
    adapter:  {method: lora, r: 16, alpha: 32, targets: all-linear}
    data:     {train: train.jsonl, max_length: 512}
    training: {lr: 2.0e-4, max_steps: 200, batch_size: 8}
    output:   {dir: runs/lora}

Any value can be overridden from the command line with dotted keys (``training.lr=1e-3``), each value read
as a YAML scalar. Every error names the field path and, for unknown keys or choices, the allowed values.
The ``adapter`` section takes the method's own options (validated by the method's config class) next to
the few keys lorakit itself reads (``method``, ``name``, ``init_batches``, ``train_head``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator

from lorakit.errors import ConfigError
from lorakit.methods import AdapterConfig, get_method
from lorakit.train import tracking
from lorakit.util import resources
from lorakit.util.arguments import checked
from lorakit.util.files import write_text
from lorakit.util.validation import parse


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """The base model.

    Attributes:
        path: a local directory, a Hugging Face hub id, or ``bundled://NAME`` for a model shipped inside
            lorakit (``bundled://tiny-base``).
        task: ``causal-lm`` (``AutoModelForCausalLM``) or ``classification``
            (``AutoModelForSequenceClassification``).
        dtype: weight dtype; ``auto`` keeps the checkpoint's.
        tokenizer: tokenizer location when it differs from ``path``.
        num_labels: number of classes (classification).
        trust_remote_code: allow model code from the hub repository.
        attn_implementation: ``sdpa``, ``eager``... (``None``: the transformers default).
        quantize: keep the frozen base quantized (QLoRA, https://arxiv.org/abs/2305.14314): ``nf4`` or
            ``int8`` (torchao, :func:`lorakit.quantize` after loading), ``bnb-nf4``, ``bnb-fp4``, ``bnb-int8``
            (bitsandbytes, through ``BitsAndBytesConfig`` at load time: what PEFT's QLoRA and vLLM use), or
            ``none``. Needs the ``quant`` extra. Delta-LoRA and full fine-tuning refuse a quantized base.
    """

    path: str
    task: Literal["causal-lm", "classification"] = "causal-lm"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tokenizer: str | None = None
    num_labels: int = Field(2, ge=2)
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    quantize: Literal["none", "nf4", "int8", "bnb-nf4", "bnb-fp4", "bnb-int8"] = "none"


#: Keys of the ``adapter`` section that lorakit reads itself; every other key is a method option.
ADAPTER_KEYS = ("method", "name", "init_batches", "train_head", "continue_from", "grow")


class AdapterSection(BaseModel):
    """The adapter: ``method`` plus that method's own options, written flat beside it.

    Attributes:
        method: a name in :data:`lorakit.METHODS`.
        name: the adapter's name on the model.
        init_batches: cap on the training batches handed to methods with a data-driven init (LoRA-SB's
            gradient estimate, which stops by itself after its ``init_examples``); ``None``: up to one
            epoch. Unused by other methods.
        train_head: for classification, also train the task head in full (a freshly initialised head
            must train); saved next to the adapter as ``head/``.
        continue_from: start from this saved adapter (a run or adapter directory) instead of a fresh one:
            its method and options, on new data (:mod:`lorakit.train.lineage`; the new adapter records its
            lineage).
        grow: with ``continue_from`` (rank1-sum): before training, add up to this many rank-1 components,
            scaled by the share of the new data the model does not know yet and placed where its gradient is
            largest (:mod:`lorakit.train.growth`); the pruner brings the adapter back to its budget.
        Other keys: the method's options (``r``, ``alpha``, ``targets``...), validated by its config class.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    method: str = "lora"
    name: str = "default"
    init_batches: int | None = Field(None, ge=1)
    train_head: bool = True
    continue_from: str | None = Field(None, min_length=1)
    grow: int | None = Field(None, ge=1)

    @property
    def options(self) -> dict[str, Any]:
        """The method's own options (everything but :data:`ADAPTER_KEYS`)."""
        return dict(self.model_extra or {})

    _typed: tuple[str, AdapterConfig] | None = PrivateAttr(None)

    def method_config(self) -> AdapterConfig:
        """The options validated by the method's config class (:class:`ConfigError` otherwise): the typed
        config that attach receives. Validated once, and again only if the section was changed since."""
        key = json.dumps([self.method, self.options], sort_keys=True, default=str)
        if self._typed is None or self._typed[0] != key:
            try:
                cls = get_method(self.method)
            except ConfigError as e:
                raise ConfigError(f"adapter.method: {e}") from None
            try:
                self._typed = (key, cls.config_cls.parse(self.options))
            except ConfigError as e:
                raise ConfigError(f"adapter: {e} (lorakit's own adapter keys: {', '.join(ADAPTER_KEYS)})") from None
        return self._typed[1]


class DataConfig(_Section):
    """Training and evaluation data (see :mod:`lorakit.train.sources` for every source and format).

    Attributes:
        train: the training data: a ``.jsonl``, ``.json``, ``.csv``/``.tsv`` or ``.parquet`` file, or a
            directory written by ``datasets.Dataset.save_to_disk``; records in one of the formats below.
        eval: held-out data, the same kinds; ``None`` splits ``eval_fraction`` of ``train`` off instead.
        eval_fraction: share of ``train`` held out when ``eval`` is not given (0 disables evaluation).
        max_length: longest sequence in tokens; longer examples are truncated (and counted).
        packing: pack whole examples into ``max_length`` blocks, each example attending only to itself
            (positions restart, block-diagonal mask); causal LM only.
        format: ``auto`` (from the first record's columns), ``text`` (``{"text"}``), ``prompt_completion``
            (``{"prompt", "completion"}``), ``chat`` (``{"messages"}``), ``classification``
            (``{"text", "label"}``), ``alpaca`` (``{"instruction", "input", "output"}``) or ``sharegpt``
            (``{"conversations": [{"from", "value"}]}``), or ``preference`` (``{"prompt", "chosen", "rejected"}``,
            text or chat messages, the prompt optional: TRL's formats, for ``training.objective`` ``dpo``, ``simpo``
            or ``orpo``).
        columns: renames, ``{lorakit column: column in the data}``, e.g. ``{prompt: question,
            completion: answer}``.
        labels: class names for classification data whose ``label`` is a string.
        add_eos: end each text/completion with the tokenizer's end-of-sequence token.
        group_by_length: batch examples of similar length together (less padding; the order stays seeded
            and resumable).
        max_tokens: a budget of padded tokens per micro-batch (per process): short examples share a batch,
            ``training.batch_size`` stays the most examples a batch holds.
        skip_known: drop the training examples the starting model (a ``continue_from`` parent, or the base)
            already predicts with a geometric-mean token probability at least this (:mod:`lorakit.train.lineage`).
        replay: with ``adapter.continue_from``, add this share (of the training examples) of examples replayed
            from the earlier updates the parent keeps (:mod:`lorakit.train.history`), against forgetting them.
        cache_dir: stream the data files into memory-mapped token stores here, tokenized once and reused by
            every run with the same data and settings (for data larger than memory; see
            :mod:`lorakit.train.streaming`). ``None``: tokenize in memory.
    """

    train: str
    eval: str | None = None
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_length: int = Field(512, ge=2)
    packing: bool = False
    format: Literal["auto", "text", "prompt_completion", "chat", "classification", "alpaca", "sharegpt",
                    "preference"] = "auto"
    columns: dict[str, str] | None = None
    labels: list[str] | None = None
    add_eos: bool = True
    group_by_length: bool = False
    max_tokens: int | None = Field(None, ge=1)
    skip_known: float | None = Field(None, gt=0.0, lt=1.0)
    replay: float | None = Field(None, gt=0.0, le=1.0)
    cache_dir: str | None = None

    @field_validator("train", "eval")
    @classmethod
    def _bundled(cls, v: str | None, info: ValidationInfo) -> str | None:
        """``bundled://data/NAME`` -> the data file shipped with lorakit (as in model.path and compare configs)."""
        return None if v is None else resources.resolve(v, what=f"data.{info.field_name}")


class TrainingConfig(_Section):
    """The optimisation.

    Attributes:
        seed: seeds Python, NumPy and torch, the data order and the held-out split.
        max_steps: optimizer steps; ``None`` runs ``epochs`` passes over the data.
        epochs: passes over the training data when ``max_steps`` is not set.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step (effective batch = batch_size x grad_accum).
        lr: peak learning rate.
        loraplus_ratio: LoRA+ (https://arxiv.org/abs/2402.12354): learning rate of B = ratio x that of A.
        weight_decay: AdamW decoupled weight decay (matrices only; vectors such as gates are not decayed).
        betas: AdamW betas.
        eps: AdamW epsilon.
        schedule: learning-rate schedule after warm-up.
        warmup_steps: linear warm-up steps (overrides ``warmup_ratio``).
        warmup_ratio: warm-up as a share of the total steps.
        min_lr_ratio: the schedule's final learning rate as a share of ``lr``.
        max_grad_norm: clip the global gradient norm to this (``None``: no clipping).
        precision: ``auto`` picks bf16 autocast on GPUs that support it (fp16 otherwise), fp32 on CPU. The fused
            adapter path follows autocast; with ``auto`` on a GPU and ``model.dtype: auto`` an fp32 checkpoint's
            frozen weights are stored in the autocast dtype (adapter weights and optimizer state stay fp32).
        gradient_checkpointing: recompute activations in backward to save memory.
        fused: lorakit's fast paths (fused adapter linears, one shared ``x A^T`` for sibling projections,
            fused linear cross-entropy): the same function with less time and memory; ``false`` runs the
            plain reference path.
        compile: ``torch.compile`` each decoder layer; ``auto``: on CUDA only.
        eval_every: evaluate every N steps (besides before and after training); ``None``: only those two.
        eval_batch_size: micro-batch size for evaluation (default: ``batch_size``).
        log_every: write training metrics every N steps.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        fsdp: under ``torchrun``, shard the frozen base model over the processes with FSDP2 (for models that do
            not fit one GPU); the adapter stays replicated. ``false``: DDP (see :mod:`lorakit.train.distributed`).
        objective: ``sft`` (next-token loss on the data's labels) or a preference objective on
            ``{prompt, chosen, rejected}`` pairs: ``dpo`` (against the frozen reference, the model as it starts),
            ``simpo`` or ``orpo`` (reference-free); formulas in :mod:`lorakit.train.preference`.
        beta: the preference objective's temperature (default: DPO 0.1, SimPO 2.0, ORPO's odds-ratio weight 0.1).
        simpo_gamma: SimPO's target reward margin gamma (default 1.0, gamma / beta = 0.5).
        label_smoothing: DPO's assumed share of flipped preference labels (conservative DPO; 0: plain DPO).
    """

    seed: int = 0
    max_steps: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    loraplus_ratio: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    fused: bool = True
    compile: bool | Literal["auto"] = "auto"
    eval_every: int | None = Field(None, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    log_every: int = Field(1, ge=1)
    device: str = "auto"
    fsdp: bool = False
    objective: Literal["sft", "dpo", "simpo", "orpo"] = "sft"
    beta: float | None = Field(None, gt=0)
    simpo_gamma: float | None = Field(None, ge=0)
    label_smoothing: float | None = Field(None, ge=0, lt=0.5)


class OutputConfig(_Section):
    """Where the run writes.

    Attributes:
        dir: the run directory: ``adapter/``, ``checkpoints/``, ``metrics.jsonl``, ``loss.png``,
            ``config.yaml``, ``run.json``.
        save_every: write a checkpoint every N steps (one is always written at the end).
        keep_checkpoints: how many recent checkpoints to keep.
        tensorboard: also log to TensorBoard when it is installed (when ``report_to`` is not set).
        report_to: the experiment trackers to send the config, metrics and final adapter to, each through its
            own client: ``tensorboard``, ``wandb`` (offline unless ``WANDB_MODE`` says otherwise), ``mlflow``
            (the store ``MLFLOW_TRACKING_URI`` names, else ``mlflow.db`` in the working directory); see
            :mod:`lorakit.train.tracking`. ``[]``: none. Unset: TensorBoard as ``tensorboard`` says.
        project: the W&B project / MLflow experiment of the run.
        run_name: the run's name in the trackers (default: the output directory's name).
        plot: write ``loss.png`` at the end.
        progress: show a progress bar.
    """

    dir: str
    save_every: int | None = Field(None, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    tensorboard: bool = True
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] | None = None
    project: str = Field("lorakit", min_length=1)
    run_name: str | None = Field(None, min_length=1)
    plot: bool = True
    progress: bool = True

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("each tracker at most once")
        return v

    def trackers(self) -> list[str]:
        """The trackers this run reports to (``report_to``, else TensorBoard when ``tensorboard`` and installed)."""
        if self.report_to is not None:
            return list(self.report_to)
        return ["tensorboard"] if self.tensorboard and tracking.installed("tensorboard") else []


class TrainConfig(_Section):
    """A whole training run (see the module docstring for the YAML layout)."""

    model: ModelConfig
    adapter: AdapterSection = AdapterSection()
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    output: OutputConfig

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Validate a nested mapping; :class:`ConfigError` lists every problem with its field path."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be a mapping of sections, got {type(data).__name__}")
        cfg = parse(cls, data, "invalid config")
        cfg.adapter.method_config()
        if cfg.data.packing and cfg.model.task != "causal-lm":
            raise ConfigError("data.packing: packing is only for model.task=causal-lm")
        if cfg.data.skip_known is not None and (cfg.data.packing or cfg.model.task != "causal-lm"):
            raise ConfigError("data.skip_known: measured per example of a causal LM, so not with data.packing or "
                              "model.task=classification")
        if cfg.data.format == "classification" and cfg.model.task != "classification":
            raise ConfigError("data.format: classification data needs model.task=classification")
        _check_objective(cfg)
        if cfg.adapter.grow is not None and not cfg.adapter.continue_from:
            raise ConfigError("adapter.grow adds rank to a continued adapter: set adapter.continue_from")
        if cfg.data.replay is not None and not cfg.adapter.continue_from:
            raise ConfigError("data.replay replays earlier updates of a continued adapter: set adapter.continue_from")
        if cfg.model.quantize != "none":
            why = get_method(cfg.adapter.method).quantized_unsupported
            if why:
                raise ConfigError(f"model.quantize={cfg.model.quantize}: method {cfg.adapter.method!r} cannot train "
                                  f"on a quantized base: {why}")
            if cfg.training.fsdp:
                raise ConfigError("model.quantize with training.fsdp: FSDP cannot shard quantized weights here; "
                                  "train a quantized base on one GPU or with DDP (torchrun without fsdp)")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible nested dict (adapter options flat in ``adapter``), as written to YAML."""
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """Identity of the run: everything but the ``output`` section (which does not change the result)."""
        d = self.to_dict()
        d.pop("output")
        if d["model"].get("quantize") == "none":
            d["model"].pop("quantize")  # runs from before the option keep their identity (resumable)
        if d["training"].get("objective") == "sft":
            d["training"].pop("objective")  # a preference objective's options are None then (_check_objective)
        for section, key in (("adapter", "continue_from"), ("adapter", "grow"), ("data", "skip_known"),
                             ("data", "replay"), ("training", "beta"), ("training", "simpo_gamma"), ("training", "label_smoothing")):
            if d[section].get(key) is None:
                d[section].pop(key, None)  # likewise
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


PREFERENCE_OBJECTIVES = ("dpo", "simpo", "orpo")


def _check_objective(cfg: TrainConfig) -> None:
    """The preference objectives' options only where they apply (a clear error instead of a silent no-op)."""
    t, objective = cfg.training, cfg.training.objective
    own = {"beta": PREFERENCE_OBJECTIVES, "simpo_gamma": ("simpo",), "label_smoothing": ("dpo",)}
    for key, objectives in own.items():
        if getattr(t, key) is not None and objective not in objectives:
            raise ConfigError(f"training.{key} applies to training.objective {', '.join(objectives)} only, not "
                              f"{objective!r}")
    if objective == "sft":
        if cfg.data.format == "preference":
            raise ConfigError("data.format=preference: preference pairs train with training.objective dpo, simpo "
                              "or orpo")
        return
    if cfg.model.task != "causal-lm":
        raise ConfigError(f"training.objective={objective}: preference objectives train causal LMs "
                          "(model.task=causal-lm)")
    for key, why in (("packing", "each pair is scored as two whole sequences"),
                     ("cache_dir", "the on-disk token store holds single sequences, not pairs"),
                     ("skip_known", "it measures next-token examples, not pairs")):
        if getattr(cfg.data, key) not in (None, False):
            raise ConfigError(f"data.{key} does not apply to training.objective={objective}: {why}")
    if cfg.data.format not in ("auto", "preference"):
        raise ConfigError(f"training.objective={objective} trains on preference pairs, but data.format="
                          f"{cfg.data.format}; use data.format: preference (or auto)")


# --- loading -----------------------------------------------------------------------------------------------
@checked
def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read ``path`` (YAML), apply ``key.path=value`` overrides, and validate.

    Args:
        path: the YAML file (``None``: start from ``base`` or an empty mapping).
        overrides: ``section.key=value`` strings; values are parsed as YAML scalars (``1e-3``, ``true``,
            ``[q_proj, v_proj]``).
        base: a mapping to start from instead of a file.

    Raises:
        ConfigError: unreadable or malformed YAML, bad override syntax, or invalid values.
    """
    if path is None and not base:
        raise ConfigError("load_config(): give a YAML path or a non-empty base mapping (overrides alone do not make "
                          "a run: model, data and output are required)")
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = read_yaml(path)
    for item in overrides:
        apply_override(data, item)
    return TrainConfig.parse(data)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML file; :class:`ConfigError` with the line number on syntax errors."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{p}: malformed YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a mapping of sections (model, adapter, data, training, "
                          f"output), got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``data[a][b] = value`` for ``item = "a.b=value"`` (value parsed as YAML), in place."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected section.key=value (e.g. training.lr=1e-3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not valid YAML: keep the literal string
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def save_config(cfg: TrainConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML (a valid input to :func:`load_config`)."""
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def resolve_model_path(path: str) -> str:
    """``bundled://NAME`` -> the bundled model's directory; other values are returned unchanged."""
    return resources.resolve(path, model=True, what="model.path")


__all__ = [
    "AdapterSection",
    "DataConfig",
    "ModelConfig",
    "OutputConfig",
    "TrainConfig",
    "TrainingConfig",
    "load_config",
    "resolve_model_path",
    "save_config",
]
