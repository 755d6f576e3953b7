"""Initialisations from the base weight, against their papers' formulas and PEFT's implementations side by side:
PiSSA (top-r singular triplets), OLoRA (QR) and LoftQ (SVD of a quantized base's error)."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.core import lowrank

from .conftest import batch_for, output_of, perturb, tiny_llama

Q = "model.layers.0.self_attn.q_proj"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _same_init_then_same_step(model: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Every adapted layer's A and B equal PEFT's; then the same update is added to both."""
    g = torch.Generator().manual_seed(3)
    for name, ad in lorakit.adapter_modules(model).items():
        peft_layer = theirs.get_submodule(f"base_model.model.{name}")
        peft_a, peft_b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        torch.testing.assert_close(ad.lora_A, peft_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ad.lora_B, peft_b, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            da, db = 0.05 * torch.randn(ad.lora_A.shape, generator=g), 0.05 * torch.randn(ad.lora_B.shape, generator=g)
            ad.lora_A.add_(da)
            ad.lora_B.add_(db)
            peft_a.add_(da)
            peft_b.add_(db)


# --- PiSSA -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("alpha", "rslora"), [(None, False), (16.0, False), (16.0, True)])
def test_pissa_init_is_the_top_singular_part_and_the_model_starts_exactly_unchanged(alpha: float | None,
                                                                                      rslora: bool) -> None:
    model = tiny_llama()
    batch = batch_for(model)
    before = output_of(model, batch)
    w = model.get_submodule(Q).weight.detach().clone()
    lorakit.attach(model, "pissa", r=4, alpha=alpha, use_rslora=rslora)
    ad = lorakit.adapter_modules(model)[Q]
    s = ad.scale
    assert s == (1.0 if alpha is None else 16.0 / (2.0 if rslora else 4.0))  # alpha defaults to r
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    top = u[:, :4] @ torch.diag(sv[:4]) @ vh[:4]  # U_r S_r V_r^T
    torch.testing.assert_close(s * ad.lora_B @ ad.lora_A, top, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ad.lora_B, ad.base_B, rtol=0, atol=0)
    # B0 and A0 share sqrt(S_r / s) (the paper's symmetric split): equal column / row norms
    torch.testing.assert_close(ad.lora_B.norm(dim=0), ad.lora_A.norm(dim=1), rtol=1e-5, atol=1e-6)
    assert torch.equal(ad.delta_weight(w), torch.zeros_like(w))
    with lowrank.fused(False):
        assert torch.equal(output_of(model, batch), before)  # exactly: B A x - B0 A0 x is zero, not rounded
    with lowrank.fused(True):  # one product over 2r: zero up to rounding
        torch.testing.assert_close(output_of(model, batch), before, rtol=0, atol=1e-6)
    assert torch.equal(model.get_submodule(Q).weight, w)  # the base keeps W0


def test_pissa_update_is_b_a_minus_the_frozen_principal_part() -> None:
    model = tiny_llama()
    lorakit.attach(model, "pissa", r=4, dropout=0.1)
    perturb(model, seed=1)
    layer = model.get_submodule(Q)
    ad = lorakit.adapter_modules(model)[Q]
    want = ad.scale * (ad.lora_B @ ad.lora_A - ad.base_B @ ad.base_A)
    torch.testing.assert_close(ad.delta_weight(layer.weight), want, rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 5, layer.d_in if hasattr(layer, "d_in") else want.shape[1])
    model.eval()  # no dropout: the layer is W0 + dW
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (layer.weight + want).T, rtol=1e-5, atol=1e-5)
    # only A and B train; A0 and B0 are saved buffers
    assert {n for n, p in ad.named_parameters()} == {"lora_A", "lora_B"}
    assert {"base_A", "base_B"} <= set(ad.state_dict())


