"""Adapters saved by an earlier lorakit load unchanged: the committed files in ``tests/data/adapters-0.1.0``
were written by lorakit 0.1.0 (the flat-module layout, before the layered package) with
``make_adapters.py`` beside them, one per method after three training steps, with the logits they gave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit

from .conftest import batch_for, output_of, tiny_llama

DATA = Path(__file__).parent / "data" / "adapters-0.1.0"
EXPECTED = json.loads((DATA / "expected_logits.json").read_text())


def _base() -> torch.nn.Module:
    return tiny_llama(seed=0, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=32)


def test_every_saved_adapter_is_of_a_registered_method() -> None:
    """The fixtures are the methods 0.1.0 had: each must still be registered (a method added since has no 0.1.0
    file, and adding one must not need a fixture)."""
    assert set(EXPECTED) <= set(lorakit.METHODS)
    assert {"lora", "dora", "vera", "full"} <= set(EXPECTED)


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_adapter_saved_by_0_1_0_loads_and_computes_the_same(method: str) -> None:
    model = _base()
    lorakit.load(model, DATA / method)
    assert lorakit.adapters(model)["default"].method == method
    got = output_of(model, batch_for(model))[0, :4, :6]
    torch.testing.assert_close(got, torch.tensor(EXPECTED[method]), rtol=1e-5, atol=1e-5)
    meta, _ = lorakit.read_adapter(DATA / method)
    assert meta["lorakit_version"] == "0.1.0" and meta["format_version"] == 1


@pytest.mark.parametrize("method", ["lora", "full"])
def test_an_old_fingerprint_keeps_its_sampling_through_save_and_hot_swap(method: str, tmp_path: Path) -> None:
    """Files from before exact fingerprint sampling were fingerprinted with float32 linspace indices: they are
    checked that way, saved again that way, and a different base is still refused."""
    model = _base()
    lorakit.load(model, DATA / method)
    assert lorakit.adapters(model)["default"].sampling == "linspace"
    saved = lorakit.save(model, tmp_path / "again")
    meta, _ = lorakit.read_adapter(saved)
    assert meta["base_sampling"] == "linspace"
    assert meta["base_fingerprint"] == lorakit.read_adapter(DATA / method)[0]["base_fingerprint"]
    lorakit.load(_base(), saved)  # the re-saved file is still recognised
    if method == "lora":
        lorakit.hot_swap(model, "default", DATA / method)  # hot-swap checks it the same way
    other = tiny_llama(seed=1, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=32)
    with pytest.raises(lorakit.IncompatibleAdapterError, match="different base weights"):
        lorakit.load(other, DATA / method)
    fresh = _base()  # a new adapter is fingerprinted with exact sampling
    lorakit.attach(fresh, method, **({"r": 2} if method == "lora" else {}))
    assert lorakit.read_adapter(lorakit.save(fresh, tmp_path / "new"))[0]["base_sampling"] == "exact"
