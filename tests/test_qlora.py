"""QLoRA: every adapter method on a 4-bit or 8-bit frozen base (torchao nf4/int8 through lorakit.quantize, and
bitsandbytes 4-bit/8-bit bases loaded by transformers), and the refusals around it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import lorakit
from lorakit.adapt.model import adapter_modules
from lorakit.adapt.quantize import quantized_layers
from lorakit.core import quant
from lorakit.core.layers import AdaptedLayer, adapted_layers
from lorakit.core.lowrank import fused, fused_calls

from .conftest import batch_for, hf_greedy, output_of
from .conftest import tiny_llama as _tiny_llama
from .test_contract import CASES, _perturb, train_losses

pytest.importorskip("torchao")
pytest.importorskip("bitsandbytes")

#: methods that train on a quantized base (Delta-LoRA and full fine-tuning refuse it)
SUPPORTED = sorted(m for m in CASES if m not in ("delta-lora", "full"))
BASES = ("nf4", "int8", "bnb-nf4", "bnb-int8")


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """The contract matrix's tiny Llama, 64 wide: bitsandbytes' CPU kernels need in_features >= its 64-block."""
    return _tiny_llama(seed, hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama of the contract matrix, saved (bitsandbytes bases are made by from_pretrained)."""
    path = tmp_path_factory.mktemp("qbase") / "base"
    tiny_llama().save_pretrained(path)
    return path


def quantized_base(kind: str, saved: Path, seed: int = 0, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The tiny Llama quantized as ``kind``: lorakit.quantize for nf4/int8, bitsandbytes via transformers."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind in ("nf4", "int8"):
        model = lorakit.quantize(tiny_llama(seed).to(device), kind)
        model.dense_for_tests = tiny_llama(seed).state_dict()  # for inits from the dense weights (LoftQ)
        return model
    qc = (BitsAndBytesConfig(load_in_8bit=True) if kind == "bnb-int8" else
          BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                             bnb_4bit_use_double_quant=True))
    model = AutoModelForCausalLM.from_pretrained(saved, quantization_config=qc, device_map={"": str(device)}).eval()
    model.dense_for_tests = str(saved)  # the checkpoint it was quantized from
    return model


def _attach(method: str, model: torch.nn.Module) -> torch.nn.Module:
    case = CASES[method]
    return lorakit.attach(model, method, **case.options, **case.runtime(model))


@pytest.fixture(params=BASES)
def base(request: pytest.FixtureRequest) -> str:
    return request.param


# --- the quantized weight itself -----------------------------------------------------------------------
@pytest.mark.parametrize("kind, tol", [("nf4", 0.12), ("int8", 0.01), ("bnb-nf4", 0.12), ("bnb-int8", 0.01)])
def test_quantized_weights_dequantize_close_to_the_original(kind: str, tol: float, saved_base: Path) -> None:
    dense = tiny_llama()
    model = quantized_base(kind, saved_base)
    layers = quantized_layers(model)
    linears = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert sorted(layers) == sorted(linears)  # every base linear but the head
    assert not quant.is_quantized(model.lm_head)
    for name in linears:
        w0 = dense.get_submodule(name).weight
        q = model.get_submodule(name)
        w = quant.dequantize_weight(q, torch.float32)
        assert w.shape == w0.shape
        assert 0 < (w - w0).norm() / w0.norm() < tol


@pytest.mark.parametrize("kind, bits", [("nf4", 4.2), ("int8", 8.3)])
def test_bits_per_weight(kind: str, bits: float) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(1024, 512))
    lorakit.quantize(model, kind)
    assert quant.weight_bytes(model[0]) * 8 / (1024 * 512) <= bits


