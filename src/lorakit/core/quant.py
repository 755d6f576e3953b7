"""Quantized frozen bases: how lorakit sees a linear layer whose weight is stored in 4 or 8 bits.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) trains adapters on a base whose frozen weight
``W0`` is kept quantized, ``W0 ~ dequant(Q)``; every adapter computes ``y = dequant(Q) x + dW x``. The adapters
never change: only the way the base weight is read does. This module recognises the quantized linears lorakit
supports, without importing their libraries unless such a layer is present:

- ``torchao-nf4``: an ``nn.Linear`` whose weight is a torchao ``NF4Tensor`` (what :func:`lorakit.quantize`
  makes for ``"nf4"``): 4-bit NormalFloat codes in blocks of 64 with double-quantized scales.
- ``torchao-int8``: an ``nn.Linear`` whose weight is a torchao ``Int8Tensor`` (``"int8"``: per-row int8
  weight-only).
- ``bnb-nf4`` / ``bnb-fp4``: a bitsandbytes ``Linear4bit`` (what ``BitsAndBytesConfig(load_in_4bit=True)``
  makes in transformers, PEFT's QLoRA base, what vLLM serves).
- ``bnb-int8``: a bitsandbytes ``Linear8bitLt`` with int8 weights (``load_in_8bit=True``).

For all of them :func:`dequantize_weight` returns ``W0`` as a dense ``(d_out, d_in)`` tensor, one layer at a
time, and :func:`weight_shape` reads ``(d_out, d_in)`` from the module (a packed 4-bit weight's own shape is
meaningless).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

#: Attribute on a linear quantized by :func:`lorakit.quantize`: the bf16 sample of its original weight that the
#: base fingerprint reads (:func:`lorakit.core.layers.weight_sample`), so a quantized base keeps the fingerprint
#: of the model it came from.
ORIGINAL_SAMPLE = "_lorakit_original_sample"
#: Attribute on a dense linear that :func:`lorakit.dequantize` made from a base quantized outside lorakit: its
#: weight is the dequantized one, not the original (the fingerprint is then not exact).
DEQUANTIZED = "_lorakit_dequantized"


def quant_kind(module: nn.Module) -> str | None:
    """The quantization of a linear layer's weight (see the module docstring), or ``None`` for a dense one."""
    if not isinstance(module, nn.Linear):
        return None
    cls = type(module)
    if cls.__module__.startswith("bitsandbytes"):
        if cls.__name__ == "Linear4bit":
            return f"bnb-{getattr(module.weight, 'quant_type', 'nf4')}"
        if cls.__name__ == "Linear8bitLt" and module.weight.dtype == torch.int8:
            return "bnb-int8"
        return None
    w = module.weight
    if type(w) is nn.Parameter or type(w) is Tensor:
        return None
    name, mod = type(w).__name__, type(w).__module__
    if mod.startswith("torchao"):
        if name == "NF4Tensor":
            return "torchao-nf4"
        if name == "Int8Tensor":
            return "torchao-int8"
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized linear lorakit can adapt."""
    return quant_kind(module) is not None


def weight_shape(module: nn.Linear) -> tuple[int, int]:
    """``(d_out, d_in)`` of a quantized linear, from its declared features."""
    return int(module.out_features), int(module.in_features)


def compute_dtype(module: nn.Linear) -> torch.dtype:
    """The dtype the dequantized weight is computed in (the model's dtype before quantization; for a bitsandbytes
    int8 layer, which computes in whatever its input is, its bias's dtype or fp32)."""
    kind = quant_kind(module)
    w = module.weight
    if kind in ("bnb-nf4", "bnb-fp4"):
        state = getattr(w, "quant_state", None)
        return getattr(module, "compute_dtype", None) or (state.dtype if state is not None else torch.float32)
    if kind == "bnb-int8":
        return module.bias.dtype if module.bias is not None else torch.float32
    return w.dtype  # torchao subclasses report the original dtype


def dequantize_weight(module: nn.Linear, dtype: torch.dtype | None = None) -> Tensor:
    """``W0 = dequant(Q)`` as a new dense ``(d_out, d_in)`` tensor (in ``dtype``, default :func:`compute_dtype`).

    Raises:
        TypeError: ``module`` is not a supported quantized linear.
    """
    kind = quant_kind(module)
    dtype = dtype or compute_dtype(module)
    w = module.weight
    if kind == "torchao-nf4":
        dense = w.get_original_weight()
    elif kind == "torchao-int8":
        dense = w.dequantize()
    elif kind in ("bnb-nf4", "bnb-fp4"):
        import bitsandbytes.functional as bnbf  # only reached when a bitsandbytes layer is present

        dense = bnbf.dequantize_4bit(*_unpacked_4bit(module, bnbf))
    elif kind == "bnb-int8":
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB  # moves to state on first use
        dense = w.data.float() * (scb.float().unsqueeze(1) / 127.0)  # row-wise absmax: W = C * s / 127
    else:
        raise TypeError(f"{type(module).__name__} is not a quantized linear lorakit supports")
    return dense.reshape(weight_shape(module)).to(dtype)


def _unpacked_4bit(module: nn.Module, bnbf: Any) -> tuple[Tensor, Any]:
    """``(codes, quant_state)`` of a bitsandbytes 4-bit weight in its canonical layout, without changing it.

    On a CPU with AVX512-BF16, bitsandbytes rewrites ``weight.data`` on an eval-mode forward without grad into a
    kernel layout (with bf16 block scales) that ``dequantize_4bit`` does not read; this undoes it on copies (the
    inverse bitsandbytes' own ``Params4bit.cuda()`` applies)."""
    w = module.weight
    state = w.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return bnbf._convert_weight_packed_for_cpu_inverse(w.data, copy.copy(state))
    return w.data, state


def pin_layout(module: nn.Module) -> None:
    """Keep a bitsandbytes 4-bit base in one layout from now on (called when an adapter wraps it): undo a CPU
    repacking in place and turn it off for this layer, so that its weights, which every adapter reads, no longer
    move between the two layouts (each pack rounds the block scales). Other layers: nothing."""
    if quant_kind(module) not in ("bnb-nf4", "bnb-fp4"):
        return
    import bitsandbytes.functional as bnbf

    w = module.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        w.data, w.quant_state = _unpacked_4bit(module, bnbf)
    if getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False


def weight_bytes(module: nn.Module) -> int:
    """Bytes the base weight occupies as stored (codes plus scales for a quantized one)."""
    w = module.weight
    kind = quant_kind(module)
    if kind is None:
        return w.numel() * w.element_size()
    if kind == "torchao-nf4":
        parts = [w.quantized_data, w.quantized_scalers, w.quantization_factor, w.scaler_mean, w.nf4]
        return sum(t.numel() * t.element_size() for t in parts)
    if kind == "torchao-int8":
        return sum(t.numel() * t.element_size() for t in (w.qdata, w.scale))
    total = w.data.numel() * w.data.element_size()
    if kind == "bnb-int8":
        return total + weight_shape(module)[0] * 4  # one fp32 scale per row
    state = w.quant_state
    total += state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "nested", False) and state.state2 is not None:
        total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total
