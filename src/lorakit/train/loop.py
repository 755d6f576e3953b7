"""The optimizer-step loop of :class:`lorakit.Trainer`: micro-batches, gradient accumulation, clipping, the
method's callbacks, logging, checkpoints, stopping on a signal and the final save.

Each optimizer step::

    for each of grad_accum micro-batches:  loss = model(**batch).loss + sum(callback regularizers)
                                           (loss / grad_accum).backward()       # under autocast
    clip the global gradient norm; callbacks.before_step(); optimizer.step(); callbacks.step()
    scheduler.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lorakit.adapt.model import adapters as adapter_records
from lorakit.adapt.model import trainable_parameters
from lorakit.formats.native import save as save_adapter
from lorakit.train import history
from lorakit.train.checkpoint import rng_state, save_training_checkpoint
from lorakit.train.config import TrainConfig
from lorakit.train.data import Dataset
from lorakit.train.distributed import Distributed
from lorakit.train.lineage import adapter_dir, lineage_extra
from lorakit.train.loading import HEAD_ADAPTER
from lorakit.train.metrics import METRICS_FILE, PLOT_FILE, peak_memory_mb, plot_losses
from lorakit.train.run import FitResult, RunState, TrainingError


class TrainingLoop:
    """The loop half of :class:`lorakit.Trainer` (which sets up the model, data and run state it reads)."""

    config: TrainConfig
    model: nn.Module | None
    train_data: Dataset | None
    eval_data: Dataset | None
    device: torch.device
    amp_dtype: torch.dtype | None
    dist: Distributed
    name: str
    _log: Callable[[str], None]
    _forward: Any
    _objective: Any
    _stop: bool
    _stopping: bool
    _pad_id: int

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def evaluate(self, data: Dataset | None = None) -> dict[str, float]:
        raise NotImplementedError

    def runtime_info(self) -> dict[str, Any]:
        raise NotImplementedError

    def _log_start(self, run: RunState) -> None:
        d, model = self.train_data, self.model
        assert d is not None and model is not None
        n_train = trainable_parameters(model)
        n_all = sum(p.numel() for p in model.parameters())
        info = {"method": self.config.adapter.method, "trainable_params": n_train, "total_params": n_all,
                "cross_entropy": self.runtime_info()["cross_entropy"],
                "train_examples": len(d), "eval_examples": len(self.eval_data or []), "total_steps": run.total,
                "truncated": d.n_truncated, "dropped": d.n_dropped, "device": str(self.device),
                "precision": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "fp32",
                **{f"update_{k}": v for k, v in (getattr(self, "update_info", None) or {}).items()}}
        run.metrics.log("info", 0, **info)
        self._log(f"{info['method']}: {n_train:,} trainable of {n_all:,} parameters "
                  f"({100 * n_train / n_all:.3f}%); {len(d)} training "
                  f"{'preference pairs' if d.format == 'preference' else 'examples'}, {run.total} steps on "
                  f"{self.device} ({info['precision']})")
        if d.n_truncated or d.n_dropped:
            self._log(f"data: {d.n_truncated} example(s) truncated to max_length={self.config.data.max_length}, "
                      f"{d.n_dropped} dropped (no trainable token left)")

    def _eval_and_log(self, run: RunState, step: int) -> dict[str, float]:
        res = self.evaluate()
        if res:
            run.metrics.log("eval", step, **res)
            self._log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
        return res

    def _step(self, run: RunState) -> tuple[float, Tensor | None, int, float]:
        """One optimizer step over ``grad_accum`` micro-batches: ``(mean loss, grad norm, non-pad tokens,
        learning rate)``: the rate this step's update used for ``training.lr`` (LoRA+'s B side took ratio x it).

        Raises:
            TrainingError: the loss is NaN or infinite (checked before the update, so nothing is changed).
        """
        t, data, model = self.config.training, self.train_data, self.model
        assert data is not None and model is not None
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for i in range(t.grad_accum):
            # this process's shard of the global micro-batch, its loss weight, the global batch's tokens
            batch, weight, n_tokens = self.dist.micro_batch(data.examples, run.order.indices(run.pos.micro),
                                                            self._pad_id)
            run.pos.micro += 1
            tokens += n_tokens
            batch = self._to_device(batch)
            with self._autocast():
                loss = run.callbacks.regularize(self._forward(batch, sync=i == t.grad_accum - 1) * weight)
            loss_sum += loss.detach().float()
            run.scaler.scale(loss / t.grad_accum).backward()
        self._forward.finish()
        # one sync per step: a NaN must stop the run at once (on every process: the loss is all-reduced)
        loss_value = self.dist.mean(loss_sum) / t.grad_accum
        if not math.isfinite(loss_value):
            last = f"; the last good checkpoint is {run.result.checkpoint}" if run.result.checkpoint else ""
            raise TrainingError(f"loss is {loss_value} at step {run.pos.step + 1}; stopping{last}. "
                                "Lower training.lr (or set training.max_grad_norm) and run again with --resume, "
                                "or check the data.")
        run.scaler.unscale_(run.opt)
        params = [p for g in run.opt.param_groups for p in g["params"]]  # re-read: pruning may swap tensors
        # the norm also guards the update: a non-finite gradient must never reach the weights (or a checkpoint)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf)
        if not run.scaler.is_enabled() and not math.isfinite(norm := float(grad_norm)):
            last = f"; the last good checkpoint is {run.result.checkpoint}" if run.result.checkpoint else ""
            raise TrainingError(f"gradient norm is {norm} at step {run.pos.step + 1} (loss {loss_value:.4g}); the step "
                                f"was not applied{last}. Lower training.lr (or set training.max_grad_norm) and "
                                "run again with --resume, or check the data.")
        if not t.max_grad_norm:
            grad_norm = None  # measured, not clipped: not logged as a clipping norm
        run.callbacks.before_step()
        # this update's rate, before the scheduler moves on (as LambdaLR computes it for a group at training.lr)
        lr = t.lr * run.sched.lr_lambdas[0](run.sched.last_epoch)
        run.scaler.step(run.opt)
        run.scaler.update()
        run.callbacks.step()  # after the update, before zero_grad: the rank pruner reads the gradients
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        run.pos.step += 1
        run.result.step = run.pos.step
        self._stopping = self.dist.any(self._stop)  # every process stops after the same step
        return loss_value, grad_norm, tokens, lr

    def _loop(self, run: RunState) -> None:
        t, out = self.config.training, self.config.output
        bar = tqdm(total=run.total, initial=run.pos.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not out.progress or not self.dist.is_main, file=sys.stderr)
        window_tokens, window_start = 0, time.perf_counter()
        saved_at = run.pos.step if run.result.checkpoint is not None else -1
        # a stop asked before the first step (during the step-0 eval or the setup): every process agrees, and the
        # run stops at its starting step with a checkpoint, as after any step
        self._stopping = self.dist.any(self._stop)
        while run.pos.step < run.total and not self._stopping:
            loss, grad_norm, tokens, lr = self._step(run)
            window_tokens += tokens
            run.pos.tokens += tokens
            step = run.pos.step
            bar.update(1)
            if step % t.log_every == 0 or step == run.total:
                tps = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                values: dict[str, Any] = {"loss": loss, "lr": lr, "tokens_per_s": round(tps, 1),
                                          "tokens": run.pos.tokens,
                                          "epoch": round(run.order.epoch_of(run.pos.micro), 4)}
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                if self._objective is not None:  # the preference metrics of the steps since the last log
                    values.update(self._objective.pop_stats(self.dist.sum))
                values["peak_memory_mb"] = peak_memory_mb(self.device)
                run.metrics.log("train", step, **values)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
                window_tokens, window_start = 0, time.perf_counter()
                self._log_ranks(run, step)
            if (t.eval_every and step % t.eval_every == 0) or step == run.total:
                run.result.eval_end = self._eval_and_log(run, step)
            if (out.save_every and step % out.save_every == 0) or step == run.total:
                self._save_checkpoint(run)
                saved_at = step
        bar.close()
        if self._stopping:
            run.result.interrupted = True
            if saved_at != run.pos.step:
                self._save_checkpoint(run)
            self._log(f"interrupted at step {run.pos.step}/{run.total}; checkpoint saved to "
                      f"{run.result.checkpoint}. Continue with `lorakit train CONFIG --resume`.")

    def _request_stop(self) -> bool:
        """Signal handler (installed by ``fit`` from the step-0 eval to the end of the loop): ask the loop to stop
        before its next optimizer step; returns whether a stop was already asked."""
        before, self._stop = self._stop, True
        if not before:
            self._log("stopping before the next step and saving a checkpoint (Ctrl-C again to abort now)")
        return before

    @staticmethod
    def _ranks(run: RunState) -> dict[str, int] | None:
        """The per-layer ranks of a dynamic-rank method (:meth:`lorakit.TrainingCallback.ranks`), or ``None``."""
        for cb in run.callbacks:
            ranks = cb.ranks()
            if ranks is not None:
                return dict(ranks)
        return None

    def _log_ranks(self, run: RunState, step: int) -> None:
        """Log the per-layer ranks of dynamic-rank methods when they change."""
        ranks = self._ranks(run)
        if ranks is not None and ranks != run.ranks:
            run.metrics.log("ranks", step, total_rank=sum(ranks.values()), ranks=ranks)
            run.ranks = ranks

    def _save_checkpoint(self, run: RunState) -> None:
        names = [self.name] + ([HEAD_ADAPTER] if HEAD_ADAPTER in adapter_records(self.model) else [])
        rngs = self.dist.gather(rng_state())  # every process's RNG (None on one process); process 0 writes
        run.result.checkpoint = self.dist.main_only(
            save_training_checkpoint, self.config.output.dir, run.pos.step, model=self.model, adapters=names,
            optimizer=run.opt, scheduler=run.sched, scaler=run.scaler, callbacks=run.own_callbacks,
            position=asdict(run.pos), keep=self.config.output.keep_checkpoints, rng=rngs)

    def _save_final(self, out: Path, result: FitResult) -> Path:
        cfg = self.config
        extra = {"base_model": cfg.model.path, "tokenizer": cfg.model.tokenizer or cfg.model.path,
                 "task": cfg.model.task, "num_labels": cfg.model.num_labels, "dtype": cfg.model.dtype,
                 "quantize": cfg.model.quantize, "trained_steps": result.step, "run": cfg.fingerprint(),
                 **lineage_extra(cfg, getattr(self, "update_info", None))}
        path = save_adapter(self.model, out / "adapter", self.name, extra=extra)
        parent = adapter_dir(cfg.adapter.continue_from) if cfg.adapter.continue_from else None
        history.write(path, self, parent, extra["data"], result.step)  # this update's held-out and replay sets
        if HEAD_ADAPTER in adapter_records(self.model):
            save_adapter(self.model, path / HEAD_ADAPTER, HEAD_ADAPTER, extra=extra)
        self._log(f"adapter saved to {path}")
        if cfg.output.plot:
            plot_losses(out / METRICS_FILE, out / PLOT_FILE, title=f"{cfg.adapter.method} on {cfg.model.path}")
        return path


__all__ = ["TrainingLoop"]
