"""The contract matrix: every method in lorakit.METHODS through the same checks.

Adding a method = adding one row to CASES (and the matrix refuses to run if a registered method has no row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import lorakit
from lorakit.adapt.model import adapter_modules
from lorakit.adapt.quantize import quantized_layers
from lorakit.core.layers import LayerInfo

from .conftest import MODELS, batch_for, output_of, perturb

pytestmark = pytest.mark.cuda  # the matrix runs on LORAKIT_TEST_DEVICE (see conftest)


@dataclass
class Case:
    """One method's row: its options, and its trainable-parameter formula."""

    method: str
    options: dict[str, Any]
    #: expected trainable count from the adapted layers (and the model, for whole-model methods)
    trainable: Callable[[list[LayerInfo], torch.nn.Module], int]
    starts_unchanged: bool = True
    #: runtime keyword arguments built from the model (e.g. LoRA-SB's init_batches)
    runtime: Callable[..., dict[str, Any]] = field(default=lambda m, seed=7: {})
    models: tuple[str, ...] = tuple(sorted(MODELS))
    lr: float = 1e-2
    #: puts adapter ``name`` of a model into the state training gives it, where that differs from the attached
    #: state in a way the checks must see (Delta-LoRA: its base update started; rank1-sum: a pruned component)
    trained: Callable[[torch.nn.Module, str], None] = field(default=lambda m, name: None)
    #: the base the method trains on: quantized this way (``model.quantize``) for methods that start from a
    #: quantized base's error (LoftQ), else dense
    quantize: str | None = None

    def base(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` made this method's base, in place (idempotent): quantized when :attr:`quantize` says, its
        dense weights kept beside it as ``dense_for_tests`` for the init."""
        if self.quantize is not None and not quantized_layers(model):
            model.dense_for_tests = {k: v.detach().clone() for k, v in model.state_dict().items()}
            lorakit.quantize(model, self.quantize)
        return model

    def model(self, model_name: str, device: torch.device | str = "cpu") -> torch.nn.Module:
        """A fresh matrix model as this method's base."""
        return self.base(MODELS[model_name]().to(device))


def _lora_count(r: int) -> Callable[[list[LayerInfo], torch.nn.Module], int]:
    return lambda layers, m: sum(r * (li.d_in + li.d_out) for li in layers)


CASES: dict[str, Case] = {
    "lora": Case("lora", {"r": 4}, _lora_count(4)),
    "dora": Case("dora", {"r": 4}, lambda layers, m: sum(4 * (li.d_in + li.d_out) + li.d_out for li in layers)),
    "full": Case("full", {}, lambda layers, m: sum(p.numel() for p in m.parameters()), lr=1e-3),
    "lora-fa": Case("lora-fa", {"r": 4}, lambda layers, m: sum(4 * li.d_out for li in layers)),
    # VeRA trains only scaling vectors and needs a ~10x larger lr than LoRA (as in the paper)
    "vera": Case("vera", {"r": 16}, lambda layers, m: sum(16 + li.d_out for li in layers), lr=1e-1),
    "rank1-sum": Case("rank1-sum", {"r_init": 4, "target_rank": 2},
                      lambda layers, m: sum(4 * (li.d_in + li.d_out + 1) for li in layers),
                      trained=lambda m, name: [ad.mask.__setitem__(0, 0.0) for ad in adapter_modules(m, name).values()]),
    "delta-lora": Case("delta-lora", {"r": 4, "delta_start": 2}, _lora_count(4),  # base moves from step 3
                       trained=lambda m, name: [ad.start() for ad in adapter_modules(m, name).values()]),
    # LoRA-XS/SB train only r x r matrices: larger lr. init_std=0: R's default N(0, 1e-5^2) init moves the
    # outputs by ~1e-6, by design
    "lora-xs": Case("lora-xs", {"r": 4, "init_std": 0.0}, lambda layers, m: 16 * len(layers), lr=3e-1),
    "lora-sb": Case("lora-sb", {"r": 4}, lambda layers, m: 16 * len(layers), starts_unchanged=False,
                    runtime=lambda m, seed=7: {"init_batches": [batch_for(m, seed=seed)]}, lr=3e-2),
    "pissa": Case("pissa", {"r": 4}, _lora_count(4)),
    "olora": Case("olora", {"r": 4}, _lora_count(4)),
    # LoftQ starts from a quantized base's error (so not unchanged): int8 (per-row scales, any shape); GPT-2's
    # Conv1D layers are not quantized
    "loftq": Case("loftq", {"r": 4}, _lora_count(4), starts_unchanged=False, quantize="int8",
                  runtime=lambda m, seed=7: {"dense_weights": m.dense_for_tests}, models=("bert", "llama")),
}


def test_every_method_has_a_row() -> None:
    assert sorted(CASES) == sorted(lorakit.METHODS)


#: The layer methods of the matrix: what per-row batches and hot-swaps apply to (full fine-tuning has no adapter).
LAYER_CASES = sorted(m for m in CASES if lorakit.METHODS[m].layer_method)


def attach_case(model: torch.nn.Module, method: str, name: str = "default", seed: int = 7,
                **options: Any) -> torch.nn.Module:
    """Attach ``method`` as the matrix does (its options, overridden by ``options``; its runtime inputs)."""
    case = CASES[method]
    model = case.base(model)
    return lorakit.attach(model, method, name=name, **{**case.options, **options}, **case.runtime(model, seed))


def _layers(model: torch.nn.Module, name: str = "default") -> list[LayerInfo]:
    return [LayerInfo.of(t, model.get_submodule(t)) for t in adapter_modules(model, name)]


def _attach(case: Case, model_name: str, device: torch.device | None = None
            ) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    if model_name not in case.models:
        pytest.skip(f"{case.method} does not support {model_name}")
    model = case.model(model_name, device or "cpu")
    batch = batch_for(model)
    lorakit.attach(model, case.method, **case.options, **case.runtime(model))
    return model, batch


_perturb = perturb  # the one perturbation of the test suite (conftest)


@pytest.fixture(params=sorted(CASES))
def case(request) -> Case:
    return CASES[request.param]


def test_starts_unchanged(case: Case, model_name: str, device: torch.device) -> None:
    if not case.starts_unchanged:
        pytest.skip(f"{case.method}'s init changes the model by design")
    model = case.model(model_name, device)
    batch = batch_for(model)
    before = output_of(model, batch)
    lorakit.attach(model, case.method, **case.options, **case.runtime(model))
    torch.testing.assert_close(output_of(model, batch), before, rtol=1e-5, atol=1e-6)


def test_only_intended_tensors_train(case: Case, model_name: str, device: torch.device) -> None:
    model, _ = _attach(case, model_name, device)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if case.method == "full":
        assert trainable == {id(p) for p in model.parameters()}
    else:
        own = {id(p) for a in adapter_modules(model).values() for p in a.parameters()}
        assert trainable and trainable <= own
        base = {id(p) for n, p in model.named_parameters() if ".adapters." not in n}
        assert not trainable & base
    assert lorakit.trainable_parameters(model) == case.trainable(_layers(model), model)


def test_merge_equals_unmerged_and_round_trips(case: Case, model_name: str, device: torch.device) -> None:
    model, batch = _attach(case, model_name, device)
    _perturb(model)
    ref = output_of(model, batch)
    if quantized_layers(model):  # W0 + dW does not fit in 4/8 bits: merging goes through a dense base
        lorakit.dequantize(model)
    lorakit.merge(model)
    merged = output_of(model, batch)
    lorakit.merge(model)  # idempotent
    torch.testing.assert_close(output_of(model, batch), merged, rtol=0, atol=0)
    torch.testing.assert_close(merged, ref, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    lorakit.unmerge(model)  # idempotent
    torch.testing.assert_close(output_of(model, batch), ref, rtol=1e-5, atol=1e-5)
    lorakit.merge(model)
    torch.testing.assert_close(output_of(model, batch), ref, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(case: Case, model_name: str, tmp_path, device: torch.device) -> None:
    model, batch = _attach(case, model_name, device)
    _perturb(model)
    ref = output_of(model, batch)
    lorakit.save(model, tmp_path / "adapter")
    fresh = case.model(model_name, device)
    lorakit.load(fresh, tmp_path / "adapter")
    torch.testing.assert_close(output_of(fresh, batch), ref, rtol=0, atol=0)
    assert lorakit.trainable_parameters(fresh) == lorakit.trainable_parameters(model)


def train_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], lr: float, steps: int = 8) -> list[float]:
    """The losses of ``steps`` AdamW steps on ``batch`` with the active adapters' training callbacks."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    callbacks = lorakit.training_callbacks(model, opt, total_steps=steps)
    losses = []
    for _ in range(steps):
        loss = callbacks.regularize(model(**batch).loss)
        losses.append(loss.item())
        loss.backward()
        callbacks.before_step()
        opt.step()
        callbacks.step()
        opt.zero_grad()
    return losses


def test_training_lowers_loss(case: Case, model_name: str, device: torch.device) -> None:
    model, batch = _attach(case, model_name, device)
    losses = train_losses(model, batch, case.lr)
    assert losses[-1] < losses[0]
