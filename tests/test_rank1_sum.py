"""rank1-sum: the gated rank-1 sum, its pruner (AdaLoRA-style importance and cubic budget), physical shrinking,
saving at pruned shapes, growth, exact resume, and a synthetic task where only one layer needs rank."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adapt.model import adapter_modules, adapter_tensors
from lorakit.core.collectives import all_reduce_mean_
from lorakit.core.layers import LayerInfo
from lorakit.core.lowrank import fused, fused_calls
from lorakit.fast.speed import group_projections, ungroup_projections
from lorakit.formats.describe import describe, format_description
from lorakit.methods.rank1_sum import Rank1Sum
from lorakit.methods.rank1_sum_pruning import RankPruner, grow, shrink

from .conftest import batch_for, output_of, tiny_llama


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation (10x slower on a busy
    2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _perturb(model: nn.Module, seed: int = 0) -> None:
    """Give every gate, A and B random values so the update is clearly non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapter_modules(model).values():
            for p in a.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.2))


def _train_step(model: nn.Module, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                pruner: RankPruner | None) -> float:
    loss = model(**batch).loss
    if pruner is not None:
        loss = loss + pruner.regularizer()
    loss.backward()
    opt.step()
    if pruner is not None:
        pruner.step()
    opt.zero_grad()
    return loss.item()


# --- the layer math ------------------------------------------------------------------------------------------
def test_forward_equals_formula_and_starts_unchanged() -> None:
    model = tiny_llama()
    batch = batch_for(model)
    before = output_of(model, batch)
    lorakit.attach(model, "rank1-sum", r_init=6, target_rank=3, alpha=9.0, targets=["q_proj"])
    torch.testing.assert_close(output_of(model, batch), before, rtol=0, atol=0)  # g = 0: no change at all

    layer = model.model.layers[0].self_attn.q_proj
    ad = layer.adapters["default"]
    _perturb(model)
    with torch.no_grad():
        ad.mask.copy_(torch.tensor([1.0, 0, 1, 1, 0, 1]))
    x = torch.randn(3, 5, layer.weight.shape[1])
    s = 9.0 / 6
    dw = s * ad.lora_B @ torch.diag(ad.mask * ad.gate) @ ad.lora_A  # the formula, written out
    expected = x @ (layer.weight + dw).T
    with fused(False):
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    before = fused_calls()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # fused path: same function
    assert fused_calls() == before + 1  # and it did run
    torch.testing.assert_close(ad.delta_weight(layer.weight), dw, rtol=1e-6, atol=1e-6)


def test_gate_gradients_are_nonzero_at_init() -> None:
    """With B = 0 (LoRA's init) every dL/dg would be zero and nothing could be scored."""
    model = tiny_llama()
    lorakit.attach(model, "rank1-sum", r_init=4, target_rank=2)
    model(**batch_for(model)).loss.backward()
    for a in adapter_modules(model).values():
        assert a.gate.grad is not None and a.gate.grad.abs().min() > 0
        assert a.lora_A.grad.abs().max() == 0  # dL/dA is proportional to g = 0


def test_bad_options_are_refused() -> None:
    model = tiny_llama()
    for bad in ({"r_init": 4, "target_rank": 5}, {"t_init": 1.5}, {"t_init": 0.6, "t_final": 0.5},
                {"score": "magnitude"}, {"r_init": 64}):
        with pytest.raises(lorakit.ConfigError):
            lorakit.attach(model, "rank1-sum", **bad)
    lorakit.attach(model, "rank1-sum", r_init=4, target_rank=2, t_init=5, t_final=6)
    with pytest.raises(lorakit.ConfigError, match="exceed total_steps"):
        RankPruner(model, total_steps=10)
    with pytest.raises(lorakit.ConfigError, match="cannot override"):
        RankPruner(model, total_steps=100, r_init=8)
    with pytest.raises(lorakit.ConfigError, match="total_steps"):
        RankPruner(model, total_steps=0)
    pruner = RankPruner(model, total_steps=100)
    with pytest.raises(lorakit.AdapterStateError, match="no gradients"):
        pruner.step()


def test_budget_schedule_is_cubic() -> None:
    model = tiny_llama()
    lorakit.attach(model, "rank1-sum", r_init=8, target_rank=2, t_init=10, t_final=20)
    n = len(adapter_modules(model))
    pruner = RankPruner(model, total_steps=110)
    b0, bt = 8 * n, 2 * n
    assert [pruner.budget(t) for t in (0, 10, 90, 110)] == [b0, b0, bt, bt]
    assert pruner.budget(50) == bt + int((b0 - bt) * 0.5**3)
    values = [pruner.budget(t) for t in range(111)]
    assert all(x >= y for x, y in zip(values, values[1:]))


