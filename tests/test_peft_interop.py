"""Interoperability with Hugging Face PEFT and plain transformers.

- lorakit adapters exported with :func:`lorakit.export_peft` load with ``peft.PeftModel.from_pretrained`` and
  give the same logits (1e-5 relative, fp32): LoRA natively, every other method as plain LoRA.
- PEFT-saved LoRA and DoRA adapters load with :func:`lorakit.load` and give PEFT's logits.
- The truncated-SVD export reports its error, and is exact at full rank.
- A merged model saved with ``save_pretrained`` loads with transformers in a process that never imports lorakit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.adapt.quantize import quantized_layers
from lorakit.formats import peft_export as peft_format
from lorakit.methods.lora_xs import LoraXs

from .conftest import MODELS, batch_for, output_of, tiny_gpt2, tiny_llama
from .test_contract import CASES, _perturb

peft = pytest.importorskip("peft")

# PEFT warns about fan_in_fan_out on GPT-2 and about embedding layers; these are expected here.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius distance of ``a`` from ``b``."""
    return ((a - b).norm() / b.norm()).item()


def peft_output(make, path, batch) -> torch.Tensor:
    """Logits of a fresh base model with the PEFT adapter in ``path`` loaded by PEFT itself."""
    model = peft.PeftModel.from_pretrained(make(), str(path)).eval()
    return output_of(model, batch)


