"""Optimizer parameter groups, with LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354).

LoRA+ changes only the optimizer: the output-side factor ``B`` of every adapter trains with learning rate
``ratio * lr`` while the input side ``A`` keeps ``lr`` (ratio 16 is the common default; the reference scripts
use 10-80). Adapters on ``nn.Embedding`` layers get a small fixed learning rate instead (``embedding_lr``).

Which tensor is "B" is answered by each adapter (:meth:`lorakit.Adapter.lr_groups`), never by parameter
names: LoRA's ``lora_B``; LoRA-FA's ``B`` (its only trainable tensor, so LoRA+ simply scales its lr); VeRA's
output scale ``b``; DoRA's magnitude stays with "A". Trainable tensors that belong to no adapter (full
fine-tuning, a task head the user unfroze) form a "base" group with ``lr``.

Weight decay follows the usual convention (GPT-2/nanoGPT): only matrices (``ndim >= 2``) decay. Vectors -
biases, norm gains, DoRA's magnitude (decaying it would shrink the base weight's rows), VeRA's ``d`` and
``b`` - do not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.core.layers import LayerKind, adapted_layers
from lorakit.errors import AdapterStateError, ConfigError
from lorakit.util.arguments import Range, checked

_SIDES = ("A", "B", "embedding", "base")


def _check(lr: float, loraplus_ratio: float | None, embedding_lr: float | None, weight_decay: float) -> None:
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    if loraplus_ratio is not None and not loraplus_ratio > 0:
        raise ConfigError(f"loraplus_ratio must be > 0 (or None for plain training), got {loraplus_ratio}")
    if embedding_lr is not None and not embedding_lr > 0:
        raise ConfigError(f"embedding_lr must be > 0 (or None to treat embedding adapters like others), "
                          f"got {embedding_lr}")
    if not weight_decay >= 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")


@checked(lr=Range(gt=0), loraplus_ratio=Range(gt=0), embedding_lr=Range(gt=0), weight_decay=Range(ge=0))
def param_groups(model: nn.Module, lr: float, *, loraplus_ratio: float | None = None,
                 embedding_lr: float | None = 1e-6, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Parameter groups of every trainable tensor of ``model``, usable with any ``torch.optim`` optimizer.

    Args:
        model: a model with adapters attached (or any model: then everything trainable is "base").
        lr: learning rate of the "A" side and of non-adapter parameters.
        loraplus_ratio: the "B" side gets ``loraplus_ratio * lr``; ``None`` (the default) or 1 gives plain
            training.
        embedding_lr: with LoRA+ on, the learning rate of adapters on ``nn.Embedding`` layers (the LoRA+
            reference uses 1e-6); ``None`` treats them like other adapters. Ignored in plain training.
        weight_decay: applied to matrices only (see the module docstring).

    Returns:
        Non-empty groups, each ``{"params", "lr", "weight_decay", "name"}`` with ``name`` one of
        ``A``, ``B``, ``embedding``, ``base`` (``_no_decay`` appended for the vector part).

    Raises:
        ConfigError: a bad value. AdapterStateError: nothing in ``model`` trains.
    """
    _check(lr, loraplus_ratio, embedding_lr, weight_decay)
    plus = loraplus_ratio is not None and loraplus_ratio != 1
    lrs = {"A": lr, "B": lr * (loraplus_ratio if plus else 1.0), "base": lr,
           "embedding": embedding_lr if plus and embedding_lr is not None else lr}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {(s, d): [] for s in _SIDES for d in (True, False)}
    seen: set[int] = set()

    def put(side: str, p: nn.Parameter) -> None:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            buckets[(side, p.ndim >= 2)].append(p)

    for _, layer in adapted_layers(model):
        for adapter in layer.adapters.values():
            on_embedding = plus and embedding_lr is not None and layer.kind is LayerKind.EMBEDDING
            for side, params in adapter.lr_groups().items():
                if side not in ("A", "B"):
                    raise AdapterStateError(f"{type(adapter).__name__}.lr_groups returned unknown side {side!r}")
                for p in params:
                    put("embedding" if on_embedding else side, p)
            for p in adapter.parameters():  # anything lr_groups forgot trains at the plain rate
                put("embedding" if on_embedding else "A", p)
    for p in model.parameters():
        put("base", p)
    if not seen:
        raise AdapterStateError("model has no trainable parameters; attach an adapter (lorakit.attach) first")

    groups: list[dict[str, Any]] = []
    for side in _SIDES:
        for decay in (True, False):
            params = buckets[(side, decay)]
            if params:
                groups.append({"params": params, "lr": lrs[side], "weight_decay": weight_decay if decay else 0.0,
                               "name": side if decay else f"{side}_no_decay"})
    return groups


@checked(lr=Range(gt=0), loraplus_ratio=Range(gt=0), embedding_lr=Range(gt=0), weight_decay=Range(ge=0))
def optimizer(model: nn.Module, lr: float, *, loraplus_ratio: float | None = None,
              embedding_lr: float | None = 1e-6, weight_decay: float = 0.0,
              **adamw_kwargs: Any) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (plain AdamW unless ``loraplus_ratio`` asks for LoRA+, as the trainer).

    Uses the fused CUDA kernel when every trainable tensor is a floating-point CUDA tensor, unless
    ``fused`` or ``foreach`` is given in ``adamw_kwargs`` (passed on to :class:`torch.optim.AdamW`).

    Example::

        opt = lorakit.optimizer(model, lr=2e-4)                        # plain AdamW
        opt = lorakit.optimizer(model, lr=2e-4, loraplus_ratio=16)     # LoRA+, B at 16 x 2e-4
    """
    groups = param_groups(model, lr, loraplus_ratio=loraplus_ratio, embedding_lr=embedding_lr,
                          weight_decay=weight_decay)
    kwargs = dict(adamw_kwargs)
    if "fused" not in kwargs and "foreach" not in kwargs:
        params = [p for g in groups for p in g["params"]]
        if torch.cuda.is_available() and all(p.is_cuda and p.is_floating_point() for p in params):
            kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **kwargs)
