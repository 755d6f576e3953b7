"""LoRA-SB: LoRA-XS initialised from the first full fine-tuning step.

LoRA-SB (Ponkshe, Singhal et al. 2024, https://arxiv.org/abs/2411.19557) keeps LoRA-XS's layer
(``y = W0 x + B R A x``, ``B``/``A`` frozen, ``R`` ``(r, r)`` trainable, scale ``s = 1``) and changes the init:

1. ``G``: the full fine-tuning gradient of every target weight, accumulated over ``init_examples`` training
   examples, ``G = sum_b n_b grad L_b`` (``L_b`` is batch ``b``'s mean loss, ``n_b`` its example count).
2. ``dW = -eta * sign(G)``: the first Adam step (Adam's first update is ``lr * sign(g)``).
3. Randomized truncated SVD ``dW ~= U_r S_r V_r^T`` (``torch.svd_lowrank``, ``q = r + svd_oversample``,
   ``svd_niter`` power iterations).
4. ``B = U_r``, ``A = V_r^T`` (orthonormal), ``R = diag(S_r)``.

So right after init the model is ``W0 + U_r S_r V_r^T``: the best rank-``r`` approximation of the simulated
first full fine-tuning step is already applied (the model does *not* start unchanged).

Design: the init runs inside :func:`lorakit.attach`:
``lorakit.attach(model, "lora-sb", r=..., init_batches=loader)``. ``init_batches`` is a runtime option (an
iterable of model input dicts with labels, such that ``model(**batch).loss`` is the training loss); it is not
saved. Attaching without it is a :class:`~lorakit.ConfigError`. Loading a saved adapter needs no data: ``B``
and ``A`` are persistent buffers and are saved with ``R``.

``eta``: the reference code uses ``lr / (warmup_ratio * steps_per_epoch * epochs)``, i.e. the learning rate of
the first step of a linear warmup (its ``steps_per_epoch`` counts batches of the gradient-estimation loader,
e.g. ``1e-4 / (0.02 * 16667) ~= 3e-7`` for 50k MetaMathQA examples in batches of 3). Left unset, ``lorakit
train`` applies the same formula to its own schedule (:meth:`LoraSb.run_defaults`: ``lr / warmup_steps``, or
``lr`` without warm-up) and saves it in the config. The formula, not the value: on a short run with a few
warm-up steps and a larger learning rate it gives a far larger ``eta`` than the reference's (60 steps at 3e-3 with
6 warm-up steps: 5e-4, about 1,700x the reference's 3e-7 and 55x more relative to the learning rate), so a
comparison meant to follow the reference sets ``eta`` explicitly (``configs/compare-smollm2-text.yaml`` uses 3e-7,
decoupled from the swept learning rate). A bare :func:`lorakit.attach` without ``eta`` uses :data:`FALLBACK_ETA`
(lr ``1e-4`` warmed up over 100 steps). Only the size of ``R`` at step 0 depends on ``eta``: ``B`` and ``A`` do
not.

Side effects, avoided: gradients are accumulated into fp32 buffers by per-parameter
``post_accumulate_grad`` hooks that free each ``.grad`` as it arrives (peak memory ~ one LoRA step plus the
fp32 gradient buffers); ``requires_grad`` flags, existing ``.grad``s and train/eval mode are restored whatever
happens; the dropout masks and the randomized SVD draw from a forked RNG seeded with ``init_seed``, so the
global RNG state is neither reset nor consumed (the reference code reseeds it).

Several processes (``torchrun``): ``init_batches`` must be the same on every process (``lorakit train`` passes
the global batches); each process runs the rows ``[rank::world]`` of every batch, its loss weighted by its
share of the batch's loss units, and the fp32 sums are all-reduced before ``sign``, so every process gets the
``G`` of one process and, with the same ``init_seed``, the same ``B``, ``A``, ``R``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from lorakit.core.collectives import all_reduce_sum_, shard_rows
from lorakit.core.contract import Adapter, AdapterConfig
from lorakit.core.layers import AdaptedLayer, LayerKind
from lorakit.errors import ConfigError
from lorakit.methods.lora_xs import LoraXs

#: ``eta`` of a bare :func:`lorakit.attach` that does not give one: lr ``1e-4`` warmed up over 100 steps.
FALLBACK_ETA = 1e-6


class LoraSbConfig(AdapterConfig):
    """Options of LoRA-SB (the scale is fixed at ``s = 1``: the paper shows it does not matter with this init).

    Attributes:
        r: rank, ``r^2`` trainable scalars per layer (paper: 96 on Mistral-7B, 24 on RoBERTa-large).
        init_examples: examples of ``init_batches`` used to estimate the gradient (reference code: 50
            arithmetic, 170 commonsense); iteration stops once this many are seen (the last batch is cut).
        eta: size of the simulated first step, ``dW = -eta sign(G)``; ``None``: the first warm-up step's
            learning rate of the run (see the module docstring).
        svd_niter: power iterations of the randomized SVD.
        svd_oversample: extra columns of the randomized SVD (``q = r + svd_oversample``, capped at full rank,
            where the SVD is exact).
        init_seed: seed of the forked RNG used by dropout during gradient estimation and by the SVD.
    """

    r: int = Field(16, gt=0)
    init_examples: int = Field(64, gt=0)
    eta: float | None = Field(None, gt=0)
    svd_niter: int = Field(10, ge=0)
    svd_oversample: int = Field(10, ge=0)
    init_seed: int = 0

    @property
    def scale(self) -> float:
        return 1.0


class LoraSb(LoraXs):
    """LoRA-XS's layer with ``B``, ``A``, ``R`` set from the SVD of ``-eta sign(G)`` by :meth:`initialize`."""

    method = "lora-sb"
    config_cls = LoraSbConfig  # type: ignore[assignment]
    runtime_options = frozenset({"init_batches"})
    needs_init_data = True
    bench_options = {"r": 16}
    swap_free_options = frozenset({"targets", "r", "eta", "init_examples", "svd_niter", "svd_oversample", "init_seed"})
    config: LoraSbConfig  # type: ignore[assignment]

    @classmethod
    def run_defaults(cls, config: AdapterConfig, *, lr: float, warmup_steps: int,  # type: ignore[override]
                     total_steps: int) -> dict[str, Any]:
        """``eta`` = the learning rate of the run's first optimizer step (``lr / warmup_steps`` under lorakit's
        linear warm-up, ``lr`` without one), as the reference code sets it; only when the config leaves it unset."""
        assert isinstance(config, LoraSbConfig)
        return {"eta": lr / warmup_steps if warmup_steps > 0 else lr} if config.eta is None else {}

    def init_from_base(self, base_weight: Tensor) -> None:
        """Nothing: ``B``, ``A``, ``R`` stay zero (the model is exactly ``W0`` while ``G`` is estimated)."""

    @classmethod
    def initialize(cls, model: nn.Module, adapters: Mapping[str, Adapter],  # type: ignore[override]
                   layers: Mapping[str, AdaptedLayer], config: LoraSbConfig, **runtime: Any) -> None:
        """Estimate ``G`` on ``init_batches`` and set every layer's ``B``, ``A``, ``R``.

        Raises:
            ConfigError: ``init_batches`` yields no example, yields no loss, or leaves a target weight with an
                all-zero gradient (a missing ``init_batches`` is refused by :meth:`check_runtime` first).
        """
        batches = runtime["init_batches"]
        weights = [_device_tensor(layer) for layer in layers.values()]  # their devices (no dequantizing)
        with _forked_rng(weights, config.init_seed):
            grads = _estimate_gradients(model, layers, batches, config.init_examples)
            for target, adapter in adapters.items():
                g = grads.pop(target)  # free each (d_out, d_in) buffer once used
                if not torch.any(g):
                    raise ConfigError(
                        f"lora-sb: target {target!r} got an all-zero gradient from init_batches (it does not "
                        "affect the loss); remove it from targets")
                assert isinstance(adapter, LoraSb)
                adapter.init_from_gradient(g)

    @torch.no_grad()
    def init_from_gradient(self, grad: Tensor) -> None:
        """``B, R, A <- U_r, diag(S_r), V_r^T`` of ``-eta sign(grad)``; ``grad`` is ``(d_out, d_in)`` fp32
        and is overwritten."""
        r = self.config.r
        eta = FALLBACK_ETA if self.config.eta is None else self.config.eta
        dw = grad.sign_().mul_(-eta)  # (d_out, d_in), in place: no second dense buffer
        q = min(r + self.config.svd_oversample, *dw.shape)
        u, s, v = torch.svd_lowrank(dw, q=q, niter=self.config.svd_niter)  # (d_out, q), (q,), (d_in, q)
        self.lora_B.copy_(u[:, :r])
        self.lora_A.copy_(v[:, :r].t())
        self.lora_R.copy_(torch.diag(s[:r]))


