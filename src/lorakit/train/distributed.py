"""Data-parallel training over several processes: DDP, or FSDP2 for base models too big for one GPU.

Launch one process per GPU; every process runs the same command (``accelerate launch`` sets the same
environment variables as ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``)::

    torchrun --nproc_per_node 8 -m lorakit train cfg.yaml
    accelerate launch --multi_gpu --num_processes 8 -m lorakit train cfg.yaml

The process group is initialised from that environment (``nccl`` on CUDA, ``gloo`` on CPU); process ``r`` uses
``cuda:LOCAL_RANK``. ``training.batch_size`` is per process, so the global batch of one optimizer step is
``batch_size x processes x grad_accum``.

Exact data parallelism. Micro-batch ``k`` of the run is the global micro-batch
``S = BatchOrder(n, batch_size x N, seed).indices(k)`` and process ``r`` takes the strided shard ``S_r = S[r::N]``.
With ``L_r`` the mean loss of ``S_r`` over its ``n_r`` loss units (predicted tokens for a causal LM, examples
for classification) and ``n = sum_r n_r``, the loss of the whole global micro-batch is

    L = sum_r (n_r / n) L_r,

so process ``r`` back-propagates ``N (n_r / n) L_r`` and DDP's gradient average ``(1/N) sum_r`` gives exactly
``grad L``: ``N`` processes with batch ``b`` train like one process with batch ``N b`` (up to fp32 summation
order), whatever the sequence lengths. Every process knows every ``n_r`` (the data is deterministic), so this
costs no communication.

What every process must agree on is computed identically or all-reduced: gradients (DDP; a manual average of
the replicated adapter gradients under FSDP), the logged loss and the stop request (two scalars per step),
LoRA-SB's gradient estimate (:mod:`lorakit.methods.lora_sb`) and rank1-sum's importance scores
(:func:`lorakit.methods.rank1_sum_pruning.all_reduce_mean_`). Only process 0 writes files (checkpoints, metrics, the adapter, the
plot); :meth:`Distributed.main_only` runs such a write on process 0 and hands its result, or its error, to every
process, which doubles as a barrier.

FSDP (``training.fsdp: true``; FSDP2's ``fully_shard``,
https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html): every decoder layer and then the root
model are sharded; the trainable adapter tensors are *not* (they are ``ignored_params``: replicated, tiny, and
free to change shape, as rank1-sum's pruning does), so their gradients are averaged by one flat all-reduce per
step. Frozen base weights are sharded and all-gathered layer by layer. The model is loaded on the CPU by every
process and moved to the GPU shard by shard, so host memory must hold one copy per process. Under FSDP the
causal-LM loss goes through the model's own forward (the root must run first), not the fused linear
cross-entropy, and methods that write into the base weights (Delta-LoRA) or initialise from full-weight
gradients (LoRA-SB) are refused: use DDP for them.
"""

from __future__ import annotations

import atexit
import gc
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lorakit.errors import ConfigError, LorakitError
from lorakit.methods import get_method
from lorakit.train.batching import collate
from lorakit.train.config import TrainConfig
from lorakit.train.data import IGNORE, Dataset, Example
from lorakit.train.metrics import MetricsLogger
from lorakit.train.parallel import DdpForward, DistributedError, ForwardFn, FsdpForward
from lorakit.train.runtime import seed_everything

T = TypeVar("T")

