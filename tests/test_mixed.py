"""Mixed-adapter batches (lorakit.per_row): each row through its own adapter equals that adapter active alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import lorakit
from lorakit.core.layers import adapted_layers

from .conftest import batch_for, perturb, tiny_gpt2, tiny_llama
from .test_contract import CASES, LAYER_CASES, attach_case

NAMES = ["a", None, "b", "a", "b"]  # rows: two adapters, a base row, non-contiguous groups


def _perturb(model: torch.nn.Module, seed: int) -> None:
    perturb(model, seed, 0.2, buffers=True)


def _attach_pair(model: torch.nn.Module, method: str, options: dict[str, Any] | None = None) -> None:
    """Adapters ``a`` and ``b`` of ``method`` (the contract matrix's options, with ``options`` on top), each in its
    trained state, with different weights."""
    for i, name in enumerate(("a", "b")):
        attach_case(model, method, name, seed=7 + i, **(options or {}))
        CASES[method].trained(model, name)
    _perturb(model, seed=3)


def _alone(model: torch.nn.Module, ids: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    """Each row with ``set_active(model, its name)``, one row at a time."""
    out = []
    for i, n in enumerate(names):
        lorakit.set_active(model, [] if n is None else n)
        with torch.no_grad():
            out.append(model(ids[i:i + 1]).logits)
    return torch.cat(out)


def _mixed(model: torch.nn.Module, ids: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    with torch.no_grad(), lorakit.per_row(model, names):
        return model(ids).logits


#: every layer method of the contract matrix, and rsLoRA (LoRA with its other scale)
VARIANTS = {"lora+rslora": ("lora", {"use_rslora": True, "alpha": 8.0})}
METHODS = {**{m: (m, {}) for m in LAYER_CASES}, **VARIANTS}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_row_equals_its_adapter_alone(method: str) -> None:
    model = tiny_llama()
    _attach_pair(model, *METHODS[method])
    ids = torch.randint(0, 128, (len(NAMES), 7), generator=torch.Generator().manual_seed(0))
    mixed = _mixed(model, ids, NAMES)
    alone = _alone(model, ids, NAMES)
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
    # the rows really differ: a, b and the base give different outputs (an implementation that ignored the
    # names would fail above)
    a_only = _alone(model, ids, ["a"] * len(NAMES))
    b_only = _alone(model, ids, ["b"] * len(NAMES))
    assert (a_only - b_only).abs().amax(dim=(1, 2)).min() > 1e-3
    assert (mixed[1] - a_only[1]).abs().max() > 1e-3


def test_conv1d_embedding_and_mixed_methods() -> None:
    """GPT-2 Conv1D layers, an adapted embedding, and three methods in one batch."""
    model = tiny_gpt2()
    lorakit.attach(model, "lora", name="a", r=4, targets=["wte", "c_attn"])
    lorakit.attach(model, "dora", name="b", r=4, targets=["c_attn", "c_fc"])
    lorakit.attach(model, "vera", name="c", r=8, targets=["c_proj"])
    _perturb(model, seed=5)
    names = ["c", "a", None, "b", "a", "c"]
    ids = torch.randint(0, 96, (len(names), 6), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_mixed(model, ids, names), _alone(model, ids, names), rtol=1e-5, atol=1e-5)


def test_one_adapter_for_every_row_and_no_adapter() -> None:
    model = tiny_llama()
    _attach_pair(model, "lora", {"r": 4})
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    for names in (["b"] * 3, [None] * 3):
        torch.testing.assert_close(_mixed(model, ids, names), _alone(model, ids, names), rtol=1e-5, atol=1e-5)


def test_state_is_restored_and_active_set_untouched() -> None:
    model = tiny_llama()
    _attach_pair(model, "lora", {"r": 4})
    lorakit.set_active(model, "b")
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(ZeroDivisionError), lorakit.per_row(model, ["a", None]):
        assert all(layer.row_router is not None for _, layer in adapted_layers(model))
        raise ZeroDivisionError
    assert not any(layer.row_router is not None for _, layer in adapted_layers(model))
    assert lorakit.active_adapters(model) == ["b"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    # nesting: the inner context restores the outer one
    with lorakit.per_row(model, ["a", "a"]):
        outer = {id(layer): layer.row_router for _, layer in adapted_layers(model)}
        with lorakit.per_row(model, ["b", None]):
            pass
        assert {id(layer): layer.row_router for _, layer in adapted_layers(model)} == outer


def test_gradients_reach_each_adapter_from_its_rows_only() -> None:
    model = tiny_llama()
    _attach_pair(model, "lora", {"r": 4})
    batch = batch_for(model, seed=4, batch=3, seq=6)
    names = ["a", "b", "a"]
    params = {n: p for n, p in model.named_parameters() if ".adapters." in n}
    for p in params.values():
        p.requires_grad_(True)
    logits_fn = torch.nn.functional.cross_entropy
    with lorakit.per_row(model, names):
        logits = model(batch["input_ids"]).logits  # (3, T, V)
    loss = sum(logits_fn(logits[i, :-1], batch["labels"][i, 1:]) for i in range(3))
    grads = torch.autograd.grad(loss, list(params.values()))
    ref: dict[str, torch.Tensor] = {n: torch.zeros_like(p) for n, p in params.items()}
    for i, n in enumerate(names):
        lorakit.set_active(model, n)
        for p in params.values():
            p.requires_grad_(True)
        out = model(batch["input_ids"][i:i + 1]).logits
        g = torch.autograd.grad(logits_fn(out[0, :-1], batch["labels"][i, 1:]), list(params.values()),
                                allow_unused=True)
        for (k, _), gi in zip(params.items(), g):
            if gi is not None:
                ref[k] += gi
    for (k, _), gk in zip(params.items(), grads):
        torch.testing.assert_close(gk, ref[k], rtol=1e-4, atol=1e-6)
    assert any(ref[k].abs().max() > 0 for k in ref if ".adapters.b." in k)


def test_generate_with_kv_cache_matches_each_adapter_alone() -> None:
    model = tiny_llama()
    _attach_pair(model, "lora", {"r": 4})
    names = ["b", "a", None]
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(3))
    kw: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False, "output_scores": True,
                          "return_dict_in_generate": True, "pad_token_id": 0, "use_cache": True}
    with lorakit.per_row(model, names):
        mixed = model.generate(ids, **kw)
    for i, n in enumerate(names):
        lorakit.set_active(model, [] if n is None else n)
        alone = model.generate(ids[i:i + 1], **kw)
        assert torch.equal(mixed.sequences[i], alone.sequences[0])
        for s_mixed, s_alone in zip(mixed.scores, alone.scores):
            torch.testing.assert_close(s_mixed[i], s_alone[0], rtol=1e-5, atol=1e-5)


def test_beam_search_raises_inside_per_row_and_generate_per_row_expands() -> None:
    model = tiny_llama()
    _attach_pair(model, "lora", {"r": 4})
    names = ["a", "b"]
    ids = torch.randint(3, 128, (2, 4), generator=torch.Generator().manual_seed(4))
    kw: dict[str, Any] = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
    with pytest.raises(lorakit.AdapterStateError, match="batch"), lorakit.per_row(model, names):
        model.generate(ids, **kw)
    out = lorakit.generate_per_row(model, ids, adapter_names=names, **kw)
    for i, n in enumerate(names):
        lorakit.set_active(model, n)
        assert torch.equal(out[i], model.generate(ids[i:i + 1], **kw)[0])


def test_wrong_batch_size_raises() -> None:
    model = tiny_llama()
    _attach_pair(model, "lora", {"r": 4})
    with pytest.raises(lorakit.AdapterStateError, match="3 adapter names"), torch.no_grad(), \
            lorakit.per_row(model, ["a", "b", None]):
        model(torch.zeros(2, 4, dtype=torch.long))


def test_refusals() -> None:
    model = tiny_llama()
    _attach_pair(model, "lora", {"r": 4})
    lorakit.attach(model, "full", name="ft", targets=["lm_head"])
    with pytest.raises(lorakit.AdapterStateError, match="no adapter named 'zzz'"), lorakit.per_row(model, ["a", "zzz"]):
        pass
    with pytest.raises(lorakit.AdapterStateError, match="full fine-tuning"), lorakit.per_row(model, ["ft", "a"]):
        pass
    with pytest.raises(lorakit.ConfigError), lorakit.per_row(model, "a"):
        pass
    with pytest.raises(lorakit.ConfigError), lorakit.per_row(model, []):
        pass
    lorakit.set_active(model, "a")
    lorakit.merge(model)
    with pytest.raises(lorakit.AdapterStateError, match="unmerge"), lorakit.per_row(model, ["a", "b"]):
        pass
    lorakit.unmerge(model)
    assert not any(layer.row_router is not None for _, layer in adapted_layers(model))
