"""LoRA-XS, LoRA-SB and Delta-LoRA against their formulas (the method modules' docstrings), beyond the contract matrix."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lorakit
from lorakit.adapt.model import adapter_modules
from lorakit.core.layers import AdaptedLayer
from lorakit.core.lowrank import fused, fused_calls

from .conftest import batch_for, output_of, perturb, tiny_llama

Q = "model.layers.0.self_attn.q_proj"  # (32, 32)
K_PROJ = "model.layers.0.self_attn.k_proj"  # (16, 32)
DOWN = "model.layers.1.mlp.down_proj"  # (32, 48)


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _layer(model: nn.Module, name: str) -> AdaptedLayer:
    layer = model.get_submodule(name)
    assert isinstance(layer, AdaptedLayer)
    return layer


def _check_forward_and_grads(layer: AdaptedLayer, w_eff: Callable[..., Tensor], leaves: list[Tensor]) -> None:
    """``layer(x) == x W_eff^T + bias`` (rel < 1e-5), and the gradients of ``x`` and of ``leaves`` (the adapter's
    trainable tensors) equal autograd through that formula; ``w_eff(*leaves)`` builds ``W_eff`` in fp32."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, layer.weight.shape[1], generator=g, requires_grad=True)
    gy = torch.randn(3, 5, layer.weight.shape[0], generator=g)
    y = layer(x)
    y.backward(gy)
    got = [x.grad] + [p.grad for p in leaves]

    x2 = x.detach().clone().requires_grad_(True)
    clones = [p.detach().clone().requires_grad_(True) for p in leaves]
    ref = F.linear(x2, w_eff(*clones), layer.bias)
    assert _rel(y.detach(), ref.detach()) < 1e-5
    ref.backward(gy)
    want = [x2.grad] + [c.grad for c in clones]
    for a, b in zip(got, want):
        assert a is not None and b is not None
        assert _rel(a, b) < 1e-5
    for p in leaves:
        p.grad = None


_perturb = perturb


# --- LoRA-XS ------------------------------------------------------------------------------------------------
def test_xs_init_is_the_truncated_svd_of_w0() -> None:
    model = tiny_llama()
    w0 = {n: model.get_submodule(n).weight.detach().clone() for n in (Q, DOWN)}
    lorakit.attach(model, "lora-xs", r=4)
    for name, w in w0.items():
        ad = adapter_modules(model)[name]
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]  # sign-free: compare products
        assert _rel(ad.lora_B @ ad.lora_A, best) < 1e-5
        torch.testing.assert_close(ad.lora_B.T @ ad.lora_B, torch.eye(4), atol=1e-5, rtol=0)
        assert 0 < ad.lora_R.std().item() < 3e-5  # N(0, 1e-5^2)
        assert not ad.lora_A.requires_grad and not ad.lora_B.requires_grad and ad.lora_R.requires_grad
    assert lorakit.trainable_parameters(model) == 16 * len(adapter_modules(model))


@pytest.mark.parametrize("alpha", [None, 8.0])
def test_xs_forward_and_grads_match_formula(alpha: float | None) -> None:
    model = tiny_llama()
    lorakit.attach(model, "lora-xs", r=4, alpha=alpha)
    _perturb(model)
    layer = _layer(model, DOWN)
    ad = layer.adapters["default"]
    s = (alpha or 4.0) / 4
    assert ad.scale == s
    w0 = layer.weight.detach()
    with fused(False):
        _check_forward_and_grads(layer, lambda r: w0 + s * ad.lora_B @ r @ ad.lora_A, [ad.lora_R])
    before = fused_calls()
    _check_forward_and_grads(layer, lambda r: w0 + s * ad.lora_B @ r @ ad.lora_A, [ad.lora_R])
    assert fused_calls() > before  # the fused path ran


