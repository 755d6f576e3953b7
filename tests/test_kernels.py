"""Fast paths == reference paths: fused adapter linears, shared-input grouping, torch.compile, checkpointing,
fused linear cross-entropy, and a smoke run of ``lorakit bench``."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lorakit
from lorakit.core import lowrank as kernels
from lorakit.core.layers import AdaptedLayer, adapted_layers
from lorakit.core.lowrank import LowRank, lowrank_linear
from lorakit.fast import cross_entropy, speed

from .conftest import batch_for, tiny_gpt2, tiny_llama
from .test_contract import CASES, _perturb


def _tol(device: torch.device) -> float:
    """fp32 agreement of two computations of the same function: tighter on the CPU than with GPU kernels."""
    return 1e-5 if device.type == "cpu" else 1e-4


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


class _Spy:
    """Counts calls of the fused autograd function."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = kernels._LowRankLinear.apply

        def apply(*args: object) -> Tensor:
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(kernels._LowRankLinear, "apply", apply)


# --- the fused op against the plain formula, for every kind of factor -------------------------------------------
#: name -> (A trains, B trains, mid: None | "matrix" | "vector", out vector)
FACTORS = {
    "lora": (True, True, None, False),
    "lora-fa": (False, True, None, False),
    "lora-xs": (False, False, "matrix", False),
    "vera": (False, False, "vector", True),
    "rank1-sum": (True, True, "vector", False),
    "all-trainable": (True, True, "vector", True),  # B and the row scaling both train: dL/dB sees diag(out)
}


def _factors(kind: str, d_in: int, d_out: int, r: int, p: float, device: torch.device | str = "cpu") -> LowRank:
    a_tr, b_tr, mid, out = FACTORS[kind]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(r, d_in, generator=g).to(device).requires_grad_(a_tr)
    b = torch.randn(d_out, r, generator=g).to(device).requires_grad_(b_tr)
    m = None if mid is None else \
        torch.randn((r, r) if mid == "matrix" else (r,), generator=g).to(device).requires_grad_()
    o = torch.randn(d_out, generator=g).to(device).requires_grad_() if out else None
    return LowRank(a, b, m, o, scale=0.7, dropout=p)


