"""GGUF export, checked by independent readers: transformers' GGUF loader for a merged model (same logits as the
merged model within the type's tolerance, same tokenizer), gguf's own reader for llama.cpp's LoRA adapter form."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.formats.gguf_export import export_gguf, export_gguf_adapter, permute_qk
from lorakit.testing import build_tiny_llama

from .conftest import perturb

pytest.importorskip("gguf")
TEXTS = ["Question: what is two plus two?\nAnswer: four.", "The cat sat on the mat, and the dog sat on the log.",
         "Define: harbour (noun)\nDefinition: a sheltered port where ships can take on or discharge cargo"] * 20
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _bpe_tokenizer() -> Any:
    """A small byte-level BPE tokenizer (the GPT-2 family SmolLM2 belongs to), with special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT
    return fast


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    """A tiny Llama (4 heads, 2 KV heads) with a trained-looking LoRA, its base copy and the merged model."""
    tok = _bpe_tokenizer()
    base = build_tiny_llama(len(tok), hidden=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = copy.deepcopy(base)
    lorakit.attach(model, "lora", r=4, alpha=8, targets="all-linear")
    perturb(model, size=0.2)
    adapted = copy.deepcopy(model)
    merged = lorakit.detach(model, merge=True)
    return {"tok": tok, "base": base, "adapted": adapted, "merged": merged}


def _load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rounded(model: Any, outtype: str) -> Any:
    """``model`` with every 2-D weight rounded as ``outtype`` stores it (1-D tensors stay f32, as written)."""
    import gguf

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() == 2 and outtype in ("f16", "bf16"):
                p.copy_(p.to(torch.float16 if outtype == "f16" else torch.bfloat16).float())
            elif p.dim() == 2 and outtype == "q8_0":
                q = gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
    return out


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_a_merged_model_loads_back_with_its_logits(tiny, tmp_path, outtype) -> None:
    path = tmp_path / f"model-{outtype}.gguf"
    report = export_gguf(tiny["merged"], tiny["tok"], path, outtype=outtype)
    assert report["architecture"] == "llama" and report["tensors"] == len(tiny["merged"].state_dict())
    loaded, tok = _load(path)
    ids = torch.tensor([tiny["tok"].encode(TEXTS[0])])
    # the merged model with its weights rounded to the file's type: what the file must compute, to fp32 round-off
    # (f32: the merged model itself; the query/key permutation matters: without it the loader scrambles heads)
    want, got = _logits(_rounded(tiny["merged"], outtype), ids), _logits(loaded, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    if outtype != "f32":  # and rounding moved the logits, so the check above could tell the types apart
        assert not torch.allclose(want, _logits(tiny["merged"], ids), rtol=0, atol=1e-5 * want.abs().max().item())
    # the tokenizer travels with it: the same ids, the chat template, the special tokens
    for text in TEXTS[:3]:
        assert tok.encode(text, add_special_tokens=False) == tiny["tok"].encode(text, add_special_tokens=False)
    assert tok.chat_template == CHAT and tok.eos_token_id == tiny["tok"].eos_token_id


def test_q_and_k_are_permuted_to_llama_cpps_rotary_layout() -> None:
    # one head of dimension 4: rows [x0, x1, y0, y1] become [x0, y0, x1, y1]
    w = torch.arange(8.0).reshape(4, 2)
    assert permute_qk(w, 1).tolist() == [[0, 1], [4, 5], [2, 3], [6, 7]]
    assert permute_qk(torch.arange(8.0), 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_an_adapter_gguf_is_llama_cpps_lora_form(tiny, tmp_path) -> None:
    from gguf import GGUFReader

    base_file, merged_file, lora_file = tmp_path / "base.gguf", tmp_path / "merged.gguf", tmp_path / "lora.gguf"
    export_gguf(tiny["base"], tiny["tok"], base_file, outtype="f32")
    export_gguf(tiny["merged"], tiny["tok"], merged_file, outtype="f32")
    report = export_gguf_adapter(tiny["adapted"], lora_file)
    assert report["exact"] and report["r"] == 4 and report["max_error"] < 1e-6
    lora = GGUFReader(str(lora_file))
    fields = {k: f.contents() for k, f in lora.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 4.0 and fields["general.architecture"] == "llama"

    def tensors(path: Path) -> dict[str, np.ndarray]:
        return {t.name: np.array(t.data, dtype=np.float32).reshape(list(reversed(t.shape.tolist())))
                for t in GGUFReader(str(path)).tensors}

    base, merged, factors = tensors(base_file), tensors(merged_file), tensors(lora_file)
    adapted = {n[:-len(".lora_a")] for n in factors if n.endswith(".lora_a")}
    assert len(adapted) == 2 * 7  # every linear of both blocks
    for name in adapted:  # llama.cpp's W + (alpha / r) B A is the merged weight, in the file's own layout
        a, b = factors[name + ".lora_a"], factors[name + ".lora_b"]
        assert a.shape[0] == 4 and b.shape[1] == 4
        np.testing.assert_allclose(base[name] + b @ a, merged[name], atol=1e-5)


def test_bad_exports_are_refused_before_anything_is_written(tiny, tmp_path) -> None:
    from lorakit.testing import build_tokenizer

    out = tmp_path / "x.gguf"
    with pytest.raises(ConfigError, match="merge its adapters first"):
        export_gguf(tiny["adapted"], tiny["tok"], out)
    with pytest.raises(ConfigError, match="outtype must be one of"):
        export_gguf(tiny["merged"], tiny["tok"], out, outtype="q4_k")
    with pytest.raises(ConfigError, match="byte-level BPE tokenizers"):
        export_gguf(tiny["merged"], build_tokenizer(TEXTS), out)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300))
    with pytest.raises(ConfigError, match="model type 'gpt2' is not supported"):
        export_gguf(gpt2, tiny["tok"], out)
    dora = copy.deepcopy(tiny["base"])
    lorakit.attach(dora, "dora", r=4, targets=["q_proj"])
    with pytest.raises(ConfigError, match="DoRA has no llama.cpp adapter form"):
        export_gguf_adapter(dora, out)
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))


