"""Fused adapter linears: the base GEMM and a low-rank update in one autograd function.

Every method whose update is a product of small factors (LoRA, LoRA-FA, Delta-LoRA, VeRA, LoRA-XS/SB,
rank1-sum) computes, for an input ``x`` (rows of ``X``, ``(N, d_in)``)::

    h = dropout(x) A^T                      (N, r)
    u = s * mid(h)                          mid(h) = h M^T (M: (r, r)), h * m (m: (r,)), or h
    y = x W^T + bias + out * (u B^T)        out: an optional (d_out,) row scaling (VeRA's ``b``)

i.e. ``dW = s * diag(out) B mid A``. :class:`LowRank` names those factors; :func:`lowrank_linear` evaluates
the layer in one :class:`torch.autograd.Function` whose backward is written by hand, so that

- frozen tensors (``W``, and ``A``/``B``/``M``/``out`` whenever they are buffers) get no gradient and cost
  no GEMM;
- it keeps only what the method's gradients need: ``x`` and ``h = A x`` for LoRA; ``h`` alone when ``A`` is
  frozen (LoRA-FA, LoRA-XS, LoRA-SB, VeRA); no copy of the dropped-out input, ever;
- the update is added to the base output in place (a rank-``r`` ``addmm`` epilogue, no ``(N, d_out)``
  temporary) and runs in the input's dtype (adapter weights are cast, activations never go to fp32);
- on a quantized base (QLoRA, :mod:`lorakit.core.quant`) ``W = dequant(Q)`` is materialised for this one layer
  in forward, freed, and materialised again in backward for the input gradient: only the quantized weight is
  kept between them.

Dropout stays on the input, as in the reference path (:meth:`lorakit.methods.lora.Lora.forward`), so the two
paths compute the same function: the mask is drawn with :func:`torch.nn.functional.dropout` on a tensor of
ones of ``x``'s shape, which consumes the random generator exactly as ``nn.Dropout(x)`` does (same seed ->
same mask, on CPU and CUDA), and only the mask is saved, as ``bool`` (1 byte per element instead of the
reference's two ``(N, d_in)`` activations).

The fast path is on by default; ``set_fused(False)`` (or ``LORAKIT_FUSED=0`` in the environment) turns every
fused path off, which is how the tests compare it with the reference path on the same model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.core import quant
from lorakit.core.experts import ExpertLinear
from lorakit.core.layers import AdaptedLayer, Conv1D, LayerKind

_ENABLED = os.environ.get("LORAKIT_FUSED", "1").strip().lower() not in {"0", "false", "no", "off"}


_CALLS = [0]  # fused low-rank linears run by this process


def fused_calls() -> int:
    """How many fused low-rank linears this process has run: tests read it before and after a forward to
    prove the fast path ran (a silent fallback to the reference path would leave it unchanged)."""
    return _CALLS[0]


def set_fused(enabled: bool) -> None:
    """Turn every fused adapter path on or off (process-wide)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def fused_enabled() -> bool:
    """Whether fused adapter paths are used."""
    return _ENABLED