def _formula(x: Tensor, w: Tensor, bias: Tensor, f: LowRank, mask: Tensor | None) -> Tensor:
    """The plain formula in fp32: ``x W^T + bias + out * (s mid(dropout(x) A^T) B^T)``."""
    xd = x if mask is None else x * mask / (1 - f.dropout)
    h = xd @ f.a.t()
    if f.mid is not None:
        h = h @ f.mid.t() if f.mid.dim() == 2 else h * f.mid
    t = (h * f.scale) @ f.b.t()
    return x @ w.t() + bias + (t if f.out is None else t * f.out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("kind", sorted(FACTORS))
@pytest.mark.cuda
def test_fused_op_matches_formula(kind: str, p: float, dtype: torch.dtype, device: torch.device) -> None:
    """Forward and every gradient; frozen factors get none. bf16 is compared with the fp32 formula."""
    d_in, d_out, r = 48, 40, 6
    layer = AdaptedLayer(nn.Linear(d_in, d_out)).requires_grad_(False)
    layer.base.to(device, dtype)
    f = _factors(kind, d_in, d_out, r, p, device)
    x = torch.randn(3, 7, d_in).to(device, dtype).requires_grad_()
    gy = torch.randn(3, 7, d_out).to(device, dtype)

    torch.manual_seed(11)
    y = lowrank_linear(x, layer, f)
    assert y is not None and y.dtype == dtype
    y.backward(gy)
    tensors = {"x": x, "a": f.a, "b": f.b, "mid": f.mid, "out": f.out}
    got = {k: t.grad for k, t in tensors.items() if t is not None}
    for t in tensors.values():
        if t is not None:
            t.grad = None

    torch.manual_seed(11)  # same draws as the fused op: the mask nn.Dropout would use on an x of this dtype
    mask = F.dropout(torch.ones(x.shape, dtype=dtype, device=device), p, True).ne(0).float() if p else None
    xr = x.detach().float().requires_grad_()
    ref = _formula(xr, layer.base.weight.float(), layer.base.bias.float(), f, mask)
    ref.backward(gy.float())
    tol = (1e-5 if device.type == "cpu" else 1e-4) if dtype == torch.float32 else 1e-2
    assert _rel(y, ref) < tol
    assert _rel(got["x"], xr.grad) < tol
    for k in ("a", "b", "mid", "out"):
        t = tensors[k]
        if t is None:
            continue
        if t.requires_grad:
            assert _rel(got[k], t.grad) < tol, k
        else:
            assert got[k] is None, f"{k} is frozen but got a gradient"


def _saved_bytes(fn: Callable[[], Tensor], exclude: list[Tensor]) -> int:
    own = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize(("kind", "p", "expected"), [
    ("lora", 0.0, lambda n, d, r: 4 * n * (d + r)),  # x and A x
    ("lora-fa", 0.0, lambda n, d, r: 4 * n * r),  # A x alone
    ("lora-xs", 0.0, lambda n, d, r: 4 * n * r),
    ("lora", 0.3, lambda n, d, r: 4 * n * (d + r) + n * d),  # + the mask as bool
    ("lora-fa", 0.3, lambda n, d, r: 4 * n * r + n * d),
])
def test_fused_op_keeps_only_what_gradients_need(kind: str, p: float, expected: Callable[..., int]) -> None:
    n, d, r = 64, 96, 4
    layer = AdaptedLayer(nn.Linear(d, 80)).requires_grad_(False)
    f = _factors(kind, d, 80, r, p)
    x = torch.randn(n, d, requires_grad=True)
    weights = [layer.base.weight, layer.base.bias, *(t for t in (f.a, f.b, f.mid, f.out) if t is not None)]
    assert _saved_bytes(lambda: lowrank_linear(x, layer, f), weights) == expected(n, d, r)


# --- every registered method: fused model == reference model --------------------------------------------------
#: Layer methods without a fused path: DoRA's row normalisation is not a low-rank product.
def _fused_calls(model: nn.Module) -> int:
    """How many fused-op calls a forward of ``model`` must make: one per adapted layer whose adapter offers
    the fused path in its current configuration (:meth:`lorakit.Adapter.lowrank`: DoRA never, PiSSA not while
    its dropout applies)."""
    model.train()
    return sum(layer.adapters["default"].lowrank(layer) is not None
               for _, layer in adapted_layers(model))


def _layer_methods() -> list[str]:
    return sorted(m for m, cls in lorakit.METHODS.items() if isinstance(cls, type)
                  and issubclass(cls, lorakit.Adapter))


def _grads(model: nn.Module, batch: dict[str, Tensor], seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _attached(method: str, dropout: float = 0.0, names: tuple[str, ...] = ("default",),
              device: torch.device | str = "cpu") -> nn.Module:
    case = CASES[method]
    model = case.model("llama", device)
    opts = dict(case.options)
    if dropout:
        opts["dropout"] = dropout
    for i, name in enumerate(names):
        lorakit.attach(model, method, name=name, **opts, **case.runtime(model))
        _perturb(model, seed=3 + i)
    lorakit.set_active(model, list(names))
    return model.train()


def _assert_same(a: tuple[Tensor, dict[str, Tensor]], b: tuple[Tensor, dict[str, Tensor]],
                 tol: float = 1e-5) -> None:
    assert _rel(a[0], b[0]) < tol
    assert a[1].keys() == b[1].keys() and a[1]
    for k in b[1]:
        assert _rel(a[1][k], b[1][k]) < tol, k


@pytest.mark.cuda
@pytest.mark.parametrize("method", _layer_methods())
def test_fused_model_equals_reference(method: str, monkeypatch: pytest.MonkeyPatch, device: torch.device) -> None:
    has_dropout = "dropout" in lorakit.METHODS[method].config_cls.model_fields
    for dropout in (0.0, 0.1) if has_dropout else (0.0,):
        try:
            model = _attached(method, dropout, device=device)
        except lorakit.ConfigError:  # a method may refuse dropout (Delta-LoRA)
            continue
        batch = batch_for(model)
        with kernels.fused(False):
            ref = _grads(model, batch)
        spy = _Spy(monkeypatch)
        _assert_same(_grads(model, batch), ref, tol=_tol(device))
        # every method with a fused path took it: 7 projections x 2 layers went through the fused op (a silent
        # fallback to the reference path would compare the reference with itself)
        want = _fused_calls(model)
        assert spy.calls == want and want in (0, 14) and (want == 14 or method != "lora"), method
        monkeypatch.undo()


@pytest.mark.parametrize("method", _layer_methods())
def test_fused_layer_in_bf16_matches_fp32_reference(method: str) -> None:
    """A bf16 base with fp32 adapter weights (how lorakit attaches to a bf16 model) against fp32."""
    if CASES[method].quantize:
        pytest.skip(f"{method} trains on a quantized base: no bf16 base weights to compare")
    model = _attached(method)
    layer = model.model.layers[0].mlp.up_proj
    adapter = layer.adapters["default"]
    # inputs and base weight exactly representable in bf16: only the arithmetic differs
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(2)).bfloat16().float().requires_grad_()
    gy = torch.randn(4, 8, 48, generator=torch.Generator().manual_seed(3)).bfloat16().float()
    layer.base.to(torch.bfloat16).float()
    params = [p for p in adapter.parameters() if p.requires_grad]

    def run() -> list[Tensor]:
        y = layer(x.to(layer.weight.dtype))
        grads = torch.autograd.grad(y, [x, *params], gy.to(y.dtype))
        return [y, *grads]

    with kernels.fused(False):
        ref = run()
    layer.base.to(torch.bfloat16)
    got = run()
    assert got[0].dtype == torch.bfloat16
    for a, b in zip(got, ref, strict=True):
        assert _rel(a, b) < 1e-2


def test_fused_conv1d_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2's Conv1D (transposed weight, bias) through the fused op."""
    model = tiny_gpt2()
    lorakit.attach(model, "lora", r=4, dropout=0.1)
    _perturb(model)
    model.train()
    batch = batch_for(model)
    with kernels.fused(False):
        ref = _grads(model, batch)
    spy = _Spy(monkeypatch)
    _assert_same(_grads(model, batch), ref)
    assert spy.calls > 0


@pytest.mark.parametrize("method", ["lora", "lora-fa"])
def test_several_active_adapters_use_the_plain_path(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if method not in lorakit.METHODS:
        pytest.skip(f"{method} is not registered")
    model = _attached(method, names=("one", "two"))
    batch = batch_for(model)
    with kernels.fused(False):
        ref = _grads(model, batch)
    spy = _Spy(monkeypatch)
    _assert_same(_grads(model, batch), ref)
    assert spy.calls == 0


@pytest.mark.cuda
def test_grouped_projections_equal_reference(monkeypatch: pytest.MonkeyPatch, device: torch.device) -> None:
    model = _attached("lora", device=device)
    batch = batch_for(model)
    with kernels.fused(False):
        ref = _grads(model, batch)
    assert speed.group_projections(model) == 4  # (q, k, v) and (gate, up) in each of 2 layers
    shared = []
    real = speed.ProjectionGroup.lookup
    monkeypatch.setattr(speed.ProjectionGroup, "lookup",
                        lambda self, layer, x: shared.append(real(self, layer, x)) or shared[-1])
    _assert_same(_grads(model, batch), ref, tol=_tol(device))
    assert len(shared) == 10 and all(h is not None for h in shared)
    assert all(g._x is None for g in {layer.projection_group for _, layer in lorakit.core.layers.adapted_layers(model)
                                        if layer.projection_group is not None})  # nothing kept after forward
    # dropout: one shared mask would change the function, so the members fall back to their own GEMM
    for _, layer in lorakit.core.layers.adapted_layers(model):
        layer.adapters["default"].dropout = nn.Dropout(0.1)
    shared.clear()
    with kernels.fused(False):
        ref = _grads(model, batch)
    _assert_same(_grads(model, batch), ref, tol=_tol(device))
    assert shared and all(h is None for h in shared)
    speed.ungroup_projections(model)
    assert not any(layer.projection_group is not None for _, layer in lorakit.core.layers.adapted_layers(model))


# --- torch.compile and checkpointing ---------------------------------------------------------------------------
def test_compile_fullgraph_adapted_layer_and_decoder_layer() -> None:
    """No graph break in the adapter path (``aot_eager``: traces forward and backward, skips C++ codegen)."""
    torch._dynamo.reset()
    model = _attached("lora")
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 8, 32, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    got = (y.detach(), x.grad, layer.adapters["default"].lora_A.grad, layer.adapters["default"].lora_B.grad)
    x.grad = None
    layer.zero_grad(set_to_none=True)
    with kernels.fused(False):
        y_ref = layer(x)
    y_ref.square().sum().backward()
    ref = (y_ref.detach(), x.grad, layer.adapters["default"].lora_A.grad, layer.adapters["default"].lora_B.grad)
    for a, b in zip(got, ref, strict=True):
        assert _rel(a, b) < 1e-5
    # a whole decoder layer, shared-input groups installed, compiles as one graph too
    speed.group_projections(model)
    dec = model.model.layers[1]
    h = torch.randn(2, 8, 32)
    pos = model.model.rotary_emb(h, torch.arange(8)[None])
    explained = torch._dynamo.explain(dec)(h, position_embeddings=pos, attention_mask=None)
    assert explained.graph_break_count == 0


def test_compile_layers_compiles_each_decoder_layer() -> None:
    model = tiny_llama()
    assert speed.decoder_layers(model) == list(model.model.layers)
    assert speed.compile_layers(model, backend="eager") == 2
    with pytest.raises(lorakit.ConfigError, match="no decoder layers"):
        speed.compile_layers(nn.Linear(2, 2))


@pytest.mark.parametrize("method", sorted(lorakit.METHODS))
def test_checkpointing_gives_the_same_gradients(method: str) -> None:
    model = _attached(method)
    batch = batch_for(model)
    ref = _grads(model, batch)
    speed.enable_checkpointing(model)
    _assert_same(_grads(model, batch), ref)


# --- fused linear cross-entropy ------------------------------------------------------------------------------
@pytest.mark.parametrize("head_trains", [False, True])
def test_linear_cross_entropy_matches_plain_loss(head_trains: bool) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g).requires_grad_(head_trains)
    bias = torch.randn(50, generator=g).requires_grad_(head_trains)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[0, :4] = -100
    loss = cross_entropy.linear_cross_entropy(h, w, labels, bias, chunk=7)  # several chunks, one ragged
    loss.backward()
    got = (h.grad, w.grad, bias.grad)
    h.grad = w.grad = bias.grad = None
    logits = (h @ w.t() + bias)[:, :-1].reshape(-1, 50)
    ref = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    assert _rel(loss, ref) < 1e-6 and _rel(got[0], h.grad) < 1e-5
    if head_trains:
        assert _rel(got[1], w.grad) < 1e-5 and _rel(got[2], bias.grad) < 1e-5
    else:
        assert got[1] is None and got[2] is None


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["lora", "full"])
def test_causal_lm_loss_equals_model_loss(method: str, device: torch.device) -> None:
    model = _attached(method, device=device)
    batch = batch_for(model, seq=12)
    batch["labels"][0, :5] = -100
    with kernels.fused(False):
        ref = _grads(model, batch)
    torch.manual_seed(0)
    loss = speed.causal_lm_loss(model, batch["input_ids"], batch["labels"])
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    _assert_same((loss.detach(), got), ref, tol=_tol(device))