# --- shrinking, saving, inspect ------------------------------------------------------------------------------
def _masked_llama(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = tiny_llama()
    lorakit.attach(model, "rank1-sum", r_init=6, target_rank=2)
    _perturb(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for i, a in enumerate(adapter_modules(model).values()):
            a.mask.copy_((torch.rand(6, generator=g) < 0.5).float())
            if i == 0:
                a.mask.zero_()  # a layer pruned to rank 0 must still work
    return model, batch_for(model)


def test_shrink_keeps_outputs_params_and_optimizer_state() -> None:
    model, batch = _masked_llama()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    layers = adapter_modules(model)
    old = {t: (a.lora_B, opt.state[a.lora_B]["exp_avg"].clone(), a.mask.nonzero().squeeze(1))
           for t, a in layers.items()}
    ref = output_of(model, batch)

    shrink(model, optimizer=opt)
    torch.testing.assert_close(output_of(model, batch), ref, rtol=1e-5, atol=1e-6)
    ranks = {t: a.rank for t, a in layers.items()}
    assert ranks[next(iter(ranks))] == 0
    assert all(a.gate.numel() == a.rank for a in layers.values())  # nothing masked is left
    expected = sum(r * (a.d_in + a.d_out + 1) for r, a in zip(ranks.values(), layers.values()))
    assert lorakit.trainable_parameters(model) == expected
    assert lorakit.adapters(model)["default"].extra["ranks"] == ranks
    group_params = {id(p) for g in opt.param_groups for p in g["params"]}
    for t, a in layers.items():
        b_old, exp_avg, keep = old[t]
        assert id(a.lora_B) in group_params and id(b_old) not in group_params
        torch.testing.assert_close(opt.state[a.lora_B]["exp_avg"], exp_avg[:, keep])
    model(**batch).loss.backward()  # training goes on at the new shapes
    opt.step()


def test_save_load_rebuilds_pruned_shapes_and_inspect_prints_ranks(tmp_path) -> None:
    model, batch = _masked_llama()
    shrink(model)
    ranks = {t: a.rank for t, a in adapter_modules(model).items()}
    ref = output_of(model, batch)
    group_projections(model)  # one shared x A^T GEMM for sibling projections, one of them at rank 0
    torch.testing.assert_close(output_of(model, batch), ref, rtol=1e-5, atol=1e-6)
    ungroup_projections(model)
    lorakit.save(model, tmp_path / "ad")

    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "ad")
    torch.testing.assert_close(output_of(fresh, batch), ref, rtol=0, atol=0)
    assert {t: a.gate.numel() for t, a in adapter_modules(fresh).items()} == ranks
    assert lorakit.trainable_parameters(fresh) == lorakit.trainable_parameters(model)

    d = describe(tmp_path / "ad")
    assert d["method"] == "rank1-sum" and d["ranks"] == ranks and d["total_rank"] == sum(ranks.values())
    assert d["trainable_parameters"] == lorakit.trainable_parameters(model)
    text = format_description(d)
    for t, r in ranks.items():
        assert any(line.split() == [t, str(r)] for line in text.splitlines())


def test_load_refuses_inconsistent_shapes() -> None:
    model, _ = _masked_llama()
    shrink(model)
    target = next(t for t, a in adapter_modules(model).items() if a.rank > 0)
    bad = dict(adapter_tensors(model, "default"))
    bad[f"{target}.gate"] = torch.zeros(bad[f"{target}.gate"].numel() + 1)
    a = Rank1Sum(LayerInfo.of(target, model.get_submodule(target)),
                 lorakit.adapters(model)["default"].config, init=False)
    sub = {k.removeprefix(target + "."): v for k, v in bad.items() if k.startswith(target + ".")}
    with pytest.raises(lorakit.IncompatibleAdapterError, match="saved shape"):
        a.load_tensors(sub, where=target)


# --- growth ----------------------------------------------------------------------------------------------
def test_grow_keeps_function_and_extends_optimizer_state() -> None:
    model, batch = _masked_llama()
    model.train()
    shrink(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train_step(model, batch, opt, None)
    before = {t: a.rank for t, a in adapter_modules(model).items()}
    ref = output_of(model, batch)
    grown = grow(model, "default", 2, optimizer=opt, generator=torch.Generator().manual_seed(0))
    assert grown == {t: r + 2 for t, r in before.items()}
    torch.testing.assert_close(output_of(model, batch), ref, rtol=1e-5, atol=1e-6)  # new gates are 0
    with_state = 0
    for a in adapter_modules(model).values():
        if a.rank > 2:  # a layer grown from rank 0 had no gradient, hence no state yet
            st = opt.state[a.lora_A]["exp_avg"]
            assert st.shape == a.lora_A.shape and st[-2:].abs().max() == 0 and st[:-2].abs().max() > 0
            with_state += 1
    assert with_state > 0
    _train_step(model, batch, opt, None)
    for a in adapter_modules(model).values():
        assert a.gate[-2:].abs().min() > 0  # the new components train at once
    with pytest.raises(lorakit.ConfigError, match="exceeds"):
        grow(model, "default", 40)
    # prune back to a new budget after growth
    pruner = RankPruner(model, total_steps=4, optimizer=opt, t_init=0, t_final=0, target_rank=1)
    for _ in range(4):
        _train_step(model, batch, opt, pruner)
    assert sum(pruner.ranks().values()) == len(before)


# --- the pruner in training ------------------------------------------------------------------------------------
def _pruned_run(steps: int, snapshot_at: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Train a tiny llama with a pruner; optionally rebuild model, optimizer and pruner from their states
    halfway, as a resumed run would."""
    model = tiny_llama()
    lorakit.attach(model, "rank1-sum", r_init=4, target_rank=2, t_init=2, t_final=4, interval=3)
    model.train()
    batch = batch_for(model, batch=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    (pruner,) = lorakit.training_callbacks(model, opt, total_steps=steps)
    assert isinstance(pruner, RankPruner)
    for t in range(steps):
        if t == snapshot_at:
            state = (copy.deepcopy(model), copy.deepcopy(opt.state_dict()), pruner.state_dict())
            model = state[0]
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            opt.load_state_dict(state[1])
            pruner = RankPruner(model, total_steps=steps, optimizer=opt)
            pruner.load_state_dict(state[2])
        _train_step(model, batch, opt, pruner)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return params, pruner.ranks()


def test_resume_is_exact_and_budget_is_met() -> None:
    full, ranks = _pruned_run(16)
    resumed, ranks2 = _pruned_run(16, snapshot_at=7)
    assert ranks == ranks2 and sum(ranks.values()) == 2 * len(ranks)
    assert full.keys() == resumed.keys()
    for n in full:
        torch.testing.assert_close(resumed[n], full[n], rtol=0, atol=0)


def test_all_reduce_point_runs_under_torch_distributed(tmp_path) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.tensor([3.0, 1.0, 2.0])
        torch.testing.assert_close(all_reduce_mean_(x.clone()), x)
    finally:
        dist.destroy_process_group()


# --- a synthetic task that needs rank in one layer only -----------------------------------------------------
D, H, NEEDED, TRUE_RANK = 16, 32, "2", 3


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(),
                         nn.Linear(H, D))


def _teacher() -> nn.Sequential:
    """The same MLP with a rank-3 change (singular values 1, like the base weight's scale) in layer "2"."""
    t = _mlp()
    g = torch.Generator().manual_seed(123)
    u = torch.linalg.qr(torch.randn(H, TRUE_RANK, generator=g))[0]  # (H, 3), orthonormal columns
    v = torch.linalg.qr(torch.randn(H, TRUE_RANK, generator=g))[0]
    with torch.no_grad():
        t.get_submodule(NEEDED).weight.add_(u @ v.T)
    return t


@functools.cache
def _distill(method: str, steps: int = 200, **options) -> tuple[float, dict[str, int] | None, int]:
    """Train adapters on the MLP to match the teacher (MSE, normalised so the base model scores 1.0, as an
    O(1) loss like an LM's); returns validation loss, final ranks and trainable parameters."""
    teacher, model = _teacher(), _mlp()
    torch.manual_seed(1)
    lorakit.attach(model, method, **options)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    callbacks = lorakit.training_callbacks(model, opt, total_steps=steps)
    g = torch.Generator().manual_seed(2)
    x_train, x_val = torch.randn(256, D, generator=g), torch.randn(512, D, generator=g)
    with torch.no_grad():
        y_train, y_val = teacher(x_train), teacher(x_val)
        norm_train = nn.functional.mse_loss(_mlp()(x_train), y_train)
        norm_val = nn.functional.mse_loss(_mlp()(x_val), y_val)
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=g)
        loss = nn.functional.mse_loss(model(x_train[idx]), y_train[idx]) / norm_train
        for cb in callbacks:
            loss = loss + cb.regularizer()
        loss.backward()
        opt.step()
        for cb in callbacks:
            cb.step()
        opt.zero_grad()
    with torch.no_grad():
        val = (nn.functional.mse_loss(model(x_val), y_val) / norm_val).item()
    ranks = callbacks[0].ranks() if callbacks else None
    return val, ranks, lorakit.trainable_parameters(model)


@pytest.mark.parametrize("score", ["sensitivity", "taylor"])
def test_ranks_concentrate_where_the_task_needs_them(score: str) -> None:
    val, ranks, n_params = _distill("rank1-sum", r_init=8, target_rank=1, score=score)
    assert ranks is not None
    print(f"\n[{score}] final ranks {ranks}, validation loss {val:.5f}")
    assert sum(ranks.values()) == 1 * len(ranks)  # the budget, exactly
    others = [r for t, r in ranks.items() if t != NEEDED]
    assert ranks[NEEDED] >= TRUE_RANK and ranks[NEEDED] > max(others)
    dims = {"0": (D, H), "2": (H, H), "4": (H, H), "6": (H, D)}  # (d_in, d_out) of each Linear
    assert n_params == sum(r * (dims[t][0] + dims[t][1] + 1) for t, r in ranks.items())  # shrunk for real


def test_pruned_is_no_worse_than_fixed_rank_lora_at_the_same_budget() -> None:
    pruned, ranks, _ = _distill("rank1-sum", r_init=8, target_rank=1, score="sensitivity")
    lora, _, _ = _distill("lora", r=1)  # same total rank (1 per layer), same steps and optimizer
    print(f"\nvalidation loss (1.0 = untrained): rank1-sum pruned to {ranks}: {pruned:.5f}; "
          f"LoRA r=1 everywhere: {lora:.5f}")
    assert pruned <= lora * 1.05


def test_a_short_run_still_re_masks_many_times() -> None:
    """t_init/t_final as fractions of a 60-step run leave a 36-step cubic phase: with interval 10 that was 3
    re-masks, a step function; min_remasks (20) makes it every step here."""
    model = tiny_llama()
    lorakit.attach(model, "rank1-sum", r_init=4, target_rank=2)
    pruner = RankPruner(model, total_steps=60)
    assert (pruner.t_init, pruner.t_end, pruner.interval) == (6, 42, 1)
    long = RankPruner(model, total_steps=2000)
    assert long.interval == 10  # a long run keeps the configured interval
    budgets = {pruner.budget(t) for t in range(pruner.t_init, pruner.t_end + 1)}
    assert len(budgets) > 10


def test_adalora_mode_keeps_masked_components_training_and_lets_them_return() -> None:
    """mode="adalora": outside the budget a component's gate is zeroed, not its mask: it still trains and is
    scored, comes back at a later re-mask when its score rises, and the final budget is met exactly (then shrunk)."""
    model = tiny_llama()
    lorakit.attach(model, "rank1-sum", r_init=4, target_rank=2, mode="adalora", t_init=2, t_final=2, interval=1,
                   orth_reg=0.0)
    _perturb(model)
    model.train()
    batch = batch_for(model, seq=12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pruner = RankPruner(model, total_steps=14, optimizer=opt)
    layers = adapter_modules(model)
    while pruner.t <= pruner.t_init:
        _train_step(model, batch, opt, pruner)
    assert all(int(a.mask.sum()) == 4 for a in layers.values())  # nothing is pruned before the end
    assert sum(pruner.ranks().values()) == pruner.budget(pruner.t) < 4 * len(layers)
    target, a = next((t, a) for t, a in layers.items() if bool((a.gate == 0).any()))
    out = int((a.gate == 0).nonzero()[0])
    # its importance rises (as if the data now needed it): it must be back in the budget after the next re-mask
    for store in (pruner._ema, pruner._unc):
        for k, v in store[target].items():
            v.select(0 if k != "lora_B" else 1, out).fill_(1e3)
    _train_step(model, batch, opt, pruner)
    assert float(a.gate[out]) != 0.0  # trained on and kept: it came back
    while not pruner.finished:
        _train_step(model, batch, opt, pruner)
    assert sum(pruner.ranks().values()) == 2 * len(layers)
    assert all(x.gate.numel() == x.rank for x in layers.values())  # shrunk to the final budget
