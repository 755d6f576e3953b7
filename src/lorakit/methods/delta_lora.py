"""Delta-LoRA: LoRA whose low-rank steps are also pushed into the base weight.

Delta-LoRA (Zi et al. 2023, https://arxiv.org/abs/2309.02411)::

    y = W x + s * B A x                                   (LoRA forward, no adapter dropout)
    after optimizer step t > K:  W <- W + lambda * s * (B_{t+1} A_{t+1} - B_t A_t)

``W`` gets no gradient and no optimizer state: its update is the change of the low-rank product, applied in
place after each step by the training callback (:class:`DeltaLoraCallback`) with two ``addmm_`` calls. The sum
telescopes, so after ``T`` steps ``W_T = W0 + lambda s (B_T A_T - B_K A_K)`` and the trained model is::

    W0 + dW,   dW = s B A + lambda s (B_T A_T - B_K A_K)        (full rank over training)

Bookkeeping (persistent buffers, saved with the adapter): ``anchor_A/B`` = ``A_K, B_K`` (factors when the
base update starts), ``applied_A/B`` = the factors whose product is already accounted in the base drift
``D = lambda s (B_app A_app - B_K A_K)``, and ``delta_started``. :meth:`DeltaLora.delta_weight` returns the
whole change relative to ``W0`` (``s B A + D``), so a saved adapter reloads onto the *original* base weights.

Where ``D`` lives, per adapter instance (flag ``drift_in_base``):

- on the model being trained, ``D`` is in ``W`` itself (the paper's in-place update); the forward is LoRA's,
  and merge adds only ``s B A``;
- on a freshly loaded model ``W`` is ``W0``; the forward adds ``D x`` as a frozen rank-``2r`` term (the same
  function, with the same gradients), and merge adds ``s B A + D``. Resuming training moves ``D`` into ``W``
  at the next step. (A whole-model ``state_dict`` carries the flag next to the base weights, so it
  round-trips either way.)

Merge and unmerge are exact inverses of each other (each remembers what it added). ``remove``/``detach``
without merge keep what the base update put into ``W`` on a trained model (like ``full``), and leave ``W0``
on a loaded one.

Precision: the update is tiny relative to ``W``, so ``W`` is updated in fp32. A bf16/fp16 base weight gets an
fp32 master copy (a non-persistent buffer, 4 bytes per adapted base-weight element, created at the first base
update) that accumulates the updates; ``W`` is re-rounded from it after every step. After a merge/unmerge
cycle the master is rebuilt from ``W`` (one rounding of the accumulated drift). The master assumes nothing
else writes ``W`` during training: merging or unmerging *another* adapter of the same layer between steps
would be overwritten at the next step.

Defaults: the paper's values of lambda and K could not be verified here. ``delta_lambda = 0.5`` (the base moves
half as far as the low-rank product, so the effective step is 1.5x LoRA's; large values amplify noisy early
steps) and ``delta_start`` = 10% of the run's optimizer steps (:data:`START_FRACTION`; K lets ``A`` and ``B``
leave their init, where ``B = 0`` makes the first products noisy, before the base starts moving; a fixed K such
as 500 would make every shorter run plain LoRA). ``lorakit train`` writes the resolved K into the saved config;
a bare attach resolves it from ``total_steps`` when its callbacks are made. Both are options; tune them with the
learning rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from lorakit.core.callbacks import TrainingCallback
from lorakit.core.contract import Adapter, AdapterConfig, Factors, LoraForm, cast
from lorakit.core.layers import AdaptedLayer, LayerInfo, LayerKind
from lorakit.core.lowrank import LowRank
from lorakit.errors import AdapterStateError
from lorakit.methods.lora import Lora, LoraConfig, lora_form

#: Share of the run's optimizer steps before the base update starts, when ``delta_start`` is left unset.
START_FRACTION = 0.1


def start_step(config: DeltaLoraConfig, total_steps: int) -> int:
    """``K``: ``config.delta_start``, or :data:`START_FRACTION` of ``total_steps`` (rounded) when unset."""
    return config.delta_start if config.delta_start is not None else round(START_FRACTION * total_steps)


class DeltaLoraConfig(LoraConfig):
    """LoRA's options (dropout must stay 0) plus the base-update rule.

    Attributes:
        delta_lambda: ``lambda``, the ratio of the base update to the change of ``s B A`` (0 gives plain LoRA).
        delta_start: ``K``, optimizer steps before the base update starts; ``None``: :data:`START_FRACTION` of
            the run's steps.
    """

    delta_lambda: float = Field(0.5, ge=0.0)
    delta_start: int | None = Field(None, ge=0)

    @field_validator("dropout")
    @classmethod
    def _no_dropout(cls, v: float) -> float:
        if v > 0:
            raise ValueError("Delta-LoRA uses no adapter dropout (it breaks the argument that the change of B A "
                             "stands in for the gradient step of W); set dropout=0")
        return v


class DeltaLora(Lora):
    """LoRA plus the bookkeeping of the base-weight drift ``D = lambda s (B_app A_app - B_K A_K)``."""

    method = "delta-lora"
    config_cls = DeltaLoraConfig
    kinds = frozenset({LayerKind.LINEAR, LayerKind.CONV1D})
    fsdp_unsupported = "it writes into the base weights, which FSDP shards"
    quantized_unsupported = ("it adds the change of s B A to W0 after every step, and a 4/8-bit weight cannot "
                             "take updates far below its quantization step; train it on a dense base "
                             "(model.quantize: none) or use lora")
    bench_options = {"r": 16, "alpha": 32.0, "delta_start": 0}  # the base update runs in every measured step
    peft_counterpart = None
    peft_import = None
    swap_free_options = Lora.swap_free_options | {"delta_start"}
    # the bookkeeping factors carry the rank and (the B side) the scale too
    rank_dims = {**Lora.rank_dims, "anchor_A": (0,), "anchor_B": (1,), "applied_A": (0,), "applied_B": (1,)}
    scaled_tensors = Lora.scaled_tensors | {"anchor_B", "applied_B"}
    config: DeltaLoraConfig

    def __init__(self, layer: LayerInfo, config: DeltaLoraConfig, shared: nn.Module | None = None,
                 *, init: bool = True) -> None:
        super().__init__(layer, config, shared, init=init)
        r, kw = config.r, {"device": layer.device, "dtype": torch.float32}
        self.register_buffer("anchor_A", torch.zeros(r, layer.d_in, **kw))  # A_K
        self.register_buffer("anchor_B", torch.zeros(layer.d_out, r, **kw))  # B_K
        self.register_buffer("applied_A", torch.zeros(r, layer.d_in, **kw))
        self.register_buffer("applied_B", torch.zeros(layer.d_out, r, **kw))
        flag = {"dtype": torch.bool, "device": layer.device}
        self.register_buffer("delta_started", torch.zeros((), **flag))
        # Saved too, so a whole-model state dict (base weights + adapter) round-trips; lorakit.load, which
        # puts the adapter onto the original W0, clears it.
        self.register_buffer("drift_in_base", torch.zeros((), **flag))
        self.register_buffer("_master", None, persistent=False)  # fp32 copy of a low-precision W
        self.base_scale = config.delta_lambda * self.scale  # lambda * s
        # python mirrors of the two flags: the forward reads them without a device sync
        self._started = False
        self._drift_in_base = False
        self._merge_added_drift = False
        self.register_load_state_dict_post_hook(_after_load_state_dict)

    def swap_refusal(self) -> str | None:
        if bool(self.drift_in_base):
            return ("its base weights hold Delta-LoRA's base update (a trained model); swapping the factors would "
                    "leave that update in place. Save it and load onto the original base")
        return None

    def after_tensors_replaced(self) -> None:
        self._sync_flags()

    def _sync_flags(self) -> None:
        """Refresh the python mirrors from the flag buffers (after they were loaded)."""
        self._started = bool(self.delta_started)
        self._drift_in_base = bool(self.drift_in_base)
        self._master = None

    # --- the math ---------------------------------------------------------------------------------------
    def drift(self) -> Tensor:
        """``D = lambda s (B_app A_app - B_K A_K)``, ``(d_out, d_in)`` fp32 (zero before the start)."""
        d = self.applied_B @ self.applied_A
        return d.addmm_(self.anchor_B, self.anchor_A, alpha=-1.0).mul_(self.base_scale)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        """The whole change relative to ``W0``: ``s B A + D``."""
        dw = super().delta_weight(base_weight)
        return dw + self.drift() if self._started else dw

    def _drift_pending(self) -> bool:
        return self._started and not self._drift_in_base

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        out = super().forward(x, base_out, layer)
        if self._drift_pending():
            # D x = lambda s [B_app, -B_K] [A_app; A_K] x: buffers only, so x is not saved for it
            a = torch.cat([self.applied_A, self.anchor_A])  # (2r, d_in)
            b = torch.cat([self.applied_B, -self.anchor_B], dim=1) * self.base_scale  # (d_out, 2r)
            out = out + F.linear(layer.project(x, a).to(base_out.dtype), cast(b, base_out))
        return out

    def lowrank(self, layer: AdaptedLayer) -> LowRank | None:
        """LoRA's factors for the fused path, unless ``D`` must be added in forward (then the plain path)."""
        return None if self._drift_pending() else LowRank(self.lora_A, self.lora_B, scale=self.scale)

    # --- merge: add what W lacks, remember it ---------------------------------------------------------------
    def merge_into(self, weight: Tensor) -> None:
        self._merge_added_drift = self._drift_pending()
        add = super().delta_weight(weight)
        if self._merge_added_drift:
            add += self.drift()
        weight.copy_(weight.float().add_(add))
        self._master = None

    def unmerge_from(self, weight: Tensor) -> None:
        sub = super().delta_weight(weight)
        if self._merge_added_drift:
            sub += self.drift()
        weight.copy_(weight.float().sub_(sub))
        self._merge_added_drift = False
        self._master = None

    # --- the base update, driven by DeltaLoraCallback --------------------------------------------------------
    @torch.no_grad()
    def start(self) -> None:
        """Fix ``B_K, A_K`` to the current factors (once); the drift is zero at this point."""
        if self._started:
            return
        for dst, src in ((self.anchor_A, self.lora_A), (self.anchor_B, self.lora_B),
                         (self.applied_A, self.lora_A), (self.applied_B, self.lora_B)):
            dst.copy_(src)
        self.delta_started.fill_(True)
        self._started = True

    @torch.no_grad()
    def update_base(self, weight: Tensor) -> None:
        """``W <- W + lambda s (B A - B_app A_app)`` in fp32, then ``B_app, A_app <- B, A``.

        Args:
            weight: the layer's ``(d_out, d_in)`` base weight (a view for Conv1D), updated in place.
        """
        if not self._started:
            return
        acc = self._accumulator(weight)
        acc.addmm_(self.lora_B, self.lora_A, alpha=self.base_scale)
        acc.addmm_(self.applied_B, self.applied_A, alpha=-self.base_scale)
        if acc is not weight:
            weight.copy_(acc)  # round the fp32 master once into the low-precision weight
        self.applied_A.copy_(self.lora_A)
        self.applied_B.copy_(self.lora_B)

    def _accumulator(self, weight: Tensor) -> Tensor:
        """The fp32 tensor that holds ``W0 + D``: ``weight`` itself if fp32, else the master copy. Moves a
        pending ``D`` into it first."""
        pending = not self._drift_in_base
        if weight.dtype == torch.float32:
            if pending:
                weight.add_(self.drift())
            acc = weight
        else:
            if self._master is None or pending:
                self._master = weight.float()  # (d_out, d_in), contiguous fp32 copy
                if pending:
                    self._master.add_(self.drift())
                    weight.copy_(self._master)
            acc = self._master
        if pending:
            self._drift_in_base = True
            self.drift_in_base.fill_(True)
        return acc

    def load_tensors(self, tensors: Mapping[str, Tensor], *, where: str = "") -> None:
        """Fill from a saved adapter, which :func:`lorakit.load` puts onto the original ``W0``: ``D`` is then
        computed in forward (and moved into ``W`` when training resumes)."""
        super().load_tensors(tensors, where=where)
        self.drift_in_base.fill_(False)
        self._sync_flags()

    @classmethod
    def run_defaults(cls, config: AdapterConfig, *, lr: float, warmup_steps: int,
                     total_steps: int) -> dict[str, Any]:
        """``delta_start`` = :data:`START_FRACTION` of the run's steps, when the config leaves it unset."""
        assert isinstance(config, DeltaLoraConfig)
        return {"delta_start": start_step(config, total_steps)} if config.delta_start is None else {}

    @classmethod
    def callbacks(cls, name: str, adapters: Mapping[str, Adapter], layers: Mapping[str, AdaptedLayer],
                  config: AdapterConfig, *, optimizer: torch.optim.Optimizer | None,
                  total_steps: int) -> list[TrainingCallback]:
        """The post-step base update of every layer."""
        assert isinstance(config, DeltaLoraConfig)
        pairs = [(layers[t], a) for t, a in adapters.items() if isinstance(a, DeltaLora)]
        return [DeltaLoraCallback(name, pairs, start_step(config, total_steps))]

    # --- export ----------------------------------------------------------------------------------------------
    def lora_form(self) -> LoraForm | None:
        """Plain LoRA until the base update starts; after that the update is no longer ``s B A``."""
        return None if self._started else lora_form(self, self.lora_A, self.lora_B)

    def lora_factors(self, layer: AdaptedLayer) -> Factors | None:
        """``dW = s B A + D``, ``D = lambda s (B_app A_app - B_K A_K)``: ``B' = [s B, lambda s B_app, -lambda s B_K]``,
        ``A' = [A; A_app; A_K]`` (rank ``3r``; ``2r`` right after a step, when ``B_app A_app = B A``). Exact
        relative to the *original* base weights, which is what a PEFT adapter is applied to."""
        b, a = self.scale * self.lora_B.float(), self.lora_A.float()
        if not self._started:  # no base drift yet: plain LoRA
            return b, a
        k = self.base_scale  # lambda * s
        if torch.equal(self.applied_A, self.lora_A) and torch.equal(self.applied_B, self.lora_B):
            # the usual state after a step: dW = (1 + lambda) s B A - lambda s B_K A_K, rank 2r
            return (torch.cat([b * (1 + self.config.delta_lambda), -k * self.anchor_B.float()], dim=1),  # (d_out, 2r)
                    torch.cat([a, self.anchor_A.float()], dim=0))  # (2r, d_in)
        return (torch.cat([b, k * self.applied_B.float(), -k * self.anchor_B.float()], dim=1),  # (d_out, 3r)
                torch.cat([a, self.applied_A.float(), self.anchor_A.float()], dim=0))  # (3r, d_in)


