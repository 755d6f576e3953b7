"""Hot-swapping adapter weights in place (lorakit.hot_swap): same outputs as a fresh load, no recompilation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import lorakit
from lorakit.core.lowrank import fused

from .conftest import batch_for, output_of, tiny_llama
from .test_contract import CASES, LAYER_CASES, attach_case
from .test_mixed import _perturb


def _saved(tmp_path: Path, tag: str, method: str, seed: int, model_seed: int = 0, **options: Any) -> Path:
    """An adapter of ``method`` (the contract matrix's options, ``options`` on top) in its trained state with
    perturbed weights, saved under ``tmp_path / tag``."""
    model = tiny_llama(seed=model_seed)
    attach_case(model, method, seed=seed, **options)
    CASES[method].trained(model, "default")
    _perturb(model, seed)
    return lorakit.save(model, tmp_path / tag)


def _fresh(path: Path, method: str = "lora") -> torch.nn.Module:
    """A fresh base (the one ``method`` trains on) with the adapter in ``path`` loaded."""
    model = CASES[method].base(tiny_llama())
    lorakit.load(model, path)
    return model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("fused_path", [True, False], ids=["fused", "reference"])
def test_compiled_model_does_not_recompile_and_matches_a_fresh_load(fused_path: bool, tmp_path) -> None:
    from torch._dynamo.testing import CompileCounter

    enabled = fused_path
    first = _saved(tmp_path, "first", "lora", seed=1, r=4, alpha=8.0)
    smaller = _saved(tmp_path, "smaller", "lora", seed=2, r=2, alpha=3.0)  # zero-padded, scale folded into B
    rs = _saved(tmp_path, "rs", "lora", seed=3, r=4, alpha=5.0, use_rslora=True)
    model = tiny_llama()
    lorakit.load(model, first, name="srv")
    ids = batch_for(model, batch=2, seq=6)["input_ids"]
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}

    torch._dynamo.reset()
    cnt = CompileCounter()
    compiled = torch.compile(model, backend=cnt)
    with torch.no_grad(), fused(enabled):  # the fused low-rank path and the reference path alike
        out = compiled(ids).logits
        torch.testing.assert_close(out, output_of(_fresh(first), {"input_ids": ids}), rtol=1e-5, atol=1e-5)
        frames = cnt.frame_count
        assert frames > 0
        compiled(ids)
        assert cnt.frame_count == frames  # the baseline: a second call does not recompile
        for path in (smaller, rs, first):
            lorakit.hot_swap(compiled, "srv", path)
            swapped = compiled(ids).logits
            want = output_of(_fresh(path), {"input_ids": ids})
            assert (want - out).abs().max() > 1e-3 or path == first  # the adapters differ
            torch.testing.assert_close(swapped, want, rtol=1e-5, atol=1e-5)
            assert cnt.frame_count == frames  # no recompilation
    torch._dynamo.reset()
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers  # the same tensors, refilled
    assert lorakit.adapters(model)["srv"].config.r == 4  # the live adapter keeps its shapes


@pytest.mark.parametrize("method", LAYER_CASES)
def test_every_method_swaps_to_the_saved_adapter(method: str, tmp_path) -> None:
    a = _saved(tmp_path, "a", method, seed=1)
    b = _saved(tmp_path, "b", method, seed=2)
    model = _fresh(a, method)
    batch = batch_for(model)
    before = output_of(model, batch)
    lorakit.hot_swap(model, "default", b)
    want = output_of(_fresh(b, method), batch)
    assert (want - before).abs().max() > 1e-3
    torch.testing.assert_close(output_of(model, batch), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("method", "live", "saved"), [
    ("dora", {"r": 4, "alpha": 8.0}, {"r": 2, "alpha": 2.0}),
    ("delta-lora", {"r": 4, "delta_start": 0}, {"r": 3, "alpha": 4.0, "delta_start": 0}),
    ("lora-xs", {"r": 4}, {"r": 2, "alpha": 3.0}),
    ("lora-fa", {"r": 4, "use_rslora": True}, {"r": 1}),
])
def test_smaller_rank_is_padded_exactly(method: str, live: dict, saved: dict, tmp_path) -> None:
    a = _saved(tmp_path, "a", method, seed=1, **live)
    b = _saved(tmp_path, "b", method, seed=2, **saved)
    model = _fresh(a)
    lorakit.hot_swap(model, "default", b)
    batch = batch_for(model)
    torch.testing.assert_close(output_of(model, batch), output_of(_fresh(b), batch), rtol=1e-5, atol=1e-5)
    # saving the swapped adapter writes the padded form: the same function
    lorakit.save(model, tmp_path / "again")
    torch.testing.assert_close(output_of(_fresh(tmp_path / "again"), batch), output_of(model, batch), rtol=1e-6,
                               atol=1e-6)


def test_init_and_training_options_may_differ(tmp_path) -> None:
    a = _saved(tmp_path, "a", "lora-sb", seed=1, r=4, init_examples=8)
    b = _saved(tmp_path, "b", "lora-sb", seed=2, r=4, init_examples=4, eta=1e-3)
    model = _fresh(a)
    lorakit.hot_swap(model, "default", b)
    batch = batch_for(model)
    torch.testing.assert_close(output_of(model, batch), output_of(_fresh(b), batch), rtol=1e-5, atol=1e-5)


def test_rank1_sum_pruned_ranks_are_padded(tmp_path) -> None:
    a = _saved(tmp_path, "a", "rank1-sum", seed=1, r_init=4, target_rank=2)
    src = tiny_llama()
    lorakit.load(src, _saved(tmp_path, "b0", "rank1-sum", seed=2, r_init=4, target_rank=2))
    for i, ad in enumerate(lorakit.adapter_modules(src).values()):  # prune each layer to its own rank 1..4
        ad.select_(torch.arange(1 + i % 4))
    b = lorakit.save(src, tmp_path / "b")
    model = _fresh(a)
    lorakit.hot_swap(model, "default", b)
    batch = batch_for(model)
    torch.testing.assert_close(output_of(model, batch), output_of(src, batch), rtol=1e-5, atol=1e-5)


# --- refusals: the model is unchanged -----------------------------------------------------------------------
def test_refusals_leave_the_model_unchanged(tmp_path) -> None:
    live = _saved(tmp_path, "live", "lora", seed=1, r=2, alpha=4.0)
    cases = {
        "method": (_saved(tmp_path, "dora", "dora", seed=2, r=2), lorakit.IncompatibleAdapterError, "method"),
        "targets": (_saved(tmp_path, "t", "lora", seed=2, r=2, targets=["q_proj"]), lorakit.IncompatibleAdapterError,
                    "targets"),
        "larger rank": (_saved(tmp_path, "big", "lora", seed=2, r=4), lorakit.IncompatibleAdapterError, "larger"),
        "base": (_saved(tmp_path, "other", "lora", seed=2, model_seed=1, r=2), lorakit.IncompatibleAdapterError,
                 "fingerprint"),
    }
    model = _fresh(live)
    before = _state(model)
    for path, error, match in cases.values():
        with pytest.raises(error, match=match):
            lorakit.hot_swap(model, "default", path)
        assert _same_state(model, before)
    with pytest.raises(lorakit.AdapterStateError, match="no adapter named"):
        lorakit.hot_swap(model, "nope", live)
    with pytest.raises(lorakit.AdapterFileError):
        lorakit.hot_swap(model, "default", tmp_path / "missing")
    lorakit.hot_swap(model, "default", cases["base"][0], force=True)  # other base weights, on request
    assert not _same_state(model, before)
    lorakit.merge(model)
    with pytest.raises(lorakit.AdapterStateError, match="unmerge"):
        lorakit.hot_swap(model, "default", live)


def test_options_that_change_the_function_are_refused(tmp_path) -> None:
    a = _saved(tmp_path, "a", "delta-lora", seed=1, r=2, delta_lambda=0.5)
    b = _saved(tmp_path, "b", "delta-lora", seed=2, r=2, delta_lambda=0.25)
    model = _fresh(a)
    before = _state(model)
    with pytest.raises(lorakit.IncompatibleAdapterError, match="delta_lambda"):
        lorakit.hot_swap(model, "default", b)
    assert _same_state(model, before)
    v = _saved(tmp_path, "v", "vera", seed=2, r=8)
    model = _fresh(_saved(tmp_path, "v16", "vera", seed=1, r=16))
    before = _state(model)
    with pytest.raises(lorakit.IncompatibleAdapterError):
        lorakit.hot_swap(model, "default", v)
    assert _same_state(model, before)


def test_a_late_mismatch_copies_nothing(tmp_path) -> None:
    """The last layer does not fit (its live rank was pruned below the saved one): no earlier layer is touched."""
    model = _fresh(_saved(tmp_path, "a", "rank1-sum", seed=1, r_init=4, target_rank=2))
    *_, last = lorakit.adapter_modules(model).values()
    last.select_(torch.arange(2))
    before = _state(model)
    with pytest.raises(lorakit.IncompatibleAdapterError, match="larger"):
        lorakit.hot_swap(model, "default", _saved(tmp_path, "b", "rank1-sum", seed=2, r_init=4, target_rank=2))
    assert _same_state(model, before)


def test_full_fine_tuning_is_refused(tmp_path) -> None:
    model = tiny_llama()
    lorakit.attach(model, "full", name="ft", targets=["lm_head"])
    path = lorakit.save(model, tmp_path / "ft", name="ft")
    with pytest.raises(lorakit.AdapterStateError, match="full fine-tuning"):
        lorakit.hot_swap(model, "ft", path)
