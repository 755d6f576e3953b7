"""GGUF, the file llama.cpp and Ollama run: a merged model, or a LoRA adapter as llama.cpp applies it.

A GGUF file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is key-value metadata plus named tensors.
Written here with the ``gguf`` package's own writer, architecture names, tensor-name tables and quantizer:

* **Metadata**: ``general.architecture`` (``llama`` for Llama and Mistral checkpoints, ``qwen2`` for Qwen2), the
  hyperparameters llama.cpp reads (``<arch>.context_length``, ``embedding_length``, ``block_count``,
  ``feed_forward_length``, ``attention.head_count`` / ``head_count_kv``, ``rope.freq_base``,
  ``attention.layer_norm_rms_epsilon``...), and the tokenizer: a byte-level BPE (GPT-2 family, what SmolLM2,
  Llama 3 and Qwen use) as ``tokenizer.ggml.model = gpt2`` with its tokens, token types, merges, special token
  ids and chat template.
* **Tensors**: each Hugging Face name mapped through ``gguf.get_tensor_name_map`` (``model.layers.0.self_attn.
  q_proj.weight`` -> ``blk.0.attn_q.weight``). For the ``llama`` architecture the query and key rows are permuted
  from Hugging Face's rotary layout (first half / second half of each head) back to the interleaved one llama.cpp
  computes with: per head, row ``(i, j)`` of the ``(2, d/2)`` split goes to ``(j, i)``; readers (transformers'
  GGUF loader among them) undo it.
* **Types**: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (blocks of 32 weights, one fp16 scale each:
  ``q = round(w / s)``, ``s = max|w| / 127``) for the 2-D weights; 1-D tensors (norms, biases) stay f32, and a
  weight whose rows are not a multiple of 32 falls back to f16 under ``q8_0``.

The adapter form is llama.cpp's LoRA GGUF: ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``, and per adapted weight ``<gguf name>.lora_a`` ``(r, d_in)`` and ``.lora_b`` ``(d_out, r)``;
llama.cpp adds ``(alpha / r) B A`` to the weight. Written from the same exact LoRA forms as the PEFT export
(:func:`lorakit.formats.peft_export.lora_layers`), at scale 1 (``alpha = r``), with the query/key permutation
applied to ``B``'s rows.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lorakit.adapt.model import adapters
from lorakit.core.layers import AdaptedLayer
from lorakit.errors import ConfigError
from lorakit.formats.peft_export import lora_layers
from lorakit.util.arguments import Range, checked
from lorakit.util.files import atomic_write

log = logging.getLogger("lorakit")

#: Hugging Face ``model_type`` -> (GGUF architecture name, whether query/key rows are permuted).
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER, _TOKEN_UNUSED = 1, 3, 4, 5


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:  # a dependency of lorakit: only a broken install lacks it
        raise ConfigError("GGUF export needs the gguf package: pip install 'gguf==0.19.0'") from None
    return gguf


def _architecture(model: nn.Module) -> tuple[str, bool]:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ConfigError(f"GGUF export: model type {kind!r} is not supported (supported: "
                          f"{', '.join(sorted(ARCHITECTURES))}); export a PEFT adapter or a merged Hugging Face "
                          "checkpoint instead")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"GGUF export: rope scaling {rope.get('rope_type')!r} of this {kind} model is not written "
                          "by lorakit's exporter (only plain RoPE)")
    return ARCHITECTURES[kind]


def _rope(config: Any) -> dict[str, Any]:
    """RoPE settings, from transformers 5's ``rope_parameters`` or the older ``rope_theta``/``rope_scaling``."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    scaling = getattr(config, "rope_scaling", None)
    if scaling and "rope_type" not in params:
        params["rope_type"] = scaling.get("rope_type") or scaling.get("type")
    return params


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def permute_qk(w: Tensor, n_head: int) -> Tensor:
    """Hugging Face's rotary row layout -> llama.cpp's: within each head, the rows ``[x_0..x_{d/2-1},
    y_0..y_{d/2-1}]`` become ``[x_0, y_0, x_1, y_1, ...]`` (``w`` is ``(n_head * d, ...)`` or a bias)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The plain model's tensors by Hugging Face name (refusing one that still carries adapters)."""
    if adapters(model) or any(isinstance(m, AdaptedLayer) for m in model.modules()):
        raise ConfigError("GGUF export of a model: merge its adapters first (lorakit.detach(model, merge=True)), "
                          "or export the adapter itself (export_gguf_adapter)")
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when there is no output tensor
    return state


