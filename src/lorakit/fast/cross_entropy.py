"""Fused linear + cross-entropy: the causal-LM loss without the ``(tokens, vocab)`` logits tensor.

On CUDA, Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` when the optional ``liger-kernel`` extra is
installed; otherwise a chunked PyTorch autograd function (:class:`_LinearCrossEntropy`) whose gradients are
formed chunk by chunk in forward. Both skip the head weight's gradient when the head is frozen.

Which one runs is :func:`kernel`'s answer, reported by the trainer (``run.json``) and the bench. The environment
variable ``LORAKIT_CROSS_ENTROPY`` chooses: ``auto`` (the default, as above), ``chunked``, or ``liger`` (Liger on
any device: on the CPU it runs under Triton's interpreter, ``TRITON_INTERPRET=1``, which is how the tests check
it without a GPU; an error if Liger cannot be imported). A Liger that is installed but fails to import is said
once as a warning, with the reason, never skipped silently.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.errors import ConfigError


def _ce_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one chunk's fp32 logits stay near 32M elements (128 MiB)."""
    return max(64, (1 << 25) // max(vocab, 1))


def next_token_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``labels`` shifted left by one, ``ignore_index`` at the end: position ``t`` predicts token ``t + 1``."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _backprop_chunk(dlogits: Tensor, hc: Tensor, weight: Tensor, g_h: Tensor | None, g_w: Tensor | None,
                    g_b: Tensor | None) -> None:
    """Push one chunk's ``(c, V)`` logit gradient (fp32) back through ``h W^T + bias``: into the chunk's rows of
    ``g_h`` and onto the accumulated ``g_w`` / ``g_b`` (those that are not ``None``)."""
    gl = dlogits.to(hc.dtype)
    if g_h is not None:
        torch.mm(gl, weight, out=g_h)
    if g_w is not None:
        g_w += gl.t() @ hc
    if g_b is not None:
        g_b += dlogits.sum(0)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h W^T + bias`` against ``target`` without materialising all the logits.

    The logits are computed chunk by chunk (``(c, V)`` at a time, in fp32 as Hugging Face's loss does), and
    the gradients are formed right away in forward (``dlogits = (softmax - onehot) / n_valid``), so backward
    only rescales them by the incoming scalar. ``W``'s gradient is accumulated only when ``W`` trains (a frozen
    or tied-and-frozen output head costs no ``(V, H)`` GEMM).
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ignore_index: int,
                chunk: int) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        valid = target.ne(ignore_index)  # (N,)
        inv = 1.0 / valid.sum().clamp(min=1).to(torch.float32)  # mean over counted tokens (no host sync)
        g_h = torch.empty_like(h) if need_h else None
        g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk):
            hc, vc = h[i:i + chunk], valid[i:i + chunk]  # (c, H), (c,)
            tc = target[i:i + chunk].masked_fill(~vc, 0).unsqueeze(1)  # (c, 1), a valid index everywhere
            logits = F.linear(hc, weight, bias).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total += ((lse - logits.gather(1, tc).squeeze(1)) * vc).sum()
            if need_h or need_w or need_b:
                p = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                p.scatter_add_(1, tc, torch.full_like(tc, -1, dtype=p.dtype))  # minus the one-hot target
                p.mul_((vc * inv).unsqueeze(1))  # ignored rows get no gradient
                _backprop_chunk(p, hc, weight, None if g_h is None else g_h[i:i + chunk], g_w, g_b)
        ctx.save_for_backward(g_h, g_w, g_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total * inv

    @staticmethod
    def backward(ctx: Any, go: Tensor) -> tuple[Tensor | None, ...]:
        g_h, g_w, g_b = ctx.saved_tensors
        w_dt, b_dt = ctx.dtypes
        return (None if g_h is None else g_h * go.to(g_h.dtype),
                None if g_w is None else (g_w * go).to(w_dt),
                None if g_b is None else (g_b * go).to(b_dt), None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, *,
                         ignore_index: int = -100, shift: bool = True, chunk: int | None = None) -> Tensor:
    """Causal-LM loss ``mean CE(hidden W^T + bias, labels)`` without the ``(N, V)`` logits tensor.

    Equals Hugging Face's ``ForCausalLMLoss`` (labels shifted left by one, fp32 logits, mean over tokens
    whose label is not ``ignore_index``). On CUDA it uses Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``
    when ``liger-kernel`` is installed (``pip install lorakit[gpu]``); otherwise a chunked PyTorch version
    (:class:`_LinearCrossEntropy`). Neither computes the head weight's gradient when it is frozen.

    Args:
        hidden: final hidden states ``(..., T, H)``.
        weight: output head ``(V, H)``.
        labels: token ids ``(..., T)`` (the same tensor as the inputs for plain LM training).
        bias: optional head bias ``(V,)``.
        shift: predict token ``t + 1`` from position ``t`` (``False`` when labels are already aligned).
        chunk: rows per chunk of the PyTorch version (default: ~128 MiB of fp32 logits per chunk).
    """
    if shift:
        labels = next_token_labels(labels, ignore_index)
    h2 = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    t2 = labels.reshape(-1).to(h2.device)  # (N,)
    if kernel(h2.device) == "liger":
        return _liger()(ignore_index=ignore_index, reduction="mean")(weight, h2, t2, bias)
    rows = chunk if chunk is not None else _ce_chunk_rows(weight.shape[0])
    return _LinearCrossEntropy.apply(h2, weight, bias, t2, ignore_index, int(rows))


class _LinearTokenLogprobs(torch.autograd.Function):
    """Per-row ``log softmax(h W^T + bias)[target]`` (0 where ``target`` is ignored) without all the logits.

    Forward computes the logits chunk by chunk and keeps only ``(N,)`` log-probabilities; backward recomputes
    each chunk's softmax (one more ``(c, H) x (H, V)`` GEMM per chunk, no ``(N, V)`` tensor kept between the
    passes): ``d logp_i / d logits_i = onehot(t_i) - softmax_i``, scaled by the incoming gradient of row ``i``.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ignore_index: int,
                chunk: int) -> Tensor:
        valid = target.ne(ignore_index)
        out = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk):
            vc = valid[i:i + chunk]
            tc = target[i:i + chunk].masked_fill(~vc, 0).unsqueeze(1)
            logits = F.linear(h[i:i + chunk], weight, bias).float()  # (c, V)
            out[i:i + chunk] = (logits.gather(1, tc).squeeze(1) - torch.logsumexp(logits, dim=-1)) * vc
        ctx.save_for_backward(h, weight, bias, target)
        ctx.ignore_index, ctx.chunk = ignore_index, chunk
        return out

    @staticmethod
    def backward(ctx: Any, go: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, bias, target = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        valid = target.ne(ctx.ignore_index)
        g_h = torch.empty_like(h) if need_h else None
        g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        c = ctx.chunk
        for i in range(0, h.shape[0], c):
            hc, vc = h[i:i + c], valid[i:i + c]
            tc = target[i:i + c].masked_fill(~vc, 0).unsqueeze(1)
            logits = F.linear(hc, weight, bias).float()
            p = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True)).exp_().neg_()  # -softmax, in place
            p.scatter_add_(1, tc, torch.ones_like(tc, dtype=p.dtype))  # onehot - softmax
            p.mul_((go[i:i + c].float() * vc).unsqueeze(1))
            _backprop_chunk(p, hc, weight, None if g_h is None else g_h[i:i + c], g_w, g_b)
        return (g_h, None if g_w is None else g_w.to(weight.dtype), None if g_b is None else g_b.to(bias.dtype),
                None, None, None)


def linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, *,
                          ignore_index: int = -100, chunk: int | None = None) -> Tensor:
    """Per-token log-probabilities of a causal LM's labels, ``(..., T)``, without the ``(N, V)`` logits.

    Position ``t`` holds ``log p(labels[t + 1] | tokens <= t)`` (labels shifted left by one, as the loss reads
    them), in fp32, and 0 where the shifted label is ``ignore_index`` (and at the last position). Summed over a
    completion's positions this is the sequence log-probability the preference objectives compare
    (:mod:`lorakit.train.preference`). Chunked like :func:`linear_cross_entropy`; backward recomputes each
    chunk's softmax instead of keeping it.
    """
    shifted = next_token_labels(labels, ignore_index)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    rows = chunk if chunk is not None else _ce_chunk_rows(weight.shape[0])
    out = _LinearTokenLogprobs.apply(h2, weight, bias, shifted.reshape(-1).to(h2.device), ignore_index, int(rows))
    return out.reshape(shifted.shape)


#: Environment variable choosing the implementation: ``auto``, ``liger`` or ``chunked`` (module docstring).
KERNEL_ENV = "LORAKIT_CROSS_ENTROPY"
KERNELS = ("auto", "liger", "chunked")
log = logging.getLogger(__name__)
_LIGER: list[Any] = []  # [class or None] once looked up
_WHY: list[str] = []  # why Liger could not be imported


def kernel(device: torch.device | str) -> str:
    """The implementation :func:`linear_cross_entropy` uses for tensors on ``device``: ``liger`` or ``chunked``.

    Raises:
        ConfigError: ``LORAKIT_CROSS_ENTROPY`` is not one of :data:`KERNELS`, or asks for Liger and Liger cannot
            be imported (the reason is in the message).
    """
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in KERNELS:
        raise ConfigError(f"{KERNEL_ENV}={choice!r}: choose one of {', '.join(KERNELS)}")
    if choice == "chunked":
        return "chunked"
    if choice == "liger":
        if _liger() is None:
            raise ConfigError(f"{KERNEL_ENV}=liger but Liger-Kernel cannot be imported: {_WHY[0]}")
        return "liger"
    return "liger" if torch.device(device).type == "cuda" and _liger() is not None else "chunked"


def _liger() -> Any:
    """Liger-Kernel's fused linear cross-entropy class, or ``None`` (not installed, or its import failed: the
    reason is kept, and said once as a warning unless the extra is simply not installed)."""
    if not _LIGER:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ModuleNotFoundError as e:
            missing = (e.name or "").split(".")[0]
            _WHY.append(f"{e}" + (" (pip install 'lorakit[gpu]')" if missing == "liger_kernel" else ""))
            if missing != "liger_kernel":  # installed, but one of its own imports is missing
                log.warning("Liger-Kernel is installed but cannot be imported (%s); using the chunked "
                            "cross-entropy", e)
            LigerFusedLinearCrossEntropyLoss = None  # noqa: N806
        except Exception as e:  # e.g. no usable Triton on this machine
            _WHY.append(f"{type(e).__name__}: {e}")
            log.warning("Liger-Kernel is installed but cannot be imported (%s: %s); using the chunked "
                        "cross-entropy", type(e).__name__, e)
            LigerFusedLinearCrossEntropyLoss = None  # noqa: N806
        _LIGER.append(LigerFusedLinearCrossEntropyLoss)
    return _LIGER[0]
