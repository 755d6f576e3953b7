"""LoRA-FA: LoRA with a frozen down-projection (Zhang et al. 2023, https://arxiv.org/abs/2308.03303).

::

    y  = W0 x + s * B (A dropout(x)),    s = alpha / r   (rsLoRA: alpha / sqrt(r))
    dW = s * B A

``A`` ``(r, d_in)`` is initialised like LoRA's (kaiming-uniform, ``a = sqrt(5)``) and then frozen: it is a
persistent buffer, saved with the adapter but never trained. Only ``B`` ``(d_out, r)`` trains, from zero, so
the model starts unchanged. Trainable: ``r d_out`` per layer.

Why it exists: activation memory. Autograd keeps an input of a matmul only when the other operand needs a
gradient. With ``A`` frozen, ``x @ A.T`` keeps nothing of ``x`` (its input gradient needs only ``A``), and
``h @ B.T`` keeps ``h = A x`` ``(N, r)`` for ``B``'s gradient. So with dropout 0 an adapted layer keeps
``N r`` numbers instead of LoRA's ``N (d_in + r)``; ``tests/test_methods_fa_vera.py`` checks this with
``torch.autograd.graph.saved_tensors_hooks``. (Dropout > 0 additionally keeps its ``N x d_in`` mask.)

Projected gradient (option ``projected_grad``, from the later version of the paper): the ``B`` update that
best reproduces a full fine-tuning step restricted to ``B``'s reach is::

    g_B <- g_B (A A^T + eps I)^-1 / s^2

Since ``g_B = s g_W A^T``, one SGD step then changes the layer by ``s dB A = -lr g_W A^T (A A^T)^-1 A``: the
full gradient projected onto the row space of ``A``. It is applied by a training callback's
``before_step()`` (a callback rather than a gradient hook on ``B``: training rules stay out of layers, and it
runs exactly once per optimizer step on the accumulated gradient; the map is linear, so gradient
accumulation does not change the result). For the same reason it commutes with gradient clipping up to which
norm is clipped: the raw one if clipping runs first (as in :class:`lorakit.train.trainer.Trainer`), else the projected one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lorakit.core.callbacks import TrainingCallback
from lorakit.core.contract import Adapter, AdapterConfig, LoraForm, cast
from lorakit.core.layers import AdaptedLayer, LayerInfo, LayerKind
from lorakit.core.lowrank import LowRank
from lorakit.methods.lora import LoraConfig, check_rank, dropout_p, input_dropout, lora_form, lora_init_


class LoraFaConfig(LoraConfig):
    """LoRA's options (see :class:`lorakit.methods.lora.LoraConfig`) plus the projected gradient.

    Attributes:
        projected_grad: replace ``B``'s gradient by ``g_B (A A^T + eps I)^-1 / s^2`` before each step.
        projected_grad_eps: the ridge ``eps`` added to ``A A^T`` (an ``(r, r)`` Gram matrix whose diagonal is
            about ``1/3`` at init), so the inverse exists even if rows of ``A`` become dependent.
    """

    projected_grad: bool = False
    projected_grad_eps: float = Field(1e-6, ge=0.0)


class LoraFa(Adapter):
    """``dW = s B A`` with ``A (r, d_in)`` a frozen buffer and ``B (d_out, r)`` the only trainable tensor."""

    method = "lora-fa"
    config_cls = LoraFaConfig
    kinds = frozenset({LayerKind.LINEAR, LayerKind.CONV1D, LayerKind.EMBEDDING})
    swap_free_options = frozenset({"targets", "r", "alpha", "use_rslora", "dropout", "projected_grad",
                                   "projected_grad_eps"})
    rank_dims = {"lora_A": (0,), "lora_B": (1,)}
    scaled_tensors = frozenset({"lora_B"})
    relative_lr = 3.0  # B alone trains: it takes a larger step than LoRA's pair
    config: LoraFaConfig

    def __init__(self, layer: LayerInfo, config: LoraFaConfig, shared: nn.Module | None = None,
                 *, init: bool = True) -> None:
        super().__init__(layer, config, shared, init=init)
        kw: dict[str, Any] = {"device": layer.device, "dtype": torch.float32}
        a = torch.empty(config.r, layer.d_in, **kw)
        if init:
            lora_init_(a)
        self.register_buffer("lora_A", a)  # persistent: it is random, so it must be saved
        self.lora_B = nn.Parameter(torch.zeros(layer.d_out, config.r, **kw))
        self.scale = config.scale
        self.dropout = input_dropout(config, layer)  # an N x d_in mask: what LoRA-FA exists to avoid

    @classmethod
    def check_layer(cls, layer: LayerInfo, config: LoraFaConfig) -> None:  # type: ignore[override]
        super().check_layer(layer, config)
        check_rank(layer, config.r, cls.method)

    @classmethod
    def callbacks(cls, name: str, adapters: Mapping[str, Adapter], layers: Mapping[str, AdaptedLayer],
                  config: AdapterConfig, *, optimizer: torch.optim.Optimizer | None,
                  total_steps: int) -> list[TrainingCallback]:
        """The projected gradient, when ``projected_grad`` is on."""
        assert isinstance(config, LoraFaConfig)
        if not config.projected_grad:
            return []
        return [ProjectedGradient([a for a in adapters.values() if isinstance(a, LoraFa)], config.projected_grad_eps)]

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """``B`` is the only trainable tensor and is LoRA+'s "B" side (so LoRA+ just scales its lr)."""
        return {"A": [], "B": [self.lora_B]}

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        # A needs no gradient, so this matmul saves only A (a buffer), never x.
        h = layer.project(self.dropout(x), self.lora_A) * self.scale  # (..., r): scale on the small side
        # B needs a gradient, so this matmul saves h = s A x: the only activation LoRA-FA keeps.
        return F.linear(h.to(base_out.dtype), cast(self.lora_B, base_out))

    def lowrank(self, layer: AdaptedLayer) -> LowRank | None:
        """The factors for the fused path (:mod:`lorakit.core.lowrank`): ``A`` is a buffer, so it keeps ``A x``
        alone; ``None`` for a subclass that changes the forward."""
        if type(self).forward is not LoraFa.forward:
            return None
        return LowRank(self.lora_A, self.lora_B, scale=self.scale, dropout=dropout_p(self.dropout))

    def lora_form(self) -> LoraForm | None:
        """A frozen ``A`` is still LoRA's ``A``: PEFT stores LoRA-FA natively."""
        return lora_form(self, self.lora_A, self.lora_B)

    @torch.no_grad()
    def grad_preconditioner(self, eps: float) -> Tensor:
        """``(A A^T + eps I)^-1 / s^2`` ``(r, r)``, fp32 on ``A``'s device.

        Computed once per run (``A`` is frozen), so it is done in fp64 on the CPU, via Cholesky.
        """
        a = self.lora_A.to("cpu", torch.float64)
        gram = a @ a.T  # (r, r)
        gram.diagonal().add_(eps)
        inv = torch.cholesky_inverse(torch.linalg.cholesky(gram))
        return (inv / self.scale**2).to(self.lora_A.device, torch.float32)


class ProjectedGradient(TrainingCallback):
    """LoRA-FA's projected gradient: ``g_B <- g_B (A A^T + eps I)^-1 / s^2`` in :meth:`before_step`.

    ``A`` is frozen, so each layer's ``(r, r)`` preconditioner is computed once and reused; it is recomputed
    if ``A`` changes (loaded, moved to another device).
    """

    def __init__(self, adapters: list[LoraFa], eps: float) -> None:
        self.adapters = adapters
        self.eps = eps
        self._cache: dict[int, tuple[tuple[int, int, torch.device], Tensor]] = {}

    def _preconditioner(self, adapter: LoraFa) -> Tensor:
        a = adapter.lora_A
        key = (a.data_ptr(), a._version, a.device)
        hit = self._cache.get(id(adapter))
        if hit is None or hit[0] != key:
            hit = (key, adapter.grad_preconditioner(self.eps).to(adapter.lora_B.device))
            self._cache[id(adapter)] = hit
        return hit[1]

    @torch.no_grad()
    def before_step(self) -> None:
        for adapter in self.adapters:
            g = adapter.lora_B.grad
            if g is None:
                continue
            p = self._preconditioner(adapter)
            g.copy_(g.float() @ p)  # (d_out, r) @ (r, r)
