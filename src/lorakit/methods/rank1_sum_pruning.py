"""Dynamic rank for rank1-sum adapters: gradient-scored pruning under a global budget, shrinking, growth.

The pruner follows AdaLoRA (Zhang et al. 2023, https://arxiv.org/abs/2303.10512), applied to the gated rank-1
components of :class:`lorakit.methods.rank1_sum.Rank1Sum` (``dW = s B diag(m * g) A``):

- Importance of every entry ``w`` of ``g``, ``A``, ``B`` after each step: ``I = |w dL/dw|``, smoothed
  ``Ibar <- b1 Ibar + (1 - b1) I``, uncertainty ``U <- b2 U + (1 - b2) |I - Ibar|``, entry score ``Ibar U``.
  Component ``i`` scores ``S(g_i) + mean_j S(A_ij) + mean_k S(B_ki)`` (``score="sensitivity"``), or just
  ``EMA(|g_i dL/dg_i|)``, the first-order cost of removing it (``score="taylor"``).
- Global budget (total live rank over all layers), cubic schedule: ``b0`` (every component) until
  ``t_init``, then ``b(t) = b_T + (b0 - b_T) (1 - (t - t_init) / (T - t_init - t_final))^3``, re-masking
  every ``interval`` steps to the top-``b(t)`` live components across all layers; at ``T - t_final`` the
  budget ``b_T = target_rank x layers`` is met exactly and the masked components are physically removed.
- Orthogonality regulariser ``gamma * mean_layers(||A A^T - I||_F + ||B^T B - I||_F)`` added to the loss.

Every decision is deterministic: scores live in tensors, ties go to the earlier layer (model order) and the
earlier component, and the one place where several processes must agree is :func:`all_reduce_mean_`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lorakit.core.callbacks import TrainingCallback
from lorakit.core.collectives import all_reduce_mean_
from lorakit.core.layers import adapted_layers
from lorakit.errors import AdapterStateError, ConfigError
from lorakit.util.arguments import Range, checked


class Components(Protocol):
    """What the pruner needs of a layer's gated rank-1 components (:class:`lorakit.methods.rank1_sum.Rank1Sum`
    is the one implementation; the pruner module comes first so that the method can build its pruner)."""

    config: Any  # Rank1SumConfig: the schedule options
    lora_A: nn.Parameter  # (r, d_in)
    lora_B: nn.Parameter  # (d_out, r)
    gate: nn.Parameter  # (r,)
    mask: Tensor  # (r,) 0/1
    d_in: int
    d_out: int

    @property
    def rank(self) -> int: ...

    def orthogonality(self) -> Tensor: ...

    def select_(self, keep: Tensor) -> dict[str, tuple[nn.Parameter, nn.Parameter]]: ...

    def extend_(self, extra: int, generator: torch.Generator | None = None
                ) -> dict[str, tuple[nn.Parameter, nn.Parameter]]: ...

logger = logging.getLogger(__name__)

#: The dimension that indexes the rank-1 components in each trainable tensor.
RANK_DIM: dict[str, int] = {"lora_A": 0, "lora_B": 1, "gate": 0}

#: Options of the schedule a :class:`RankPruner` may override (the rest define the adapter's shape).
SCHEDULE_OPTIONS = frozenset({"target_rank", "t_init", "t_final", "interval", "orth_reg", "score",
                              "beta1", "beta2"})


# --- helpers shared by the pruner, shrink and grow ----------------------------------------------------------
def rank1_adapters(model: nn.Module, name: str = "default") -> dict[str, Components]:
    """The per-layer rank1-sum modules of adapter ``name``, in model order (found on the model's layers)."""
    found = {path: layer.adapters[name] for path, layer in adapted_layers(model) if name in layer.adapters}
    if not found:
        raise AdapterStateError(f"model has no adapter named {name!r} on any layer")
    method = getattr(next(iter(found.values())), "method", None)
    if method != "rank1-sum":
        raise AdapterStateError(f"adapter {name!r} is {method!r}; rank pruning needs a 'rank1-sum' adapter")
    return found  # type: ignore[return-value]


def live_ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """The live rank (components whose mask is 1) of every layer of adapter ``name``."""
    return {t: a.rank for t, a in rank1_adapters(model, name).items()}


def check_growth(adapter: Components, extra: int, where: str) -> None:
    """Refuse growth beyond ``min(d_in, d_out)`` components (it would add parameters, not expressiveness)."""
    if extra <= 0:
        raise ConfigError(f"extra_rank must be a positive int, got {extra}")
    limit = min(adapter.d_in, adapter.d_out)
    if adapter.gate.numel() + extra > limit:
        raise ConfigError(f"{where}: growing rank {adapter.gate.numel()} by extra_rank={extra} exceeds "
                          f"min(d_in, d_out) = {limit}")


def remap_optimizer(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
                    transform: Callable[[Tensor], Tensor]) -> None:
    """Move ``old``'s optimizer state and param-group slot to ``new``.

    State tensors shaped like the parameter (Adam's ``exp_avg``, ``exp_avg_sq``, SGD's momentum) go through
    ``transform`` (which selects or appends components); scalars (``step``) are kept. An optimizer with
    other state shapes (factored second moments) cannot be remapped: its state for ``new`` restarts, with a
    warning.
    """
    state = optimizer.state.pop(old, None)
    if state:
        moved: dict[str, Any] = {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                if value.shape != old.shape:
                    warnings.warn(f"optimizer state {key!r} of shape {tuple(value.shape)} cannot follow a "
                                  f"parameter resized from {tuple(old.shape)}; its state restarts", stacklevel=3)
                    moved = {}
                    break
                value = transform(value)
            moved[key] = value
        if moved:
            optimizer.state[new] = moved
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]


def shrink(model: nn.Module, name: str = "default",
           optimizer: torch.optim.Optimizer | None = None) -> dict[str, Tensor]:
    """Physically remove the masked components of every layer (new, smaller Parameters); the function is
    unchanged. Returns the kept component indices of each layer that shrank.

    Args:
        optimizer: the optimizer training the adapter, whose state and param groups are moved to the new
            Parameters. Without it, build the optimizer after shrinking.
    """
    return shrink_adapters(rank1_adapters(model, name), optimizer, name)


def shrink_adapters(adapters: Mapping[str, Components], optimizer: torch.optim.Optimizer | None = None,
                    name: str = "default") -> dict[str, Tensor]:
    """:func:`shrink` for the given per-layer adapters."""
    kept: dict[str, Tensor] = {}
    for target, adapter in adapters.items():
        keep = adapter.mask.nonzero().squeeze(1)  # (live,) indices, ascending
        if keep.numel() == adapter.mask.numel():
            continue
        for key, (old, new) in adapter.select_(keep).items():
            if optimizer is not None:
                dim = RANK_DIM[key]
                remap_optimizer(optimizer, old, new, lambda v, d=dim, k=keep: v.index_select(d, k.to(v.device)))
        kept[target] = keep
    ranks = {t: a.rank for t, a in adapters.items()}
    logger.info("rank1-sum[%s]: shrunk to %d components, ranks %s", name, sum(ranks.values()), ranks)
    return kept


@checked(extra_rank=Range(ge=1))
def grow(model: nn.Module, name: str, extra_rank: int, *, optimizer: torch.optim.Optimizer | None = None,
         layers: list[str] | None = None, generator: torch.Generator | None = None) -> dict[str, int]:
    """Add ``extra_rank`` fresh components to every (or each named) layer of a trained adapter.

    The new components have ``g = 0``, so the model's function is unchanged; ``A`` and ``B`` get the
    adapter's Gaussian init so their gates receive gradient at once. Use it to continue training on new data,
    then prune back with a new :class:`RankPruner`. Returns the new live ranks.

    Args:
        optimizer: if given, its state is extended with zeros for the new components (the shared ``step``
            count is kept, so their first updates are slightly damped by Adam's bias correction).
        layers: module names to grow (default: every layer of the adapter).
        generator: random generator for the new ``A`` and ``B`` rows (default: the global one).
    """
    adapters = rank1_adapters(model, name)
    chosen = list(adapters) if layers is None else list(layers)
    unknown = sorted(set(chosen) - set(adapters))
    if unknown:
        raise ConfigError(f"grow: adapter {name!r} has no layer(s) {unknown}")
    for target in chosen:  # check everything before changing anything
        check_growth(adapters[target], extra_rank, target)
    for target in chosen:
        for key, (old, new) in adapters[target].extend_(extra_rank, generator).items():
            if optimizer is not None:
                dim = RANK_DIM[key]

                def pad(v: Tensor, d: int = dim) -> Tensor:
                    shape = list(v.shape)
                    shape[d] = extra_rank
                    return torch.cat([v, v.new_zeros(shape)], d)

                remap_optimizer(optimizer, old, new, pad)
    return live_ranks(model, name)


# --- the pruner -------------------------------------------------------------------------------------------
class RankPruner(TrainingCallback):
    """Scores, masks and finally shrinks the components of a rank1-sum adapter during training.

    Use from any loop::

        pruner = lorakit.RankPruner(model, total_steps=1000, optimizer=opt)
        for batch in data:
            loss = model(**batch).loss + pruner.regularizer()
            loss.backward()
            opt.step()
            pruner.step()        # after optimizer.step(), before zero_grad(): it reads the gradients
            opt.zero_grad()
        pruner.ranks()           # {"model.layers.0.self_attn.q_proj": 5, ...}

    ``lorakit.training_callbacks(model, optimizer, total_steps=...)`` builds it for a rank1-sum adapter.

    Args:
        model: a model with a rank1-sum adapter.
        name: the adapter's name.
        total_steps: optimizer steps of the run (``T`` of the schedule).
        optimizer: the optimizer training the adapter; needed to shrink it in the middle of training.
        auto_shrink: physically shrink when the schedule ends (default: when ``optimizer`` is given; without
            it call :meth:`shrink` yourself after training, or the saved adapter keeps masked components).
        **overrides: schedule options replacing the adapter's config (:data:`SCHEDULE_OPTIONS`), e.g. a new
            ``target_rank`` after :func:`grow`.
    """

    @checked(total_steps=Range(ge=1))
    def __init__(self, model: nn.Module, name: str = "default", *, total_steps: int,
                 optimizer: torch.optim.Optimizer | None = None, auto_shrink: bool | None = None,
                 **overrides: Any) -> None:
        self._setup(rank1_adapters(model, name), name, total_steps=total_steps, optimizer=optimizer,
                    auto_shrink=auto_shrink, **overrides)

    @classmethod
    def for_adapters(cls, adapters: Mapping[str, Components], *, name: str = "default", total_steps: int,
                     optimizer: torch.optim.Optimizer | None = None, auto_shrink: bool | None = None,
                     **overrides: Any) -> RankPruner:
        """A pruner of the given per-layer adapters (what :meth:`Rank1Sum.callbacks` builds): no model needed."""
        self = cls.__new__(cls)
        self._setup(dict(adapters), name, total_steps=total_steps, optimizer=optimizer, auto_shrink=auto_shrink,
                    **overrides)
        return self

    def _setup(self, adapters: dict[str, Components], name: str, *, total_steps: int,
               optimizer: torch.optim.Optimizer | None, auto_shrink: bool | None, **overrides: Any) -> None:
        config = next(iter(adapters.values())).config  # a Rank1SumConfig
        bad = sorted(set(overrides) - SCHEDULE_OPTIONS)
        if bad:
            raise ConfigError(f"RankPruner cannot override {bad}; schedule options: {sorted(SCHEDULE_OPTIONS)}")
        if overrides:
            merged = {**config.model_dump(), **overrides}
            # target_rank <= r_init guards the attach; a grown adapter may exceed r_init, and the budget is
            # checked against the live rank below instead.
            merged["r_init"] = max(merged["r_init"], merged["target_rank"])
            config = type(config).parse(merged)
        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ConfigError(f"total_steps must be a positive int, got {total_steps!r}")
        self.adapters, self.name, self.config = adapters, name, config
        self.optimizer = optimizer
        self.auto_shrink = optimizer is not None if auto_shrink is None else auto_shrink
        self.total_steps = total_steps
        self.t_init = config.steps(config.t_init, total_steps)
        self.t_end = total_steps - config.steps(config.t_final, total_steps)
        # at least min_remasks re-masks over the cubic phase, never more than one per step
        self.interval = max(1, min(config.interval, (self.t_end - self.t_init) // config.min_remasks))
        if self.t_end < self.t_init:
            raise ConfigError(f"t_init ({self.t_init} steps) + t_final ({total_steps - self.t_end} steps) "
                              f"exceed total_steps={total_steps}")
        self.b0 = sum(a.rank for a in adapters.values())
        self.b_final = config.target_rank * len(adapters)
        if self.b_final > self.b0:
            raise ConfigError(f"budget target_rank x layers = {self.b_final} exceeds the live rank {self.b0}")
        self.t = 0
        self.finished = False
        self._in_budget: dict[str, int] | None = None  # mode "adalora": components inside the budget
        self._keys = ("gate",) if config.score == "taylor" else ("lora_A", "lora_B", "gate")
        # Per layer and tensor: smoothed importance Ibar and uncertainty U (sensitivity only), fp32.
        self._ema: dict[str, dict[str, Tensor]] = {}
        self._unc: dict[str, dict[str, Tensor]] = {}
        for target, a in adapters.items():
            self._ema[target] = {k: torch.zeros_like(getattr(a, k), dtype=torch.float32) for k in self._keys}
            if config.score == "sensitivity":
                self._unc[target] = {k: torch.zeros_like(getattr(a, k), dtype=torch.float32) for k in self._keys}

    # --- queries -----------------------------------------------------------------------------------------
    def ranks(self) -> dict[str, int]:
        """The current live rank of every adapted layer, by module name (``mode="adalora"``, before the end: the
        components inside the budget at the last re-mask)."""
        if self._in_budget is not None and not self.finished:
            return dict(self._in_budget)
        return {t: a.rank for t, a in self.adapters.items()}

    def budget(self, t: int) -> int:
        """The total live rank allowed after step ``t`` (the cubic schedule)."""
        if t >= self.t_end:
            return self.b_final
        if t <= self.t_init:
            return self.b0
        left = 1 - (t - self.t_init) / (self.t_end - self.t_init)
        return self.b_final + int((self.b0 - self.b_final) * left**3)

    # --- training-loop hooks ---------------------------------------------------------------------------------
    def regularizer(self) -> Tensor:
        """``gamma * mean_layers(||A A^T - I||_F + ||B^T B - I||_F)`` over live components.

        Always a tensor (zero when ``orth_reg = 0``), so a plain loop can add it to the loss unconditionally.
        """
        adapters = list(self.adapters.values())
        if self.config.orth_reg == 0:
            return adapters[0].gate.new_zeros(())
        dev = adapters[0].gate.device
        terms = torch.stack([a.orthogonality().to(dev) for a in adapters])  # (layers,)
        return self.config.orth_reg * terms.mean()

    def step(self) -> None:
        """After ``optimizer.step()``: update the scores, re-mask on schedule, shrink when the schedule ends.

        As in AdaLoRA's reference code, the importance ``|w dL/dw|`` pairs the gradient of the step just taken
        with the updated weights, so the gradients must still be there (call before ``zero_grad()``).
        """
        if self.finished:
            return
        self.t += 1
        self._update_scores()
        if self.t >= self.t_end:
            self._mask_to(self.b_final)
            self.finished = True
            if self.auto_shrink:
                self.shrink()
            self._ema, self._unc = {}, {}  # scores are no longer needed: free them
        elif self.t > self.t_init and (self.t - self.t_init) % self.interval == 0:
            self._mask_to(self.budget(self.t), final=False)

    def shrink(self) -> dict[str, int]:
        """Physically remove masked components now (also done automatically when the schedule ends)."""
        kept = shrink_adapters(self.adapters, self.optimizer, self.name)
        for target, keep in kept.items():
            for store in (self._ema, self._unc):
                if target in store:
                    store[target] = {k: v.index_select(RANK_DIM[k], keep.to(v.device))
                                     for k, v in store[target].items()}
        return self.ranks()

    # --- scoring and masking -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_scores(self) -> None:
        adapters = self.adapters
        params, ema, unc = [], [], []
        for target, a in adapters.items():
            if target not in self._ema or self._ema[target]["gate"].shape != a.gate.shape:
                raise AdapterStateError(f"layer {target!r} was resized outside this pruner (grow/load); "
                                        "create a new RankPruner")
            for k in self._keys:
                params.append(getattr(a, k))
                ema.append(self._ema[target][k])
                if self._unc:
                    unc.append(self._unc[target][k])
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            raise AdapterStateError("RankPruner.step() found no gradients: call it after optimizer.step() and "
                                    "before optimizer.zero_grad()")
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        # A step with inf/nan gradients (skipped by a loss scaler) must not poison the running averages.
        if not torch.stack([n.float().to(ema[0].device) for n in torch._foreach_norm(grads)]).isfinite().all():
            return
        imp = torch._foreach_mul([p.float() for p in params], [g.float() for g in grads])  # I = |w dL/dw|
        torch._foreach_abs_(imp)
        torch._foreach_lerp_(ema, imp, 1 - self.config.beta1)  # Ibar <- b1 Ibar + (1 - b1) I
        if unc:
            dev = torch._foreach_sub(imp, ema)
            torch._foreach_abs_(dev)
            torch._foreach_lerp_(unc, dev, 1 - self.config.beta2)  # U <- b2 U + (1 - b2) |I - Ibar|

    def _component_scores(self) -> list[Tensor]:
        """One score per component and layer, in model order."""
        out = []
        for target in self.adapters:
            ema = self._ema[target]
            if self.config.score == "taylor":
                out.append(ema["gate"])
                continue
            s = {k: ema[k] * self._unc[target][k] for k in self._keys}  # entry scores Ibar * U
            out.append(s["gate"] + s["lora_A"].mean(1) + s["lora_B"].mean(0))  # (r,)
        return out

    @torch.no_grad()
    def _mask_to(self, budget: int, final: bool = True) -> None:
        """Keep the ``budget`` best live components over all layers; mask the rest (``mode="adalora"`` before the
        end: zero their gates instead, and let them train and compete again)."""
        adapters = list(self.adapters.values())
        per_layer = self._component_scores()
        dev = per_layer[0].device
        scores = torch.cat([s.float().to(dev) for s in per_layer])  # (sum of r,)
        scores = torch.nan_to_num(all_reduce_mean_(scores), nan=0.0)
        live = torch.cat([a.mask.to(dev) for a in adapters]) > 0
        scores = scores.masked_fill(~live, float("-inf"))  # a pruned (mask 0) component never comes back
        # stable sort: equal scores keep model order, so ties go to the earlier layer and component
        order = torch.sort(scores, descending=True, stable=True).indices
        keep = torch.zeros_like(live)
        keep[order[:min(budget, int(live.sum()))]] = True
        soft = self.config.mode == "adalora" and not final
        split = keep.split([a.mask.numel() for a in adapters])
        for a, k in zip(adapters, split):
            if soft:  # AdaLoRA: out of the budget for now, still training (and scored) from zero
                a.gate.masked_fill_(~k.to(a.gate.device), 0.0)
            else:
                a.mask.copy_(k.to(a.mask))
        self._in_budget = {t: int(k.sum()) for t, k in zip(self.adapters, split)} if soft else None
        ranks = self.ranks()
        logger.info("rank1-sum[%s] step %d/%d: budget %d, ranks %s", self.name, self.t, self.total_steps,
                    sum(ranks.values()), ranks)

    # --- resume ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (the masks themselves are saved with the adapter)."""
        return {"t": self.t, "total_steps": self.total_steps, "b0": self.b0, "b_final": self.b_final,
                "finished": self.finished, "in_budget": self._in_budget,
                "ema": {t: {k: v.clone() for k, v in d.items()} for t, d in self._ema.items()},
                "unc": {t: {k: v.clone() for k, v in d.items()} for t, d in self._unc.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["total_steps"] != self.total_steps:
            raise AdapterStateError(f"pruner state is for total_steps={state['total_steps']}, "
                                    f"not {self.total_steps}")
        adapters = self.adapters
        for store in ("ema", "unc"):
            for target, d in state[store].items():
                if target not in adapters or d["gate"].shape != adapters[target].gate.shape:
                    raise AdapterStateError(f"pruner state does not match layer {target!r} of adapter "
                                            f"{self.name!r} (different layers or ranks)")
        self.t, self.b0, self.b_final = int(state["t"]), int(state["b0"]), int(state["b_final"])
        self.finished = bool(state["finished"])
        self._in_budget = state.get("in_budget")
        dev = {t: a.gate.device for t, a in adapters.items()}
        self._ema = {t: {k: v.to(dev[t]).clone() for k, v in d.items()} for t, d in state["ema"].items()}
        self._unc = {t: {k: v.to(dev[t]).clone() for k, v in d.items()} for t, d in state["unc"].items()}
