"""The training loop behind ``lorakit train``: ``lorakit.Trainer(model, config).fit()``.

One loop serves every method in :data:`lorakit.METHODS`; what differs between methods comes from the method itself:
its options (validated by its config class), its data-driven init (``attach(..., init_batches=...)`` when the
method :attr:`~lorakit.Method.needs_init_data`, e.g. LoRA-SB), its training callbacks
(:func:`lorakit.training_callbacks`: Delta-LoRA's base update, rank1-sum's pruner) and its LoRA+ parameter split
(:func:`lorakit.optimizer`). Setup (model, data, adapter, run directory, schedule, resume) is here; each optimizer
step is :class:`lorakit.train.loop.TrainingLoop`'s.

Resuming restores the adapter, optimizer, scheduler, grad scaler, callback states, every RNG and the data
position (micro-batch ``k`` is a pure function of ``k``, see :class:`lorakit.train.data.BatchOrder`), so on CPU an
interrupted-and-resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lorakit._version import __version__
from lorakit.adapt.model import adapters as adapter_records
from lorakit.adapt.model import attach, attach_config, remove, set_active, training_callbacks
from lorakit.adapt.targets import HEAD_NAMES
from lorakit.core import lowrank
from lorakit.core.callbacks import Callbacks, TrainingCallback
from lorakit.errors import ConfigError
from lorakit.fast import speed
from lorakit.formats.native import load as load_adapter
from lorakit.methods import get_method
from lorakit.train import distributed, preference
from lorakit.train.batching import BatchOrder, collate, iter_batches
from lorakit.train.checkpoint import (
    RUN_FILE,
    RunLock,
    latest_good_checkpoint,
    load_training_checkpoint,
    prepare_run_dir,
    read_json,
    write_json,
)
from lorakit.train.config import TrainConfig, load_config, resolve_model_path, save_config
from lorakit.train.data import IGNORE, Dataset, dataset_from, records_like
from lorakit.train.growth import grow_where_new
from lorakit.train.lineage import finish_update, measure_update
from lorakit.train.loading import HEAD_ADAPTER, load_model, load_tokenizer, resolve_device
from lorakit.train.loop import TrainingLoop
from lorakit.train.metrics import MetricsLogger
from lorakit.train.optim import optimizer as make_optimizer
from lorakit.train.run import FitResult, Position, RunState, TrainingError, logged_eval
from lorakit.train.runtime import (
    device_name,
    lr_schedule,
    rebase_schedule,
    resolve_precision,
    seed_everything,
    stop_on_signals,
)
from lorakit.train.streaming import load_data
from lorakit.train.tracking import check_report_to, start_tracking
from lorakit.util.arguments import checked
from lorakit.util.dense_weights import DenseWeights


class Trainer(TrainingLoop):
    """Fine-tune a model with any lorakit method from a :class:`~lorakit.train.config.TrainConfig`.

    Example::

        cfg = lorakit.load_config("run.yaml", ["training.lr=1e-3"])
        result = lorakit.Trainer(None, cfg).fit()          # loads cfg.model, attaches cfg.adapter
        result = lorakit.Trainer(model, cfg, tokenizer=tok).fit(resume=True)

    Args:
        model: the base model, or a model that already carries the adapter named ``config.adapter.name``
            (its method must be ``config.adapter.method``); ``None`` loads ``config.model``.
        config: a TrainConfig, a mapping of sections, or a YAML path.
        tokenizer: the tokenizer (default: loaded from ``config.model``).
        train_data, eval_data: data to use instead of ``config.data``'s files: a tokenized
            :class:`~lorakit.train.data.Dataset`, or records to tokenize as ``config.data`` says (a
            ``datasets.Dataset``, a list of dicts, a file path; formats and ``data.columns`` as for files).
        callbacks: extra :class:`~lorakit.TrainingCallback` objects driven by the loop after the method's
            own (only the method's callbacks are checkpointed).
        log: where progress messages go (default: stderr, above the progress bar).
    """

    @checked
    def __init__(self, model: nn.Module | None, config: TrainConfig | Mapping[str, Any] | str | os.PathLike[str],
                 *, tokenizer: Any = None, train_data: Any = None, eval_data: Any = None,
                 callbacks: Sequence[TrainingCallback] = (), log: Callable[[str], None] | None = None) -> None:
        for arg, data in (("train_data", train_data), ("eval_data", eval_data)):
            if data is not None and not isinstance(data, Dataset) and not records_like(data):
                raise ConfigError(f"Trainer(): argument {arg!r} must be a lorakit Dataset, a datasets.Dataset, a "
                                  f"list of records (dicts) or a data file path, got {type(data).__name__}")
        if isinstance(config, TrainConfig):
            self.config = config
        elif isinstance(config, Mapping):
            self.config = TrainConfig.parse(config)
        else:
            self.config = load_config(config)
        self.model = model
        self.tokenizer = tokenizer
        self.train_data, self.eval_data = train_data, eval_data
        self.extra_callbacks = list(callbacks)
        self.update_info: dict[str, Any] | None = None  # what the starting model knew of the data (measure_update)
        self.new_data_confidence: tuple[list[float], float] = ([], 0.0)  # per example, and the unknown share
        self._log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
        # under torchrun: join the process group; each process trains on its own GPU, process 0 speaks
        self.dist, self.device = distributed.setup(self.config, resolve_device(self.config.training.device))
        if not self.dist.is_main:
            self._log = lambda msg: None
        self.amp_dtype = resolve_precision(self.config.training.precision, self.device)
        self._objective: preference.PreferenceObjective | None = None  # training.objective other than sft
        self._stop = self._stopping = False  # a signal on this process; agreed by every process after a step
        self._lock: RunLock | None = None  # the run directory's, while fit runs (process 0)

    # --- setup -----------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.adapter.name

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self) -> None:
        """Load what is not loaded yet: tokenizer, model, data; move the model to the device (``fit`` and
        ``evaluate`` call it)."""
        cfg = self.config
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(cfg.model)
        if self.model is None:
            self.model = load_model(cfg.model, pad_token_id=self.tokenizer.pad_token_id, device=self.device)
            frozen = self.frozen_dtype()
            if frozen is not None and any(p.dtype == torch.float32 for p in self.model.parameters()):
                self.model.to(frozen)  # adapters attach afterwards, in fp32
                self._log(f"frozen base weights stored in {str(frozen).removeprefix('torch.')}, the compute dtype "
                          "(adapter weights and optimizer state stay fp32; model.dtype: float32 keeps fp32)")
        if cfg.model.task == "classification" and getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        task, n = cfg.model.task, cfg.model.num_labels
        if self.train_data is None:
            self.train_data, loaded_eval = load_data(cfg.data, self.tokenizer, task=task, seed=cfg.training.seed,
                                                     num_labels=n, log=self._log)
            self.eval_data = self.eval_data if self.eval_data is not None else loaded_eval
        elif not isinstance(self.train_data, Dataset):  # records (a datasets.Dataset, dicts): tokenize them
            self.train_data = dataset_from(self.train_data, cfg.data, self.tokenizer, task=task, num_labels=n)
        if self.eval_data is not None and not isinstance(self.eval_data, Dataset):
            self.eval_data = dataset_from(self.eval_data, cfg.data, self.tokenizer, task=task, num_labels=n)
        preference.check_data(cfg.training.objective, self.train_data, self.eval_data)
        if not self.dist.fsdp:  # FSDP moves each shard to the device itself (the whole model may not fit)
            self.model.to(self.device)
        if (cfg.adapter.continue_from or cfg.data.skip_known is not None) and self.update_info is None:
            self.update_info = measure_update(self)  # the parent loaded; what the data holds that is new

    def frozen_dtype(self) -> torch.dtype | None:
        """The dtype the frozen base weights are stored in on the default GPU path, or ``None`` to keep them as
        loaded: with ``training.precision`` and ``model.dtype`` both ``auto`` on CUDA, an fp32 checkpoint's
        frozen weights go to the autocast dtype (bf16), the dtype every GEMM runs in anyway, which halves their
        memory and spares a cast per layer per step. Not when base weights train (full fine-tuning, a
        classification head): they keep fp32 masters under autocast."""
        cfg = self.config
        if (self.device.type != "cuda" or self.amp_dtype is None or cfg.training.precision != "auto"
                or cfg.model.dtype != "auto" or cfg.model.quantize != "none"):
            return None
        if not get_method(cfg.adapter.method).layer_method or self._trains_head():
            return None
        return self.amp_dtype

    def _trains_head(self) -> bool:
        return self.config.model.task == "classification" and self.config.adapter.train_head

    def runtime_info(self) -> dict[str, Any]:
        """How this run computes (``run.json``'s ``runtime``): device, autocast dtype, the frozen weights' dtype,
        whether fused adapter paths are on, which loss kernel runs, and compile."""
        model, t = self.model, self.config.training
        assert model is not None
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad})
        fused_loss = t.fused and self.config.model.task == "causal-lm" and not self.dist.fsdp
        return {"device": str(self.device), "device_name": device_name(self.device),
                "autocast": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else None,
                "frozen_dtypes": dtypes, "fused": t.fused,
                "cross_entropy": speed.loss_kernel(model) if fused_loss else "model",
                "compile": t.compile is True or (t.compile == "auto" and self.device.type == "cuda"),
                "torch": torch.__version__}

    def _head_name(self) -> str | None:
        if self.config.model.task != "classification" or not self.config.adapter.train_head:
            return None
        heads = [n for n, _ in self.model.named_children() if n in HEAD_NAMES]
        if not heads:
            raise ConfigError(f"adapter.train_head: no task head ({sorted(HEAD_NAMES)}) found on "
                              f"{type(self.model).__name__}")
        return heads[0]

    def _batch_order(self, seed: int) -> BatchOrder:
        """The run's micro-batch order over the global batch (every process draws the same)."""
        assert self.train_data is not None
        d = self.config.data
        lengths = None
        if d.group_by_length or d.max_tokens:
            stored = getattr(self.train_data.examples, "lengths", None)  # a TokenStore: from its offsets
            lengths = stored() if callable(stored) else [e.n_tokens for e in self.train_data.examples]
        budget = None if d.max_tokens is None else d.max_tokens * self.dist.world  # the budget is per process
        return BatchOrder(len(self.train_data), self.dist.global_batch(self.config.training.batch_size), seed,
                          lengths=lengths, group_by_length=d.group_by_length, max_tokens=budget)

    def _init_batches(self) -> Iterator[dict[str, Tensor]]:
        """Training batches for a data-driven init, in a seeded order of their own (so the training order,
        and therefore a resumed run, does not depend on how many the method read)."""
        assert self.train_data is not None
        order = self._batch_order(self.config.training.seed + 1)  # LoRA-SB splits each global batch over processes
        n = order.batches_per_epoch if self.config.adapter.init_batches is None else \
            min(order.batches_per_epoch, self.config.adapter.init_batches)
        for k in range(n):  # preference pairs: the chosen answers (the data-driven init fits what to learn)
            chosen = [self.train_data.examples[i] for i in order.indices(k)]
            yield self._to_device(collate([replace(e, rejected=None, reference=None) for e in chosen], self._pad_id))

    def _attach(self, *, total: int, warmup: int) -> None:
        """Attach the configured adapter (unless the model carries it already); ``total`` optimizer steps with
        ``warmup`` warm-up steps are what options that follow the run are resolved from."""
        model, a = self.model, self.config.adapter
        existing = adapter_records(model)
        if a.name in existing:  # also a parent loaded by continue_from (lorakit.train.lineage.measure_update)
            if existing[a.name].method != a.method:
                raise ConfigError(f"adapter.method={a.method!r} but the model already carries adapter "
                                  f"{a.name!r} of method {existing[a.name].method!r}")
            self._log(f"using the {a.method} adapter {a.name!r} already attached to the model")
            if a.grow:  # rank where the new data is new (measured on the parent by measure_update)
                assert self.update_info is not None
                self.update_info["growth"] = grow_where_new(self, *self.new_data_confidence)
        else:
            data_init = get_method(a.method).needs_init_data
            runtime: dict[str, Any] = {"init_batches": self._init_batches()} if data_init else {}
            if get_method(a.method).needs_dense_weights:  # read lazily from the checkpoint, one layer at a time
                runtime["dense_weights"] = DenseWeights(resolve_model_path(self.config.model.path))
            # a data-driven init runs forward/backward passes: use the training precision for them
            config = a.method_config()
            t = self.config.training
            fill = get_method(a.method).run_defaults(config, lr=t.lr, warmup_steps=warmup, total_steps=total)
            if fill:  # options that follow the run (LoRA-SB's eta, Delta-LoRA's start): saved as resolved
                config = config.model_copy(update=fill)
                self._log(f"{a.method}: " + ", ".join(f"{k} = {v:g}" for k, v in fill.items()) + " (from the run's "
                          "schedule)")
            with self._autocast() if data_init else contextlib.nullcontext():
                attach_config(model, config, a.method, name=a.name, runtime=runtime)
        head = self._head_name()
        if head is not None and HEAD_ADAPTER not in adapter_records(model):
            attach(model, "full", name=HEAD_ADAPTER, targets=[head])
            set_active(model, [a.name, HEAD_ADAPTER])

    def _restore_adapter(self, ckpt: Path) -> None:
        """Replace the adapter(s) on the model by the checkpoint's."""
        for n in (self.name, HEAD_ADAPTER):
            if n in adapter_records(self.model):
                remove(self.model, n)
        load_adapter(self.model, ckpt / "adapter", name=self.name)
        if (ckpt / "adapter" / HEAD_ADAPTER).is_dir():
            load_adapter(self.model, ckpt / "adapter" / HEAD_ADAPTER, name=HEAD_ADAPTER, force=True)
            set_active(self.model, [self.name, HEAD_ADAPTER])

    @property
    def _pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _speed_up(self, model: nn.Module) -> None:
        """Gradient checkpointing, shared projections and per-layer compile, as configured."""
        t = self.config.training
        if t.gradient_checkpointing:
            speed.enable_checkpointing(model)
            if hasattr(model.config, "use_cache"):
                model.config.use_cache = False
        if t.fused:
            speed.group_projections(model)
        if t.compile is True or (t.compile == "auto" and self.device.type == "cuda"):
            speed.compile_layers(model)

    def _loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The training loss on ``batch``: the run's preference objective, or :meth:`_lm_loss`."""
        return self._objective(model, batch) if self._objective is not None else self._lm_loss(model, batch)

    def _lm_loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The model's loss on ``batch``; causal LMs go through the fused linear cross-entropy (no
        ``(tokens, vocab)`` logits) when fast paths are on."""
        if self.config.training.fused and batch["labels"].dim() == 2 and not self.dist.fsdp:  # FSDP: root forward
            return speed.causal_lm_loss(model, batch["input_ids"], batch["labels"],
                                        attention_mask=batch["attention_mask"],
                                        position_ids=batch.get("position_ids"))
        return model(**batch).loss

    # --- evaluation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: Dataset | None = None) -> dict[str, float]:
        """Loss (token-weighted) and perplexity, or loss and accuracy for classification, on ``data``
        (default: the evaluation data)."""
        if self.model is None or self.train_data is None:
            self.prepare()
        data = data if data is not None else self.eval_data
        if data is None or len(data) == 0:
            return {}
        if data.format == "preference":
            return preference.evaluate(self, data)
        model = self.model
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        correct = 0
        bs = self.config.training.eval_batch_size or self.config.training.batch_size
        for batch in iter_batches(self.dist.eval_shard(data), bs, self._pad_id):
            batch = self._to_device(batch)
            labels = batch["labels"]
            with self._autocast():
                if labels.dim() == 1:  # classification: loss is a mean over examples
                    out = model(**batch)
                    loss, n = out.loss, labels.numel()
                    correct += int((out.logits.argmax(-1) == labels).sum())
                else:  # causal LM: a mean over predicted (shifted, non-ignored) tokens
                    loss, n = self._lm_loss(model, batch), int((labels[:, 1:] != IGNORE).sum())
            total += loss.double() * n
            count += n
        model.train(was_training)
        total, count, correct = self.dist.eval_sum(total, count, correct)
        loss = float(total / max(count, 1))
        if data.format == "classification":
            return {"eval_loss": loss, "eval_accuracy": correct / max(count, 1)}
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    # --- training --------------------------------------------------------------------------------------------
    def fit(self, *, resume: bool = False, overwrite: bool = False) -> FitResult:
        """Train, checkpoint, evaluate and save the adapter into ``output.dir/adapter``.

        Args:
            resume: continue from the latest checkpoint in ``output.dir`` (start fresh if there is none).
            overwrite: replace a previous run in ``output.dir``.

        Raises:
            RunDirError: ``output.dir`` holds another run (or this one, without ``resume``/``overwrite``).
            TrainingError: the loss became NaN or infinite (the last good checkpoint is kept).
        """
        try:
            with lowrank.fused(self.config.training.fused):
                return self._fit(resume=resume, overwrite=overwrite)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _claim_run_dir(self, out: Path, *, resume: bool, overwrite: bool) -> bool:
        """Lock ``out`` for this run (one process trains in a run directory at a time; process 0 holds the
        lock for a torchrun job), then check and prepare it; returns whether to resume."""
        self._lock = RunLock(out).acquire()
        cfg = self.config
        return prepare_run_dir(out, cfg.fingerprint(), cfg.to_dict(), resume=resume, overwrite=overwrite,
                               log=self._log)

    def _write_run_file(self, out: Path, *, fresh: bool) -> None:
        """``run.json``: the run's identity (fingerprint, config, lorakit version; a fresh run writes it and
        ``config.yaml``) and how it computes (``runtime``: rewritten on resume, which may run elsewhere)."""
        cfg = self.config
        if fresh:
            save_config(cfg, out / "config.yaml")
            run = {"fingerprint": cfg.fingerprint(), "config": cfg.to_dict(), "lorakit_version": __version__}
        else:
            run = read_json(out / RUN_FILE)
        write_json(out / RUN_FILE, {**run, "runtime": self.runtime_info()})

    def _fit(self, *, resume: bool, overwrite: bool) -> FitResult:
        cfg, t = self.config, self.config.training
        out = Path(cfg.output.dir)
        trackers = check_report_to(cfg.output.trackers())  # before any work: a missing client fails at once
        resuming = self.dist.main_only(self._claim_run_dir, out, resume=resume, overwrite=overwrite)
        seed_everything(t.seed)  # before loading: a fresh task head is initialised randomly
        self.prepare()
        assert self.model is not None and self.train_data is not None
        model = self.model
        order = self._batch_order(t.seed)
        total = t.max_steps or max(1, math.ceil(t.epochs * order.batches_per_epoch / t.grad_accum))
        warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total)
        # process 0's view: on several nodes output.dir must be shared, or reading it fails (no silent divergence)
        ckpt = self.dist.main_only(latest_good_checkpoint, out, self._log) if resuming else None
        if ckpt is not None:
            self._restore_adapter(ckpt)
        else:
            self._attach(total=total, warmup=warmup)
        self._speed_up(model)
        if self.dist.is_main:
            self._write_run_file(out, fresh=ckpt is None)
        # under torchrun: DDP, or FSDP2 (after checkpointing/compile, and before the optimizer: FSDP moves the
        # adapter to the device); then each process draws its own dropout masks
        self._forward = self.dist.wrap(model, self._loss, log=self._log)
        if t.objective != "sft":  # DPO's reference: computed now, before any update, or read back on resume
            self._objective = preference.prepare(self, order, total, out, fresh=ckpt is None)
        self.dist.reseed(t.seed)
        model.train()

        opt = make_optimizer(model, t.lr, loraplus_ratio=t.loraplus_ratio, weight_decay=t.weight_decay,
                             betas=t.betas, eps=t.eps)
        sched = lr_schedule(opt, total=total, warmup=warmup, schedule=t.schedule, min_ratio=t.min_lr_ratio)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        # The method's own rules are part of the run's state (checkpointed); extra callbacks are not.
        own = training_callbacks(model, opt, total_steps=total)
        pos = Position()
        if ckpt is not None:
            configured = list(sched.base_lrs)  # this run's peak rates (a resume may lower training.lr)
            pos = Position(**load_training_checkpoint(ckpt, optimizer=opt, scheduler=sched, scaler=scaler,
                                                       callbacks=own, rank=self.dist.rank, world=self.dist.world))
            rebase_schedule(sched, configured)
            self._log(f"resumed from {ckpt} at step {pos.step}/{total}")
        tracking = start_tracking(trackers, out, cfg.to_dict(), resume=ckpt is not None, log=self._log) \
            if self.dist.is_main else None
        metrics = MetricsLogger(out, tracking=tracking, resume_step=pos.step if ckpt is not None else None) \
            if self.dist.is_main else distributed.NullMetrics()
        run = RunState(order, total, opt, sched, scaler, own, Callbacks(own + self.extra_callbacks), metrics, pos,
                   FitResult(pos.step, total, out, None, ckpt))
        status = "failed"
        try:
            # Ctrl-C / SIGTERM from here on is a stop request, the step-0 eval included (minutes on a real model):
            # the loop stops before its next step and checkpoints, at step 0 if no step has run
            with stop_on_signals(self._request_stop):
                if ckpt is None:
                    self._log_start(run)
                    run.result.eval_start = self._eval_and_log(run, 0)
                else:
                    run.result.eval_start = logged_eval(out, 0)
                    run.ranks = self._ranks(run)  # logged before the checkpoint: only later changes are new
                self._loop(run)
            if run.result.interrupted:
                status = "interrupted"
                return run.result
            # every final write in one main_only, which is also a barrier: the processes leave fit together (one
            # that exits while process 0 still writes can make the other abort in the process group's teardown)
            finish_update(self)  # every earlier update's held-out loss now (on every process: evaluation is collective)
            run.result.adapter_dir = self.dist.main_only(self._save_final, out, run.result)
            if tracking is not None and run.result.adapter_dir is not None:
                tracking.artifact(Path(run.result.adapter_dir))
            status = "finished"
            return run.result
        finally:
            run.metrics.close()
            if tracking is not None:
                tracking.finish(status)


__all__ = ["FitResult", "Trainer", "TrainingError"]