def test_the_cli_exports_a_merged_model_and_an_adapter(tiny, tmp_path, capsys) -> None:
    from lorakit.cli import main

    base_dir, adapter = tmp_path / "base", tmp_path / "adapter"
    tiny["base"].save_pretrained(base_dir)
    tiny["tok"].save_pretrained(base_dir)
    lorakit.save(tiny["adapted"], adapter, extra={"base_model": str(base_dir)})
    model_file, lora_file = tmp_path / "model.gguf", tmp_path / "lora.gguf"
    args = ["export", "--adapter", str(adapter)]
    assert main([*args, "--out", str(model_file), "--format", "gguf", "--outtype", "q8_0"]) == 0
    loaded, _ = _load(model_file)
    ids = torch.tensor([tiny["tok"].encode(TEXTS[1])])
    want = _logits(_rounded(tiny["merged"], "q8_0"), ids)
    torch.testing.assert_close(_logits(loaded, ids), want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert main([*args, "--out", str(lora_file), "--format", "gguf-lora"]) == 0
    assert "llama.cpp LoRA, r=4" in capsys.readouterr().err
    assert main([*args, "--out", str(lora_file), "--format", "gguf-lora"]) == 1  # refuses to overwrite
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "model"), "--format", "gguf"]) == 1
    assert "name it <something>.gguf" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_mistral_and_qwen2_load_back_too(tiny, tmp_path, kind) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(kind, vocab_size=len(tiny["tok"]), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, tie_word_embeddings=kind == "qwen2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if kind == "qwen2":  # its q/k/v biases start at zero: give them values, so a misplaced bias shows
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.5)
    path = tmp_path / f"{kind}.gguf"
    assert export_gguf(model, tiny["tok"], path, outtype="f32")["architecture"] == ("llama" if kind == "mistral"
                                                                                     else "qwen2")
    loaded, _ = _load(path)
    ids = torch.tensor([tiny["tok"].encode(TEXTS[2])])
    want = _logits(model, ids)
    torch.testing.assert_close(_logits(loaded, ids), want, rtol=0, atol=1e-5 * want.abs().max().item())
