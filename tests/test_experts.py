"""Mixture-of-experts experts as adapter targets (lorakit.core.experts): tiny Mixtral and Qwen2-MoE.

Every layer method of the contract matrix on the experts' 3-D parameters: the starting function, merge, save/load,
detach; PEFT's target_parameters export loaded by PEFT; the fused path per expert; no dense expert delta in a
training step; the errors.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit
from lorakit.adapt.records import get_record
from lorakit.core.experts import AdaptedExperts
from lorakit.core.lowrank import fused_calls

from .conftest import batch_for, output_of, perturb
from .test_contract import CASES, LAYER_CASES


def tiny_mixtral(seed: int = 0, hidden: int = 32, inter: int = 48) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=96, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, tie_word_embeddings=False)
    return MixtralForCausalLM(cfg).eval()


def tiny_qwen_moe(seed: int = 0) -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                         shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return Qwen2MoeForCausalLM(cfg).eval()


MOE = {"mixtral": tiny_mixtral, "qwen2-moe": tiny_qwen_moe}


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _expert_targets(model: nn.Module, name: str = "default") -> list[str]:
    return [t for t in get_record(model, name).targets if ".experts." in t]


@pytest.mark.parametrize("arch", sorted(MOE))
def test_all_linear_covers_the_experts_not_the_router(arch: str) -> None:
    model = MOE[arch]()
    names, batch = _names(model), batch_for(model, seq=12)
    before = output_of(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every 3-D parameter is covered: no "left frozen" warning
        lorakit.attach(model, "lora", r=4)
    targets = get_record(model, "default").targets
    experts = _expert_targets(model)
    assert len(experts) == 2 * 2 * 4  # 2 layers x (gate_up, down) x 4 experts
    assert "model.layers.0.mlp.experts.gate_up_proj.3" in experts and "model.layers.1.mlp.experts.down_proj.0" in experts
    assert not any(t.endswith(("mlp.gate", "shared_expert_gate")) for t in targets)  # routers, scalar gates
    assert isinstance(model.model.layers[0].mlp.experts, AdaptedExperts)
    torch.testing.assert_close(output_of(model, batch), before, rtol=0, atol=1e-6)  # LoRA starts at B = 0
    lorakit.detach(model, merge=False)
    assert _names(model) == names and not any(isinstance(m, AdaptedExperts) for m in model.modules())
    torch.testing.assert_close(output_of(model, batch), before, rtol=0, atol=0)


def test_experts_named_by_their_parameter_or_one_by_one() -> None:
    model = tiny_mixtral()
    lorakit.attach(model, "lora", r=2, targets=["experts.down_proj"])  # PEFT's target_parameters spelling
    assert get_record(model, "default").targets == [f"model.layers.{i}.mlp.experts.down_proj.{e}"
                                                    for i in range(2) for e in range(4)]
    lorakit.attach(model, "lora", name="two", r=2, targets=r"model\.layers\.0\.mlp\.experts\.gate_up_proj\.[02]")
    assert get_record(model, "two").targets == ["model.layers.0.mlp.experts.gate_up_proj.0",
                                                "model.layers.0.mlp.experts.gate_up_proj.2"]
    assert not isinstance(model.model.layers[1].mlp.experts.gate_up_proj[0], lorakit.core.layers.AdaptedLayer)
    lorakit.remove(model, "default")
    assert not isinstance(model.model.layers[1].mlp.experts, AdaptedExperts)  # nothing left there: unwrapped
    assert isinstance(model.model.layers[0].mlp.experts, AdaptedExperts)


@pytest.mark.parametrize("method", LAYER_CASES)
def test_every_layer_method_on_experts(method: str, tmp_path: Path) -> None:
    """Through the contract, per expert: the start, the trained function, merge == unmerged, save/load, detach."""
    case = CASES[method]
    model = case.base(tiny_mixtral())
    batch = batch_for(model, seq=12)
    before = output_of(model, batch)
    options = {**case.options, "r": 2} if "r" in case.options else case.options
    if method == "loftq":  # starts from a quantized base's error; experts are not quantized: refused, untouched
        names = _names(model)
        with pytest.raises(lorakit.ConfigError, match=r"experts\.gate_up_proj\.0' is not quantized"):
            lorakit.attach(model, method, **options, **case.runtime(model))
        assert _names(model) == names and not any(isinstance(m, AdaptedExperts) for m in model.modules())
        return
    lorakit.attach(model, method, **options, **case.runtime(model))
    assert len(_expert_targets(model)) == 16
    if case.starts_unchanged:
        torch.testing.assert_close(output_of(model, batch), before, rtol=1e-5, atol=1e-6)
    perturb(model, buffers=True)
    case.trained(model, "default")
    trained = output_of(model, batch)
    assert (trained - before).abs().max() > 1e-3
    lorakit.save(model, tmp_path / "a")
    lorakit.merge(model)
    torch.testing.assert_close(output_of(model, batch), trained, rtol=1e-4, atol=1e-5)
    lorakit.unmerge(model)
    lorakit.detach(model, merge=False)
    fresh = case.base(tiny_mixtral())
    lorakit.load(fresh, tmp_path / "a")
    torch.testing.assert_close(output_of(fresh, batch), trained, rtol=1e-5, atol=1e-6)
    lorakit.detach(fresh, merge=True)  # merged into the 3-D parameters, names as the model's own
    assert _names(fresh) == _names(tiny_mixtral())
    torch.testing.assert_close(output_of(fresh, batch), trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("arch", "method", "options"), [
    ("mixtral", "lora", {"r": 4, "alpha": 8}),
    ("mixtral", "lora", {"r": 4, "use_rslora": True, "targets": ["gate_up_proj"]}),  # experts only, one param
    ("mixtral", "lora", {"r": 2, "targets": r"model\.layers\.0\.mlp\.experts\.down_proj\.[13]"}),  # some experts
    ("mixtral", "vera", {"r": 8}),  # exact fold, scale 1
    ("qwen2-moe", "lora", {"r": 4}),
    ("qwen2-moe", "rank1-sum", {"r_init": 4, "target_rank": 2}),
])
def test_peft_export_target_parameters_loads_in_peft(arch: str, method: str, options: dict, tmp_path: Path) -> None:
    from peft import PeftModel

    model = MOE[arch]()
    batch = batch_for(model, seq=12)
    lorakit.attach(model, method, **options)
    perturb(model)
    want = output_of(model, batch)
    report = lorakit.export_peft(model, tmp_path / "peft")
    assert report["exact"] and report["target_parameters"]
    assert all(p.endswith(("experts.gate_up_proj", "experts.down_proj")) for p in report["target_parameters"])
    peft_model = PeftModel.from_pretrained(MOE[arch](), tmp_path / "peft").eval()
    torch.testing.assert_close(output_of(peft_model, batch), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("arch", "options"), [
    ("mixtral", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                 "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}),
    ("mixtral", {"r": 2, "lora_alpha": 3, "use_rslora": True, "target_modules": None,
                 "target_parameters": ["model.layers.1.mlp.experts.down_proj"]}),  # one parameter, one layer
    ("qwen2-moe", {"r": 4, "lora_alpha": 8, "target_modules": None,
                   "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}),
])
def test_a_peft_target_parameters_adapter_loads_with_peft_logits(arch: str, options: dict, tmp_path: Path) -> None:
    """An adapter PEFT made on the experts (lora.ParamWrapper, nested per parameter) loads into lorakit as
    per-expert layers computing what PEFT computes, and exports back to a file PEFT reads the same way."""
    from peft import LoraConfig, PeftModel, get_peft_model

    peft_model = get_peft_model(MOE[arch](), LoraConfig(**options))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)  # PEFT starts at B = 0: give both factors values
    peft_model.save_pretrained(tmp_path / "peft")
    batch = batch_for(peft_model, seq=12)
    want = output_of(peft_model.eval(), batch)
    model = MOE[arch]()
    lorakit.load(model, tmp_path / "peft")
    assert len(_expert_targets(model)) == 4 * len(
        [n for n, _ in peft_model.named_parameters() if ".lora_A." in n and ".experts." in n])
    torch.testing.assert_close(output_of(model, batch), want, rtol=1e-5, atol=1e-5)
    assert lorakit.export_peft(model, tmp_path / "back")["exact"]  # and back again
    again = PeftModel.from_pretrained(MOE[arch](), tmp_path / "back").eval()
    torch.testing.assert_close(output_of(again, batch), want, rtol=1e-5, atol=1e-5)


def test_a_peft_target_parameters_adapter_for_other_weights_is_refused(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_mixtral(), LoraConfig(r=2, target_modules=None,
                                                           target_parameters=["experts.down_proj"]))
    peft_model.save_pretrained(tmp_path / "peft")
    smaller = tiny_mixtral(inter=40)  # the same names, experts of another width
    before = _names(smaller)
    with pytest.raises(lorakit.IncompatibleAdapterError, match="wrong shape"):
        lorakit.load(smaller, tmp_path / "peft")
    assert _names(smaller) == before and not any(isinstance(m, AdaptedExperts) for m in smaller.modules())


def test_peft_export_refuses_dora_experts(tmp_path: Path) -> None:
    model = tiny_mixtral()
    lorakit.attach(model, "dora", r=2, targets=["q_proj", "experts.down_proj"])
    with pytest.raises(lorakit.ConfigError, match="no DoRA form"):
        lorakit.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft" / "adapter_model.safetensors").exists()


def test_experts_take_the_fused_path() -> None:
    """Every adapted layer, each expert's projections included, runs the fused low-rank op (a train-mode step)."""
    model = tiny_mixtral()
    lorakit.attach(model, "lora", r=4)
    perturb(model)
    model.train()
    batch = batch_for(model, batch=4, seq=16)  # 128 token-expert picks over 4 experts: every expert is hit
    calls = fused_calls()
    model(**batch).loss.backward()
    assert fused_calls() - calls == len(lorakit.adapter_modules(model)) == 2 * (4 + 8)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if p.requires_grad and ".experts." in n)