def _after_load_state_dict(module: nn.Module, incompatible_keys: Any) -> None:
    assert isinstance(module, DeltaLora)
    module._sync_flags()


class DeltaLoraCallback(TrainingCallback):
    """Applies Delta-LoRA's base update after every optimizer step past ``K``.

    The anchors ``B_K, A_K`` are taken in :meth:`before_step` of step ``K + 1`` (or right after step ``K``);
    the "old factors" of each update are the ones applied at the previous step, kept in the adapter. The step
    counter goes through :meth:`state_dict`, the anchors through the saved adapter, so resumed runs are exact.
    """

    def __init__(self, name: str, pairs: list[tuple[AdaptedLayer, DeltaLora]], start: int) -> None:
        self.name = name
        self.pairs = pairs
        self.start = start
        self.steps = 0  # optimizer steps seen

    def before_step(self) -> None:
        if self.steps >= self.start:
            for _, adapter in self.pairs:
                adapter.start()

    def step(self) -> None:
        if any(self.name in layer.merged for layer, _ in self.pairs):
            raise AdapterStateError(f"Delta-LoRA adapter {self.name!r} is merged; unmerge it before training")
        self.steps += 1
        for layer, adapter in self.pairs:
            if adapter._started:
                adapter.update_base(layer.weight)
            elif self.steps >= self.start:
                adapter.start()  # right after step K: A_K, B_K are the current factors

    def state_dict(self) -> dict[str, Any]:
        """The step count, and for each layer whose base already holds the drift, the base weight itself and its
        fp32 master copy: a resumed run continues from the very same bits (recomputing ``W0 + D`` would round
        differently from the step-by-step updates). This makes a checkpoint as large as the adapted weights."""
        base = {str(i): layer.weight.detach().clone() for i, (layer, a) in enumerate(self.pairs) if a._drift_in_base}
        master = {str(i): a._master.clone() for i, (_, a) in enumerate(self.pairs)
                  if a._drift_in_base and a._master is not None}
        return {"steps": self.steps, "base": base, "master": master}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        for key, w in state.get("base", {}).items():
            layer, adapter = self.pairs[int(key)]
            if tuple(w.shape) != tuple(layer.weight.shape):
                raise AdapterStateError(f"Delta-LoRA state holds a base weight of shape {tuple(w.shape)} for a "
                                        f"layer of shape {tuple(layer.weight.shape)}")
            layer.weight.copy_(w)
            adapter.drift_in_base.fill_(True)
            adapter._drift_in_base = True
            m = state.get("master", {}).get(key)
            adapter._master = None if m is None else m.to(layer.weight.device, torch.float32).clone()