def test_set_fused_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _attached("lora")
    spy = _Spy(monkeypatch)
    with kernels.fused(False):
        assert not kernels.fused_enabled()
        model(**batch_for(model))
    assert spy.calls == 0 and kernels.fused_enabled()


# --- bench --------------------------------------------------------------------------------------------------
def test_bench_smoke(tmp_path) -> None:
    from lorakit.cli import main
    from lorakit.evaluation.bench import run_bench

    out = tmp_path / "r.json"
    res = run_bench("cpu", ["lora", "full"], compare_peft=True, out=out, workload="tiny", steps=1,
                    warmup=0, quiet=True)
    saved = json.loads(out.read_text())
    assert saved["ratios"] == res["ratios"]
    names = [r["name"] for r in saved["rows"]]
    assert names[:6] == ["floor", "floor[hf-loss]", "lora", "lora[plain]", "peft:lora", "peft:lora[hf-loss]"]
    assert "full" in names and not saved["failed_rows"]
    assert not [r for r in saved["rows"] if r["error"]]
    for key in ("lora_vs_peft", "lora_vs_floor", "lora_mem_vs_peft", "lora_vs_peft_hf_loss"):
        assert saved["ratios"][key] > 0
    # the floor and PEFT's row run the lorakit rows' loss kernel, so the ratios compare adapters only
    loss = {r["name"]: r["loss"] for r in saved["rows"]}
    assert loss["floor"] == loss["lora"] == loss["peft:lora"] == loss["full"] == "chunked"
    assert loss["floor[hf-loss]"] == loss["peft:lora[hf-loss]"] == loss["lora[plain]"] == "model"
    assert saved["versions"]["torch"] and saved["device"]["name"] and isinstance(saved["noisy_rows"], list)
    assert main(["bench", "--methods", "nope", "--workload", "tiny"]) != 0