class _Largest(TorchDispatchMode):
    """The largest tensor any op allocates (views of an input's storage, e.g. ``W[e]``, excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.numel = max(self.numel, t.numel())
        return out


def _largest_in_step(model: nn.Module, batch: dict) -> int:
    model.train()
    with _Largest() as probe:
        model(**batch).loss.backward()
    return probe.numel


def test_an_expert_lora_step_forms_no_dense_expert_delta() -> None:
    """Peak memory, op by op: no tensor of a training step is as large as one expert's weight (d_out x d_in),
    so no dense delta W[e] + s B A is formed; PEFT's target_parameters step, which forms it, is caught."""
    from peft import LoraConfig, get_peft_model

    batch = batch_for(tiny_mixtral(hidden=32, inter=256), batch=2, seq=8)  # 16 tokens: activations <= 16 x 512
    expert = 512 * 32  # gate_up_proj of one expert (2 x 256, 32)
    model = tiny_mixtral(hidden=32, inter=256)
    lorakit.attach(model, "lora", r=4, targets=["gate_up_proj", "down_proj"])
    perturb(model)
    assert _largest_in_step(model, batch) < expert
    dense = get_peft_model(tiny_mixtral(hidden=32, inter=256), LoraConfig(
        r=4, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    assert _largest_in_step(dense, batch) >= expert  # the probe sees a dense expert delta when there is one


def test_expert_errors_and_limits() -> None:
    model = tiny_mixtral()
    with pytest.raises(lorakit.TargetError, match="router is not a linear layer"):
        lorakit.attach(model, "lora", r=2, targets=["mlp.gate"])
    lorakit.attach(model, "lora", r=2, name="a", targets=["experts.down_proj"])
    lorakit.attach(model, "lora", r=2, name="b", targets=["experts.down_proj"])
    with pytest.raises(lorakit.AdapterStateError, match="per-row adapters do not reach mixture-of-experts"):
        with lorakit.per_row(model, ["a", "b"]):
            pass

    class Stacked(nn.Module):  # 3-D weights in a layout lorakit does not know: said once, left frozen
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.experts = nn.Parameter(torch.zeros(4, 8, 8))

    with pytest.warns(UserWarning, match=r"left 1 parameter tensor\(s\) of 3 or more dimensions"):
        lorakit.attach(Stacked(), "lora", r=2)


def test_hot_swap_and_combine_on_experts(tmp_path: Path) -> None:
    model = tiny_mixtral()
    batch = batch_for(model, seq=12)
    lorakit.attach(model, "lora", r=4)
    perturb(model, seed=5)
    lorakit.save(model, tmp_path / "one")
    one = output_of(model, batch)
    lorakit.detach(model, merge=False)
    lorakit.attach(model, "lora", r=4)
    perturb(model, seed=6)
    lorakit.hot_swap(model, "default", tmp_path / "one")
    torch.testing.assert_close(output_of(model, batch), one, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def moe_run(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """``tiny_run`` with its base replaced by a tiny Mixtral of the same tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_run["base"])
    base = tmp_path_factory.mktemp("moe") / "base"
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False)).save_pretrained(base)
    tok.save_pretrained(base)
    return {**tiny_run, "base": base}


def test_a_resumed_moe_run_is_the_uninterrupted_run(moe_run, tmp_path: Path) -> None:
    """`lorakit train` on a Mixtral, all-linear (experts included), with a warm-up, dropout and gradient
    accumulation, interrupted by Ctrl-C and resumed: the same adapter, losses and learning rates as straight."""
    from .test_resume import Setting, check_resume

    check_resume(moe_run, tmp_path, Setting(method="lora", warmup_steps=2, dropout=0.1, grad_accum=2, stop_after=3))
    adapter = tmp_path / "resumed" / "adapter"
    meta = __import__("json").loads((adapter / "adapter.json").read_text())
    assert sum(".experts." in t for t in meta["targets"]) == 16