@contextmanager
def _forked_rng(tensors: list[Tensor], seed: int) -> Iterator[None]:
    """Run the block on RNG states forked from the global ones (CPU and the tensors' CUDA devices), seeded
    with ``seed``; the global states are restored afterwards."""
    cuda = sorted({torch.cuda.current_device() if t.device.index is None else t.device.index
                   for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for idx in cuda:
            torch.cuda.default_generators[idx].manual_seed(seed)
        yield


def _estimate_gradients(model: nn.Module, layers: Mapping[str, AdaptedLayer], batches: Iterable[Mapping[str, Any]],
                        max_examples: int) -> dict[str, Tensor]:
    """``G`` of every target's ``(d_out, d_in)`` base weight, accumulated in fp32 over ``max_examples``.

    Only the target base weights require grad (temporarily); each ``.grad`` is added to its fp32 buffer and
    freed as soon as it is accumulated. Flags, ``.grad``s and the train/eval mode are restored.

    A quantized base weight (QLoRA) has no gradient: for those layers ``G = sum_tokens g_y^T x`` is accumulated
    from the layer's input ``x`` and output gradient ``g_y`` instead (:func:`_tap_quantized`), which needs no
    ``W``: the same sum autograd computes for a dense weight.
    """
    # quantized layers, and experts' slices of a 3-D parameter, have no weight of their own to take a .grad
    quantized = {t: layer for t, layer in layers.items()
                 if layer.quant is not None or not isinstance(layer.base.weight, nn.Parameter)}
    params = {t: layer.base.weight for t, layer in layers.items() if t not in quantized}
    unique = list({id(p): p for p in params.values()}.values())  # tied weights: one hook, one buffer
    flags = [(p, p.requires_grad) for p in model.parameters()]
    old_grads = [(p, p.grad) for p in unique]
    was_training = model.training
    sums: dict[int, Tensor] = {}
    handles = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in unique:
            p.grad = None
            p.requires_grad_(True)
            sums[id(p)] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            handles.append(p.register_post_accumulate_grad_hook(_accumulator(sums[id(p)])))
        taps = _tap_quantized(quantized, handles)
        model.train()  # the loss of a training step (dropout on), as in the reference
        device = _device_tensor(next(iter(layers.values()))).device
        seen = 0
        with torch.enable_grad():
            for batch in batches:
                batch, n = _take(batch, max_examples - seen, device)
                if n == 0:
                    continue
                # under torchrun: this process's rows and its share of the batch's loss (1.0 on one process)
                batch, k, share = shard_rows(batch, n)
                if k:
                    loss = getattr(model(**batch), "loss", None)
                    if loss is None:
                        raise ConfigError("lora-sb: the model returned no loss for an init batch; init_batches "
                                          "must include labels")
                    (loss * (n * share)).backward()
                seen += n
                if seen >= max_examples:
                    break  # do not pull another batch from the iterable
        if seen == 0:
            raise ConfigError("lora-sb: init_batches yielded no example")
        all_reduce_sum_([sums[id(p)] for p in unique] + list(taps.values()))  # G over every process
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        for p, g in old_grads:
            p.grad = g
        model.train(was_training)
    out = dict(taps)
    for t, p in params.items():
        g = sums[id(p)]
        # Conv1D stores W0^T; every grad here is returned as (d_out, d_in)
        out[t] = g.t().contiguous() if layers[t].kind is LayerKind.CONV1D else g
    return out


def _device_tensor(layer: AdaptedLayer) -> Tensor:
    """A tensor of the layer's base on its device, without dequantizing (an expert's view has no parameter)."""
    p = next(layer.base.parameters(), None)
    return layer.base.weight if p is None else p


def _tap_quantized(layers: Mapping[str, AdaptedLayer], handles: list[Any]) -> dict[str, Tensor]:
    """Accumulate ``G = sum g_y^T x`` (fp32, ``(d_out, d_in)``) of each quantized layer through forward hooks.

    Each hook adds a zero that requires grad to the layer output, so backward reaches it even when nothing below
    trains, and registers a hook on that output's gradient. The hooks' handles are appended to ``handles``.
    """
    sums: dict[str, Tensor] = {}
    for t, layer in layers.items():
        d_out, d_in = layer.weight_shape
        p = _device_tensor(layer)
        sums[t] = buf = torch.zeros(d_out, d_in, dtype=torch.float32, device=p.device)
        anchor = torch.zeros((), dtype=torch.float32, device=p.device, requires_grad=True)

        def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor, buf: Tensor = buf,
                 anchor: Tensor = anchor) -> Tensor:
            x = args[0].detach()
            y = out + anchor.to(out.dtype)

            def grad(g: Tensor) -> None:
                buf.addmm_(g.reshape(-1, g.shape[-1]).t().float(), x.reshape(-1, x.shape[-1]).float())

            y.register_hook(grad)
            return y

        handles.append(layer.register_forward_hook(hook))
    return sums


def _accumulator(buf: Tensor) -> Any:
    def hook(p: Tensor) -> None:
        buf.add_(p.grad)
        p.grad = None  # free it now: peak memory stays near one LoRA step

    return hook


def _take(batch: Mapping[str, Any], limit: int, device: torch.device) -> tuple[dict[str, Any], int]:
    """The first ``limit`` examples of ``batch`` on ``device`` and how many that is.

    The batch size is the leading dimension of ``input_ids`` (or of the first tensor); tensors with that
    leading dimension are cut, other values pass unchanged.
    """
    if not isinstance(batch, Mapping):
        raise ConfigError(f"lora-sb: init_batches must yield dicts of model inputs, got {type(batch).__name__} "
                          "(pass an iterable of batches, e.g. a list or a DataLoader, not a single batch)")
    tensors = [v for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0]
    lead = batch.get("input_ids")
    lead = lead if isinstance(lead, Tensor) and lead.dim() > 0 else (tensors[0] if tensors else None)
    if lead is None:
        raise ConfigError("lora-sb: an init batch has no tensor input")
    n = lead.shape[0]
    k = min(n, limit)
    out = {}
    for key, v in batch.items():
        if isinstance(v, Tensor):
            v = v[:k] if v.dim() > 0 and v.shape[0] == n and k < n else v
            v = v.to(device)
        out[key] = v
    return out, k