def _gguf_name(name_map: Any, hf: str) -> str:
    mapped = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ConfigError(f"GGUF export: no GGUF name for tensor {hf!r} in gguf's tables for this architecture")
    return mapped


def _oriented(hf: str, t: Tensor, config: Any, permute: bool) -> Tensor:
    """``t`` as llama.cpp expects it: query/key rows permuted for the llama architecture."""
    if permute and hf.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return permute_qk(t, config.num_attention_heads)
    if permute and hf.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return permute_qk(t, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return t


def _typed(gguf: Any, data: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """``data`` (float32) in the output type: ``(array, raw dtype or None)``."""
    q = gguf.GGMLQuantizationType
    if data.ndim < 2 or outtype == "f32":
        return data.astype(np.float32), None
    if outtype == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data, q.Q8_0), q.Q8_0
    if outtype == "bf16":
        return gguf.quants.quantize(data, q.BF16), q.BF16
    return data.astype(np.float16), None  # f16, and q8_0's fallback for rows that are not whole blocks


def _hparams(w: Any, config: Any, arch: str, n_vocab: int) -> None:
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(config.num_attention_heads))
    w.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
    head = _head_dim(config)
    w.add_rope_dimension_count(head)
    if head != config.hidden_size // config.num_attention_heads:
        w.add_key_length(head)
        w.add_value_length(head)
    w.add_vocab_size(n_vocab)