def test_bnb_cpu_repacking_does_not_move_the_weights(saved_base: Path) -> None:
    """bitsandbytes repacks a 4-bit weight into a CPU kernel layout (bf16 scales) on an eval forward without grad
    (with AVX512-BF16): reading the weight does not change it, and once an adapter wraps the layer it keeps one
    layout, so its weights stay the same."""
    model = quantized_base("bnb-nf4", saved_base)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, q.in_features)
    with torch.no_grad():
        packed = q(x)  # may repack
        torch.testing.assert_close(q(x), packed, rtol=0, atol=0)
    quant.dequantize_weight(q)
    with torch.no_grad():
        torch.testing.assert_close(q(x), packed, rtol=0, atol=0)  # reading it moved nothing
    AdaptedLayer(q)
    before = quant.dequantize_weight(q).clone()
    for _ in range(2):
        with torch.no_grad():
            y = q(x)
        torch.testing.assert_close(quant.dequantize_weight(q), before, rtol=0, atol=0)
        torch.testing.assert_close(y, x @ before.t(), rtol=1e-5, atol=1e-5)


# --- the contract matrix on quantized bases --------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("method", SUPPORTED)
def test_trains_on_a_quantized_base(method: str, base: str, saved_base: Path, device: torch.device) -> None:
    model = _attach(method, quantized_base(base, saved_base, device=device)).train()
    assert all(layer.quant is not None for _, layer in adapted_layers(model))
    frozen = {n: quant.dequantize_weight(m).clone() for n, m in model.named_modules() if quant.is_quantized(m)}
    losses = train_losses(model, batch_for(model), CASES[method].lr)
    assert losses[-1] < losses[0]
    for n, w in frozen.items():  # the quantized base never moved
        torch.testing.assert_close(quant.dequantize_weight(model.get_submodule(n)), w, rtol=0, atol=0)


