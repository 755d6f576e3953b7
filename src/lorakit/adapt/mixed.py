"""Mixed-adapter batches: every row of a batch through its own adapter, in one forward.

Inside ``with per_row(model, ["a", "b", None, "a"]):`` row ``i`` (batch dimension 0) of every forward, and of every
step of Hugging Face ``generate``, is computed as if ``set_active(model, names[i])`` were in effect alone (``None``:
the base model). Each :class:`~lorakit.core.layers.AdaptedLayer` computes::

    y = base(x)                                        one base GEMM for the whole batch
    for each adapter a among the names:                one grouped product per adapter, no per-row loop
        rows = the rows of a                           (an index tensor, built once)
        y[rows] += dW_a x[rows]                        index_select -> the adapter's update -> index_add_

so the cost is one base forward plus, per adapter, its update on its own rows only (the same work as a batch of
those rows alone). The update is the method's own ``forward`` (any layer method: LoRA, rsLoRA, DoRA, LoRA-FA, VeRA,
LoRA-XS/SB, Delta-LoRA, rank1-sum); methods that expose low-rank factors (:meth:`lorakit.Adapter.lowrank`) are
evaluated from them directly (``h = x_rows A^T``, ``y[rows] += (s mid(h)) (diag(out) B)^T``), the same function.

The hook is one line at the top of :meth:`AdaptedLayer.forward`: while the context is open each adapted layer holds
a callable as ``layer.row_router`` (core imports nothing from this module); leaving the context
(also on an exception) restores what was there before, so contexts nest.

A layer that sees a batch dimension other than ``len(names)`` raises :class:`~lorakit.errors.AdapterStateError`:
beam search and ``num_return_sequences > 1`` expand the batch inside ``generate``; :func:`generate_per_row` expands
the names the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.adapt.records import get_record
from lorakit.core.contract import Adapter
from lorakit.core.experts import expert_paths
from lorakit.core.layers import AdaptedLayer, adapted_layers
from lorakit.errors import AdapterStateError, ConfigError
from lorakit.util.arguments import checked


def _update(adapter: Adapter, x: Tensor, base_out: Tensor | Callable[[], Tensor], layer: AdaptedLayer,
            dtype: torch.dtype) -> Tensor:
    """``dW x`` of ``adapter`` for the input rows ``x``; ``base_out`` is ``base(x)`` of those rows, or a function
    that gathers them (only methods without low-rank factors read it, e.g. DoRA).

    From the adapter's :class:`~lorakit.core.lowrank.LowRank` factors when it has them and no dropout applies now
    (``h = A x``, ``u = s mid(h)``, ``dW x = u (diag(out) B)^T``), else its own ``forward``: the same function.
    """
    f = adapter.lowrank(layer)
    if f is None or f.dropout > 0:
        return adapter(x, base_out if isinstance(base_out, Tensor) else base_out(), layer)
    h = layer.project(x, f.a).to(dtype)  # (rows, ..., r)
    if f.mid is not None:
        mid = f.mid.to(dtype)
        h = F.linear(h, mid) if mid.dim() == 2 else h * mid
    b = f.b if f.out is None else f.b * f.out.unsqueeze(1)  # diag(out) B, (d_out, r)
    if f.scale != 1.0:
        h = h * f.scale  # the scale on the small side
    return F.linear(h, b.to(dtype))  # (rows, ..., d_out)


class RowAdapters:
    """The per-row forward every adapted layer defers to inside :func:`per_row` (one object for all layers).

    Attributes:
        names: the adapter of each row (``None``: the base model).
        groups: the row indices of each named adapter, ``(k,)`` int64 on the CPU.
    """

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = list(names)
        rows: dict[str, list[int]] = {}
        for i, n in enumerate(self.names):
            if n is not None:
                rows.setdefault(n, []).append(i)
        self.groups = {n: torch.tensor(ix, dtype=torch.long) for n, ix in rows.items()}
        self._on: dict[torch.device, dict[str, Tensor]] = {torch.device("cpu"): self.groups}

    def _indices(self, device: torch.device) -> dict[str, Tensor]:
        """:attr:`groups` on ``device`` (copied once per device)."""
        if device not in self._on:
            self._on[device] = {n: ix.to(device) for n, ix in self.groups.items()}
        return self._on[device]

    def __call__(self, layer: AdaptedLayer, x: Tensor) -> Tensor:
        """``layer``'s output for input ``x`` ``(batch, ...)``, row ``i`` with adapter ``names[i]``."""
        n = len(self.names)
        if x.dim() == 0 or x.shape[0] != n:
            raise AdapterStateError(
                f"per_row was given {n} adapter names but a layer saw a batch of "
                f"{x.shape[0] if x.dim() else 'no'} rows; the batch dimension (dim 0) must stay {n} for the whole "
                "forward (beam search and num_return_sequences > 1 expand it inside generate: use "
                "lorakit.generate_per_row, which expands the names the same way)")
        if layer.merged:
            raise AdapterStateError(f"adapters {layer.merged} were merged inside per_row; unmerge them first")
        out = layer.base(x)  # (batch, ..., d_out): one base GEMM for every row
        inplace = not torch.is_grad_enabled()  # with autograd, keep base(x) intact for any backward that saved it
        for name, idx in self._indices(x.device).items():
            if name not in layer.adapters:
                continue  # this adapter does not wrap this layer: its rows see the base layer, as when active alone
            adapter = layer.adapters[name]
            if idx.numel() == n:  # every row: no gather, no scatter
                delta = _update(adapter, x, out, layer, out.dtype).to(out.dtype)
                out = out.add_(delta) if inplace else out + delta
                continue
            # rows of different adapters are disjoint, so out[idx] still holds base(x)[idx] here
            base_rows = functools.partial(out.index_select, 0, idx)
            delta = _update(adapter, x.index_select(0, idx), base_rows, layer, out.dtype).to(out.dtype)
            # the scatter on a 2-D (batch, rest) view: CPU's index_add_ over a 3-D tensor is ~30x slower
            flat, rows = out.reshape(n, -1), delta.reshape(idx.numel(), -1)
            flat = flat.index_add_(0, idx, rows) if inplace else flat.index_add(0, idx, rows)
            out = flat.view(out.shape)
        return out


