"""DPO against the implementation people use: TRL's ``DPOTrainer`` on a PEFT LoRA model, same tiny model, data and
adapter weights. Step 0 (the first batch, before any update) must give the same loss and the same gradients.

- Through ``lorakit train``'s path (data format, reference cache, objective), from a fresh adapter (B = 0) and from
  a trained one (B != 0; TRL's reference is then a frozen copy of the starting adapter, as lorakit's is the model
  as it starts): TRL's loss (log 2: the policy is the reference at step 0) and TRL's gradients of every factor.
- With the base as the reference (TRL's ``ref_model``; lorakit's reference log-probabilities computed with the
  adapter switched off) and a trained adapter, the loss is far from log 2 and still equal, with equal gradients:
  the sequence log-probabilities, the answer masks and the formula all agree, not only at a tie. Text and chat.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import trl
from datasets import Dataset as HFDataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit
from lorakit.core.callbacks import TrainingCallback
from lorakit.train.batching import collate
from lorakit.train.preference import PreferenceObjective, reference_logprobs

from .fixtures_train import make_config, write_jsonl

TARGETS = ["q_proj", "v_proj"]
BETA = 0.1


def pairs(tiny_run: dict[str, Path], n: int = 12) -> list[dict[str, Any]]:
    """Preference pairs from the tiny run's prompt/completion data: the right completion over another row's."""
    rows = [json.loads(line) for line in tiny_run["train"].read_text().splitlines()][:n]
    return [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[(i + 3) % n]["completion"]}
            for i, r in enumerate(rows) if r["completion"] != rows[(i + 3) % n]["completion"]]


def lorakit_model(base: Path, *, perturb: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lorakit.attach(model, "lora", r=4, alpha=8, dropout=0.0, targets=TARGETS)
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.copy_(1.0 * torch.randn(p.shape, generator=g))
    return model


def trl_step0(base: Path, model: torch.nn.Module, rows: list[dict[str, Any]], tmp: Path, *,
              base_reference: bool = False, beta: float = BETA) -> tuple[float, dict]:
    """TRL's DPO loss and gradients on one batch holding every pair, for a PEFT copy of ``model``'s adapter; the
    reference is TRL's default for a PEFT model that already has an adapter (a frozen copy of it: the starting
    model), or with ``base_reference`` the base model given as ``ref_model``."""
    lorakit.export_peft(model, tmp / "peft")
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                        str(tmp / "peft"), is_trainable=True)
    tok = AutoTokenizer.from_pretrained(base)
    args = trl.DPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=len(rows), max_steps=1, beta=beta,
                         max_length=None, use_cpu=True, report_to=[], disable_dropout=True, save_strategy="no",
                         bf16=False)  # TRL's default is bf16 autocast (its reference model runs in it): compare in fp32
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32) if base_reference else None
    trainer = trl.DPOTrainer(model=pm, ref_model=ref, args=args, train_dataset=HFDataset.from_list(rows),
                             processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    pm.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    loss = loss.detach()
    grads = {}
    for n, p in pm.named_parameters():
        if p.grad is not None:  # base_model.model.X.lora_A.default.weight -> X.adapters.default.lora_A
            layer, factor = n.removeprefix("base_model.model.").split(".lora_")
            grads[f"{layer}.adapters.default.lora_{factor.split('.')[0]}"] = p.grad.detach().clone()
    return float(loss), grads


class Grads(TrainingCallback):
    """Keeps the adapter's gradients of the first optimizer step (before the update)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.grads = model, None

    def before_step(self) -> None:
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}


def assert_same_grads(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs) and ours
    nonzero = 0
    for n, g in theirs.items():
        torch.testing.assert_close(ours[n], g, rtol=1e-4, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
        nonzero += bool(g.abs().max() > 1e-6)
    assert nonzero >= len(theirs) // 2  # the comparison is not between zeros


@pytest.mark.parametrize("perturb", [False, True])
def test_dpo_step0_loss_and_gradients_equal_trl_through_the_trainer(tiny_run, tmp_path, perturb):
    rows = pairs(tiny_run)
    model = lorakit_model(tiny_run["base"], perturb=perturb)
    loss_trl, grads_trl = trl_step0(tiny_run["base"], model, rows, tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = make_config(tiny_run, tmp_path / "run", options={"r": 4, "alpha": 8, "dropout": 0.0, "targets": TARGETS},
                      data={"train": str(data), "eval": None, "eval_fraction": 0.0, "max_length": 64},
                      training={"objective": "dpo", "beta": BETA, "max_steps": 1, "batch_size": len(rows),
                                "lr": 1e-3, "warmup_steps": 0, "max_grad_norm": None, "device": "cpu"})
    grads = Grads(model)
    tok = AutoTokenizer.from_pretrained(tiny_run["base"])
    result = lorakit.Trainer(model, cfg, tokenizer=tok, callbacks=[grads]).fit()
    logged = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    loss = next(r["loss"] for r in logged if r["kind"] == "train" and r["step"] == 1)
    assert loss == pytest.approx(loss_trl, abs=1e-6) and loss_trl == pytest.approx(math.log(2), abs=1e-6)
    assert_same_grads(grads.grads, grads_trl)
    assert os.path.isfile(result.output_dir / "reference_logps.safetensors")


@pytest.mark.parametrize("chat", [False, True])
def test_dpo_loss_and_gradients_equal_trl_away_from_the_reference(tiny_run, tmp_path, chat):
    rows = pairs(tiny_run)
    if chat:  # TRL's conversational format: the template renders the prompt and the answers
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    model = lorakit_model(tiny_run["base"], perturb=True)
    loss_trl, grads_trl = trl_step0(tiny_run["base"], model, rows, tmp_path, base_reference=True, beta=2.0)
    tok = AutoTokenizer.from_pretrained(tiny_run["base"])
    if chat:
        assert tok.chat_template, "the tiny tokenizer has a chat template"
    data = lorakit.train.data.tokenize(list(enumerate(rows, 1)), tok, max_length=256, source="pairs")
    assert data.format == "preference"
    batch = collate(data.examples, tok.pad_token_id)
    lorakit.set_active(model, [])  # TRL's reference: the adapter switched off
    ref = reference_logprobs(model, data.examples, batch_size=len(rows), pad_id=tok.pad_token_id,
                             device=torch.device("cpu"), autocast=contextlib.nullcontext,
                             fused=True, progress=False)
    lorakit.set_active(model, ["default"])
    batch["reference_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
    model.train()
    loss = PreferenceObjective("dpo", beta=2.0)(model, batch)
    loss.backward()
    assert float(loss) == pytest.approx(loss_trl, abs=1e-5)
    assert abs(loss_trl - math.log(2)) > 1e-3  # away from the tie
    assert_same_grads({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, grads_trl)