def _saved_activations(layer: AdaptedLayer, x: Tensor) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd keeps for backward in ``layer(x)``, other than the layer's own
    parameters and buffers (and their views)."""
    own = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    saved: list[tuple[int, ...]] = []

    def pack(t: Tensor) -> Tensor:
        if t.untyped_storage().data_ptr() not in own:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum()
    return saved


def test_frozen_linear_saves_no_input() -> None:
    """The PyTorch fact the XS/SB forward relies on: F.linear keeps x only if the weight needs a gradient."""
    x = torch.randn(6, 8, requires_grad=True)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.data_ptr()) or t, lambda t: t):
        F.linear(x, torch.randn(3, 8))
    assert x.data_ptr() not in saved
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.data_ptr()) or t, lambda t: t):
        F.linear(x, torch.randn(3, 8, requires_grad=True))
    assert x.data_ptr() in saved


@pytest.mark.parametrize("method", ["lora-xs", "lora-sb", "lora"])
def test_xs_sb_keep_only_n_by_r(method: str) -> None:
    model = tiny_llama()
    extra = {"init_batches": [batch_for(model)]} if method == "lora-sb" else {}
    lorakit.attach(model, method, r=4, **extra)
    layer = _layer(model, DOWN)
    x = torch.randn(2, 5, 48, requires_grad=True)  # a middle layer: its input needs a gradient
    for use_fused in (False, True):
        with fused(use_fused):
            saved = _saved_activations(layer, x)
        if method == "lora":  # the control: LoRA keeps x itself (N x d_in) for A's gradient
            assert any(s[-1] == 48 for s in saved)
        else:
            assert len(saved) == 1 and saved[0][-1] == 4 and torch.Size(saved[0]).numel() == 10 * 4, saved


# --- LoRA-SB ------------------------------------------------------------------------------------------------
def _full_gradient(name: str, batches: list[dict[str, Tensor]], counts: list[int]) -> Tensor:
    """``sum_b n_b grad L_b`` of one weight of a fresh tiny Llama, computed without lorakit."""
    model = tiny_llama().train()  # no dropout in this config: train mode is deterministic
    for p in model.parameters():
        p.requires_grad_(False)
    w = model.get_submodule(name).weight
    w.requires_grad_(True)
    for b, n in zip(batches, counts):
        (model(**{k: v[:n] for k, v in b.items()}).loss * n).backward()
    assert w.grad is not None
    return w.grad


def _best_rank(m: Tensor, r: int) -> Tensor:
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def test_sb_init_is_best_rank_r_of_the_sign_step() -> None:
    model = tiny_llama()
    batches = [batch_for(model, seed=5, batch=2), batch_for(model, seed=6, batch=2), batch_for(model, seed=8)]
    pulled: list[int] = []

    def stream() -> Iterator[dict[str, Tensor]]:
        for i, b in enumerate(batches):
            pulled.append(i)
            yield b

    w0 = {n: model.get_submodule(n).weight.detach().clone() for n in (Q, DOWN)}
    eta = 1e-3
    rng = torch.get_rng_state()
    t0 = time.perf_counter()
    lorakit.attach(model, "lora-sb", r=4, eta=eta, init_examples=3, init_batches=stream())
    elapsed = time.perf_counter() - t0
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is neither reset nor consumed
    assert pulled == [0, 1]  # stops once 3 examples are seen; the second batch is cut to 1 example
    assert elapsed < 10, f"LoRA-SB init took {elapsed:.1f}s on a tiny Llama"
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert lorakit.trainable_parameters(model) == 16 * len(adapter_modules(model))

    lorakit.merge(model)
    for name, w in w0.items():
        g = _full_gradient(name, batches[:2], [2, 1])
        target = -eta * torch.sign(g)
        best = _best_rank(target, 4)
        diff = model.get_submodule(name).weight.detach().double() - w  # W_eff - W0
        assert _rel(diff, best) < 1e-4, name
        # and it is a real rank-4 truncation, not the whole step
        assert _rel(best, target.double()) > 0.1
        ad = adapter_modules(model)[name]
        torch.testing.assert_close(ad.lora_A @ ad.lora_A.T, torch.eye(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(ad.lora_R, torch.diag(torch.diagonal(ad.lora_R)))


def test_sb_full_rank_reproduces_the_sign_step() -> None:
    model = tiny_llama()
    batch = batch_for(model, seed=5)
    w0 = model.get_submodule(K_PROJ).weight.detach().clone()
    lorakit.attach(model, "lora-sb", r=16, eta=1e-3, targets=["k_proj"], init_batches=[batch])
    target = -1e-3 * torch.sign(_full_gradient(K_PROJ, [batch], [2]))
    dw = adapter_modules(model)[K_PROJ].delta_weight(w0)
    assert _rel(dw, target) < 1e-5
    lorakit.merge(model)
    torch.testing.assert_close(model.get_submodule(K_PROJ).weight - w0, target, rtol=0, atol=1e-8)


def test_sb_restores_train_mode_and_fails_cleanly() -> None:
    model = tiny_llama().train()
    before = output_of(model.eval(), batch_for(model))
    model.train()
    with pytest.raises(lorakit.ConfigError, match="init_batches"):
        lorakit.attach(model, "lora-sb", r=4)
    with pytest.raises(lorakit.ConfigError, match="labels"):
        lorakit.attach(model, "lora-sb", r=4, init_batches=[{"input_ids": batch_for(model)["input_ids"]}])
    with pytest.raises(lorakit.ConfigError, match="no example"):
        lorakit.attach(model, "lora-sb", r=4, init_batches=[])
    with pytest.raises(lorakit.ConfigError, match="single batch"):
        lorakit.attach(model, "lora-sb", r=4, init_batches=batch_for(model))
    # every failure left the model as it was
    assert model.training and not lorakit.adapters(model)
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(output_of(model.eval(), batch_for(model)), before, rtol=0, atol=0)
    model.train()
    lorakit.attach(model, "lora-sb", r=4, init_batches=[batch_for(model)])
    assert model.training
    # the flags are the adapter's again: only R trains, no base weight kept requires_grad or a .grad
    own = {id(a.lora_R) for a in adapter_modules(model).values()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == own
    assert all(p.grad is None for p in model.parameters())


def test_sb_init_is_reproducible_and_seeded() -> None:
    outs = []
    for seed in (0, 0, 1):
        model = tiny_llama()
        lorakit.attach(model, "lora-sb", r=4, init_seed=seed, init_batches=[batch_for(model)])
        outs.append(adapter_modules(model)[Q].lora_B.clone())
    assert torch.equal(outs[0], outs[1])
    # another seed changes the randomized SVD's draws (not its result beyond sign/rounding)
    assert torch.allclose(outs[0].abs(), outs[2].abs(), atol=1e-3)


# --- Delta-LoRA ---------------------------------------------------------------------------------------------
def _delta_model(seed: int = 0, **options: object) -> nn.Module:
    model = tiny_llama(seed)
    lorakit.attach(model, "delta-lora", r=4, **{"delta_lambda": 0.5, "delta_start": 2, **options})
    return model


def _step(model: nn.Module, opt: torch.optim.Optimizer, callbacks: list, batch: dict[str, Tensor]) -> None:
    model.train()
    model(**batch).loss.backward()
    for cb in callbacks:
        cb.before_step()
    opt.step()
    for cb in callbacks:
        cb.step()
    opt.zero_grad()
    model.eval()


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def test_delta_rejects_dropout() -> None:
    with pytest.raises(lorakit.ConfigError, match="dropout"):
        lorakit.attach(tiny_llama(), "delta-lora", r=4, dropout=0.1)


def test_delta_forward_and_grads_match_formula() -> None:
    model = _delta_model()
    _perturb(model)
    layer = _layer(model, DOWN)
    ad = layer.adapters["default"]
    w = layer.weight.detach()
    _check_forward_and_grads(layer, lambda a, b: w + ad.scale * b @ a, [ad.lora_A, ad.lora_B])


def test_delta_base_update_after_k_plus_n_steps() -> None:
    model = _delta_model()
    batch = batch_for(model)
    names = list(adapter_modules(model))
    w0 = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    opt = _optimizer(model)
    cbs = lorakit.training_callbacks(model, opt, total_steps=5)
    assert len(cbs) == 1
    for _ in range(2):  # t <= K: the base does not move
        _step(model, opt, cbs, batch)
    assert all(torch.equal(model.get_submodule(n).weight, w0[n]) for n in names)
    factors_k = {n: (a.lora_B.detach().clone(), a.lora_A.detach().clone()) for n, a in adapter_modules(model).items()}
    for _ in range(3):
        _step(model, opt, cbs, batch)
    for n, ad in adapter_modules(model).items():
        b_k, a_k = factors_k[n]
        want = 0.5 * ad.scale * (ad.lora_B @ ad.lora_A - b_k @ a_k)
        got = model.get_submodule(n).weight.detach() - w0[n]
        assert want.abs().max() > 1e-4  # the base really moved
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        assert torch.equal(ad.anchor_B, b_k) and torch.equal(ad.anchor_A, a_k)
    state = cbs[0].state_dict()  # the step count, and the drifted base weights a resume restores bit for bit
    assert state["steps"] == 5 and set(state["base"]) == {str(i) for i in range(len(names))}
    assert all(torch.equal(w, model.get_submodule(n).weight) for n, w in zip(names, state["base"].values()))


def test_delta_save_load_merge_reproduce_the_trained_model(tmp_path) -> None:
    model = _delta_model()
    batch = batch_for(model)
    opt = _optimizer(model)
    cbs = lorakit.training_callbacks(model, opt, total_steps=5)
    for _ in range(5):
        _step(model, opt, cbs, batch)
    ref = output_of(model, batch)
    # merge / unmerge on the trained model: exact, and the base drift is not counted twice
    lorakit.merge(model)
    torch.testing.assert_close(output_of(model, batch), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(lorakit.AdapterStateError, match="merged"):
        cbs[0].step()
    lorakit.unmerge(model)
    torch.testing.assert_close(output_of(model, batch), ref, rtol=1e-5, atol=1e-5)

    lorakit.save(model, tmp_path / "a")
    fresh = tiny_llama()
    w0 = {n: fresh.get_submodule(n).weight.detach().clone() for n in adapter_modules(model)}
    lorakit.load(fresh, tmp_path / "a")
    torch.testing.assert_close(output_of(fresh, batch), ref, rtol=1e-5, atol=1e-5)
    for n, ad in adapter_modules(fresh).items():
        trained = adapter_modules(model)[n]
        assert _rel(ad.delta_weight(w0[n]), model.get_submodule(n).weight.detach() - w0[n]
                    + trained.scale * trained.lora_B @ trained.lora_A) < 1e-5
    lorakit.merge(fresh)
    torch.testing.assert_close(output_of(fresh, batch), ref, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(fresh)  # back to W0 exactly (up to fp32 rounding)
    for n, w in w0.items():
        torch.testing.assert_close(fresh.get_submodule(n).weight.detach(), w, rtol=0, atol=1e-7)
    plain = lorakit.detach(fresh, merge=True)
    torch.testing.assert_close(output_of(plain, batch), ref, rtol=1e-5, atol=1e-5)


def test_delta_resume_matches_an_uninterrupted_run(tmp_path) -> None:
    batch = batch_for(tiny_llama())
    straight = _delta_model()
    opt = _optimizer(straight)
    cbs = lorakit.training_callbacks(straight, opt, total_steps=6)
    for _ in range(5):
        _step(straight, opt, cbs, batch)

    first = _delta_model()
    opt = _optimizer(first)
    cbs = lorakit.training_callbacks(first, opt, total_steps=6)
    for _ in range(3):  # K = 2: the base moved once
        _step(first, opt, cbs, batch)
    lorakit.save(first, tmp_path / "a")
    opt_state, cb_state = opt.state_dict(), cbs[0].state_dict()

    resumed = tiny_llama()
    lorakit.load(resumed, tmp_path / "a")
    opt = _optimizer(resumed)
    opt.load_state_dict(opt_state)
    cbs = lorakit.training_callbacks(resumed, opt, total_steps=6)
    cbs[0].load_state_dict(cb_state)
    for _ in range(2):
        _step(resumed, opt, cbs, batch)
    torch.testing.assert_close(output_of(resumed, batch), output_of(straight, batch), rtol=1e-4, atol=1e-5)
    for n, ad in adapter_modules(resumed).items():  # the drift moved into W when training resumed
        torch.testing.assert_close(resumed.get_submodule(n).weight, straight.get_submodule(n).weight,
                                   rtol=0, atol=1e-6)
        assert ad.drift_in_base


def test_delta_whole_model_state_dict_round_trips() -> None:
    model = _delta_model()
    batch = batch_for(model)
    opt = _optimizer(model)
    cbs = lorakit.training_callbacks(model, opt, total_steps=4)
    for _ in range(4):
        _step(model, opt, cbs, batch)
    other = _delta_model(seed=1)  # same structure, other weights
    other.load_state_dict(model.state_dict())  # base weights (with the drift) + adapter buffers
    torch.testing.assert_close(output_of(other, batch), output_of(model, batch), rtol=0, atol=0)


def test_delta_fused_path_equals_reference_and_skips_pending_drift(tmp_path) -> None:
    model = _delta_model()
    batch = batch_for(model)
    opt = _optimizer(model)
    cbs = lorakit.training_callbacks(model, opt, total_steps=4)
    for _ in range(4):
        _step(model, opt, cbs, batch)
    with fused(False):
        ref = output_of(model, batch)
    with fused(True):
        torch.testing.assert_close(output_of(model, batch), ref, rtol=1e-5, atol=1e-5)
    lorakit.save(model, tmp_path / "a")
    fresh = lorakit.load(tiny_llama(), tmp_path / "a")  # drift pending: computed in forward
    with fused(True):
        torch.testing.assert_close(output_of(fresh, batch), ref, rtol=1e-5, atol=1e-5)


def test_delta_bf16_base_keeps_small_updates() -> None:
    """A bf16 base accumulates the updates in an fp32 master: ``W == round(W0 + D)``. Adding each step's
    update to the bf16 weight directly would round most of them away."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, dtype=torch.bfloat16))
    w0 = model[0].weight.detach().clone()
    lorakit.attach(model, "delta-lora", r=4, delta_start=0, targets=["0"])
    ad = adapter_modules(model)["0"]
    opt = torch.optim.AdamW([ad.lora_A, ad.lora_B], lr=3e-4)
    (cb,) = lorakit.training_callbacks(model, opt, total_steps=20)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 64, generator=g).bfloat16(), torch.randn(16, 64, generator=g).bfloat16()
    naive = w0.float()
    for _ in range(20):
        old = (ad.lora_B @ ad.lora_A).detach()
        F.mse_loss(model(x).float(), y.float()).backward()
        cb.before_step()
        opt.step()
        cb.step()
        opt.zero_grad()
        inc = 0.5 * ad.scale * ((ad.lora_B @ ad.lora_A).detach() - old)
        naive = (naive + inc).bfloat16().float()  # what a bf16 in-place update would keep
    drift = (0.5 * ad.scale * (ad.lora_B.double() @ ad.lora_A.double()
                               - ad.anchor_B.double() @ ad.anchor_A.double()))
    exact = w0.double() + drift
    got = model[0].weight.detach().double()
    assert model[0].weight.dtype == torch.bfloat16 and ad._master.dtype == torch.float32
    # ours is the exact result rounded once (ties aside): within half a bf16 ulp everywhere
    half_ulp = exact.abs() * 2.0 ** -8 * 1.01 + 1e-7  # slack: fp32 rounding of the master, ties
    assert ((got - exact).abs() <= half_ulp).all()
    err_ours = (got - exact).norm() / drift.norm()
    err_naive = (naive.double() - exact).norm() / drift.norm()
    assert err_ours < 0.6 * err_naive, (err_ours, err_naive)
    # and the change really reached W: it correlates with the drift
    moved = got - w0.double()
    assert (moved * drift).sum() / (moved.norm() * drift.norm()) > 0.8