def env_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` / ``accelerate launch`` (1 when launched plainly)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def is_main_process() -> bool:
    """Whether this is process 0 (always true without ``torch.distributed``): the one that prints and writes."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a data-parallel run, and the few collective operations the trainer uses.

    Attributes:
        rank, world, local_rank: this process's index, the number of processes, its index on its node.
        fsdp: shard the frozen base model with FSDP2 (only with ``world > 1``).
        device: the device collectives run on (this process's GPU, or the CPU for ``gloo``).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- data ------------------------------------------------------------------------------------------------
    def global_batch(self, batch_size: int) -> int:
        """Examples of one global micro-batch: ``batch_size`` per process."""
        return batch_size * self.world

    def micro_batch(self, examples: Sequence[Example], indices: Sequence[int],
                    pad_id: int) -> tuple[dict[str, Tensor], float, int]:
        """This process's shard of the global micro-batch ``indices``, padded.

        Returns:
            ``(batch, weight, tokens)``: the padded shard; the factor ``N n_r / n`` its mean loss is scaled by
            (see the module docstring; exactly ``1.0`` on one process); the non-pad tokens of the whole global
            micro-batch (for throughput).
        """
        tokens = sum(examples[i].n_tokens for i in indices)
        if not self.active:
            return collate([examples[i] for i in indices], pad_id), 1.0, tokens
        units = [loss_units(examples[i]) for i in indices]
        mine = list(indices[self.rank::self.world])
        if not mine:  # a last global batch smaller than the world: run one example with weight 0 so that
            return collate([examples[indices[0]]], pad_id), 0.0, tokens  # every process joins the reduction
        weight = self.world * sum(units[self.rank::self.world]) / max(sum(units), 1)
        return collate([examples[i] for i in mine], pad_id), weight, tokens

    def eval_shard(self, data: Dataset) -> Dataset:
        """This process's share of the evaluation data (all of it under FSDP, whose forward is collective)."""
        if not self.active or self.fsdp:
            return data
        return replace(data, examples=data.examples[self.rank::self.world])

    def eval_total(self, values: Tensor) -> Tensor:
        """Per-process sums over :meth:`eval_shard`'s data added up (under FSDP every process saw all of it)."""
        return values.detach().cpu() if self.fsdp else self.sum(values)

    def eval_sum(self, total: Tensor, count: int, correct: int) -> tuple[Tensor, int, int]:
        """Sum :meth:`eval_shard`'s per-process loss total, loss units and correct predictions."""
        if not self.active:
            return total, count, correct
        t = self.eval_total(torch.stack([total.detach().double().cpu(), torch.tensor(float(count), dtype=torch.float64),
                                         torch.tensor(float(correct), dtype=torch.float64)]))
        return t[0].to(total.device), int(t[1]), int(t[2])

    # --- the model -------------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor], *,
             log: Callable[[str], None] | None = None) -> ForwardFn:
        """The training forward for this run: plain, DDP, or FSDP2 (which shards ``model`` in place).

        Call it after the adapter is attached and before the optimizer is built (FSDP moves the adapter to
        the device without changing its Parameters).
        """
        if not self.active:
            return ForwardFn(model, loss_fn)
        what = "FSDP2" if self.fsdp else "DDP"
        if log is not None:
            log(f"{what} over {self.world} processes ({dist.get_backend()}); training.batch_size is per process")
        if self.fsdp:
            return FsdpForward(model, loss_fn, self.device, self.world)
        return DdpForward(model, loss_fn, self.device)

    # --- agreement -------------------------------------------------------------------------------------------
    def mean(self, value: Tensor) -> float:
        """``value`` averaged over processes (the step's loss: every process then takes the same NaN decision)."""
        if not self.active:
            return float(value)
        t = value.detach().float().to(self.device).reshape(1)
        dist.all_reduce(t)
        return float(t[0]) / self.world

    def sum(self, values: Tensor) -> Tensor:
        """``values`` (a tensor of sums) added up over processes, returned on the CPU."""
        if not self.active:
            return values.detach().cpu()
        t = values.detach().to(self.device).clone()
        dist.all_reduce(t)
        return t.cpu()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process (a stop request: every process stops after the same step)."""
        if not self.active:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t)
        return bool(t[0] > 0)

    def main_only(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on process 0 only (file writes) and return its result, or raise its error, everywhere.

        The broadcast also acts as a barrier: no process goes on before process 0 is done.
        """
        if not self.active:
            return fn(*args, **kwargs)
        box: list[Any] = [None]
        error: Exception | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn(*args, **kwargs))
            except Exception as e:  # hand it to the others, then raise it here too
                error = e
                box[0] = ("err", e if _picklable(e) else DistributedError(f"{type(e).__name__}: {e}"))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if error is not None:
            raise error
        if kind == "err":
            raise value if isinstance(value, LorakitError) else DistributedError(f"process 0 failed: {value}")
        return value

    def gather(self, obj: Any) -> list[Any] | None:
        """``obj`` of every process, by rank (``None`` on one process)."""
        if not self.active:
            return None
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def reseed(self, seed: int) -> None:
        """Give each process its own random stream (dropout masks) once the model is identical everywhere."""
        if self.active:

            seed_everything(seed * 1_000_003 + self.rank)


def loss_units(example: Example) -> int:
    """What an example's mean loss averages over: its predicted tokens (labels after the first that are not
    ignored; the loss shifts labels by one), or 1 for a classification example or a preference pair (the
    preference losses are means over pairs)."""
    if isinstance(example.labels, int) or example.rejected is not None:
        return 1
    return sum(1 for y in example.labels[1:] if y != IGNORE)


# --- setup ---------------------------------------------------------------------------------------------------
def setup(config: TrainConfig, device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group described by the launcher's environment; returns the context and this process's
    training device (``cuda:LOCAL_RANK`` for a CUDA run).

    Without ``WORLD_SIZE > 1`` (a plain launch) nothing changes. A process group created beforehand (e.g. by
    ``accelerate.Accelerator``) is used as it is.

    Raises:
        ConfigError: an explicit ``cuda:N`` device or an FSDP-incompatible method under a multi-process launch.
        DistributedError: the environment is incomplete or names a GPU this machine lacks.
    """
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else env_world_size()
    if world <= 1:
        return Distributed(), device
    if not dist.is_available():  # pragma: no cover - torch built without distributed
        raise DistributedError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    fsdp = bool(config.training.fsdp)
    if fsdp:
        _check_fsdp(config)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"training.device={device}: under torchrun each process uses cuda:LOCAL_RANK; "
                              "set training.device to cuda or auto")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                                   "visible; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not initialized:
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun or "
                                   "accelerate launch")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        atexit.register(_destroy)
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, fsdp=fsdp,
                       device=device), device


def _check_fsdp(config: TrainConfig) -> None:
    method = config.adapter.method
    cls = get_method(method)
    if cls.fsdp_unsupported:
        raise ConfigError(f"training.fsdp: method {method!r} cannot train under FSDP ({cls.fsdp_unsupported}); "
                          "use DDP (training.fsdp=false)")
    if cls.needs_init_data:
        raise ConfigError(f"training.fsdp: method {method!r} computes its init from full-weight gradients of "
                          "the unsharded model; use DDP (training.fsdp=false)")


def _destroy() -> None:
    """Tear the process group down while the interpreter is still whole (``atexit``).

    Objects that hold the group (a DDP reducer in a reference cycle, finished work handles) are collected first:
    freed later, during interpreter finalization, gloo's worker threads can abort the process (SIGABRT,
    "terminate called without an active exception") after a run that succeeded.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def _picklable(e: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(e))
        return True
    except Exception:
        return False


class NullMetrics(MetricsLogger):
    """The metrics log of processes other than 0: writes nothing."""

    def __init__(self) -> None:  # no file, no TensorBoard
        pass

    def log(self, kind: str, step: int, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


__all__ = ["Distributed", "DistributedError", "NullMetrics", "is_main_process", "loss_units", "setup"]