@pytest.mark.parametrize("method", SUPPORTED)
def test_save_load_and_merged_export(method: str, base: str, saved_base: Path, tmp_path: Path) -> None:
    model = _attach(method, quantized_base(base, saved_base))
    _perturb(model)
    batch = batch_for(model)
    ref = output_of(model, batch)
    lorakit.save(model, tmp_path / "a")
    fresh = lorakit.load(quantized_base(base, saved_base), tmp_path / "a")
    torch.testing.assert_close(output_of(fresh, batch), ref, rtol=0, atol=0)
    # merged export: dense W = dequant(Q) + dW, equal to the quantized base + adapter
    lorakit.dequantize(fresh)
    assert not quantized_layers(fresh)
    lorakit.detach(fresh, merge=True)
    assert not any(isinstance(m, AdaptedLayer) for m in fresh.modules())
    # bitsandbytes int8 multiplies with int8 activations where the plain path calls it (DoRA); dense does not
    tol = 1e-2 if base == "bnb-int8" else 1e-4
    torch.testing.assert_close(output_of(fresh, batch), ref, rtol=tol, atol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("method", [m for m in SUPPORTED if m != "dora"])
def test_fused_path_runs_on_quantized_weights_and_equals_the_reference(method: str, base: str,
                                                                       saved_base: Path, device: torch.device) -> None:
    model = _attach(method, quantized_base(base, saved_base, device=device)).train()
    _perturb(model)
    batch = batch_for(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(enabled: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        with fused(enabled):
            before = fused_calls()
            out = model(**batch)
            calls = fused_calls() - before
            grads = torch.autograd.grad(out.loss, params)
        return out.logits.detach(), [g.detach() for g in grads], calls

    ref_out, ref_grads, ref_calls = run(False)
    out, grads, calls = run(True)
    assert ref_calls == 0 and calls == len(adapter_modules(model))  # the fast path ran on every layer
    # bitsandbytes int8 multiplies with int8 activations in the reference path; the fused path dequantizes W
    tol = 2e-2 if base == "bnb-int8" else 1e-4
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * max(1.0, float(r.abs().max())))


# --- the base fingerprint sees through quantization -------------------------------------------------------
@pytest.mark.parametrize("trained_on, loaded_on", [("nf4", "dense"), ("dense", "nf4"), ("bnb-nf4", "dense"),
                                                   ("dense", "bnb-nf4"), ("bnb-nf4", "nf4"), ("int8", "bnb-int8")])
def test_an_adapter_loads_across_quantizations_of_its_base(trained_on: str, loaded_on: str, saved_base: Path,
                                                          tmp_path: Path) -> None:
    def make(kind: str) -> torch.nn.Module:
        return tiny_llama() if kind == "dense" else quantized_base(kind, saved_base)

    model = lorakit.attach(make(trained_on), "lora", r=4)
    _perturb(model)
    batch = batch_for(model)
    ref = output_of(model, batch)
    lorakit.save(model, tmp_path / "a")
    other = lorakit.load(make(loaded_on), tmp_path / "a")
    # the adapter is the same; the outputs differ only by the bases' quantization error
    assert (output_of(other, batch) - ref).abs().max() < 0.5
    with pytest.raises(lorakit.IncompatibleAdapterError, match="different base weights"):
        lorakit.load(tiny_llama(seed=5), tmp_path / "a")


def test_a_quantized_adapter_is_refused_on_a_different_quantized_base(saved_base: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = lorakit.attach(quantized_base("bnb-nf4", saved_base), "lora", r=4)
    lorakit.save(model, tmp_path / "a")
    tiny_llama(seed=5).save_pretrained(tmp_path / "other")
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "other", device_map={"": "cpu"},
                                                 quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    for target in (other, lorakit.quantize(tiny_llama(seed=5), "nf4")):
        before = output_of(target, batch_for(target))
        with pytest.raises(lorakit.IncompatibleAdapterError, match="different base weights"):
            lorakit.load(target, tmp_path / "a")
        assert not lorakit.adapters(target) and not list(adapted_layers(target))
        torch.testing.assert_close(output_of(target, batch_for(target)), before, rtol=0, atol=0)


# --- bad input: clear errors, model unchanged ---------------------------------------------------------------
def _state(model: torch.nn.Module) -> dict[str, Any]:
    return {"out": output_of(model, batch_for(model)), "flags": [p.requires_grad for p in model.parameters()],
            "types": [type(m) for m in model.modules()]}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, Any]) -> None:
    after = _state(model)
    torch.testing.assert_close(after["out"], before["out"], rtol=0, atol=0)
    assert after["flags"] == before["flags"] and after["types"] == before["types"]


def test_unknown_quantization_is_refused() -> None:
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(lorakit.ConfigError, match="unknown quantization 'int4'.*nf4"):
        lorakit.quantize(model, "int4")
    _assert_unchanged(model, before)


def test_quantizing_twice_or_after_attaching_is_refused() -> None:
    model = lorakit.quantize(tiny_llama(), "nf4")
    before = _state(model)
    with pytest.raises(lorakit.AdapterStateError, match="already quantized"):
        lorakit.quantize(model, "int8")
    _assert_unchanged(model, before)
    adapted = lorakit.attach(tiny_llama(), "lora", r=4)
    before = _state(adapted)
    with pytest.raises(lorakit.AdapterStateError, match="before attaching"):
        lorakit.quantize(adapted, "nf4")
    _assert_unchanged(adapted, before)


@pytest.mark.parametrize("method", ["delta-lora", "full"])
@pytest.mark.parametrize("kind", ["nf4", "bnb-nf4"])
def test_methods_that_write_the_base_refuse_a_quantized_one(method: str, kind: str, saved_base: Path) -> None:
    model = quantized_base(kind, saved_base)
    before = _state(model)
    with pytest.raises(lorakit.ConfigError, match=f"'{method}' cannot train on a quantized base"):
        lorakit.attach(model, method, **CASES[method].options)
    _assert_unchanged(model, before)
    assert not lorakit.adapters(model)


@pytest.mark.parametrize("kind", ["nf4", "bnb-nf4"])
def test_merging_in_place_into_quantized_weights_is_refused(kind: str, saved_base: Path) -> None:
    model = lorakit.attach(quantized_base(kind, saved_base), "dora", r=4)
    _perturb(model)
    before = _state(model)
    with pytest.raises(lorakit.AdapterStateError, match="cannot merge in place into a quantized base"):
        lorakit.merge(model)
    with pytest.raises(lorakit.AdapterStateError, match="quantized"):
        lorakit.detach(model, merge=True)
    _assert_unchanged(model, before)
    assert not any(layer.merged for _, layer in adapted_layers(model))


def test_dequantize_keeps_the_base_identity(tmp_path: Path) -> None:
    """After dequantize a lorakit-quantized model still has its original fingerprint: adapters still load."""
    model = lorakit.attach(lorakit.quantize(tiny_llama(), "nf4"), "lora", r=4)
    lorakit.save(model, tmp_path / "a")
    plain = lorakit.dequantize(lorakit.quantize(tiny_llama(), "nf4"))
    lorakit.load(plain, tmp_path / "a")
    lorakit.merge(plain)  # dense now: merging works


def test_train_config_refuses_quantized_delta_lora_and_fsdp(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    from .fixtures_train import make_config

    for method, training, match in [("delta-lora", {}, "cannot train on a quantized base"),
                                    ("lora", {"fsdp": True}, "FSDP")]:
        cfg = make_config(tiny_run, tmp_path / method, method=method, model={"quantize": "nf4"}, training=training)
        with pytest.raises(lorakit.ConfigError, match=match):
            lorakit.load_config(cfg)
    cfg = make_config(tiny_run, tmp_path / "bad", model={"quantize": "q3"})
    with pytest.raises(lorakit.ConfigError, match="model.quantize"):
        lorakit.load_config(cfg)


# --- end to end: train on a quantized base, then merge to a plain checkpoint ----------------------------------
@pytest.mark.parametrize("kind", ["nf4", "bnb-nf4"])
def test_cli_trains_qlora_and_merges_to_a_plain_checkpoint(kind: str, tiny_run: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main
    from lorakit.train.loading import load_trained

    from .fixtures_train import make_config

    out = tmp_path / "run"
    cfg = make_config(tiny_run, out, model={"quantize": kind})
    assert main(["train", str(cfg)]) == 0, capsys.readouterr().err
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("kind") == "eval"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1e-3
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["extra"]["quantize"] == kind
    trained, _ = load_trained(out / "adapter")  # reloads the base quantized as it was trained
    assert quantized_layers(trained)
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out / "adapter"), "--out", str(merged)]) == 0
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert not quantized_layers(plain)
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, trained.eval()(ids).logits, rtol=1e-4, atol=1e-4)


