"""Rank that follows the data (``adapter.grow``): before an update, add rank-1 components where the new data is new.

The dynamic-rank article keeps "the useful rank-1 updates" chosen "by leveraging retrieval confidence or gradient
signals"; an update uses both, before its first step, on the starting model (the parent adapter):

1. **How much of the data is new** (retrieval confidence, :func:`lorakit.train.lineage.measure_update`): the share
   ``u`` of the training examples the model predicts with a geometric-mean token probability below 0.5. The update
   adds ``round(u x adapter.grow)`` components in all: none for data it already knows, all of them for new data.
2. **Where** (gradient signal): on up to :data:`SAMPLE` of those unknown examples, the gradient of the loss with
   respect to each adapted layer's weight, ``G_l = sum_t g_t x_t^T`` per batch (``g_t``: the gradient at the layer's
   output, ``x_t``: its input, over the batch's tokens), is the direction a rank-1 update of that layer would follow
   first; its Frobenius norm, ``||G_l||_F = sqrt(sum((X X^T) * (G G^T)))`` (computed from the two ``(tokens,
   tokens)`` Gram matrices, never the ``(d_out, d_in)`` matrix), is how fast it would lower the loss. The
   components go to the layers in proportion to their mean norm (largest remainders; no layer beyond
   ``min(d_in, d_out)``).

The new components start with a zero gate (the model's function is unchanged) and train with the rest; the method's
pruner then brings the adapter back to its budget (``target_rank``) during the update, so what the new data needed
is kept and the rest pruned. The update records ``extra.update.growth`` (components added per layer, the unknown
share, the layer scores) and logs it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lorakit.adapt.model import adapted_layers
from lorakit.core.layers import LayerInfo
from lorakit.errors import ConfigError
from lorakit.methods import get_method
from lorakit.train.batching import iter_batches
from lorakit.train.data import Dataset

#: Unknown examples the layer scores are measured on.
SAMPLE = 64
#: Confidence below which an example counts as new (as ``extra.update``'s ``known_0.5``).
KNOWN = 0.5


def layer_scores(trainer: Any, data: Dataset, name: str) -> dict[str, float]:
    """Mean over batches of ``||dL/dW_l||_F`` for every layer ``l`` of adapter ``name`` (module docstring)."""
    model = trainer.model
    layers = {path: layer for path, layer in adapted_layers(model) if name in layer.adapters}
    sums = dict.fromkeys(layers, 0.0)
    inputs: dict[str, Tensor] = {}
    handles = []

    def forward_hook(path: str):
        def hook(module: Any, args: tuple[Any, ...], out: Tensor) -> None:
            inputs[path] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if out.requires_grad:
                out.register_hook(lambda g: _add(path, g))
        return hook

    def _add(path: str, g: Tensor) -> None:
        x, g2 = inputs.pop(path), g.detach().reshape(-1, g.shape[-1]).float()
        sums[path] += float(((x @ x.t()) * (g2 @ g2.t())).sum().clamp(min=0).sqrt())

    for path, layer in layers.items():
        handles.append(layer.register_forward_hook(forward_hook(path)))
    was_training = model.training
    model.eval()
    batches = 0
    try:
        bs = trainer.config.training.eval_batch_size or trainer.config.training.batch_size
        for batch in iter_batches(data, bs, trainer._pad_id):
            batch = trainer._to_device(batch)
            with trainer._autocast():
                loss = trainer._lm_loss(model, batch)
            loss.backward()
            batches += 1
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {p: v / max(batches, 1) for p, v in sums.items()}


def allocate(total: int, scores: dict[str, float], room: dict[str, int]) -> dict[str, int]:
    """``total`` components over the layers in proportion to ``scores`` (largest remainders), at most ``room[l]``
    per layer."""
    out = dict.fromkeys(scores, 0)
    left = total
    while left > 0:
        open_ = {p: s for p, s in scores.items() if out[p] < room[p] and s > 0}
        if not open_:
            break
        norm = sum(open_.values())
        share = {p: left * s / norm for p, s in open_.items()}
        whole = {p: min(int(math.floor(v)), room[p] - out[p]) for p, v in share.items()}
        order = sorted(open_, key=lambda p: share[p] - math.floor(share[p]), reverse=True)
        for p in order[:max(0, left - sum(whole.values()))]:
            if out[p] + whole[p] < room[p]:
                whole[p] += 1
        added = sum(whole.values())
        for p, k in whole.items():
            out[p] += k
        left -= added
        if added == 0:
            break
    return out


def grow_where_new(trainer: Any, confidences: list[float], unknown_share: float) -> dict[str, Any]:
    """Grow the continued adapter before the update (module docstring): ``confidences`` of the training examples
    (in data order), ``unknown_share`` of the whole new data (before ``data.skip_known``); returns
    ``extra.update.growth``."""
    cfg, model = trainer.config, trainer.model
    method = get_method(cfg.adapter.method)
    if not method.growable:
        raise ConfigError(f"adapter.grow: {cfg.adapter.method} adapters cannot gain rank; rank1-sum can (its "
                          "components are rank-1 updates with their own gates)")
    if not confidences:
        raise ConfigError("adapter.grow measures what the model knows of each new example first: it needs next-token "
                          "data of a causal LM, not packed (data.packing) or preference pairs")
    unknown = [i for i, c in enumerate(confidences) if c < KNOWN]
    total = round(cfg.adapter.grow * unknown_share)
    info: dict[str, Any] = {"requested": cfg.adapter.grow, "unknown_share": round(unknown_share, 4), "added": 0,
                            "layers": {}}
    if total == 0 or not unknown:
        trainer._log(f"growth: the model already knows the new data (confidence >= {KNOWN} on every example); "
                     "no component added")
        return info
    data = trainer.train_data
    sample = Dataset([data.examples[i] for i in unknown[:SAMPLE]], data.format, source=data.source)
    scores = layer_scores(trainer, sample, cfg.adapter.name)
    room = {}  # how many more components each layer can take: min(d_in, d_out) minus its stored rank
    for path, layer in adapted_layers(model):
        if cfg.adapter.name in layer.adapters:
            info_ = LayerInfo.of(path, layer.base)
            rank = getattr(layer.adapters[cfg.adapter.name], method.rank_tensor or "").numel()
            room[path] = min(info_.d_in, info_.d_out) - int(rank)
    extra = allocate(total, scores, room)
    g = torch.Generator(device="cpu").manual_seed(cfg.training.seed)
    ranks = method.grow(model, cfg.adapter.name, extra, generator=g)
    added = {p: k for p, k in extra.items() if k}
    info.update(added=sum(added.values()), layers=added, total_rank_before=sum(ranks.values()) - sum(added.values()),
                total_rank_grown=sum(ranks.values()),
                scores={p: round(s, 6) for p, s in sorted(scores.items(), key=lambda kv: -kv[1])[:10]})
    top = ", ".join(f"{p} +{k}" for p, k in sorted(added.items(), key=lambda kv: -kv[1])[:5])
    trainer._log(f"growth: {100 * info['unknown_share']:.1f}% of the new data is unknown to the model: "
                 f"+{info['added']} of adapter.grow={cfg.adapter.grow} components, over {len(added)} layers "
                 f"(most: {top}); the pruner brings the adapter back to its budget during the update")
    return info


__all__ = ["allocate", "grow_where_new", "layer_scores"]