def _tokenizer(w: Any, tokenizer: Any, n_vocab: int) -> None:
    """A byte-level BPE tokenizer as ``tokenizer.ggml.*`` (``gpt2`` model), padded to the embedding's rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}  # a slow tokenizer has no JSON form
    model = spec.get("model") or {}
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise ConfigError(f"GGUF export: the tokenizer is {model.get('type') or type(tokenizer).__name__}"
                          f"{'' if 'ByteLevel' in pre else ' without byte-level pre-tokenization'}; lorakit writes "
                          "byte-level BPE tokenizers (GPT-2 family: SmolLM2, Llama 3, Qwen) only")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {a["content"]: a for a in spec.get("added_tokens") or []}
    vocab.update({c: a["id"] for c, a in special.items()})
    if max(vocab.values()) >= n_vocab:
        raise ConfigError(f"GGUF export: the tokenizer has ids up to {max(vocab.values())} but the model embeds "
                          f"{n_vocab} tokens")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [_TOKEN_UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        a = special.get(text)
        types[i] = _TOKEN_NORMAL if a is None else _TOKEN_CONTROL if a.get("special") else _TOKEN_USER
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2" if spec.get("pre_tokenizer", {}).get("type") == "ByteLevel" else "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            add(value)
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        w.add_chat_template(template)


def _write(path: Path, fill: Any, arch: str) -> Path:
    gguf = _gguf()

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


def _model_tensors(model: nn.Module, gguf: Any, arch: str, permute: bool) -> Iterator[tuple[str, Tensor]]:
    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], int(config.num_hidden_layers))
    for hf, t in _hf_tensors(model).items():
        yield _gguf_name(name_map, hf), _oriented(hf, t.detach().float().cpu(), config, permute)


@checked
def export_gguf(model: nn.Module, tokenizer: Any, path: str | os.PathLike[str], *, outtype: str = "f16",
                name: str | None = None) -> dict[str, Any]:
    """Write a plain (merged) Hugging Face causal LM and its tokenizer as one GGUF file for llama.cpp / Ollama.

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` without adapters (merge them
            first: ``lorakit.detach(model, merge=True)``; a quantized base dequantized).
        tokenizer: its tokenizer (byte-level BPE).
        path: the ``.gguf`` file to write (atomically: a failed export leaves no partial file).
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the 2-D weights (1-D tensors stay f32).
        name: ``general.name`` (default: the model's ``name_or_path``).

    Returns:
        ``{"path", "architecture", "outtype", "tensors", "bytes"}``.

    Raises:
        ConfigError: an architecture, RoPE scaling or tokenizer GGUF export does not handle, an unknown
            ``outtype``, or a model that still carries adapters.
    """
    if outtype not in OUTTYPES:
        raise ConfigError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    gguf = _gguf()
    arch, permute = _architecture(model)
    n_vocab = int(model.get_input_embeddings().weight.shape[0])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    tensors = list(_model_tensors(model, gguf, arch, permute))
    _tokenizer(gguf.GGUFWriter(os.devnull, arch), tokenizer, n_vocab)  # refuse before writing anything

    def fill(w: Any) -> None:
        w.add_name(name or str(getattr(model, "name_or_path", "") or "lorakit-model"))
        w.add_file_type(file_type)
        _hparams(w, model.config, arch, n_vocab)
        _tokenizer(w, tokenizer, n_vocab)
        for gname, t in tensors:
            data, raw = _typed(gguf, t.numpy(), outtype)
            w.add_tensor(gname, data, raw_dtype=raw)

    out = _write(Path(path), fill, arch)
    report = {"path": str(out), "architecture": arch, "outtype": outtype, "tensors": len(tensors),
              "bytes": out.stat().st_size}
    log.info("wrote %s (%s, %s, %d tensors, %.1f MB)", out, arch, outtype, len(tensors), report["bytes"] / 1e6)
    return report


@checked(rank=Range(ge=1))
def export_gguf_adapter(model: nn.Module, path: str | os.PathLike[str], name: str = "default", *,
                        rank: int | None = None) -> dict[str, Any]:
    """Write adapter ``name`` as a llama.cpp LoRA adapter GGUF (``llama-cli -m base.gguf --lora this.gguf``).

    Every layer is written in its exact LoRA form at scale 1 (``adapter.lora.alpha = r``, with ``r`` the largest
    layer rank; lower-rank layers are zero-padded, which is exact), or by truncated SVD at ``rank`` for methods
    with no exact form, as in :func:`lorakit.formats.peft_export.export_peft`. DoRA has no llama.cpp form (merge it).

    Returns:
        ``{"path", "architecture", "r", "layers", "max_error", "exact"}``.
    """
    gguf = _gguf()
    arch, permute = _architecture(model)
    layers, form = lora_layers(model, name, rank)
    if form is not None and form.magnitude is not None:
        raise ConfigError("DoRA has no llama.cpp adapter form: export the merged model instead (lorakit export "
                          "--format gguf), or pass a rank to export the adapter as its best LoRA approximation")
    scale = form.scale if form is not None else 1.0  # native factors: dW = s B A; folds and SVDs: scale 1
    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], int(config.num_hidden_layers))
    r = max(ex.a.shape[0] for ex in layers.values())
    tensors: list[tuple[str, np.ndarray]] = []
    for target, ex in layers.items():
        gname = _gguf_name(name_map, target + ".weight")
        pad = r - ex.a.shape[0]
        a, b = ex.a.detach().float().cpu(), ex.b.detach().float().cpu()
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1) if pad else b
        b = _oriented(target + ".weight", scale * b, config, permute)  # B's rows are the weight's rows
        tensors += [(gname + ".lora_a", a.numpy()), (gname + ".lora_b", b.numpy())]

    def fill(w: Any) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(r))  # scale alpha / r = 1: the factors hold it
        for gname, data in tensors:
            w.add_tensor(gname, data.astype(np.float32))

    out = _write(Path(path), fill, arch)
    errors = [ex.error for ex in layers.values()]
    return {"path": str(out), "architecture": arch, "r": r, "layers": len(layers), "max_error": max(errors),
            "exact": not any(ex.truncated for ex in layers.values())}


__all__ = ["ARCHITECTURES", "OUTTYPES", "export_gguf", "export_gguf_adapter", "permute_qk"]