@contextmanager
def fused(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_fused` that restores the previous setting."""
    before = _ENABLED
    set_fused(enabled)
    try:
        yield
    finally:
        set_fused(before)


@dataclass(frozen=True)
class LowRank:
    """The factors of ``dW = scale * diag(out) B mid A`` (see the module docstring).

    A factor trains exactly when it ``requires_grad``; everything else is treated as frozen.

    Attributes:
        a: ``(r, d_in)``.
        b: ``(d_out, r)``.
        mid: ``None``, an ``(r, r)`` matrix ``M`` (LoRA-XS/SB's ``R``), or an ``(r,)`` vector (VeRA's ``d``,
            rank1-sum's masked gates).
        out: ``None`` or a ``(d_out,)`` vector scaling the update's rows (VeRA's ``b``).
        scale: the scalar ``s``.
        dropout: probability of dropping input elements; pass 0 when the adapter is in eval mode.
    """

    a: Tensor
    b: Tensor
    mid: Tensor | None = None
    out: Tensor | None = None
    scale: float = 1.0
    dropout: float = 0.0


def _mid(h: Tensor, mid: Tensor | None) -> Tensor:
    """``mid(h)`` for ``h`` of shape ``(N, r)``."""
    if mid is None:
        return h
    return h @ mid.t() if mid.dim() == 2 else h * mid


def _scaled(t: Tensor, s: float) -> Tensor:
    return t if s == 1.0 else t * s


def _row_scaled(b: Tensor, out: Tensor | None) -> Tensor:
    """``diag(out) B`` (``(d_out, r)``): a row scaling of the update folded into ``B``."""
    return b if out is None else b * out.unsqueeze(1)


class _LowRankLinear(torch.autograd.Function):
    """``y = x W^T + bias + out * (s mid(dropout(x) A^T) B^T)`` on 2-D ``x``, with a hand-written backward.

    ``h_pre`` replaces ``dropout(x) A^T`` when it was computed outside (one shared GEMM for projections that
    read the same input, see :mod:`lorakit.fast.speed`); ``a`` is then unused and its gradient flows through
    ``h_pre``. ``qbase`` is a quantized base layer: ``weight`` is then ``None`` and ``W`` is dequantized from it
    when needed (it is frozen: no weight gradient).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, a: Tensor, mid: Tensor | None,
                b: Tensor, out: Tensor | None, h_pre: Tensor | None, scale: float, p: float,
                qbase: nn.Module | None, mask_dtype: torch.dtype | None) -> Tensor:
        mask = None
        if h_pre is not None:
            h = h_pre
        elif p > 0:
            # Same generator draws as nn.Dropout on the layer's input (of mask_dtype: under autocast the input
            # before its cast): the mask does not depend on the values dropped.
            noise = F.dropout(torch.ones(x.shape, dtype=mask_dtype or x.dtype, device=x.device), p, True)
            mask = noise.ne(0)  # (N, d_in)
            h = (x * noise.to(x.dtype)) @ a.t()
            del noise
        else:
            h = x @ a.t()  # (N, r)
        u = _scaled(_mid(h, mid), scale)  # (N, r): the scale is applied on the small side
        w = _base_weight(weight, qbase, x.dtype)  # (d_out, d_in), in the compute dtype
        y = F.linear(x, w, bias)  # (N, d_out): the base GEMM
        del w  # a dequantized weight lives for this GEMM only
        y.addmm_(u, _row_scaled(b, out).t())  # rank-r epilogue, in place: no (N, d_out) temporary

        need = ctx.needs_input_grad
        a_grad = h_pre is None and need[3]
        keep_x = a_grad or need[1]  # only A's and W's gradients read x
        keep_h = need[4] or need[5] or need[6]  # M's, B's and out's gradients read h
        ctx.scale, ctx.p, ctx.pre, ctx.qbase = scale, p, h_pre is not None, qbase
        ctx.mid_kind = None if mid is None else mid.dim()
        ctx.save_for_backward(x if keep_x else None, h if keep_h else None,
                              mask if (mask is not None and (a_grad or need[0])) else None,
                              weight, a, mid, b, out)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, h, mask, weight, a, mid, b, out = ctx.saved_tensors
        need = ctx.needs_input_grad
        s, p = ctx.scale, ctx.p
        g_x = g_w = g_bias = g_a = g_mid = g_b = g_out = g_pre = None

        # With t = u B^T and y += out * t:  dL/dB = diag(out) G,  dL/dout = rowsum(B * G),  G = gy^T u (d_out, r),
        # and dL/du = gy diag(out) B: the row scaling never touches an (N, d_out) tensor.
        if need[5] or need[6]:
            u = _scaled(_mid(h, mid), s)
            g = gy.t() @ u  # (d_out, r)
            if need[5]:
                g_b = _row_scaled(g, out)
            if need[6]:
                g_out = (g.float() * b.float()).sum(1).to(out.dtype)  # (d_out,), summed in fp32
        a_grad = not ctx.pre and need[3]
        if need[0] or a_grad or need[4] or need[7]:
            gu = _scaled(gy @ _row_scaled(b, out), s)  # (N, r)
            if need[4]:
                g_mid = gu.t() @ h if ctx.mid_kind == 2 else (gu * h).sum(0, dtype=torch.float32).to(mid.dtype)
            gh = gu if mid is None else (gu @ mid if ctx.mid_kind == 2 else gu * mid)  # (N, r)
            if need[7]:
                g_pre = gh
            if a_grad:
                xd = x if mask is None else x * mask * (1.0 / (1.0 - p))
                g_a = gh.t() @ xd  # (r, d_in)
            if need[0]:
                w = _base_weight(weight, ctx.qbase, gy.dtype)
                g_x = gy @ w  # (N, d_in): input gradient of the base GEMM
                del w
                if not ctx.pre:
                    if mask is None:
                        g_x.addmm_(gh, a)
                    else:
                        g_x.add_((gh @ a) * mask, alpha=1.0 / (1.0 - p))
        if need[1]:
            g_w = (gy.t() @ x).to(weight.dtype)
        if need[2]:
            g_bias = gy.sum(0, dtype=torch.float32).to(gy.dtype)
        return g_x, g_w, g_bias, g_a, g_mid, g_b, g_out, g_pre, None, None, None, None


def _base_weight(weight: Tensor | None, qbase: nn.Module | None, dtype: torch.dtype) -> Tensor:
    """``W`` in the compute dtype: dequantized from a quantized base, or cast (under autocast) for this GEMM
    only; a cast or dequantized copy is never saved for backward, which makes it again."""
    if qbase is not None:
        return quant.dequantize_weight(qbase, dtype)
    assert weight is not None
    return weight if weight.dtype == dtype else weight.to(dtype)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear layer computes in for input ``x``: autocast's when autocast is on for ``x``'s device
    (as it casts ``F.linear``'s inputs), else ``x``'s own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def supports(layer: AdaptedLayer, x: Tensor) -> bool:
    """Whether :func:`lowrank_linear` can replace ``layer``'s plain forward for input ``x``.

    Only plain ``nn.Linear`` / GPT-2 ``Conv1D`` bases (and mixture-of-experts experts' slices) and the quantized
    linears of :mod:`lorakit.core.quant` (dequantized inside the op), without hooks (another subclass has its own
    forward), and floating inputs of the weight's (compute) dtype, or of any floating dtype under autocast, which
    the op then follows: it casts the input, base weight, bias and factors to autocast's dtype as autocast casts
    ``F.linear``'s inputs, and computes in it (see :func:`lowrank_linear`).
    """
    base = layer.base
    q = quant.quant_kind(base)
    if q is not None:
        plain, dtype = True, (x.dtype if q == "bnb-int8" else quant.compute_dtype(base))  # int8: any input dtype
    elif layer.kind is LayerKind.LINEAR:
        plain, dtype = type(base) in (nn.Linear, ExpertLinear), base.weight.dtype  # an expert's slice too
    else:
        plain = layer.kind is LayerKind.CONV1D and Conv1D is not None and type(base) is Conv1D
        dtype = base.weight.dtype
    return (plain and not base._forward_hooks and not base._forward_pre_hooks and x.is_floating_point()
            and (x.dtype == dtype or torch.is_autocast_enabled(x.device.type)))


def lowrank_linear(x: Tensor, layer: AdaptedLayer, f: LowRank, h: Tensor | None = None) -> Tensor | None:
    """``layer``'s whole output ``(W0 + s diag(out) B mid A) x + bias`` in one fused op.

    Args:
        x: the layer input, ``(..., d_in)``.
        layer: the adapted layer (its base supplies ``W0`` and the bias).
        f: the adapter's factors (fp32 or any dtype: they are cast to ``x``'s dtype, autograd casts the
            gradients back).
        h: ``dropout(x) A^T`` already computed, ``(..., r)`` (shared-input grouping); ``f.a`` is then unused.

    Returns:
        ``(..., d_out)``, or ``None`` when the fused path is off or does not apply (the caller then runs
        the reference path).
    """
    if not _ENABLED or not supports(layer, x):
        return None
    group = layer.projection_group
    if h is None and group is not None:
        h = group.lookup(layer, x)
    if not torch.compiler.is_compiling():  # a Python counter would make dynamo guard on it and recompile
        _CALLS[0] += 1
    amp = torch.is_autocast_enabled(x.device.type)
    dt = torch.get_autocast_dtype(x.device.type) if amp else x.dtype  # autocast casts F.linear's inputs so
    lead = x.shape[:-1]
    mask_dtype = x.dtype  # nn.Dropout would draw its mask on the input as it arrives
    x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (N, d_in); autograd casts the input gradient back
    h2 = None if h is None else h.reshape(-1, h.shape[-1]).to(dt)  # (N, r)
    bias = layer.bias
    mid = None if f.mid is None else f.mid.to(dt)
    out = None if f.out is None else f.out.to(dt)
    a = f.a if h2 is not None else f.a.to(dt)  # unused (no cast) when h is given
    qbase = layer.base if quant.is_quantized(layer.base) else None
    weight = None if qbase is not None else layer.weight  # cast to dt inside the op, per GEMM
    with torch.autocast(x.device.type, enabled=False) if amp else contextlib.nullcontext():  # GEMMs already in dt
        y = _LowRankLinear.apply(x2, weight, None if bias is None else bias.to(dt), a, mid, f.b.to(dt), out,
                                 h2, float(f.scale), float(f.dropout) if h2 is None else 0.0, qbase, mask_dtype)
    return y.view(*lead, y.shape[-1])  # (..., d_out)
