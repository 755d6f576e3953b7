"""Loading base models and tokenizers with ``transformers`` (local paths, hub ids, ``bundled://``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.adapt.model import set_active
from lorakit.adapt.quantize import TORCHAO_SCHEMES, quantize
from lorakit.errors import ConfigError, LorakitError
from lorakit.formats.native import load, read_adapter
from lorakit.train.config import ModelConfig, resolve_model_path
from lorakit.util.validation import parse

#: Name of the ``full`` adapter that trains a classification head; saved in ``<adapter dir>/head``.
HEAD_ADAPTER = "head"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(LorakitError, OSError):
    """The base model or tokenizer could not be loaded (missing path, unknown hub id, bad files)."""


def _dtype_kwargs(dtype: str) -> dict[str, Any]:
    import transformers

    value: Any = "auto" if dtype == "auto" else DTYPES[dtype]
    # transformers 5 renamed ``torch_dtype`` to ``dtype``
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return {key: value}


def _bnb_kwargs(cfg: ModelConfig, device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the base quantized by bitsandbytes (``model.quantize: bnb-*``)."""
    try:
        import bitsandbytes  # noqa: F401  (an optional dependency: the ``quant`` extra)
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ConfigError(f"model.quantize={cfg.quantize} needs bitsandbytes (pip install 'lorakit[quant]'): "
                          f"{e}") from None
    # the compute dtype is the model's: bf16 on a GPU unless the config says otherwise, fp32 on the CPU
    dtype = DTYPES.get(cfg.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if cfg.quantize == "bnb-int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantize.removeprefix("bnb-"),
                                bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
    return {**_dtype_kwargs(str(dtype).removeprefix("torch.")), "quantization_config": qc,
            "device_map": {"": str(device)}}


def load_model(cfg: ModelConfig, *, num_labels: int | None = None, pad_token_id: int | None = None,
               device: torch.device | str | None = None) -> nn.Module:
    """The base model described by ``cfg`` (``AutoModelForCausalLM`` or ``...ForSequenceClassification``),
    quantized as ``cfg.quantize`` says (bitsandbytes at load time, on ``device``; torchao after loading, each
    weight quantized on ``device``)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(cfg.path)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    kwargs: dict[str, Any] = {**_dtype_kwargs(cfg.dtype), "trust_remote_code": cfg.trust_remote_code}
    if cfg.quantize.startswith("bnb-"):
        kwargs.update(_bnb_kwargs(cfg, dev))
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        if cfg.task == "classification":
            kwargs["num_labels"] = num_labels or cfg.num_labels
            if pad_token_id is not None:
                kwargs["pad_token_id"] = pad_token_id  # the head pools the last non-pad token
            model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"model.path {cfg.path!r}: cannot load the model ({_first_line(e)})") from None
    if cfg.quantize in TORCHAO_SCHEMES:
        quantize(model, cfg.quantize, device=dev)
    return model


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer (from ``cfg.tokenizer`` or ``cfg.path``), with a pad token guaranteed."""
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.tokenizer or cfg.path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load the tokenizer from {path!r} ({_first_line(e)})") from None
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ConfigError(f"tokenizer at {path!r} has neither a pad nor an end-of-sequence token")
        tok.pad_token = tok.eos_token  # pad positions carry no loss and no attention, so any id works
    return tok


def resolve_device(name: str, *, what: str = "training.device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; other names are checked (errors name the setting ``what``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{what}: unknown device {name!r} (use auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}={name!r} but CUDA is not available")
    return dev


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def adapter_model_config(adapter_dir: str | os.PathLike[str], *, base: str | None = None,
                         dtype: str | None = None, quantize: str | None = None,
                         meta: dict[str, Any] | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of the base model an adapter saved by ``lorakit train`` was trained on
    (``base``/``dtype``/``quantize`` override what the adapter recorded; ``meta``: its ``adapter.json``, if
    already read)."""
    if meta is None:
        meta, _ = read_adapter(adapter_dir, tensors=False)
    extra = meta.get("extra") or {}
    path = base or extra.get("base_model")
    if not path:
        raise ConfigError(f"{adapter_dir}: the adapter does not record its base model; pass --base PATH")
    tokenizer = None if base else extra.get("tokenizer")
    return parse(ModelConfig, {"path": path, "task": extra.get("task", "causal-lm"),
                               "dtype": dtype or extra.get("dtype", "auto"), "tokenizer": tokenizer,
                               "num_labels": extra.get("num_labels", 2),
                               "quantize": quantize or extra.get("quantize", "none")},
                 f"{adapter_dir}: invalid model settings")


def load_adapter_dir(model: nn.Module, adapter_dir: str | os.PathLike[str], *, force: bool = False,
                     meta: dict[str, Any] | None = None) -> str:
    """Load an adapter saved by ``lorakit train`` (and its trained task head, if any); returns its name
    (``meta``: its ``adapter.json``, if already read)."""
    if meta is None:
        meta, _ = read_adapter(adapter_dir, tensors=False)
    name = meta.get("name") or "default"
    load(model, adapter_dir, name=name, force=force)
    head = Path(adapter_dir) / HEAD_ADAPTER
    if head.is_dir():
        # the head started from a random init, so its fingerprint cannot match a fresh load: force it
        load(model, head, name=HEAD_ADAPTER, force=True)
        set_active(model, [name, HEAD_ADAPTER])
    return name


def load_trained(adapter_dir: str | os.PathLike[str], *, base: str | None = None, dtype: str | None = None,
                 force: bool = False, quantize: str | None = None,
                 device: torch.device | str | None = None) -> tuple[nn.Module, Any]:
    """``(model with the adapter loaded, tokenizer)`` for an adapter directory written by ``lorakit train``, on
    the base it was trained on (quantized as it was, unless ``quantize`` says otherwise)."""
    meta, _ = read_adapter(adapter_dir, tensors=False)
    cfg = adapter_model_config(adapter_dir, base=base, dtype=dtype, quantize=quantize, meta=meta)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, pad_token_id=tokenizer.pad_token_id, device=device)
    load_adapter_dir(model, adapter_dir, force=force, meta=meta)
    return model, tokenizer