def test_bench_compiles_every_row_and_says_so(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows one after the other as on a GPU, more compiled rows than dynamo's per-code-object cache holds (the
    layers of every row share one code object): each compiled row is compiled afresh and really runs its compiled
    graphs in every measured step (counted by the backend); the JSON is written as rows finish; ``--strict``."""
    from lorakit.cli import main
    from lorakit.evaluation import bench

    out = tmp_path / "c.json"
    written: list[int] = []
    real = bench.write_json
    monkeypatch.setattr(bench, "write_json", lambda path, data, **kw: written.append(len(data["rows"])) or
                        real(path, data, **kw))
    methods = ["lora", "lora-fa", "vera", "delta-lora", "lora-xs", "rank1-sum", "full"]
    res = bench.run_bench("cpu", methods, out=out, workload="tiny", steps=1, warmup=1, compile_layers=True,
                          compile_backend="aot_eager", interleave=False, quiet=True)
    compiled = [r for r in res["rows"] if r["compiled"]]
    assert [r["name"] for r in compiled] == methods
    for r in compiled:
        assert r["ran_compiled"] and r["frames"] >= 1 and r["graph_calls_per_step"] >= 2, r
        assert r["compile_s"] is not None
    assert not res["not_compiled_rows"] and not res["failed_rows"]
    assert len(written) == len(res["rows"]) + 1  # after each row, and once at the end
    assert json.loads(out.read_text())["rows"][-1]["name"] == "full"

    def broken(row, *a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(bench, "_prepare", broken)
    assert main(["bench", "--device", "cpu", "--workload", "tiny", "--methods", "lora", "--steps", "1",
                 "--warmup", "0", "--strict"]) == 1
    assert main(["bench", "--device", "cpu", "--workload", "tiny", "--methods", "lora", "--steps", "1",
                 "--warmup", "0"]) == 0  # without --strict a failed row is reported, not fatal


def test_bench_cpu_ratios_use_fast_medians() -> None:
    from lorakit.evaluation.bench_results import WORKLOADS, Row, fast_median
    from lorakit.evaluation.bench_results import summarize_rows as _results

    assert fast_median([5.0, 1.0, 1.2, 9.0, 1.1, 1.3]) == pytest.approx(1.1)  # median of 1.0, 1.1, 1.2
    assert fast_median([2.0]) == 2.0 and fast_median([]) is None
    rows = [Row("floor", "floor", None, times=[1.0, 3.0, 1.1, 1.05]),
            Row("lora", "lorakit", "lora", times=[1.2, 1.05, 2.5, 1.1])]
    rows.append(Row("peft:lora", "peft", "lora", times=[1.5, 1.4, 1.6, 1.45]))
    for r in rows:
        r.mem_bytes = 100
    res = _results(rows, WORKLOADS["tiny"], "cpu", 1e9, 4, 0, False, 2, ["lora"], interleaved=True)
    # the spikes (3.0 s, 2.5 s) change nothing: fast medians 1.025 and 1.075
    assert res["ratios"]["lora_vs_floor"] == pytest.approx(1.075 / 1.025)
    assert res["ratios"]["lora_vs_peft"] == pytest.approx(1.075 / 1.425)
    assert res["rows"][0]["step_s"] == pytest.approx(1.075)  # the plain median is still reported
    medians = _results(rows, WORKLOADS["tiny"], "cpu", 1e9, 4, 0, False, 2, ["lora"], interleaved=False)
    assert medians["ratios"]["lora_vs_floor"] == pytest.approx(1.15 / 1.075)


def test_bench_with_checkpointing_saves_activations() -> None:
    from lorakit.evaluation.bench import run_bench

    kw = dict(workload="tiny", steps=1, warmup=0, quiet=True, compare_peft=True)
    plain = run_bench("cpu", ["lora"], **kw)
    ckpt = run_bench("cpu", ["lora"], checkpointing=True, **kw)
    assert ckpt["settings"]["checkpointing"] and not [r for r in ckpt["rows"] if r["error"]]
    saved = {r["name"]: r["saved_activation_bytes"] for r in plain["rows"]}
    for r in ckpt["rows"]:  # every row, PEFT and the floor included, keeps less for backward
        assert r["saved_activation_bytes"] < saved[r["name"]], r["name"]


# --- under autocast (the GPU default, training.precision auto/bf16): the fused op follows its casts -------------
def _max_rel(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(_rel(a[k], b[k]) for k in b)


@pytest.mark.cuda
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["fp32-weights", "bf16-weights"])
@pytest.mark.parametrize("method", _layer_methods())
def test_fused_model_under_bf16_autocast_equals_reference(method: str, weights: torch.dtype,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          device: torch.device) -> None:
    """bf16 autocast over an fp32 or a bf16 base (adapter weights fp32, as lorakit keeps them): every adapted
    projection takes the fused op, and its loss and gradients are as close to the fp32 truth as the reference
    path's under the same autocast (bf16 rounding makes both differ from fp32 by 1-5% on this tiny model)."""
    has_dropout = "dropout" in lorakit.METHODS[method].config_cls.model_fields and method != "delta-lora"
    for dropout in (0.0, 0.1) if has_dropout else (0.0,):
        model = _attached(method, dropout, device=device)
        batch = batch_for(model)
        truth = _grads(model, batch)
        for name, p in model.named_parameters():
            if ".adapters." not in name:
                p.data = p.data.to(weights)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            with kernels.fused(False):
                ref = _grads(model, batch)
            spy = _Spy(monkeypatch)
            got = _grads(model, batch)
        want = _fused_calls(model)
        assert spy.calls == want and want in (0, 14), method  # 7 projections x 2 layers
        assert got[1].keys() == ref[1].keys() == truth[1].keys()
        assert _rel(got[0], truth[0]) < 1e-3 and _rel(ref[0], truth[0]) < 1e-3
        assert _max_rel(got[1], truth[1]) <= 1.5 * _max_rel(ref[1], truth[1]) + 5e-3, method
        assert _max_rel(got[1], ref[1]) < 0.1
        assert all(g.dtype == torch.float32 for n, g in got[1].items() if ".adapters." in n)  # fp32 adapter grads
        monkeypatch.undo()


