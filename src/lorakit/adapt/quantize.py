"""Quantizing a frozen base for QLoRA, and turning a quantized base dense again.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) keeps the frozen base in 4 bits (NormalFloat-4,
blocks of 64 values sharing an absmax scale, the scales themselves quantized) and trains adapters on top:
``y = dequant(Q) x + dW x``. :func:`quantize` does that in place with torchao (``"nf4"``, or ``"int8"``
weight-only, per-row scales); models loaded with bitsandbytes (``BitsAndBytesConfig(load_in_4bit=True)`` or
``load_in_8bit=True``) are used as they are. :func:`dequantize` replaces every quantized linear with a dense
``nn.Linear`` holding ``dequant(Q)``, after which merging writes ``W = dequant(Q) + dW`` and ``save_pretrained``
writes a plain checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn

from lorakit.adapt.records import records_of
from lorakit.core import quant
from lorakit.core.layers import AdaptedLayer, original_samples
from lorakit.errors import AdapterStateError, ConfigError
from lorakit.util.arguments import checked

log = logging.getLogger(__name__)

#: The schemes :func:`quantize` applies: torchao's (``nf4``, ``int8``) and bitsandbytes' layers (``bnb-*``, the
#: ones ``BitsAndBytesConfig`` makes at load time, for a model already in memory).
Scheme = Literal["nf4", "int8", "bnb-nf4", "bnb-fp4", "bnb-int8"]
TORCHAO_SCHEMES: tuple[str, ...] = ("nf4", "int8")
SCHEMES: tuple[str, ...] = ("nf4", "int8", "bnb-nf4", "bnb-fp4", "bnb-int8")
#: NF4 block size (QLoRA: 64 weights share one absmax) and the largest block of scales quantized together.
NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256


def _quantizable(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear or m is head or id(m.weight) in embeddings:
            continue  # the output head and tied weights stay dense, as in QLoRA / bitsandbytes
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        out.append((name, m))
    return out


def _scaler_block(blocks: int) -> int:
    """The largest power of two <= :data:`NF4_SCALER_BLOCK` dividing the number of NF4 blocks."""
    size = NF4_SCALER_BLOCK
    while blocks % size:
        size //= 2
    return size


@checked
def quantize(model: nn.Module, scheme: str = "nf4", *, skip: tuple[str, ...] | list[str] = ("lm_head",),
             device: torch.device | str | None = None) -> nn.Module:
    """Quantize the frozen base linears of ``model`` in place (torchao) and return it.

    Args:
        model: a dense model with no adapters yet.
        scheme: ``"nf4"`` (torchao 4-bit NormalFloat, QLoRA's; ~4.2 bits per weight), ``"int8"`` (torchao
            per-row int8 weight-only; ~8.3 bits per weight), or ``"bnb-nf4"`` / ``"bnb-fp4"`` / ``"bnb-int8"``
            (bitsandbytes ``Linear4bit`` with double-quantized scales / ``Linear8bitLt``, as transformers'
            ``BitsAndBytesConfig`` makes them).
        skip: module names (or name suffixes) to keep dense; the output head and weights tied to an embedding
            are always kept dense.
        device: move each weight there before quantizing it (one dense layer at a time on a GPU: a model that
            fits only quantized can be quantized); the rest of the model stays where it is.

    Every other ``nn.Linear`` is quantized, except (with a warning) one whose weight does not split into NF4
    blocks of 64. The sample of each original weight the base fingerprint reads is kept on the module, so
    adapters trained on the quantized base load onto the dense one and back.

    Raises:
        ConfigError: an unknown scheme, or torchao is not installed.
        AdapterStateError: the model already has adapters or quantized layers. The model is unchanged then.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization {scheme!r}; use one of {list(SCHEMES)}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"quantize(): argument 'device' {device!r} is not a device ({e})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"quantize(): argument 'device' is {device} but CUDA is not available")
    if records_of(model):
        raise AdapterStateError("quantize the base before attaching adapters (the model already has "
                                f"{sorted(records_of(model))})")
    already = [n for n, m in model.named_modules() if quant.is_quantized(m)]
    if already:
        raise AdapterStateError(f"model is already quantized ({len(already)} layers, e.g. {already[0]} is "
                                f"{quant.quant_kind(model.get_submodule(already[0]))}); quantize a dense model")
    if scheme.startswith("bnb-"):
        return _bnb_quantize(model, scheme, tuple(skip), device)
    to_nf4, int8_config, quantize_ = _torchao()
    layers = _quantizable(model, tuple(skip))
    kept = []
    for name, m in layers:
        w = m.weight.detach()
        if scheme == "nf4" and w.numel() % NF4_BLOCK:
            kept.append(name)
            continue
        sample = original_samples(w)
        if device is not None:
            m.to(device)
            w = m.weight.detach()
        if scheme == "nf4":
            q = to_nf4(w, NF4_BLOCK, _scaler_block(w.numel() // NF4_BLOCK))
            m.weight = nn.Parameter(q, requires_grad=False)
        else:
            quantize_(m, int8_config())
            m.weight.requires_grad_(False)
        m.__dict__[quant.ORIGINAL_SAMPLE] = sample
    if kept:
        log.warning("kept %d linear(s) dense: their size is not a multiple of %d (e.g. %s)", len(kept), NF4_BLOCK,
                    kept[0])
    return model


def _bnb_quantize(model: nn.Module, scheme: str, skip: tuple[str, ...], device: torch.device | str | None) -> nn.Module:
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ConfigError(f"quantize {scheme!r} needs bitsandbytes (pip install 'lorakit[quant]'): {e}") from None
    for name, m in _quantizable(model, skip):
        w = m.weight.detach()
        dev = torch.device(device) if device is not None else w.device
        bias = m.bias is not None
        if scheme == "bnb-int8":
            q: nn.Module = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=bias, has_fp16_weights=False,
                                               threshold=6.0, device="meta")
            q.weight = bnb.nn.Int8Params(w.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False)
        else:
            kind = scheme.removeprefix("bnb-")
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=bias, compute_dtype=w.dtype,
                                  compress_statistics=True, quant_type=kind, device="meta")
            q.weight = bnb.nn.Params4bit(w.to("cpu"), requires_grad=False, compress_statistics=True,
                                         quant_type=kind, module=q)
        if bias:
            q.bias = nn.Parameter(m.bias.detach().to("cpu", w.dtype if scheme != "bnb-int8" else m.bias.dtype),
                                  requires_grad=False)
        q = q.to(dev)  # bitsandbytes quantizes on the move to a device
        q.__dict__[quant.ORIGINAL_SAMPLE] = original_samples(w)
        q.train(m.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


def _torchao() -> tuple[Any, Any, Any]:
    try:  # an optional dependency (the ``quant`` extra): imported only when asked for
        from torchao.quantization import Int8WeightOnlyConfig, quantize_, to_nf4
    except ImportError as e:
        raise ConfigError(f"quantizing needs torchao (pip install 'lorakit[quant]'): {e}") from None
    return to_nf4, Int8WeightOnlyConfig, quantize_


@checked
def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized linear (wrapped by an adapter or not) with a dense ``nn.Linear`` holding
    ``dequant(Q)``, in ``dtype`` (default: each layer's compute dtype); returns ``model``.

    Adapters stay attached and unmerged; afterwards :func:`lorakit.merge` / ``detach`` work as on any dense
    model. A Hugging Face model loaded with bitsandbytes also loses its ``quantization_config``, so
    ``save_pretrained`` writes a plain checkpoint that ``from_pretrained`` loads without bitsandbytes.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, AdaptedLayer):
            if quant.is_quantized(module.base):
                module.base = _dense(module.base, dtype)
            continue
        if quant.is_quantized(module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _dense(module, dtype))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if model.__dict__.get("is_quantized"):
        model.is_quantized = False
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if model.__dict__.get(attr):
            setattr(model, attr, False)
    return model


def _dense(module: nn.Linear, dtype: torch.dtype | None) -> nn.Linear:
    d_out, d_in = quant.weight_shape(module)
    w = quant.dequantize_weight(module, dtype)
    dense = nn.Linear(d_in, d_out, bias=module.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        dense.weight.copy_(w)
        if module.bias is not None:
            dense.bias.copy_(module.bias.detach().to(w.dtype))
    dense.weight.requires_grad_(False)
    if dense.bias is not None:
        dense.bias.requires_grad_(module.bias.requires_grad)
    kept = module.__dict__.get(quant.ORIGINAL_SAMPLE)
    if kept is not None:
        dense.__dict__[quant.ORIGINAL_SAMPLE] = kept
    else:
        dense.__dict__[quant.DEQUANTIZED] = True
    dense.train(module.training)
    return dense


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """``{module name: quantization}`` of every quantized linear in ``model`` (wrapped ones by their base)."""
    out = {}
    for name, m in model.named_modules():
        kind = quant.quant_kind(m)
        if kind is not None:
            out[name.removesuffix(".base")] = kind
    return out
