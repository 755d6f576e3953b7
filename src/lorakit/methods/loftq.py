"""LoftQ: LoRA started from the quantization error of a quantized base.

LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659) initialises LoRA's factors so that the quantized base
plus the adapter approximates the dense weight better than the quantized base alone. The paper alternates::

    Q_t = q(W - s B_{t-1} A_{t-1})           (quantize what the adapter does not hold)
    s B_t A_t = SVD_r(W - Q_t)               (the best rank-r fit of the rest)

lorakit runs one step (``T = 1``) on the base as it is quantized: ``Q = q(W)``, the standard NF4 / int8 weights
``lorakit.quantize`` (or bitsandbytes) made, and::

    W - Q = U S V^T
    B = U_r sqrt(S_r / s),   A = sqrt(S_r / s) V_r^T        (s B A = U_r S_r V_r^T, the best rank-r fit)
    y = Q x + s B (A dropout(x))

so the model starts at ``Q + U_r S_r V_r^T`` instead of ``Q``: closer to the dense model in Frobenius norm by
construction, layer by layer. Keeping ``Q = q(W)`` (as PEFT's ``replace_lora_weights_loftq`` does) means the
adapter trains and loads on any copy of the base quantized the usual way, like any QLoRA adapter; ``T > 1`` would
change ``Q`` itself, which then has to be saved and shipped as a new base checkpoint, and is not offered.
Afterwards LoftQ is LoRA: the same layer, fused path, merge (through ``lorakit.dequantize``) and native PEFT
export.

The init needs ``W``, which a quantized model no longer holds: ``lorakit.attach(model, "loftq",
dense_weights=...)`` takes the dense state dict or the base's safetensors checkpoint (read one layer at a time;
``lorakit train`` passes ``model.path``). A layer whose base is not quantized is refused (its error is zero).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lorakit.core.contract import AdapterConfig
from lorakit.core.layers import AdaptedLayer, LayerKind, base_weight
from lorakit.errors import ConfigError
from lorakit.methods.lora import Lora
from lorakit.util.dense_weights import dense_source


class Loftq(Lora):
    """LoRA whose ``A``, ``B`` start at the top-``r`` SVD of the base's quantization error ``W - q(W)``."""

    method = "loftq"
    kinds = frozenset({LayerKind.LINEAR})
    runtime_options = frozenset({"dense_weights"})
    needs_dense_weights = True
    peft_counterpart = None
    peft_import = None

    @classmethod
    def initialize(cls, model: nn.Module, adapters: Mapping[str, Any], layers: Mapping[str, AdaptedLayer],
                   config: AdapterConfig, **runtime: Any) -> None:
        unquantized = [name for name, layer in layers.items() if layer.quant is None]
        if unquantized:  # (a saved LoftQ adapter loads onto any base, a dequantized one included: no init)
            raise ConfigError(f"method 'loftq' starts from the quantization error of a quantized base, and "
                              f"{unquantized[0]!r} is not quantized: quantize the model first (lorakit.quantize, "
                              "model.quantize: nf4), or use lora on a dense base")
        dense = dense_source(runtime["dense_weights"])
        for name, ad in adapters.items():
            q = base_weight(layers[name]).float()  # (d_out, d_in), dequantized
            w = dense.weight(name).to(q.device)
            if w.shape != q.shape:
                raise ConfigError(f"dense_weights: {name!r} has shape {tuple(w.shape)} in {dense.where}, the "
                                  f"layer {tuple(q.shape)}: not this model's dense base")
            u, sv, vh = torch.linalg.svd(w - q, full_matrices=False)
            root = (sv[:ad.config.r] / ad.scale).sqrt()  # (r,)
            with torch.no_grad():
                ad.lora_B.copy_(u[:, :ad.config.r] * root)
                ad.lora_A.copy_(root[:, None] * vh[:ad.config.r])
