"""Rank-1 Sum LoRA: a sum of gated rank-1 components whose number per layer adapts to the data.

::

    dW = s * sum_i m_i g_i b_i a_i^T = s * B diag(m * g) A,      s = alpha / r_init (fixed for the whole run)
    y  = W0 x + s * B ((m * g) * (A x))

``A`` is ``(r, d_in)``, ``B`` is ``(d_out, r)``, the gates ``g`` are ``(r,)`` and train; the 0/1 mask ``m``
``(r,)`` is a persistent buffer written by the pruner (:class:`lorakit.methods.rank1_sum_pruning.RankPruner`), which scores
the components by gradient-based importance and keeps the best ones under a global budget, following AdaLoRA
(Zhang et al. 2023, https://arxiv.org/abs/2303.10512). When its schedule ends it physically removes the masked
components, so the saved adapter has per-layer shapes ``r_l <= r_init``; :meth:`Rank1Sum.load_tensors`
rebuilds those shapes.

Init: ``g = 0`` (the model starts unchanged), ``A`` and ``B`` small Gaussians (``init_std``). ``B = 0`` as in
LoRA would make every gate gradient ``dL/dg_i = s b_i^T (dL/dy) a_i^T x`` zero, and nothing could be scored.
``s`` never follows the live rank: rescaling by it would change the function each time a component is pruned.

Trainable: ``r (d_in + d_out + 1)`` per layer, ``r`` the current (possibly pruned or grown) rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from lorakit.core.callbacks import TrainingCallback
from lorakit.core.contract import Adapter, AdapterConfig, Factors, cast
from lorakit.core.layers import AdaptedLayer, LayerInfo, LayerKind
from lorakit.core.lowrank import LowRank
from lorakit.errors import IncompatibleAdapterError
from lorakit.methods.lora import check_rank
from lorakit.methods.rank1_sum_pruning import RANK_DIM, RankPruner, live_ranks
from lorakit.methods.rank1_sum_pruning import grow as grow_components


class Rank1SumConfig(AdapterConfig):
    """Options of rank1-sum: the adapter's shape and the pruner's schedule (saved with the adapter).

    Attributes:
        r_init: starting rank of every layer (at most ``min(d_in, d_out)``).
        target_rank: average final rank; the global budget is ``target_rank x number of adapted layers``.
        alpha: scaling numerator, ``s = alpha / r_init``; ``None`` means ``2 r_init``.
        init_std: standard deviation of the Gaussian init of ``A`` and ``B``.
        t_init: steps of warm-up at full rank before pruning starts: an int is a step count, a float in
            ``[0, 1)`` a fraction of the run's total steps.
        t_final: steps at the final budget at the end of the run (same convention); the pruner reaches the
            budget, then physically shrinks the adapter, at step ``total_steps - t_final``.
        interval: re-mask every ``interval`` steps during the cubic schedule (at most: see ``min_remasks``).
        min_remasks: the fewest re-masks of the cubic schedule: a short run re-masks more often than every
            ``interval`` steps so that the budget falls in at least this many steps (AdaLoRA re-masks hundreds of
            times; three re-masks would be a step function, not a schedule).
        mode: ``"prune"``: a masked component is out for good (its mask is 0, it gets no gradient) and the adapter
            shrinks when the schedule ends; ``"adalora"``: as AdaLoRA, a component outside the budget has its gate
            zeroed but keeps training, is scored like the others, and comes back at the next re-mask if its
            score rises; the final budget is enforced, and the adapter shrunk, when the schedule ends.
        orth_reg: weight ``gamma`` of the orthogonality regulariser ``||A A^T - I||_F + ||B^T B - I||_F``.
            It is added to the loss as is, so 0.1 (AdaLoRA's value) suits O(1) losses such as an LM's
            cross-entropy; scale it with a loss of a very different size (on an MSE of ~1e-3 it swamps the
            task), or set 0 to turn it off.
        score: ``"sensitivity"`` (AdaLoRA: smoothed ``|w dL/dw|`` times its uncertainty, over ``g``, ``A``,
            ``B``) or ``"taylor"`` (the cheaper first-order removal cost, EMA of ``|g_i dL/dg_i|``).
        beta1: EMA factor of the importance.
        beta2: EMA factor of the uncertainty (``"sensitivity"`` only).
    """

    r_init: int = Field(12, gt=0)
    target_rank: int = Field(8, gt=0)
    alpha: float | None = Field(None, gt=0)
    init_std: float = Field(0.02, gt=0)
    t_init: int | float = Field(0.1, ge=0)
    t_final: int | float = Field(0.3, ge=0)
    interval: int = Field(10, gt=0)
    min_remasks: int = Field(20, ge=1)
    mode: Literal["prune", "adalora"] = "prune"
    orth_reg: float = Field(0.1, ge=0)
    score: Literal["sensitivity", "taylor"] = "sensitivity"
    beta1: float = Field(0.85, ge=0, lt=1)
    beta2: float = Field(0.85, ge=0, lt=1)

    @field_validator("t_init", "t_final")
    @classmethod
    def _steps_or_fraction(cls, v: int | float) -> int | float:
        if isinstance(v, float) and v >= 1:
            raise ValueError(f"{v} is neither a fraction in [0, 1) nor an int step count (write {int(v)})")
        return v

    @model_validator(mode="after")
    def _check(self) -> Rank1SumConfig:
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(2 * self.r_init))
        if self.target_rank > self.r_init:
            raise ValueError(f"target_rank={self.target_rank} exceeds r_init={self.r_init}")
        fractions = [v for v in (self.t_init, self.t_final) if isinstance(v, float)]
        if len(fractions) == 2 and sum(fractions) >= 1:
            raise ValueError(f"t_init + t_final = {sum(fractions)} leaves no room for pruning (needs < 1)")
        return self

    @property
    def scale(self) -> float:
        assert self.alpha is not None
        return self.alpha / self.r_init

    def steps(self, value: int | float, total_steps: int) -> int:
        """``t_init``/``t_final`` as a step count for a run of ``total_steps``."""
        return int(value * total_steps) if isinstance(value, float) else int(value)


class Rank1Sum(Adapter):
    """``dW = s B diag(m * g) A`` with trainable ``A (r, d_in)``, ``B (d_out, r)``, ``g (r,)`` and mask ``m``."""

    method = "rank1-sum"
    config_cls = Rank1SumConfig
    kinds = frozenset({LayerKind.LINEAR, LayerKind.CONV1D, LayerKind.EMBEDDING})
    rank_tensor = "gate"
    growable = True
    bench_options = {"r_init": 16}
    swap_free_options = frozenset({"targets", "r_init", "alpha", "init_std", "target_rank", "t_init", "t_final",
                                   "interval", "min_remasks", "mode", "orth_reg", "score", "beta1", "beta2"})
    rank_dims = {"lora_A": (0,), "lora_B": (1,), "gate": (0,), "mask": (0,)}
    scaled_tensors = frozenset({"lora_B"})
    config: Rank1SumConfig

    @classmethod
    def grow(cls, model: nn.Module, name: str, extra: Mapping[str, int], *,
             generator: torch.Generator | None = None) -> dict[str, int]:
        """Zero-gated components (:func:`lorakit.methods.rank1_sum_pruning.grow`), ``extra[layer]`` per layer."""
        by_count: dict[int, list[str]] = {}
        for layer, k in extra.items():
            if k > 0:
                by_count.setdefault(k, []).append(layer)
        for k, layers in sorted(by_count.items()):
            grow_components(model, name, k, layers=layers, generator=generator)
        return live_ranks(model, name)

    def __init__(self, layer: LayerInfo, config: Rank1SumConfig, shared: nn.Module | None = None,
                 *, init: bool = True) -> None:
        super().__init__(layer, config, shared, init=init)
        kw: dict[str, Any] = {"device": layer.device, "dtype": torch.float32}
        r = config.r_init
        self.d_in, self.d_out = layer.d_in, layer.d_out
        self.scale = config.scale
        self.lora_A = nn.Parameter(torch.empty(r, layer.d_in, **kw))
        self.lora_B = nn.Parameter(torch.empty(layer.d_out, r, **kw))
        self.gate = nn.Parameter(torch.zeros(r, **kw))
        self.register_buffer("mask", torch.ones(r, **kw))
        if init:
            with torch.no_grad():
                self.lora_A.normal_(0.0, config.init_std)
                self.lora_B.normal_(0.0, config.init_std)

    @classmethod
    def check_layer(cls, layer: LayerInfo, config: Rank1SumConfig) -> None:  # type: ignore[override]
        super().check_layer(layer, config)
        check_rank(layer, config.r_init, cls.method)

    @classmethod
    def callbacks(cls, name: str, adapters: Mapping[str, Adapter], layers: Mapping[str, AdaptedLayer],
                  config: AdapterConfig, *, optimizer: torch.optim.Optimizer | None,
                  total_steps: int) -> list[TrainingCallback]:
        """The rank pruner, wired to ``optimizer`` so it can shrink the optimizer state with the adapter."""
        return [RankPruner.for_adapters(adapters, name=name, optimizer=optimizer, total_steps=total_steps)]

    @classmethod
    def metadata(cls, adapters: Mapping[str, Adapter]) -> dict[str, Any]:
        """``{"ranks": {module: live rank}}``: saved with the adapter and printed by ``lorakit inspect``."""
        return {"ranks": {t: a.rank for t, a in adapters.items() if isinstance(a, Rank1Sum)}}

    # --- the math ----------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """The live rank: components whose mask is 1."""
        return int(self.mask.sum().item())

    def _coef(self) -> Tensor:
        return self.mask * self.gate * self.scale  # (r,)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return (self.lora_B.float() * self._coef()) @ self.lora_A.float()  # (d_out, r) @ (r, d_in)

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        h = layer.project(x, self.lora_A)  # (..., r)
        h = h.to(base_out.dtype) * cast(self._coef(), base_out)  # gates and scale on the small side
        return F.linear(h, cast(self.lora_B, base_out))

    def lowrank(self, layer: AdaptedLayer) -> LowRank | None:
        """The factors for the fused path (:mod:`lorakit.core.lowrank`): ``mid = m * g``, a vector. ``None`` for a
        layer pruned to rank 0, which has nothing to fuse."""
        if self.gate.numel() == 0:
            return None
        return LowRank(self.lora_A, self.lora_B, mid=self.mask * self.gate, scale=self.scale)

    def lora_factors(self, layer: AdaptedLayer) -> Factors:
        """``B' = s B diag(m g)``, ``A' = A``; at rank 0 both are empty (``dW = 0``)."""
        return self.lora_B.float() * self._coef().float(), self.lora_A.float()

    def fused_forward(self, x: Tensor, layer: AdaptedLayer) -> Tensor | None:
        """``W0 x + bias + s B ((m * g) * (A x))`` in one autograd function: saves ``x`` and ``A x`` only."""
        if self.gate.numel() == 0:
            return layer.base(x)  # rank 0: dW = 0, the layer is its base
        return super().fused_forward(x, layer)

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """LoRA+ sides: ``B`` is the output side; ``A`` and the gates take the plain learning rate."""
        return {"A": [self.lora_A, self.gate], "B": [self.lora_B]}

    def orthogonality(self) -> Tensor:
        """``||(A A^T - I) * mm^T||_F + ||(B^T B - I) * mm^T||_F``: masked components are left out."""
        mm = torch.outer(self.mask, self.mask)  # (r, r)
        eye = torch.eye(self.mask.numel(), device=self.mask.device, dtype=torch.float32)
        a, b = self.lora_A.float(), self.lora_B.float()
        return ((a @ a.t() - eye) * mm).norm() + ((b.t() @ b - eye) * mm).norm()

    # --- resizing ----------------------------------------------------------------------------------------
    def _replace(self, tensors: Mapping[str, Tensor]) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """Swap in new ``lora_A``, ``lora_B``, ``gate`` (new Parameters) and ``mask``; returns old -> new."""
        swapped = {}
        for key in RANK_DIM:
            old = getattr(self, key)
            new = nn.Parameter(tensors[key].detach().to(old.device, torch.float32).clone(),
                               requires_grad=old.requires_grad)
            setattr(self, key, new)
            swapped[key] = (old, new)
        self.mask = tensors["mask"].detach().to(self.mask.device, torch.float32).clone()
        return swapped

    @torch.no_grad()
    def select_(self, keep: Tensor) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """Keep only the components at indices ``keep`` (in that order); returns old -> new parameters."""
        keep = keep.to(self.gate.device)
        return self._replace({k: getattr(self, k).index_select(d, keep) for k, d in RANK_DIM.items()}
                             | {"mask": self.mask.index_select(0, keep)})

    @torch.no_grad()
    def extend_(self, extra: int, generator: torch.Generator | None = None
                ) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """Append ``extra`` fresh components with ``g = 0`` (the function is unchanged); returns old -> new."""
        dev, std = self.gate.device, self.config.init_std
        fresh_a = torch.randn(extra, self.d_in, generator=generator).mul_(std).to(dev)
        fresh_b = torch.randn(self.d_out, extra, generator=generator).mul_(std).to(dev)
        return self._replace({
            "lora_A": torch.cat([self.lora_A, fresh_a], 0),
            "lora_B": torch.cat([self.lora_B, fresh_b], 1),
            "gate": torch.cat([self.gate, self.gate.new_zeros(extra)]),
            "mask": torch.cat([self.mask, self.mask.new_ones(extra)]),
        })

    # --- state -------------------------------------------------------------------------------------------
    def load_tensors(self, tensors: Mapping[str, Tensor], *, where: str = "") -> None:
        """Rebuild the parameters at the saved (possibly pruned or grown) rank ``r``, then fill them."""
        expected = {*RANK_DIM, "mask"}
        if set(tensors) != expected:
            raise IncompatibleAdapterError(
                f"{where}: saved tensors do not match method {self.method!r} "
                f"(missing {sorted(expected - set(tensors))}, unexpected {sorted(set(tensors) - expected)})")
        r = tensors["gate"].shape[0] if tensors["gate"].dim() == 1 else -1
        want = {"lora_A": (r, self.d_in), "lora_B": (self.d_out, r), "gate": (r,), "mask": (r,)}
        for key, shape in want.items():
            if r < 0 or tuple(tensors[key].shape) != shape:
                raise IncompatibleAdapterError(
                    f"{where}.{key}: saved shape {tuple(tensors[key].shape)} != expected {shape} "
                    f"(rank {r}, d_in {self.d_in}, d_out {self.d_out})")
        if r > min(self.d_in, self.d_out):
            raise IncompatibleAdapterError(f"{where}: saved rank {r} exceeds min(d_in, d_out)")
        self._replace(tensors)


__all__ = ["RANK_DIM", "Rank1Sum", "Rank1SumConfig"]