def test_pissa_with_dropout_drops_the_trained_part_only() -> None:
    """PiSSA's residual is part of the frozen base: dropout applies to ``B A x`` alone, never to ``B0 A0 x``
    (with A = A0 and B = B0, dropping it would change the function at step 0)."""
    model = tiny_llama()
    batch = batch_for(model)
    before = output_of(model, batch)
    lorakit.attach(model, "pissa", r=4, dropout=0.5)
    model.train()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert _rel(out, before) > 1e-3  # dropout is on
    layer = model.get_submodule(Q)
    ad = lorakit.adapter_modules(model)[Q]
    x = torch.randn(2, 3, ad.lora_A.shape[1])
    torch.manual_seed(0)
    got = ad(x, torch.zeros(2, 3, ad.lora_B.shape[0]), layer)
    torch.manual_seed(0)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    want = ad.scale * (dropped @ ad.lora_A.T @ ad.lora_B.T - x @ ad.base_A.T @ ad.base_B.T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pissa_randomized_svd_is_close_to_the_exact_one() -> None:
    """On a weight whose spectrum decays (as pretrained weights' do), a few subspace iterations find the same
    top-r part."""
    torch.manual_seed(0)
    exact, fast = tiny_llama(), tiny_llama()
    w = exact.get_submodule(Q).weight
    u, _, vh = torch.linalg.svd(torch.randn(w.shape), full_matrices=False)
    spectrum = 0.5 ** torch.arange(min(w.shape), dtype=torch.float32)
    with torch.no_grad():
        for m in (exact, fast):
            m.get_submodule(Q).weight.copy_(u @ torch.diag(spectrum) @ vh)
    lorakit.attach(exact, "pissa", r=4)
    lorakit.attach(fast, "pissa", r=4, niter=8)
    a, b = lorakit.adapter_modules(exact)[Q], lorakit.adapter_modules(fast)[Q]
    assert _rel(b.lora_B @ b.lora_A, a.lora_B @ a.lora_A) < 0.05


def test_pissa_matches_peft_side_by_side() -> None:
    """PEFT's PiSSA init on the same model: the same A and B, and the same function after the same update."""
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    batch = batch_for(model)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"], init_lora_weights="pissa"))
    lorakit.attach(model, "pissa", r=4, alpha=8.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"])
    ours = lorakit.adapter_modules(model)
    assert len(ours) == len([n for n, _ in theirs.named_modules() if n.endswith(".lora_A.default")])
    _same_init_then_same_step(model, theirs)
    ref = output_of(theirs, batch)
    assert _rel(output_of(model, batch), ref) < 1e-5
    assert _rel(ref, output_of(tiny_llama(), batch)) > 1e-3  # the update is visible


def test_pissa_exports_to_peft_as_an_exact_rank_2r_lora(tmp_path) -> None:
    model = tiny_llama()
    batch = batch_for(model)
    lorakit.attach(model, "pissa", r=4)
    perturb(model, seed=2)
    ref = output_of(model, batch)
    report = lorakit.export_peft(model, tmp_path / "peft")
    assert report["exact"] and report["r"] == 8 and report["max_error"] < 1e-5, report
    back = tiny_llama()
    lorakit.load(back, tmp_path / "peft")  # PEFT's format, read back as plain LoRA
    assert _rel(output_of(back, batch), ref) < 1e-5


# --- OLoRA -------------------------------------------------------------------------------------------------------
def test_olora_init_is_the_qr_basis_and_the_model_starts_exactly_unchanged() -> None:
    model = tiny_llama()
    batch = batch_for(model)
    before = output_of(model, batch)
    w = model.get_submodule(Q).weight.detach().clone()
    lorakit.attach(model, "olora", r=4)
    ad = lorakit.adapter_modules(model)[Q]
    q, r = torch.linalg.qr(w)
    torch.testing.assert_close(ad.lora_B, q[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(ad.lora_A, r[:4], rtol=0, atol=0)
    torch.testing.assert_close(ad.lora_B.T @ ad.lora_B, torch.eye(4), rtol=0, atol=1e-5)  # orthonormal columns
    assert ad.scale == 2.0  # LoRA's default alpha = 2 r; B0 A0 is not rescaled
    with lowrank.fused(False):
        assert torch.equal(output_of(model, batch), before)
    perturb(model, seed=1)
    want = ad.scale * (ad.lora_B @ ad.lora_A - q[:, :4] @ r[:4])
    torch.testing.assert_close(ad.delta_weight(w), want, rtol=1e-5, atol=1e-6)


def test_olora_matches_peft_side_by_side(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    batch = batch_for(model)
    targets = ["q_proj", "v_proj", "down_proj"]
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights="olora"))
    lorakit.attach(model, "olora", r=4, alpha=8.0, targets=targets)
    _same_init_then_same_step(model, theirs)
    ref = output_of(theirs, batch)
    assert _rel(output_of(model, batch), ref) < 1e-5 and _rel(ref, output_of(tiny_llama(), batch)) > 1e-3
    report = lorakit.export_peft(model, tmp_path / "peft")  # exact plain LoRA of rank 2r
    assert report["exact"] and report["r"] == 8


# --- LoftQ -------------------------------------------------------------------------------------------------------
def _nf4_with_dense(seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.nn.Module]:
    dense = tiny_llama(seed=seed)
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    return lorakit.quantize(tiny_llama(seed=seed), "nf4"), state, dense


@pytest.mark.parametrize("alpha", [4.0, 16.0])
def test_loftq_init_is_the_best_rank_r_fit_of_the_quantization_error(alpha: float) -> None:
    from lorakit.core.layers import base_weight

    model, state, dense = _nf4_with_dense()
    batch = batch_for(model)
    nf4_out, dense_out = output_of(model, batch), output_of(dense, batch)
    lorakit.attach(model, "loftq", r=4, alpha=alpha, dense_weights=state)
    for name, ad in lorakit.adapter_modules(model).items():
        w, q = state[f"{name}.weight"], base_weight(model.get_submodule(name)).float()
        u, sv, vh = torch.linalg.svd(w - q, full_matrices=False)
        fit = u[:, :4] @ torch.diag(sv[:4]) @ vh[:4]  # Eckart-Young: the best rank-4 approximation
        torch.testing.assert_close(ad.delta_weight(q), fit, rtol=1e-4, atol=1e-5)
        assert (w - q - fit).norm() < (w - q).norm()  # Q + s B A is closer to W than Q
    # the whole model starts closer to the dense one
    assert _rel(output_of(model, batch), dense_out) < _rel(nf4_out, dense_out)


def test_loftq_equals_peft_low_rank_decomposition() -> None:
    """PEFT's LoftQ needs bitsandbytes on a GPU; its decomposition of the residual is plain torch: with s = 1 (the
    only scale PEFT's LoftQ is right for: it does not divide by s) lorakit's B, A are its L, R."""
    loftq_utils = pytest.importorskip("peft.utils.loftq_utils")
    from lorakit.core.layers import base_weight

    model, state, _ = _nf4_with_dense()
    lorakit.attach(model, "loftq", r=4, alpha=4.0, dense_weights=state)
    ad = lorakit.adapter_modules(model)[Q]
    residual = state[f"{Q}.weight"] - base_weight(model.get_submodule(Q)).float()
    theirs = loftq_utils._low_rank_decomposition(residual, reduced_rank=4)
    torch.testing.assert_close(ad.lora_B, theirs["L"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ad.lora_A, theirs["R"], rtol=1e-5, atol=1e-6)


def test_loftq_reads_the_checkpoint_and_loads_like_any_qlora_adapter(tmp_path) -> None:
    model, state, dense = _nf4_with_dense()
    dense.save_pretrained(tmp_path / "base")
    batch = batch_for(model)
    lorakit.attach(model, "loftq", r=4, dense_weights=tmp_path / "base")  # read one layer at a time
    other, _, _ = _nf4_with_dense()
    lorakit.attach(other, "loftq", r=4, dense_weights=state)
    torch.testing.assert_close(output_of(model, batch), output_of(other, batch), rtol=0, atol=0)
    perturb(model, seed=4)
    lorakit.save(model, tmp_path / "adapter")
    fresh = lorakit.quantize(tiny_llama(), "nf4")  # the base quantized the usual way: no dense weights needed
    lorakit.load(fresh, tmp_path / "adapter")
    torch.testing.assert_close(output_of(fresh, batch), output_of(model, batch), rtol=0, atol=0)


def test_loftq_refusals(tmp_path) -> None:
    with pytest.raises(lorakit.ConfigError, match="not quantized"):
        lorakit.attach(tiny_llama(), "loftq", r=4, dense_weights=tiny_llama().state_dict())
    model, state, _ = _nf4_with_dense()
    with pytest.raises(lorakit.ConfigError, match="needs dense_weights"):
        lorakit.attach(model, "loftq", r=4)
    wide = tiny_llama(hidden_size=64, intermediate_size=96).state_dict()
    with pytest.raises(lorakit.ConfigError, match="not this model's dense base"):
        lorakit.attach(model, "loftq", r=4, dense_weights=wide)
    with pytest.raises(lorakit.ConfigError, match="no weight for"):
        lorakit.attach(model, "loftq", r=4, dense_weights={"x": torch.zeros(1)})
    assert not lorakit.adapters(model)  # a failed init leaves nothing behind


def test_lorakit_train_runs_loftq_on_an_nf4_base(tiny_run, tmp_path, capsys) -> None:
    """``model.quantize: nf4`` + ``adapter.method: loftq``: the trainer hands the checkpoint to the init."""
    from lorakit.cli import main

    from .fixtures_train import make_config

    cfg = make_config(tiny_run, tmp_path / "run", method="loftq", model={"quantize": "nf4"})
    assert main(["train", str(cfg)]) == 0, capsys.readouterr().err
    meta, _ = lorakit.read_adapter(tmp_path / "run" / "adapter")
    assert meta["method"] == "loftq" and meta["extra"]["quantize"] == "nf4"