def train_steps(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int, lr: float) -> None:
    """A few real optimizer steps with the method's callbacks (Delta-LoRA's base drift, rank pruning)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    callbacks = lorakit.training_callbacks(model, opt, total_steps=steps)
    for _ in range(steps):
        callbacks.regularize(model(**batch).loss).backward()
        callbacks.before_step()
        opt.step()
        callbacks.step()
        opt.zero_grad()
    model.eval()


# --- lorakit -> PEFT ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_exported_lora_loads_in_peft(model_name: str, tmp_path) -> None:
    make = MODELS[model_name]
    model = make()
    batch = batch_for(model)
    base = output_of(model, batch)
    lorakit.attach(model, "lora", r=4, alpha=6, use_rslora=True)
    _perturb(model)
    ref = output_of(model, batch)
    assert rel(base, ref) > 1e-2  # the adapter changes the model: the comparison below means something

    report = lorakit.export_peft(model, tmp_path / "peft", base_model_name_or_path="tiny")
    assert report["mode"] == "native" and report["exact"] and report["max_error"] < 1e-6
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 6
    assert config["use_rslora"] is True and config["use_dora"] is False
    assert config["base_model_name_or_path"] == "tiny"
    assert config["fan_in_fan_out"] is (model_name == "gpt2")
    expected = {"llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
                "gpt2": ["c_attn", "c_fc", "c_proj"]}[model_name]
    assert config["target_modules"] == expected
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    first = lorakit.adapters(model)["default"].targets[0]
    layer = model.get_submodule(first)
    a = tensors[f"base_model.model.{first}.lora_A.weight"]
    b = tensors[f"base_model.model.{first}.lora_B.weight"]
    assert a.shape == (4, layer.weight.shape[1]) and b.shape == (layer.weight.shape[0], 4)

    got = peft_output(make, tmp_path / "peft", batch)
    assert rel(got, ref) < 1e-5


def test_exported_embedding_lora_loads_in_peft(tmp_path) -> None:
    model = tiny_llama()
    batch = batch_for(model)
    lorakit.attach(model, "lora", r=4, targets=["embed_tokens", "q_proj"], dropout=0.1)
    _perturb(model)
    model.eval()
    ref = output_of(model, batch)
    lorakit.export_peft(model, tmp_path / "peft")
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 128)  # (r, vocab)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 4)  # (dim, r)
    assert rel(peft_output(tiny_llama, tmp_path / "peft", batch), ref) < 1e-5


@pytest.mark.parametrize("method", sorted(CASES))
def test_every_method_exports_to_peft_and_back(method: str, tmp_path) -> None:
    """Every registered method (its contract-matrix options) -> PEFT gives the same logits, and the PEFT
    directory loads back into lorakit with the same logits."""
    case = CASES[method]
    model = case.base(tiny_llama())
    batch = batch_for(model)
    base = output_of(model, batch)
    lorakit.attach(model, method, **case.options, **case.runtime(model))
    if method == "full":
        with pytest.raises(lorakit.ConfigError, match="full fine-tuning"):
            lorakit.export_peft(model, tmp_path / "peft")
        return
    train_steps(model, batch, steps=4, lr=case.lr)  # Delta-LoRA's base moves from step 3; rank1-sum prunes
    _perturb(model)
    ref = output_of(model, batch)
    assert rel(base, ref) > 1e-2

    report = lorakit.export_peft(model, tmp_path / "peft")
    assert report["exact"] and report["max_error"] < 1e-5, report
    # LoRA in disguise (and DoRA) keep their own A, B, alpha; the others are folded into exact factors
    native = next(iter(lorakit.adapter_modules(model).values())).lora_form() is not None
    assert report["mode"] == ("native" if native else "fold"), report["mode"]
    # PEFT on the base as lorakit computes it (a quantized one dequantized: PEFT does not read torchao's layers)
    def peft_base() -> torch.nn.Module:
        m = case.base(tiny_llama())
        return lorakit.dequantize(m) if quantized_layers(m) else m
    assert rel(peft_output(peft_base, tmp_path / "peft", batch), ref) < 1e-5

    back = case.base(tiny_llama())
    lorakit.load(back, tmp_path / "peft")
    assert lorakit.adapters(back)["default"].method == ("dora" if method == "dora" else "lora")
    assert rel(output_of(back, batch), ref) < 1e-5


def test_delta_lora_exports_its_base_drift(tmp_path) -> None:
    """After the base update started, the export is relative to the original base weights: without the drift
    the PEFT model would be plain LoRA on W0, which this model is not."""
    model = tiny_llama()
    batch = batch_for(model)
    lorakit.attach(model, "delta-lora", r=4, delta_start=1, delta_lambda=0.5)
    train_steps(model, batch, steps=4, lr=1e-2)
    ref = output_of(model, batch)
    report = lorakit.export_peft(model, tmp_path / "peft")
    assert report["mode"] == "fold" and report["r"] == 8  # (1 + lambda) s B A - lambda s B_K A_K
    assert rel(peft_output(tiny_llama, tmp_path / "peft", batch), ref) < 1e-5
    lora_only = lorakit.export_peft(model, tmp_path / "r4", rank=4)  # the user's choice: smaller, approximate
    assert not lora_only["exact"] and lora_only["max_error"] > 1e-4


# --- truncated SVD -------------------------------------------------------------------------------------------
def test_svd_export_reports_error_and_is_exact_at_full_rank(tmp_path) -> None:
    model = tiny_llama()
    batch = batch_for(model)
    lorakit.attach(model, "lora", r=4)
    _perturb(model)
    ref = output_of(model, batch)

    low = lorakit.export_peft(model, tmp_path / "r2", rank=2)
    assert low["mode"] == "svd" and not low["exact"] and low["r"] == 2 and low["lora_alpha"] == 2
    assert all(v["rank"] == 2 and v["error"] > 1e-3 for v in low["layers"].values())
    # the reported error is the real one: recompute it from the file against delta_weight
    tensors = load_file(str(tmp_path / "r2" / "adapter_model.safetensors"))
    target, ad = next(iter(lorakit.adapter_modules(model).items()))
    dw = ad.delta_weight(model.get_submodule(target).weight)
    approx = tensors[f"base_model.model.{target}.lora_B.weight"] @ tensors[f"base_model.model.{target}.lora_A.weight"]
    assert rel(approx, dw) == pytest.approx(low["layers"][target]["error"], rel=1e-3)
    assert rel(peft_output(tiny_llama, tmp_path / "r2", batch), ref) > 1e-4
    assert "error" in peft_format.format_report(low)

    full = lorakit.export_peft(model, tmp_path / "r4", rank=4)
    assert full["exact"] and full["max_error"] < 1e-6

    # DoRA's update is dense: with a rank it is exported as plain LoRA by SVD, exact at full rank
    dora = tiny_llama()
    lorakit.attach(dora, "dora", r=4)
    _perturb(dora)
    dref = output_of(dora, batch)
    approx_report = lorakit.export_peft(dora, tmp_path / "d2", rank=2)
    assert not approx_report["use_dora"] and approx_report["max_error"] > 1e-2
    exact_report = lorakit.export_peft(dora, tmp_path / "d32", rank=32)  # >= min(d_out, d_in) of every layer
    assert exact_report["mode"] == "svd" and exact_report["exact"] and exact_report["max_error"] < 1e-5
    assert rel(peft_output(tiny_llama, tmp_path / "d32", batch), dref) < 1e-5


def test_export_refusals(tmp_path, monkeypatch) -> None:
    model = tiny_llama()
    lorakit.attach(model, "lora-xs", r=4)
    with pytest.raises(lorakit.ConfigError, match="argument 'rank' must be >= 1"):
        lorakit.export_peft(model, tmp_path / "x", rank=0)
    lorakit.merge(model)
    with pytest.raises(lorakit.AdapterStateError, match="unmerge"):
        lorakit.export_peft(model, tmp_path / "x")
    lorakit.unmerge(model)
    # a method with no known low-rank form needs a rank
    monkeypatch.setattr(LoraXs, "lora_factors", lambda ad, layer: None)
    with pytest.raises(lorakit.ConfigError, match="no exact LoRA form; pass rank"):
        lorakit.export_peft(model, tmp_path / "x")
    assert lorakit.export_peft(model, tmp_path / "x", rank=4)["mode"] == "svd"
    # a fold that disagrees with delta_weight is an error, not a silent export
    monkeypatch.setattr(LoraXs, "lora_factors", lambda ad, layer: (ad.lora_B, ad.lora_A))
    with pytest.raises(lorakit.AdapterStateError, match="disagrees with its delta_weight"):
        lorakit.export_peft(model, tmp_path / "x")


# --- PEFT -> lorakit ---------------------------------------------------------------------------------------
PEFT_CASES = {
    "llama-lora-embedding": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"]}),
    "llama-dora-rslora": ("llama", {"target_modules": "all-linear", "use_dora": True, "use_rslora": True}),
    "gpt2-dora": ("gpt2", {"target_modules": ["c_attn", "c_fc"], "use_dora": True}),
    "gpt2-lora-dropout": ("gpt2", {"target_modules": ["c_attn", "c_proj"], "lora_dropout": 0.1}),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_loads_into_lorakit(case: str, tmp_path) -> None:
    model_name, options = PEFT_CASES[case]
    make = MODELS[model_name]
    torch.manual_seed(5)
    # init_lora_weights=False: random B, so the adapter is not a no-op
    pm = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options)).eval()
    batch = batch_for(pm)
    ref = output_of(pm, batch)
    pm.save_pretrained(str(tmp_path / "peft"))

    model = make()
    assert rel(output_of(model, batch), ref) > 1e-2
    lorakit.load(model, tmp_path / "peft")
    rec = lorakit.adapters(model)["default"]
    assert rec.method == ("dora" if options.get("use_dora") else "lora")
    assert rec.config.use_rslora is bool(options.get("use_rslora"))
    assert rel(output_of(model, batch), ref) < 1e-5
    # and it is a normal lorakit adapter from here on: save/load round trip in lorakit's own format
    lorakit.save(model, tmp_path / "lk")
    again = make()
    lorakit.load(again, tmp_path / "lk")
    again.eval()  # lorakit.load builds adapter modules (their dropout) in training mode
    assert rel(output_of(again, batch), ref) < 1e-5


def _write_peft(path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, **config}))
    save_file(tensors, str(path / "adapter_model.safetensors"))


def test_peft_load_refusals(tmp_path) -> None:
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    k = "base_model.model.model.layers.0.self_attn.k_proj"
    ok = {f"{q}.lora_A.weight": torch.zeros(2, 32), f"{q}.lora_B.weight": torch.zeros(32, 2)}
    bad = {
        "ia3": ({"peft_type": "IA3"}, ok, "not LoRA"),
        "bias": ({"bias": "all"}, ok, "bias"),
        "modules_to_save": ({"modules_to_save": ["lm_head"]}, ok, "modules_to_save"),
        "pissa": ({"init_lora_weights": "pissa"}, ok, "modified base weights"),
        "alpha_pattern": ({"alpha_pattern": {"k_proj": 8}},
                          {**ok, f"{k}.lora_A.weight": torch.zeros(2, 32), f"{k}.lora_B.weight": torch.zeros(16, 2)},
                          "one rank and one alpha"),
        "foreign key": ({}, {**ok, "base_model.model.lm_head.weight": torch.zeros(128, 32)}, "cannot map"),
        "shape": ({}, {f"{q}.lora_A.weight": torch.zeros(2, 31), f"{q}.lora_B.weight": torch.zeros(32, 2)},
                  "wrong shape"),
        "missing module": ({}, {f"{q}x.lora_A.weight": torch.zeros(2, 32), f"{q}x.lora_B.weight": torch.zeros(32, 2)},
                           "missing"),
    }
    for label, (config, tensors, message) in bad.items():
        _write_peft(tmp_path / label.replace(" ", "_"), config, tensors)
        model = tiny_llama()
        with pytest.raises(lorakit.LorakitError, match=message):
            lorakit.load(model, tmp_path / label.replace(" ", "_"))
        assert lorakit.adapters(model) == {}, label  # the model is left unchanged
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(lorakit.AdapterFileError, match="pickle"):
        lorakit.load(tiny_llama(), tmp_path / "pickled")


# --- plain transformers ---------------------------------------------------------------------------------
_READER = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
ids = torch.tensor(json.load(open(sys.argv[2])))
with torch.no_grad():
    logits = model(input_ids=ids).logits.float().contiguous()
save_file({"logits": logits}, sys.argv[3])
assert not any(m == "lorakit" or m.startswith("lorakit.") for m in sys.modules), "lorakit was imported"
"""