# --- PEFT on bitsandbytes bases (what PEFT's QLoRA and vLLM use) -------------------------------------------------
def _one_layout(model: torch.nn.Module) -> torch.nn.Module:
    """Keep bitsandbytes' 4-bit layers of a PEFT model in one layout, as lorakit does for the layers it adapts:
    otherwise bitsandbytes' CPU inference kernel (bf16 block scales) runs on PEFT's side only."""
    for m in model.modules():
        quant.pin_layout(m)
    return model


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-int8"])
def test_exported_qlora_adapter_loads_in_peft_on_the_bnb_base(kind: str, saved_base: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = lorakit.attach(quantized_base(kind, saved_base), "lora", r=4)
    _perturb(model)
    batch = batch_for(model)
    ref = output_of(model, batch)
    lorakit.export_peft(model, tmp_path / "peft")
    theirs = _one_layout(peft.PeftModel.from_pretrained(quantized_base(kind, saved_base), tmp_path / "peft").eval())
    assert any(type(m).__module__ == "peft.tuners.lora.bnb" for m in theirs.modules())  # PEFT's QLoRA layers
    # bnb int8 multiplies int8 activations in PEFT's path; lorakit's fused path uses the dequantized weight
    tol = 2e-2 if kind == "bnb-int8" else 1e-4
    torch.testing.assert_close(output_of(theirs, batch), ref, rtol=tol, atol=tol)


def test_peft_qlora_adapter_loads_into_lorakit(saved_base: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = quantized_base("bnb-nf4", saved_base)
    theirs = _one_layout(peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    _perturb(theirs)
    batch = batch_for(theirs)
    ref = output_of(theirs.eval(), batch)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorakit.load(quantized_base("bnb-nf4", saved_base), tmp_path / "peft")
    assert all(layer.quant == "bnb-nf4" for _, layer in adapted_layers(ours))
    torch.testing.assert_close(output_of(ours, batch), ref, rtol=1e-4, atol=1e-4)


# --- serving a QLoRA adapter on its quantized base ----------------------------------------------------------------
def test_serve_answers_a_qlora_adapter_on_the_quantized_base(tmp_path: Path) -> None:
    import threading
    import time

    openai = pytest.importorskip("openai")
    uvicorn = pytest.importorskip("uvicorn")
    from lorakit.serve import Engine, bind, create_app
    from lorakit.testing import DEMO_DATA, build_tiny_llama, build_tokenizer, record_texts

    tok = build_tokenizer(record_texts(DEMO_DATA))
    build_tiny_llama(len(tok), hidden=64).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = lorakit.attach(lorakit.quantize(build_tiny_llama(len(tok), hidden=64), "nf4"), "lora", r=4)
    _perturb(model, seed=11)
    lorakit.save(model, tmp_path / "a")
    prompt = "Question: What number comes after 7?\nAnswer:"
    want = hf_greedy(model.eval(), tok, [prompt], 6)[0]

    engine = Engine.from_pretrained(str(tmp_path / "base"), {"a": str(tmp_path / "a")}, device="cpu",
                                    quantize="nf4", base_name="base")
    assert quantized_layers(engine.model)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        host, port = sock.getsockname()[:2]
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="x", max_retries=0, timeout=60)
        got = client.completions.create(model="a", prompt=prompt, max_tokens=6, temperature=0).choices[0].text
        assert got == want
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.mark.parametrize("kind", ["nf4", "int8", "bnb-nf4"])
def test_saved_activation_bytes_on_a_quantized_base(kind: str, saved_base: Path) -> None:
    """`lorakit compare` counts the bytes saved for backward; quantized weights (wrapper tensors without a storage
    of their own) are the model's, not activations: the same count as the dense base (LoRA saves the same)."""
    from lorakit.evaluation.generation import saved_activation_bytes, tensor_storages

    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))

    def count(model: torch.nn.Module) -> int:
        lorakit.attach(model, "lora", r=4)
        return saved_activation_bytes(model, lambda: model(input_ids=ids, labels=ids).loss)

    q = quantized_base(kind, saved_base)
    weight = q.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert tensor_storages(weight) and all(n > 0 for _, n in tensor_storages(weight))
    dense, quantized = count(tiny_llama()), count(q)
    assert dense > 0 and abs(quantized - dense) <= 0.1 * dense


# --- the dense weights of a quantized base (for inits from the quantization error) -----------------------------
def test_dense_weights_read_from_a_state_dict_or_the_checkpoint(tmp_path: Path) -> None:
    from lorakit.util.dense_weights import DenseWeights

    model = _tiny_llama(hidden_size=64)
    model.save_pretrained(tmp_path / "base")
    name = "model.layers.0.self_attn.q_proj"
    want = model.get_submodule(name).weight.detach().float()
    for source in (model.state_dict(), tmp_path / "base", str(tmp_path / "base" / "model.safetensors"),
                   {k.removeprefix("model."): v for k, v in model.state_dict().items()}):  # the inner model's keys
        got = DenseWeights(source).weight(name)
        assert got.dtype == torch.float32 and torch.equal(got, want)
    with pytest.raises(lorakit.ConfigError, match="no weight for 'model.nope'"):
        DenseWeights(tmp_path / "base").weight("model.nope")
    with pytest.raises(lorakit.ConfigError, match="no \\*.safetensors"):
        DenseWeights(tmp_path)
    with pytest.raises(lorakit.ConfigError, match="not a file, a directory"):
        DenseWeights(str(tmp_path / "missing"))
