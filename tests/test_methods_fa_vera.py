"""LoRA-FA, VeRA and LoRA+: each forward against its formula, LoRA-FA's activation memory, VeRA's sharing and
reload, and LoRA+'s parameter groups."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import lorakit
from lorakit.adapt.model import adapter_modules, shared_module
from lorakit.core.layers import AdaptedLayer
from lorakit.core.lowrank import fused
from lorakit.methods import vera
from lorakit.methods.lora_fa import LoraFa
from lorakit.methods.vera import Vera

from .conftest import batch_for, output_of, tiny_llama


class TwoLayers(nn.Module):
    """Two linear layers of different shapes: (d_out, d_in) = (10, 12) and (7, 10)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(12, 10)
        self.down = nn.Linear(10, 7)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.up(x))


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def perturb(model: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def check_against(layer: AdaptedLayer, formula, params: dict[str, Tensor]) -> None:
    """Forward and gradients (of ``params`` and of ``x``) of ``layer`` equal ``formula`` evaluated in fp64."""
    x = torch.randn(2, 5, layer.weight.shape[1], requires_grad=True)
    w_out = torch.randn(2, 5, layer.weight.shape[0])
    y = layer(x)
    (y * w_out).sum().backward()

    ref_params = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in params.items()}
    x_ref = x.detach().double().requires_grad_()
    y_ref = formula(x_ref, **ref_params)
    (y_ref * w_out.double()).sum().backward()

    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(x.grad, x_ref.grad) < 1e-5
    trained = [k for k, v in params.items() if v.requires_grad]
    assert trained
    for k in trained:
        assert rel_err(params[k].grad, ref_params[k].grad) < 1e-5, k


# --- LoRA-FA ----------------------------------------------------------------------------------------------
def test_lora_fa_forward_and_gradients_match_formula() -> None:
    model = lorakit.attach(TwoLayers(), "lora-fa", r=3, alpha=5.0)
    perturb(model)
    layer = model.up
    ad = layer.adapters["default"]
    assert isinstance(ad, LoraFa) and not ad.lora_A.requires_grad
    assert "lora_A" in dict(ad.named_buffers()) and [n for n, _ in ad.named_parameters()] == ["lora_B"]
    s = 5.0 / 3

    def formula(x: Tensor, W: Tensor, bias: Tensor, A: Tensor, B: Tensor) -> Tensor:
        return x @ W.T + bias + s * (x @ A.T) @ B.T

    check_against(layer, formula, {"W": layer.base.weight, "bias": layer.base.bias, "A": ad.lora_A,
                                   "B": ad.lora_B})
    torch.testing.assert_close(ad.delta_weight(layer.weight), s * ad.lora_B @ ad.lora_A)