def _check_names(model: nn.Module, names: Sequence[str | None]) -> list[str | None]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise ConfigError(f"per_row takes a sequence of adapter names (or None), one per row; got {names!r}")
    names = list(names)
    if not names:
        raise ConfigError("per_row needs at least one row (an empty list of adapter names was given)")
    for n in dict.fromkeys(names):
        if n is None:
            continue
        if not isinstance(n, str):
            raise ConfigError(f"per_row: each row's adapter must be a name or None, got {n!r}")
        rec = get_record(model, n)  # AdapterStateError for an unknown name, listing the known ones
        if not rec.is_layer_method:
            raise AdapterStateError(
                f"per_row: adapter {n!r} is full fine-tuning ({rec.method!r}): it changes the base weights themselves, "
                "which every row shares, so it cannot apply to some rows only; per_row mixes layer adapters")
    merged = sorted({m for _, layer in adapted_layers(model) for m in layer.merged})
    if merged:
        raise AdapterStateError(
            f"per_row: adapters {merged} are merged into the base weights, which every row shares; call "
            "lorakit.unmerge(model) first")
    return names


@contextmanager
@checked
def per_row(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Run each row of every forward inside the block through its own adapter.

    Args:
        model: a model with layer adapters attached (:func:`lorakit.attach`, :func:`lorakit.load`).
        names: one entry per row of the batch (dimension 0): an adapter name, or ``None`` for the base model.
            Which adapters are active outside the block does not matter inside it, and is not changed.

    Yields:
        ``model``.

    Row ``i`` computes exactly what ``set_active(model, names[i])`` computes for that row alone (up to float
    round-off; dropout in training mode draws different masks). Gradients flow to every adapter named.

    Raises:
        ConfigError: ``names`` is not a non-empty sequence of names/``None``.
        AdapterStateError: an unknown name, a full fine-tuning "adapter", merged adapters (unmerge first); inside
            the block, a layer whose batch dimension is not ``len(names)``.
    """
    rows = RowAdapters(_check_names(model, names))
    experts = expert_paths([n for n, _ in adapted_layers(model)])
    if experts:
        raise AdapterStateError(
            f"per-row adapters do not reach mixture-of-experts experts ({next(iter(experts))}...: an expert sees "
            "the tokens routed to it, not batch rows); run one adapter at a time (lorakit.set_active) on this model")
    layers = [layer for _, layer in adapted_layers(model)]
    before = [layer.row_router for layer in layers]
    try:
        for layer in layers:
            layer.row_router = rows
        yield model
    finally:
        for layer, old in zip(layers, before):
            layer.row_router = old


@checked
def generate_per_row(model: nn.Module, input_ids: Tensor, adapter_names: Sequence[str | None],
                     **generate_kwargs: Any) -> Any:
    """``model.generate(input_ids, **generate_kwargs)`` with prompt ``i`` through adapter ``adapter_names[i]``.

    ``generate`` repeats each prompt ``max(num_beams, num_return_sequences)`` times (``repeat_interleave``; beam
    search reorders rows within each prompt's group only), so the names are repeated the same way. Decoder-only
    models: an encoder-decoder model runs its encoder on the unexpanded batch, which :func:`per_row` refuses when
    the names were expanded.

    Raises:
        ConfigError: ``len(adapter_names)`` differs from the number of prompts.
    """
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex:
        raise ConfigError(f"generate_per_row: argument 'input_ids' must be a 2-D tensor of token ids (batch, "
                          f"length), got a {input_ids.dim()}-D {input_ids.dtype} tensor")
    if input_ids.shape[0] != len(adapter_names):
        raise ConfigError(f"generate_per_row: {input_ids.shape[0]} prompts (rows of input_ids) but "
                          f"{len(adapter_names)} adapter_names; give one name (or None) per prompt")
    config = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = generate_kwargs.get("num_beams", getattr(config, "num_beams", None)) or 1
    returns = generate_kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None)) or 1
    expand = max(int(beams), int(returns))
    names = [n for n in adapter_names for _ in range(expand)]
    with per_row(model, names):
        return model.generate(input_ids, **generate_kwargs)


__all__ = ["RowAdapters", "generate_per_row", "per_row"]
