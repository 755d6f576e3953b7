"""Combining adapters (lorakit.combine): cat is exact, linear/svd/ties/dare follow their formulas and match PEFT."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import lorakit
from lorakit.adapt.combine import disjoint_mean, drop, trim, truncated_svd

from .conftest import batch_for, output_of, tiny_gpt2, tiny_llama
from .test_mixed import _perturb

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def _delta(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s dense update per layer (from its own delta_weight)."""
    return {t: ad.delta_weight(model.get_submodule(t).weight).float()
            for t, ad in lorakit.adapter_modules(model, name).items()}


def _weighted_sum(model: torch.nn.Module, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for n, w in weights.items():
        for t, dw in _delta(model, n).items():
            out[t] = out.get(t, torch.zeros_like(dw)) + w * dw
    return out


def _two_loras(make=tiny_llama) -> torch.nn.Module:
    """Two LoRA adapters of rank 4 with different alphas (one rsLoRA) and overlapping targets."""
    model = make()
    attn = ["q_proj", "v_proj"] if make is tiny_llama else ["c_attn"]
    other = ["v_proj", "down_proj"] if make is tiny_llama else ["c_attn", "c_fc"]
    lorakit.attach(model, "lora", name="a", r=4, alpha=8.0, targets=attn)
    lorakit.attach(model, "lora", name="b", r=4, alpha=6.0, use_rslora=True, targets=other)
    _perturb(model, seed=1)
    return model


# --- formulas --------------------------------------------------------------------------------------------------
def test_cat_is_exact_over_methods_and_target_union() -> None:
    model = tiny_llama()
    lorakit.attach(model, "lora", name="a", r=2, alpha=5.0, targets=["q_proj", "v_proj"])
    lorakit.attach(model, "lora-xs", name="b", r=3, targets=["v_proj", "up_proj"])
    lorakit.attach(model, "vera", name="c", r=8, targets=["q_proj"])
    _perturb(model, seed=2)
    weights = {"a": 0.7, "b": -1.3, "c": 2.0}
    report = lorakit.combine(model, weights, how="cat", name="mix")
    mix = _delta(model, "mix")
    expected = _weighted_sum(model, weights)
    assert sorted(mix) == sorted(expected)  # the union of the targets
    for t, dw in expected.items():
        assert dw.norm() > 1e-2
        torch.testing.assert_close(mix[t], dw, rtol=1e-5, atol=1e-6)
    rec = lorakit.adapters(model)["mix"]
    assert rec.method == "lora" and rec.config.r == 2 + 8 and rec.config.alpha == rec.config.r  # scale 1
    assert not rec.config.use_rslora
    assert report["sum_rel_error"] < 1e-6 and report["layers"]["model.layers.0.self_attn.q_proj"]["rank"] == 10
    assert lorakit.active_adapters(model) == ["mix"]


def test_cat_refuses_dora() -> None:
    model = tiny_llama()
    lorakit.attach(model, "dora", name="a", r=2)
    lorakit.attach(model, "lora", name="b", r=2)
    _perturb(model, seed=2)
    with pytest.raises(lorakit.ConfigError, match="svd"):
        lorakit.combine(model, {"a": 1.0, "b": 1.0}, how="cat")
    assert "mix" not in lorakit.adapters(model)
    # svd works on DoRA's dense (full-rank) update: exact at full rank (k/v_proj are 16 x 32), truncated elsewhere
    report = lorakit.combine(model, {"a": 1.0, "b": 1.0}, how="svd", rank=16)
    layers = report["layers"]
    assert layers["model.layers.0.self_attn.k_proj"]["sum_rel_error"] < 1e-5
    assert layers["model.layers.0.self_attn.q_proj"]["sum_rel_error"] > 1e-3
    expected = _weighted_sum(model, {"a": 1.0, "b": 1.0})["model.layers.0.self_attn.v_proj"]
    assert expected.norm() > 1e-2
    torch.testing.assert_close(_delta(model, "mix")["model.layers.0.self_attn.v_proj"], expected, rtol=1e-4,
                               atol=1e-5)


def test_linear_formula_and_that_it_is_not_the_weighted_sum() -> None:
    model = _two_loras()
    weights = {"a": 0.6, "b": -0.4}
    report = lorakit.combine(model, weights, how="linear")
    t = "model.layers.0.self_attn.v_proj"  # both sources adapt it
    mix = lorakit.adapter_modules(model, "mix")[t]
    a_ad, b_ad = lorakit.adapter_modules(model, "a")[t], lorakit.adapter_modules(model, "b")[t]
    ca, cb = 0.6 * a_ad.scale, -0.4 * b_ad.scale
    assert b_ad.scale == pytest.approx(6.0 / 2.0)  # rsLoRA: alpha / sqrt(r)
    want_a = math.sqrt(abs(ca)) * a_ad.lora_A - math.sqrt(abs(cb)) * b_ad.lora_A  # the sign on A only
    want_b = math.sqrt(abs(ca)) * a_ad.lora_B + math.sqrt(abs(cb)) * b_ad.lora_B
    torch.testing.assert_close(mix.lora_A, want_a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mix.lora_B, want_b, rtol=1e-6, atol=1e-7)
    assert mix.scale == 1.0
    # cross terms: far from sum_i w_i dW_i where both sources are present, exact where only one is
    assert report["layers"][t]["sum_rel_error"] > 1e-2
    assert report["layers"]["model.layers.0.self_attn.q_proj"]["sum_rel_error"] < 1e-5


def test_linear_refuses_different_ranks() -> None:
    model = tiny_llama()
    lorakit.attach(model, "lora", name="a", r=2)
    lorakit.attach(model, "lora", name="b", r=3)
    with pytest.raises(lorakit.ConfigError, match="one rank"):
        lorakit.combine(model, {"a": 1.0, "b": 1.0}, how="linear")


def test_svd_is_the_best_rank_k_approximation() -> None:
    model = _two_loras()
    weights = {"a": 1.0, "b": 0.5}
    report = lorakit.combine(model, weights, how="svd", rank=3)
    expected = _weighted_sum(model, weights)
    mix = _delta(model, "mix")
    num = den = 0.0
    for t, m in expected.items():
        s = torch.linalg.svdvals(m)
        best = s[3:].norm() / s.norm()  # Eckart-Young: the error of the best rank-3 approximation
        err = ((mix[t] - m).norm() / m.norm()).item()
        assert err == pytest.approx(best.item(), rel=1e-3)
        assert report["layers"][t]["svd_rel_error"] == pytest.approx(err, rel=1e-4)
        num += ((mix[t] - m).norm() ** 2).item()
        den += (m.norm() ** 2).item()
    assert report["svd_rel_error"] == pytest.approx(math.sqrt(num / den), rel=1e-4)
    assert report["rank"] == 3
    # default rank: the largest source rank (4); layers where a rank-4 source is alone are exact
    lorakit.combine(model, weights, how="svd", name="mix4")
    assert lorakit.adapters(model)["mix4"].config.r == 4
    q = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(_delta(model, "mix4")[q], expected[q], rtol=1e-4, atol=1e-5)


def test_ties_rules_on_small_tensors() -> None:
    t1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    t2 = torch.tensor([[-1.0, -4.0], [0.25, -3.0]])
    assert torch.equal(trim(t1, 0.5), torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
    # signs: sum of trimmed = [[3-0, 0-4], [0, 2-3]] -> [+, -, + (0 counts as +), -]
    tr = [trim(t1, 0.5), trim(t2, 0.5)]  # t2 trimmed: [[0, -4], [0, -3]]
    m = disjoint_mean(tr, [1.0, 2.0])
    want = torch.tensor([[3.0, -8.0], [0.0, -6.0]])  # each entry: the agreeing weighted values / their count
    assert torch.equal(m, want)
    # the disjoint mean divides by the number that agree
    m2 = disjoint_mean([torch.tensor([[1.0]]), torch.tensor([[3.0]])], [1.0, 1.0])
    assert m2.item() == 2.0


def test_dare_drop_is_seeded_and_unbiased() -> None:
    t = torch.ones(200, 200)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    d1, d2 = drop(t, 0.3, g1), drop(t, 0.3, g2)
    assert torch.equal(d1, d2)
    kept = d1.ne(0).float().mean().item()
    assert kept == pytest.approx(0.3, abs=0.02)
    assert torch.allclose(d1[d1 != 0], torch.tensor(1 / 0.3))  # survivors rescaled by 1/density
    assert d1.mean().item() == pytest.approx(1.0, abs=0.07)
    before = torch.random.get_rng_state()
    drop(t, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched


def test_dare_and_ties_combine_are_deterministic_and_use_density() -> None:
    model = _two_loras()
    w = {"a": 1.0, "b": 1.0}
    r1 = lorakit.combine(model, w, how="dare_linear", name="d1", density=0.5, seed=3, rank=4)
    lorakit.combine(model, w, how="dare_linear", name="d2", density=0.5, seed=3, rank=4)
    lorakit.combine(model, w, how="dare_linear", name="d3", density=0.5, seed=4, rank=4)
    lorakit.combine(model, w, how="dare_linear", name="full", density=1.0, rank=4)
    lorakit.combine(model, w, how="svd", name="svd", rank=4)
    d1, d2, d3 = _delta(model, "d1"), _delta(model, "d2"), _delta(model, "d3")
    for t in d1:
        assert torch.equal(d1[t], d2[t])
        assert not torch.equal(d1[t], d3[t])
    for t, m in _delta(model, "svd").items():  # density 1 keeps everything: plain SVD of the weighted sum
        torch.testing.assert_close(_delta(model, "full")[t], m)
    assert r1["sum_rel_error"] > 0.1 and r1["svd_rel_error"] < r1["sum_rel_error"]
    lorakit.combine(model, w, how="dare_ties", name="dt", density=0.5, seed=3, rank=4)
    lorakit.combine(model, w, how="ties", name="ties", density=0.3, rank=4)


# --- against PEFT ----------------------------------------------------------------------------------------------
def _peft_pair(model: torch.nn.Module, make, tmp_path):
    """A PEFT model holding lorakit's adapters "a" and "b", exported natively."""
    for n in ("a", "b"):
        rep = lorakit.export_peft(model, tmp_path / n, name=n)
        assert rep["mode"] == "native"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(make(), str(tmp_path / "a"), adapter_name="a")
        pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    return pm


def _peft_layers(pm):
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in pm.named_modules() if isinstance(m, LoraLayer) and n.startswith(prefix)}


def _peft_delta(layer, name: str, conv1d: bool) -> torch.Tensor:
    """PEFT's update as ``(d_out, d_in)`` (it transposes GPT-2 Conv1D's)."""
    dw = layer.get_delta_weight(name).float()
    return dw.T if conv1d else dw


@pytest.mark.parametrize(("how", "peft_how", "make"), [
    ("cat", "cat", tiny_llama), ("cat", "cat", tiny_gpt2), ("svd", "svd", tiny_llama), ("svd", "svd", tiny_gpt2),
    ("linear", "linear", tiny_llama), ("ties", "ties_svd", tiny_llama)])
def test_matches_peft_add_weighted_adapter(how: str, peft_how: str, make, tmp_path) -> None:
    model = _two_loras(make)
    weights = {"a": 0.8, "b": -0.5}
    pm = _peft_pair(model, make, tmp_path)
    extra = {"density": 0.4} if how == "ties" else {}
    lorakit.combine(model, weights, how=how, name="mix", **extra)
    pm.add_weighted_adapter(["a", "b"], list(weights.values()), "mix", combination_type=peft_how, **extra)
    ours = _delta(model, "mix")
    layers = _peft_layers(pm)
    assert sorted(ours) == sorted(t for t, m in layers.items() if "mix" in m.lora_A)
    conv1d = make is tiny_gpt2
    for t, dw in ours.items():
        theirs = _peft_delta(layers[t], "mix", conv1d)
        assert theirs.norm() > 1e-3
        torch.testing.assert_close(dw, theirs, rtol=1e-4, atol=1e-5)
        if how == "linear":  # same factors, not only the same product
            torch.testing.assert_close(lorakit.adapter_modules(model, "mix")[t].lora_A, layers[t].lora_A["mix"].weight)
    # the combined adapter as a whole gives PEFT's logits
    batch = batch_for(model)
    pm.set_adapter("mix")
    torch.testing.assert_close(output_of(model, batch), output_of(pm, batch), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("how", "util"), [("dare_linear", "dare_linear"), ("dare_ties", "dare_ties")])
def test_dare_matches_peft_merge_utils_with_the_same_draws(how: str, util: str) -> None:
    """PEFT draws DARE's masks from the global RNG; seeded alike, the same draws give the same merged update."""
    from peft.utils import merge_utils

    model = tiny_llama()
    lorakit.attach(model, "lora", name="a", r=4, targets=["q_proj"], alpha=8.0)
    lorakit.attach(model, "lora", name="b", r=4, targets=["q_proj"], alpha=8.0)
    _perturb(model, seed=4)
    weights = {"a": 1.0, "b": 0.7}
    lorakit.combine(model, weights, how=how, name="mix", density=0.6, seed=11, rank=32)  # full rank: exact SVD
    torch.manual_seed(11)  # the same stream as torch.Generator().manual_seed(11)
    dws = {n: _delta(model, n) for n in weights}
    for t in _delta(model, "mix"):  # model order, as combine draws
        want = getattr(merge_utils, util)([dws[n][t] for n in weights], torch.tensor(list(weights.values())), 0.6)
        torch.testing.assert_close(_delta(model, "mix")[t], want, rtol=1e-4, atol=1e-5)


# --- the result is an ordinary adapter -------------------------------------------------------------------------
def test_combined_adapter_saves_and_loads(tmp_path) -> None:
    model = _two_loras()
    lorakit.combine(model, {"a": 1.0, "b": 1.0}, how="cat", name="mix")
    batch = batch_for(model)
    ref = output_of(model, batch)
    lorakit.save(model, tmp_path / "mix", name="mix")
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "mix")
    torch.testing.assert_close(output_of(fresh, batch), ref, rtol=0, atol=0)
    # and it is the sum of the two adapters: both merged give the same outputs
    lorakit.set_active(model, ["a", "b"])
    torch.testing.assert_close(output_of(model, batch), ref, rtol=1e-5, atol=1e-5)


# --- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"weights": {"zzz": 1.0}}, lorakit.AdapterStateError, "no adapter named"),
    ({"how": "average"}, lorakit.ConfigError, "unknown how"),
    ({"weights": {}}, lorakit.ConfigError, "non-empty"),
    ({"weights": {"a": float("nan")}}, lorakit.ConfigError, "finite"),
    ({"weights": {"a": float("inf"), "b": 1.0}}, lorakit.ConfigError, "finite"),
    ({"weights": {"a": "1"}}, lorakit.ConfigError, "argument 'weights' must be a mapping {a string: a number}"),
    ({"name": "b"}, lorakit.AdapterStateError, "already has an adapter"),
    ({"weights": {"a": 1.0, "ft": 1.0}}, lorakit.AdapterStateError, "full fine-tuning"),
    ({"how": "ties"}, lorakit.ConfigError, "density"),
    ({"how": "dare_linear", "density": 0.0}, lorakit.ConfigError, "density"),
    ({"how": "svd", "density": 0.5}, lorakit.ConfigError, "density"),
    ({"how": "cat", "rank": 2}, lorakit.ConfigError, "rank"),
    ({"how": "svd", "rank": 0}, lorakit.ConfigError, "rank"),
    ({"how": "svd", "rank": 1000}, lorakit.ConfigError, "exceeds"),
])
def test_bad_input_leaves_the_model_unchanged(kwargs, error, match) -> None:
    model = _two_loras()
    lorakit.attach(model, "full", name="ft", targets=["lm_head"])
    lorakit.set_active(model, "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = sorted(lorakit.adapters(model))
    call = {"weights": {"a": 1.0, "b": 1.0}, "how": "svd", **kwargs}
    with pytest.raises(error, match=match):
        lorakit.combine(model, **call)
    assert sorted(lorakit.adapters(model)) == names and lorakit.active_adapters(model) == ["a"]
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_truncated_svd_helper_is_exact_at_full_rank() -> None:
    m = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    b, a = truncated_svd(m, 6)
    torch.testing.assert_close(b @ a, m, rtol=1e-5, atol=1e-5)