def saved_activations(model: nn.Module, layer: AdaptedLayer, x: Tensor) -> list[tuple[int, ...]]:
    """Shapes of what autograd saves in ``layer``'s forward, leaving out weights (``model``'s parameters and
    buffers, VeRA's shared matrices included)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in own]


@pytest.mark.parametrize(("method", "fast"), [("lora-fa", True), ("lora", True), ("vera", False), ("vera", True)])
def test_saved_activations(method: str, fast: bool) -> None:
    """LoRA-FA keeps only A x (N x r); LoRA also keeps x, the contrast that shows the check can fail; VeRA's
    reference path keeps A x and B d A x (N x d_out), as LoRA-FA's docstring says, and its fused path A x alone
    (b is folded into B, its gradient is rowsum(B * g^T (d * A x)))."""
    d_in, d_out, r, n = 64, 48, 4, 2 * 9
    model = nn.Sequential(nn.Linear(d_in, d_out))
    lorakit.attach(model, method, r=r)
    perturb(model)
    assert not model[0].base.weight.requires_grad
    x = torch.randn(2, 9, d_in, requires_grad=True)
    with fused(fast):
        shapes = saved_activations(model, model[0], x)
    expected = {"lora-fa": [n * r], "lora": [n * r, n * d_in],
                "vera": [n * r] if fast else [n * r, n * d_out]}[method]
    assert sorted(torch.Size(s).numel() for s in shapes) == expected, shapes


def test_lora_fa_projected_gradient_projects_full_gradient() -> None:
    r, alpha, lr, eps = 3, 4.0, 0.1, 1e-6
    torch.manual_seed(1)
    base = nn.Sequential(nn.Linear(12, 10))
    x = torch.randn(4, 12)

    def run(projected: bool) -> tuple[Tensor, Tensor, Tensor]:
        model = copy.deepcopy(base)
        torch.manual_seed(1)  # the same A in both runs
        lorakit.attach(model, "lora-fa", r=r, alpha=alpha, projected_grad=projected, projected_grad_eps=eps)
        ad = model[0].adapters["default"]
        opt = torch.optim.SGD([ad.lora_B], lr=lr)
        callbacks = lorakit.training_callbacks(model, opt, total_steps=1)
        assert len(callbacks) == int(projected)
        model(x).pow(2).sum().backward()
        g_raw = ad.lora_B.grad.clone()
        for cb in callbacks:
            cb.before_step()
        b0 = ad.lora_B.detach().clone()
        opt.step()
        return g_raw, ad.lora_B.detach() - b0, ad.lora_A.clone()

    g_raw, step, a = run(projected=True)
    s = alpha / r
    precond = torch.linalg.inv(a.double() @ a.double().T + eps * torch.eye(r, dtype=torch.float64)) / s**2
    assert rel_err(step, -lr * (g_raw.double() @ precond)) < 1e-5
    g_raw_plain, step_plain, _ = run(projected=False)
    assert rel_err(step_plain, -lr * g_raw_plain) < 1e-6 and rel_err(step, step_plain) > 1e-2

    # The point of the projection: s dB A is the full-FT step projected on A's row space.
    base(x).pow(2).sum().backward()  # B starts at 0, so the adapted model's gradient is the base's
    w = base[0].weight
    a64 = a.double()
    proj = a64.T @ torch.linalg.inv(a64 @ a64.T) @ a64  # (d_in, d_in)
    assert rel_err(s * step.double() @ a64, -lr * w.grad.double() @ proj) < 1e-4


# --- VeRA -------------------------------------------------------------------------------------------------
def test_vera_forward_and_gradients_match_formula() -> None:
    r = 16  # larger than min(d_in, d_out) of both layers: allowed for VeRA
    model = lorakit.attach(TwoLayers(), "vera", r=r)
    perturb(model)
    shared = shared_module(model, "default")
    assert tuple(shared.vera_A.shape) == (r, 12) and tuple(shared.vera_B.shape) == (10, r)
    for layer in (model.up, model.down):
        ad = layer.adapters["default"]
        d_out, d_in = layer.weight.shape
        a, b = shared.vera_A[:, :d_in], shared.vera_B[:d_out, :]

        def formula(x: Tensor, W: Tensor, bias: Tensor, A: Tensor, B: Tensor, d: Tensor, bv: Tensor) -> Tensor:
            return x @ W.T + bias + (((x @ A.T) * d) @ B.T) * bv  # W0 x + diag(b) B diag(d) A x

        check_against(layer, formula, {"W": layer.base.weight, "bias": layer.base.bias, "A": a, "B": b,
                                       "d": ad.lambda_d, "bv": ad.lambda_b})
        expected = torch.diag(ad.lambda_b) @ b @ torch.diag(ad.lambda_d) @ a
        torch.testing.assert_close(ad.delta_weight(layer.weight), expected)


def test_vera_layers_share_one_copy_of_the_projections() -> None:
    model = lorakit.attach(TwoLayers(), "vera", r=8)
    up, down = model.up.adapters["default"], model.down.adapters["default"]
    assert isinstance(up, Vera) and set(up.state_dict()) == {"lambda_d", "lambda_b"}
    assert lorakit.trainable_parameters(model) == (8 + 10) + (8 + 7)
    for dtype in (torch.float32, torch.float64):  # .to() moves the one copy; the layers follow it
        model.to(dtype)
        shared = shared_module(model, "default")
        for ad in (up, down):
            a, b = ad.sliced(torch.device("cpu"))
            assert a.data_ptr() == shared.vera_A.data_ptr() and b.data_ptr() == shared.vera_B.data_ptr()
            assert a.dtype == dtype
        assert sum("vera_A" in k for k in model.state_dict()) == 1


def test_vera_projections_come_from_the_seed_not_the_global_rng() -> None:
    models = [TwoLayers() for _ in range(3)]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    lorakit.attach(models[0], "vera", r=8, projection_seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG was not touched
    torch.manual_seed(456)  # nor does its state matter
    lorakit.attach(models[1], "vera", r=8, projection_seed=7)
    lorakit.attach(models[2], "vera", r=8, projection_seed=8)
    s1, s2, s3 = (shared_module(m, "default") for m in models)
    assert torch.equal(s1.vera_A, s2.vera_A) and torch.equal(s1.vera_B, s2.vera_B)
    assert not torch.equal(s1.vera_A, s3.vera_A)


def test_vera_rejects_bad_options() -> None:
    for bad in ({"r": 0}, {"d_init": 0.0}, {"projection_seed": -1}):
        with pytest.raises(lorakit.ConfigError):
            lorakit.attach(TwoLayers(), "vera", **bad)


@pytest.mark.parametrize("save_projections", [True, False])
def test_vera_reloads_bit_exactly(tmp_path, save_projections: bool) -> None:
    model = tiny_llama()
    batch = batch_for(model)
    lorakit.attach(model, "vera", r=16, save_projections=save_projections)
    perturb(model)
    ref = output_of(model, batch)
    lorakit.save(model, tmp_path / "a")
    _, saved = lorakit.read_adapter(tmp_path / "a")
    assert ("__shared__.vera_A" in saved) == save_projections and "__shared__.checksum" in saved
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "a")
    old, new = shared_module(model, "default"), shared_module(fresh, "default")
    assert torch.equal(old.vera_A, new.vera_A) and torch.equal(old.vera_B, new.vera_B)
    torch.testing.assert_close(output_of(fresh, batch), ref, rtol=0, atol=0)


def test_vera_load_detects_projections_that_do_not_match_the_checksum(tmp_path, monkeypatch) -> None:
    model = TwoLayers()
    lorakit.attach(model, "vera", r=8, save_projections=False)
    lorakit.save(model, tmp_path / "a")
    real = vera.projections
    monkeypatch.setattr(vera, "projections", lambda *a: tuple(t * 1.01 for t in real(*a)))  # "another RNG"
    fresh = TwoLayers()
    with pytest.raises(lorakit.IncompatibleAdapterError, match="checksum"):
        lorakit.load(fresh, tmp_path / "a")
    assert lorakit.adapters(fresh) == {} and isinstance(fresh.up, nn.Linear)  # left unchanged


# --- LoRA+ ------------------------------------------------------------------------------------------------
def _ids(params) -> set[int]:
    return {id(p) for p in params}


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def test_loraplus_groups_follow_the_adapters() -> None:
    model = tiny_llama()
    lorakit.attach(model, "lora", r=4, targets=["embed_tokens", "q_proj", "v_proj"])
    ads = adapter_modules(model)
    emb = {t for t in ads if "embed_tokens" in t}
    groups = _by_name(lorakit.param_groups(model, 1e-3, loraplus_ratio=16, weight_decay=0.1))
    assert set(groups) == {"A", "B", "embedding"}
    assert groups["B"]["lr"] == pytest.approx(16e-3) and groups["A"]["lr"] == 1e-3
    assert groups["embedding"]["lr"] == 1e-6 and groups["A"]["weight_decay"] == 0.1
    assert _ids(groups["B"]["params"]) == _ids(a.lora_B for t, a in ads.items() if t not in emb)
    assert _ids(groups["A"]["params"]) == _ids(a.lora_A for t, a in ads.items() if t not in emb)
    assert _ids(groups["embedding"]["params"]) == _ids(p for t in emb for p in ads[t].parameters())
    # plain: every adapter tensor at lr, embeddings included
    plain = lorakit.param_groups(model, 1e-3, loraplus_ratio=None)
    assert {g["lr"] for g in plain} == {1e-3} and sum(len(g["params"]) for g in plain) == 2 * len(ads)


def test_loraplus_sides_of_other_methods() -> None:
    model = lorakit.attach(TwoLayers(), "dora", r=2)
    g = _by_name(lorakit.param_groups(model, 1e-3, weight_decay=0.1))
    mags = _ids(model.get_submodule(t).adapters["default"].magnitude for t in ("up", "down"))
    assert _ids(g["A_no_decay"]["params"]) == mags and g["A_no_decay"]["weight_decay"] == 0.0
    assert g["A_no_decay"]["lr"] == 1e-3

    model = lorakit.attach(TwoLayers(), "vera", r=4)
    g = _by_name(lorakit.param_groups(model, 1e-3))
    assert _ids(g["B_no_decay"]["params"]) == _ids(a.lambda_b for a in adapter_modules(model).values())
    model = lorakit.attach(TwoLayers(), "lora-fa", r=2)
    g = _by_name(lorakit.param_groups(model, 1e-3))
    assert set(g) == {"B"} and _ids(g["B"]["params"]) == _ids(a.lora_B for a in adapter_modules(model).values())
    model = lorakit.attach(TwoLayers(), "full")
    assert set(_by_name(lorakit.param_groups(model, 1e-3))) == {"base", "base_no_decay"}


def test_loraplus_sgd_step_moves_b_by_the_ratio() -> None:
    model = lorakit.attach(TwoLayers(), "lora", r=2)
    perturb(model)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]

    def step(ratio: float | None) -> dict[int, Tensor]:
        with torch.no_grad():
            for p, s0, g in zip(params, start, grads):
                p.copy_(s0)
                p.grad = g.clone()
        torch.optim.SGD(lorakit.param_groups(model, 0.01, loraplus_ratio=ratio)).step()
        return {id(p): p.detach() - s0 for p, s0 in zip(params, start)}

    plus, plain = step(16.0), step(None)
    for ad in adapter_modules(model).values():
        torch.testing.assert_close(plus[id(ad.lora_B)], 16 * plain[id(ad.lora_B)])
        torch.testing.assert_close(plus[id(ad.lora_A)], plain[id(ad.lora_A)])
        assert plain[id(ad.lora_B)].abs().max() > 0


def test_loraplus_optimizer_and_errors() -> None:
    model = lorakit.attach(TwoLayers(), "lora", r=2)
    plain = lorakit.optimizer(model, 2e-4, weight_decay=0.01)  # LoRA+ only when asked for, as in the trainer
    assert {g["lr"] for g in plain.param_groups} == {2e-4}
    opt = lorakit.optimizer(model, 2e-4, weight_decay=0.01, loraplus_ratio=16)
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"A": 2e-4, "B": pytest.approx(16 * 2e-4)}
    assert not opt.defaults.get("fused")  # CPU tensors: no fused CUDA kernel
    for bad in ({"lr": 0.0}, {"lr": 1e-3, "loraplus_ratio": -1.0}, {"lr": 1e-3, "weight_decay": -0.1},
                {"lr": 1e-3, "embedding_lr": 0.0}):
        with pytest.raises(lorakit.ConfigError):
            lorakit.param_groups(model, **bad)
    with pytest.raises(lorakit.AdapterStateError, match="no trainable"):
        lorakit.param_groups(TwoLayers().requires_grad_(False), 1e-3)