def test_merged_checkpoint_loads_without_lorakit(tmp_path) -> None:
    model = tiny_llama()
    batch = batch_for(model)
    lorakit.attach(model, "lora", r=4)
    _perturb(model)
    ref = output_of(model, batch)
    lorakit.detach(model, merge=True)
    model.save_pretrained(str(tmp_path / "merged"))
    assert "lorakit" not in (tmp_path / "merged" / "config.json").read_text()
    (tmp_path / "ids.json").write_text(json.dumps(batch["input_ids"].tolist()))
    proc = subprocess.run([sys.executable, "-c", _READER, str(tmp_path / "merged"), str(tmp_path / "ids.json"),
                           str(tmp_path / "logits.safetensors")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    assert rel(got, ref) < 1e-5


def test_generate_with_adapter_matches_merged_model() -> None:
    model = tiny_gpt2()
    lorakit.attach(model, "lora", r=4)
    _perturb(model)
    prompt = torch.tensor([[1, 5, 9, 3]])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = model.generate(prompt, **kwargs)
        plain = lorakit.detach(model, merge=True).generate(prompt, **kwargs)
        base = tiny_gpt2().generate(prompt, **kwargs)
    assert torch.equal(adapted, plain)
    assert not torch.equal(adapted, base)  # the adapter matters for what is generated
