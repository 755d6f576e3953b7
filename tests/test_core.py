"""LoRA numerics, several adapters, targets, and bad input for the core API."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.layers import AdaptedLayer

from .conftest import batch_for, output_of, perturb, tiny_bert, tiny_gpt2, tiny_llama


def _randomize(model: nn.Module, seed: int = 5) -> None:
    perturb(model, seed, 0.2)


# --- LoRA forward == W0 x + s B A x ----------------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear_matches_formula(rslora: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    lorakit.attach(model, "lora", r=3, alpha=6, use_rslora=rslora, targets=["0"])
    _randomize(model)
    layer = model[0]
    a, b = layer.adapters["default"].lora_A, layer.adapters["default"].lora_B
    w0, bias = layer.base.weight, layer.base.bias
    s = 6 / (math.sqrt(3) if rslora else 3)
    x = torch.randn(4, 5, 12, requires_grad=True)
    got = model(x)
    want = x @ w0.T + bias + s * (x @ a.T @ b.T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # gradients through the adapter equal those through the formula
    g_got = torch.autograd.grad(got.square().sum(), [x, a, b])
    g_want = torch.autograd.grad(want.square().sum(), [x, a, b])
    for gg, gw in zip(g_got, g_want):
        torch.testing.assert_close(gg, gw, rtol=1e-5, atol=1e-5)


def test_lora_gpt2_conv1d_matches_formula() -> None:
    model = tiny_gpt2()
    lorakit.attach(model, "lora", r=2, targets=["h.0.attn.c_attn"])
    _randomize(model)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, AdaptedLayer)
    a, b, s = layer.adapters["default"].lora_A, layer.adapters["default"].lora_B, layer.adapters["default"].scale
    x = torch.randn(3, 32)
    w0 = layer.base.weight  # Conv1D stores (d_in, d_out)
    torch.testing.assert_close(layer(x), x @ w0 + layer.base.bias + s * (x @ a.T @ b.T), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight, w0.T)
    torch.testing.assert_close(layer.adapters["default"].delta_weight(layer.weight), s * b @ a)


def test_lora_initialisation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 50))
    lorakit.attach(model, "lora", r=8, targets=["0"])
    ad = model[0].adapters["default"]
    assert torch.count_nonzero(ad.lora_B) == 0
    bound = 1 / math.sqrt(400)
    assert ad.lora_A.abs().max() <= bound and ad.lora_A.abs().max() > 0.9 * bound
    assert ad.scale == 2.0  # default alpha = 2r


def test_lora_on_embedding() -> None:
    model = tiny_llama()
    batch = batch_for(model)
    lorakit.attach(model, "lora", r=4, targets=["embed_tokens"])
    _randomize(model)
    layer = model.model.embed_tokens
    ad = layer.adapters["default"]
    ids = batch["input_ids"]
    torch.testing.assert_close(layer(ids), layer.base.weight[ids] + ad.scale * (ad.lora_A.T[ids] @ ad.lora_B.T))
    ref = output_of(model, batch)
    lorakit.merge(model)
    torch.testing.assert_close(output_of(model, batch), ref, rtol=1e-5, atol=1e-5)


# --- several adapters ----------------------------------------------------------------------------------------
def test_several_adapters_add_up(tmp_path) -> None:
    model = tiny_llama()
    batch = batch_for(model)
    base = output_of(model, batch)
    lorakit.attach(model, "lora", name="a", r=2)
    _randomize(model, 1)
    only_a = output_of(model, batch)
    lorakit.attach(model, "lora", name="b", r=4, targets=["q_proj", "v_proj"])
    assert lorakit.active_adapters(model) == ["b"]
    _randomize(model, 2)
    only_b = output_of(model, batch)
    lorakit.set_active(model, ["a", "b"])
    assert set(lorakit.adapters(model)) == {"a", "b"}
    both = output_of(model, batch)
    # each adapter's delta on a layer is additive; check on the weights of a shared layer
    q = model.model.layers[0].self_attn.q_proj
    da = q.adapters["a"].delta_weight(q.weight)
    db = q.adapters["b"].delta_weight(q.weight)
    lorakit.merge(model)
    torch.testing.assert_close(output_of(model, batch), both, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    lorakit.set_active(model, "a")
    lorakit.merge(model)
    torch.testing.assert_close(q.weight, q.base.weight)
    lorakit.unmerge(model)
    w0 = q.weight.clone()
    lorakit.set_active(model, ["a", "b"])
    lorakit.merge(model)
    torch.testing.assert_close(q.weight, w0 + da + db, rtol=1e-5, atol=1e-6)
    lorakit.unmerge(model)
    assert not torch.allclose(both, only_a) and not torch.allclose(both, only_b)
    # only active adapters train
    lorakit.set_active(model, "b")
    assert all(not p.requires_grad for p in q.adapters["a"].parameters())
    assert all(p.requires_grad for p in q.adapters["b"].parameters())
    # remove one: the other stays, unwrapped layers return to their base type
    lorakit.remove(model, "b")
    lorakit.set_active(model, "a")
    torch.testing.assert_close(output_of(model, batch), only_a)
    lorakit.remove(model, "a")
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(output_of(model, batch), base)


def test_set_active_refused_while_merged() -> None:
    model = tiny_llama()
    lorakit.attach(model, "lora", name="a", r=2)
    lorakit.attach(model, "lora", name="b", r=2)
    lorakit.merge(model)
    with pytest.raises(lorakit.AdapterStateError, match="unmerge"):
        lorakit.set_active(model, ["a"])


def test_detach_gives_plain_model_loadable_by_transformers(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    batch = batch_for(model)
    lorakit.attach(model, "lora", r=4)
    _randomize(model)
    ref = output_of(model, batch)
    plain = lorakit.detach(model, merge=True)
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert all(p.requires_grad for p in plain.parameters())
    plain.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(output_of(reloaded, batch), ref, rtol=1e-5, atol=1e-5)


def test_detach_without_merge_restores_base() -> None:
    model = tiny_llama()
    batch = batch_for(model)
    base = output_of(model, batch)
    lorakit.attach(model, "dora", r=2)
    _randomize(model)
    lorakit.merge(model)
    lorakit.detach(model, merge=False)
    torch.testing.assert_close(output_of(model, batch), base, rtol=1e-5, atol=1e-5)


# --- targets -----------------------------------------------------------------------------------------------------
def test_target_selection_forms() -> None:
    assert lorakit.adapters(lorakit.attach(tiny_llama(), "lora", r=2, targets=["q_proj"]))["default"].targets == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    rec = lorakit.adapters(lorakit.attach(tiny_llama(), "lora", r=2, targets=r".*layers\.1\..*_proj"))["default"]
    assert len(rec.targets) == 7 and all(".layers.1." in t for t in rec.targets)
    rec = lorakit.adapters(lorakit.attach(tiny_llama(), "lora", r=2))["default"]
    assert len(rec.targets) == 14 and "lm_head" not in rec.targets
    rec = lorakit.adapters(lorakit.attach(tiny_bert(), "lora", r=2))["default"]
    assert "classifier" not in rec.targets and any("attention.self.query" in t for t in rec.targets)


# --- bad input: a clear lorakit error, no partial state ---------------------------------------------------------------
def _state(model: nn.Module) -> tuple:
    return (tuple(type(m).__name__ for m in model.modules()), tuple(p.requires_grad for p in model.parameters()),
            tuple(lorakit.adapters(model)))


@pytest.mark.parametrize("method, options, error, match", [
    ("nope", {}, lorakit.UnknownMethodError, "unknown method 'nope'; available: .*lora"),
    ("lora", {"r": 0}, lorakit.ConfigError, "r: Input should be greater than 0"),
    ("lora", {"r": -2}, lorakit.ConfigError, "r:"),
    ("lora", {"r": 33}, lorakit.ConfigError, "r=33 is larger than layer .* allows"),
    ("lora", {"rank": 4}, lorakit.ConfigError, "rank: unknown option"),
    ("lora", {"dropout": 1.5}, lorakit.ConfigError, "dropout"),
    ("lora", {"targets": ["nothing_like_this"]}, lorakit.TargetError, "matched no module.*q_proj"),
    ("lora", {"targets": "(unclosed"}, lorakit.TargetError, "not a valid regular expression"),
    ("lora", {"targets": ["input_layernorm"]}, lorakit.TargetError, "cannot be adapted.*LlamaRMSNorm"),
    ("dora", {"targets": ["embed_tokens"]}, lorakit.ConfigError, "cannot adapt .*embedding"),
])
def test_bad_attach_input(method, options, error, match) -> None:
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(error, match=match):
        lorakit.attach(model, method, **options)
    assert _state(model) == before
    assert isinstance(error("x"), lorakit.LorakitError)


def test_duplicate_adapter_name() -> None:
    model = lorakit.attach(tiny_llama(), "lora", r=2)
    with pytest.raises(lorakit.AdapterStateError, match="already has an adapter named 'default'"):
        lorakit.attach(model, "lora", r=2)


def _saved(tmp_path, method: str = "lora"):
    model = tiny_llama()
    lorakit.attach(model, method, r=2)
    _randomize(model)
    return lorakit.save(model, tmp_path / "ad")


def test_truncated_adapter_file(tmp_path) -> None:
    path = _saved(tmp_path)
    f = path / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(lorakit.AdapterFileError, match="truncated or corrupted"):
        lorakit.load(model, path)
    assert _state(model) == before


def test_corrupted_adapter_bytes(tmp_path) -> None:
    path = _saved(tmp_path)
    f = path / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(lorakit.AdapterFileError, match="checksum mismatch"):
        lorakit.load(tiny_llama(), path)


def test_corrupted_metadata(tmp_path) -> None:
    path = _saved(tmp_path)
    (path / "adapter.json").write_text("{not json")
    with pytest.raises(lorakit.AdapterFileError, match="corrupted metadata"):
        lorakit.load(tiny_llama(), path)
    (path / "adapter.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(lorakit.AdapterFileError, match="not lorakit adapter metadata"):
        lorakit.load(tiny_llama(), path)
    with pytest.raises(lorakit.AdapterFileError, match="no such adapter directory"):
        lorakit.load(tiny_llama(), tmp_path / "missing")


def test_adapter_from_a_different_model(tmp_path) -> None:
    path = _saved(tmp_path)
    other = tiny_llama(seed=123)  # same shapes, different weights
    before = _state(other)
    with pytest.raises(lorakit.IncompatibleAdapterError, match="different base weights"):
        lorakit.load(other, path)
    assert _state(other) == before
    lorakit.load(other, path, force=True)  # the override flag
    bigger = tiny_llama(hidden_size=48)
    with pytest.raises(lorakit.IncompatibleAdapterError, match="does not fit this model"):
        lorakit.load(bigger, path, force=True)
    with pytest.raises(lorakit.IncompatibleAdapterError, match="missing module"):
        lorakit.load(tiny_gpt2(), path, force=True)


def test_adapter_files_hold_no_pickle(tmp_path) -> None:
    path = _saved(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["adapter.json", "adapter.safetensors"]
    meta = json.loads((path / "adapter.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["r"] == 2
    assert meta["lorakit_version"] == lorakit.__version__ and len(meta["base_fingerprint"]) == 32


def test_fingerprint_is_dtype_robust(tmp_path) -> None:
    path = _saved(tmp_path)
    model = tiny_llama().to(torch.bfloat16)
    lorakit.load(model, path)  # same checkpoint in another dtype: accepted
    assert lorakit.adapters(model)["default"].method == "lora"


def test_merge_refuses_tied_weights() -> None:
    model = tiny_llama(tie_word_embeddings=True)
    lorakit.attach(model, "lora", r=2, targets=["embed_tokens"])
    with pytest.raises(lorakit.AdapterStateError, match="tied"):
        lorakit.merge(model)
    assert not model.model.embed_tokens.merged


def test_weight_sample_of_a_tensor_beyond_float32_integer_range() -> None:
    """A 28M-value embedding (SmolLM2's): the last sample is the last value (no index past the end)."""
    from lorakit.core.layers import sample_weight

    w = torch.arange(28_311_552, dtype=torch.int32)
    for sampling in ("exact", "linspace"):
        s = sample_weight(w, sampling)
        assert s.shape == (256,) and s[-1] == float(torch.tensor(28_311_551).to(torch.bfloat16))
    small = torch.randn(1000, 64)  # files saved before exact sampling: the indices they were fingerprinted with
    idx = torch.linspace(0, small.numel() - 1, steps=256).long()
    assert torch.equal(sample_weight(small, "linspace"), small.reshape(-1)[idx].to(torch.bfloat16).float())


def test_fingerprint_samples_are_exact_integer_indices_on_every_device() -> None:
    """Over 2^24 values a float32 linspace cannot hold every index, and its rounding depends on how the device
    evaluates it (a fused multiply-add on a GPU moved 17-63 of the 256): the indices are exact integers
    ``floor(i (n - 1) / 255)``, computed on the CPU whatever the weight's device."""
    from lorakit.core.layers import sample_indices, sample_weight

    n = 4097 * 4097  # 16,785,409 > 2^24
    w = torch.randn(4097, 4097, generator=torch.Generator().manual_seed(0))
    exact = torch.tensor([i * (n - 1) // 255 for i in range(256)])
    assert torch.equal(sample_indices(n), exact) and sample_indices(n).device.type == "cpu"
    assert torch.equal(sample_weight(w), w.reshape(-1)[exact].to(torch.bfloat16).float())
    assert not torch.equal(sample_indices(n, "linspace"), exact)  # what a float32 linspace gives instead
    assert torch.equal(sample_indices(7), torch.arange(7)) and torch.equal(sample_indices(1), torch.zeros(1).long())


@pytest.mark.cuda
def test_a_fingerprint_on_the_gpu_equals_the_one_on_the_cpu(device) -> None:
    from lorakit.core.layers import sample_weight

    w = torch.randn(4097, 4097, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_weight(w.to(device)), sample_weight(w))


def test_moe_experts_are_targets_and_a_dense_model_gets_no_warning() -> None:
    """transformers 5 keeps Mixtral's experts as 3-D parameters, not linears: 'all-linear' adapts them per expert
    (lorakit.core.experts; tests/test_experts.py), and naming the experts module selects all of them."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    with warnings.catch_warnings():  # nothing left frozen: nothing to say
        warnings.simplefilter("error")
        model = lorakit.attach(MixtralForCausalLM(cfg), "lora", r=2, targets="all-linear")
        assert sum(".experts." in t for t in lorakit.adapter_modules(model)) == 8
        model = lorakit.attach(MixtralForCausalLM(cfg), "lora", r=2, targets=["experts"])
        assert sorted(lorakit.adapter_modules(model)) == sorted(
            f"model.layers.0.mlp.experts.{p}.{e}" for p in ("gate_up_proj", "down_proj") for e in range(4))
        lorakit.attach(tiny_llama(), "lora", r=2, targets="all-linear")
