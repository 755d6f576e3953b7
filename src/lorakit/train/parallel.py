"""The training forward of one process: plain (:class:`ForwardFn`), DDP over the trainable tensors
(:class:`DdpForward`) or FSDP2 with the adapters replicated (:class:`FsdpForward`, :func:`shard_model`,
:func:`average_gradients`). :meth:`lorakit.train.distributed.Distributed.wrap` picks one."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.fast.speed import decoder_layers


class DistributedError(LorakitError, RuntimeError):
    """A distributed run cannot start or go on (bad launch environment, a failure on another process)."""


# --- the training forward ----------------------------------------------------------------------------------
class ForwardFn:
    """``loss = forward(batch, sync=...)`` for one process; the base of the DDP and FSDP versions.

    Args:
        sync: whether this micro-batch ends the optimizer step (gradients are reduced after its backward).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor]) -> None:
        self.model, self.loss_fn = model, loss_fn

    def __call__(self, batch: dict[str, Tensor], *, sync: bool = True) -> Tensor:
        return self.loss_fn(self.model, batch)

    def finish(self) -> None:
        """After the step's last backward: make the gradients global (a no-op except under FSDP)."""


class _LossModule(nn.Module):
    """``model`` plus its loss as one module, so DDP's forward covers lorakit's fused loss paths too."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor]) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self._loss_fn(self.model, batch)


class DdpForward(ForwardFn):
    """DDP over the trainable tensors: gradients are averaged in buckets during the step's last backward.

    Frozen base weights take no part (not broadcast, not bucketed: every process loaded the same ones).
    The wrapper is rebuilt when the set of trainable Parameters changes (rank1-sum's pruning replaces them
    by smaller ones), which happens between steps and identically on every process.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor],
                 device: torch.device) -> None:
        super().__init__(model, loss_fn)
        self.device = device
        self._key: tuple[int, ...] = ()
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self._build()

    def _trainable_key(self) -> tuple[int, ...]:
        return tuple(id(p) for p in self.model.parameters() if p.requires_grad)

    def _build(self) -> None:
        self.ddp = None  # drop the old reducer (and its hooks) first
        if not any(p.requires_grad for p in self.model.parameters()):
            raise DistributedError("DDP: the model has no trainable parameter")
        module = _LossModule(self.model, self.loss_fn)
        frozen = [f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad]
        if hasattr(nn.parallel.DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model"):
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
        cuda = self.device.type == "cuda"
        # No buffer sync in forward: buffers are equal everywhere and change only identically on every process
        # (masks, Delta-LoRA's bookkeeping). find_unused_parameters=False: every adapter tensor is used in every
        # forward (masked rank1-sum components get zero gradients, not none).
        ddp = nn.parallel.DistributedDataParallel
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters \
            else {"broadcast_buffers": False}
        self.ddp = ddp(module, device_ids=[self.device] if cuda else None, find_unused_parameters=False,
                       **no_sync)
        self._key = self._trainable_key()

    def __call__(self, batch: dict[str, Tensor], *, sync: bool = True) -> Tensor:
        if self._trainable_key() != self._key:
            self._build()
        assert self.ddp is not None
        if sync:
            return self.ddp(batch)
        with self.ddp.no_sync():  # gradient accumulation: reduce only after the step's last micro-batch
            return self.ddp(batch)


class FsdpForward(ForwardFn):
    """FSDP2: decoder layers and the root sharded (frozen weights only); adapters replicated and averaged here."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor],
                 device: torch.device, world: int) -> None:
        super().__init__(model, loss_fn)
        self.world = world
        shard_model(model, device, world)

    def finish(self) -> None:
        average_gradients([p for p in self.model.parameters() if p.requires_grad], self.world)


def shard_model(model: nn.Module, device: torch.device, world: int) -> None:
    """``fully_shard`` every decoder layer, then the root, leaving the trainable tensors out (replicated).

    Raises:
        DistributedError: FSDP2 is missing from this torch, or the model has no repeated decoder layers.
    """
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # pragma: no cover - torch < 2.6
        raise DistributedError("training.fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6)") from None

    layers = decoder_layers(model)
    if not layers:
        raise DistributedError(f"training.fsdp: found no decoder layers to shard in {type(model).__name__}")
    trainable = {p for p in model.parameters() if p.requires_grad}
    mesh = init_device_mesh(device.type, (world,))
    for layer in layers:  # bottom-up: each layer is one all-gather / free unit
        fully_shard(layer, mesh=mesh, ignored_params=trainable)
    fully_shard(model, mesh=mesh, ignored_params=trainable)  # embeddings, final norm, head
    with torch.no_grad():
        for p in trainable:  # FSDP leaves ignored tensors where they are; same Parameter objects, new device
            p.data = p.data.to(device)


@torch.no_grad()
def average_gradients(params: Sequence[Tensor], world: int) -> None:
    """Average ``params``' gradients over all processes with one flat all-reduce per dtype.

    A parameter without a gradient counts as zero (and gets a zero gradient), so every process reduces the
    same layout.
    """
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])  # (sum of numel,)
        dist.all_reduce(flat)
        flat.div_(world)
        for p, g in zip(group, flat.split([p.numel() for p in group])):
            p.grad.copy_(g.view_as(p.grad))


__all__ = ["DdpForward", "DistributedError", "ForwardFn", "FsdpForward", "average_gradients", "shard_model"]