_LIGER_CHECK = """
import json, sys, torch
from lorakit.fast import cross_entropy
g = torch.Generator().manual_seed(0)
out = {"kernel": cross_entropy.kernel("cpu")}
for dtype in (torch.float32, torch.bfloat16):
    h = torch.randn(2, 9, 32, generator=g).to(dtype).requires_grad_()
    w = torch.randn(50, 32, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[0, :3] = -100
    got = cross_entropy.linear_cross_entropy(h, w, labels)
    gh, gw = torch.autograd.grad(got, [h, w])
    logits = (h.float() @ w.float().t())[:, :-1].reshape(-1, 50)
    ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    rh, rw = torch.autograd.grad(ref, [h, w])
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    out[str(dtype)] = {"loss": rel(got, ref), "h": rel(gh, rh), "w": rel(gw, rw)}
print(json.dumps(out))
"""


def test_liger_cross_entropy_runs_under_the_triton_interpreter(tmp_path) -> None:
    """LORAKIT_CROSS_ENTROPY=liger forces Liger's kernel off CUDA; under TRITON_INTERPRET=1 it runs on the CPU, so
    the branch every CUDA run takes is checked here (loss and gradients against full-logit cross-entropy)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("needs triton and liger-kernel (pip install 'lorakit[gpu]' triton)")
    env = {**os.environ, "TRITON_INTERPRET": "1", cross_entropy.KERNEL_ENV: "liger", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _LIGER_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["kernel"] == "liger"
    assert max(res["torch.float32"].values()) < 1e-5
    assert res["torch.bfloat16"]["loss"] < 1e-2 and max(res["torch.bfloat16"].values()) < 2e-2


def test_cross_entropy_kernel_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cross_entropy.KERNEL_ENV, "chunked")
    assert cross_entropy.kernel("cpu") == "chunked"
    monkeypatch.setenv(cross_entropy.KERNEL_ENV, "auto")
    assert cross_entropy.kernel("cpu") == "chunked"  # Liger only on CUDA unless forced
    monkeypatch.setenv(cross_entropy.KERNEL_ENV, "fast")
    with pytest.raises(lorakit.ConfigError, match="choose one of auto, liger, chunked"):
        cross_entropy.kernel("cpu")
    monkeypatch.setenv(cross_entropy.KERNEL_ENV, "liger")
    monkeypatch.setattr(cross_entropy, "_LIGER", [None])
    monkeypatch.setattr(cross_entropy, "_WHY", ["No module named 'liger_kernel'"])
    with pytest.raises(lorakit.ConfigError, match="cannot be imported: No module named 'liger_kernel'"):
        cross_entropy.kernel("cpu")
    model = _attached("lora")
    monkeypatch.setenv(cross_entropy.KERNEL_ENV, "chunked")
    assert speed.loss_kernel(model) == "chunked"
    with kernels.fused(False):
        assert speed.loss_kernel(model) == "model"
