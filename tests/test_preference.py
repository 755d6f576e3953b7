"""Preference tuning (``training.objective: dpo | simpo | orpo``): data formats and their errors, the per-token
log-probability kernel, each objective against its paper's formula, the trainer path for every method, bit-exact
resume with a warm-up, dropout and gradient accumulation, and the CLI. (Equality with TRL: test_preference_trl.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.fast.cross_entropy import linear_token_logprobs
from lorakit.fast.speed import token_logprobs
from lorakit.testing import build_tiny_llama, build_tokenizer
from lorakit.train.batching import collate
from lorakit.train.data import DataError, tokenize
from lorakit.train.metrics import read_metrics
from lorakit.train.preference import REFERENCE_FILE, PreferenceObjective
from lorakit.train.trainer import Trainer

from .fixtures_train import CtrlCAfter, make_config, write_jsonl
from .test_contract import CASES

IGNORE = -100


def pair_rows(tiny_run: dict[str, Path], n: int = 48) -> list[dict[str, Any]]:
    """Pairs from the tiny run's prompt/completion lines: the right completion preferred to another line's."""
    rows = [json.loads(x) for x in tiny_run["train"].read_text().splitlines()][:n]
    out = []
    for i, r in enumerate(rows):
        other = next(rows[(i + k) % n]["completion"] for k in range(1, n) if rows[(i + k) % n]["completion"] !=
                     r["completion"])
        out.append({"prompt": r["prompt"], "chosen": r["completion"], "rejected": other})
    return out


@pytest.fixture(scope="module")
def pairs(tiny_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pairs")
    rows = pair_rows(tiny_run)
    return {"train": write_jsonl(root / "train.jsonl", rows), "eval": write_jsonl(root / "eval.jsonl", rows[:12])}


def dpo_config(tiny_run, pairs, out: Path, *, method: str = "lora", options: dict | None = None,
               **training: Any) -> Path:
    return make_config(tiny_run, out, method=method, options=options,
                       data={"train": str(pairs["train"]), "eval": str(pairs["eval"]), "max_length": 48},
                       training={"objective": "dpo", "max_steps": 4, "batch_size": 4, "lr": 1e-2, **training})


@pytest.fixture(scope="module")
def tok(tiny_run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_run["base"])


# --- data ------------------------------------------------------------------------------------------------------
def _records(rows: list[dict]) -> list[tuple[int, dict]]:
    return list(enumerate(rows, 1))


def test_text_pairs_explicit_and_implicit_prompt_tokenize_alike(tok) -> None:
    explicit = {"prompt": "the cat", "chosen": " sat on the mat", "rejected": " ran to the dog"}
    implicit = {"chosen": "the cat sat on the mat", "rejected": "the cat ran to the dog"}
    a, b = (tokenize(_records([r]), tok, source="p").examples[0] for r in (explicit, implicit))
    assert tokenize(_records([explicit]), tok, source="p").format == "preference"
    for ex in (a, b):
        prompt = tok("the cat")["input_ids"]
        assert ex.input_ids[:len(prompt)] == prompt and ex.labels[:len(prompt)] == [IGNORE] * len(prompt)
        assert ex.labels[len(prompt):] == tok(" sat on the mat", add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id]
        assert ex.rejected.labels[len(prompt):] == tok(" ran to the dog", add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id]
    assert (a.input_ids, a.labels, a.rejected.input_ids) == (b.input_ids, b.labels, b.rejected.input_ids)


def test_chat_pairs_explicit_and_implicit_prompt_label_only_the_answer(tok) -> None:
    user = {"role": "user", "content": "What is the capital of Italy"}
    good, bad = ({"role": "assistant", "content": t} for t in ("Rome", "Paris"))
    explicit = {"prompt": [user], "chosen": [good], "rejected": [bad]}
    implicit = {"chosen": [user, good], "rejected": [user, bad]}
    a, b = (tokenize(_records([r]), tok, source="p").examples[0] for r in (explicit, implicit))
    assert (a.input_ids, a.labels, a.rejected.labels) == (b.input_ids, b.labels, b.rejected.labels)
    answer = [t for t, y in zip(a.input_ids, a.labels, strict=True) if y != IGNORE]
    assert "Rome" in tok.decode(answer) and "Italy" not in tok.decode(answer)
    head = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert tok.decode([t for t, y in zip(a.input_ids, a.labels, strict=True) if y == IGNORE]).strip() == \
        tok.decode(tok(head, add_special_tokens=False)["input_ids"]).strip()


@pytest.mark.parametrize(("row", "message"), [
    ({"chosen": "the cat sat"}, "line 2: not a preference pair: missing ['rejected']"),
    ({"chosen": "the cat sat", "rejected": "the cat sat"}, "line 2: not a preference pair: 'chosen' and 'rejected' "
                                                           "are the same"),
    ({"chosen": "the cat sat", "rejected": [{"role": "assistant", "content": "x"}]}, "line 2: 'rejected' must be"),
    ({"chosen": "the cat", "rejected": "the cat sat"}, "line 2: not a preference pair: the chosen answer is empty"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "line 2: 'prompt' must be a string"),
    ({"text": "the cat sat"}, "line 2: not a preference pair"),
])
def test_rows_that_are_not_pairs_are_refused_naming_the_line(tok, tmp_path, row, message) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat", "chosen": " sat", "rejected": " ran"}, row])
    from lorakit.train.data import read_jsonl

    with pytest.raises(DataError) as e:
        tokenize(read_jsonl(path), tok, source=str(path))
    assert message.replace("line 2", f"{path}:2") in str(e.value)


def test_long_pairs_are_cut_and_empty_ones_dropped(tok) -> None:
    long = {"prompt": "the cat", "chosen": " sat" * 40, "rejected": " ran" * 40}
    lost = {"prompt": "the cat " * 40, "chosen": " sat", "rejected": " ran"}
    data = tokenize(_records([long, lost]), tok, max_length=16, source="p")
    assert len(data) == 1 and data.n_truncated == 2 and data.n_dropped == 1
    ex = data.examples[0]
    assert len(ex.input_ids) == len(ex.rejected.input_ids) == 16
    batch = collate(data.examples, tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 16)  # chosen rows, then rejected rows


@pytest.mark.parametrize(("training", "data", "message"), [
    ({"beta": 0.2}, {}, "training.beta applies to training.objective dpo, simpo, orpo only"),
    ({"objective": "simpo", "label_smoothing": 0.1}, {}, "training.label_smoothing applies to training.objective dpo"),
    ({"objective": "dpo"}, {"packing": True}, "data.packing does not apply to training.objective=dpo"),
    ({"objective": "dpo"}, {"cache_dir": "/tmp/x"}, "data.cache_dir does not apply"),
    ({"objective": "dpo"}, {"format": "chat"}, "use data.format: preference"),
    ({}, {"format": "preference"}, "preference pairs train with training.objective"),
])
def test_objective_options_only_where_they_apply(training, data, message) -> None:
    cfg = {"model": {"path": "bundled://tiny-base"}, "data": {"train": "x.jsonl", **data}, "output": {"dir": "o"},
           "training": training}
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        lorakit.TrainConfig.parse(cfg)


def test_data_and_objective_must_match(tiny_run, pairs, tmp_path) -> None:
    sft_data = make_config(tiny_run, tmp_path / "a", training={"objective": "dpo"})
    with pytest.raises(ConfigError, match="trains on preference pairs .* is 'prompt_completion' data"):
        Trainer(None, sft_data, log=lambda m: None).prepare()
    pair_data = make_config(tiny_run, tmp_path / "b", data={"train": str(pairs["train"]), "eval": None})
    with pytest.raises(ConfigError, match="holds preference pairs .* training.objective: dpo, simpo or orpo"):
        Trainer(None, pair_data, log=lambda m: None).prepare()


# --- the kernel and the formulas -------------------------------------------------------------------------------
def test_token_logprob_kernel_equals_log_softmax_in_value_and_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 150, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (2, 150), generator=g)
    labels[0, :10] = IGNORE
    up = torch.randn(2, 150, generator=g)
    ours = linear_token_logprobs(h, w, labels, b, chunk=64)  # several chunks, the last one short
    (ours * up).sum().backward()
    mine = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    shifted = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    valid = shifted != IGNORE
    ref = torch.log_softmax(F.linear(h, w, b), -1).gather(-1, shifted.clamp(min=0)[..., None]).squeeze(-1) * valid
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (ours[~valid] == 0).all()
    (ref * up).sum().backward()
    for a, t in zip(mine, (h, w, b), strict=True):
        torch.testing.assert_close(a, t.grad, atol=1e-4, rtol=1e-4)


def test_fused_sequence_logprobs_equal_the_models_logits(tiny_run, tok) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_run["base"])
    lorakit.attach(model, "lora", r=4)
    data = tokenize(_records(pair_rows(tiny_run, 8)), tok, source="p")
    batch = collate(data.examples, tok.pad_token_id)
    args = (batch["input_ids"], batch["labels"])
    fused = token_logprobs(model, *args, attention_mask=batch["attention_mask"], fused=True)
    plain = token_logprobs(model, *args, attention_mask=batch["attention_mask"], fused=False)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert (fused[:, :-1][batch["labels"][:, 1:] == IGNORE] == 0).all() and (fused.sum(-1) < 0).all()
    from lorakit.fast.speed import loss_kernel

    assert loss_kernel(model) == "chunked"  # the fused head ran (not the model's logits)


def _outcome(objective: str, **options: float):
    lc, lr = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -5.0])  # sequence log-probs of 2 pairs
    nc, nr = torch.tensor([2, 3]), torch.tensor([4, 1])
    ref = torch.tensor([-5.0, -8.5, -5.5, -6.0])  # reference: chosen rows, then rejected rows
    return PreferenceObjective(objective, **options).outcome(torch.cat([lc, lr]), torch.cat([nc, nr]), ref), \
        (lc, lr, nc.float(), nr.float(), ref[:2], ref[2:])


def test_dpo_formula_with_label_smoothing() -> None:
    out, (lc, lr, _, _, rc, rr) = _outcome("dpo", beta=0.5, label_smoothing=0.1)
    h = (lc - rc) - (lr - rr)
    expected = (-(0.9) * F.logsigmoid(0.5 * h) - 0.1 * F.logsigmoid(-0.5 * h)).mean()
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-6)
    torch.testing.assert_close(out.rewards_chosen, 0.5 * (lc - rc))
    sums = out.sums()
    assert float(sums[1]) == 1.0  # pair 0: reward 0.5 vs -0.25 (right); pair 1: -0.25 vs 0.5 (wrong)


def test_simpo_formula() -> None:
    out, (lc, lr, nc, nr, _, _) = _outcome("simpo", beta=2.0, simpo_gamma=0.6)
    expected = -F.logsigmoid(2.0 * lc / nc - 2.0 * lr / nr - 0.6).mean()
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-6)


def test_orpo_formula() -> None:
    out, (lc, lr, nc, nr, _, _) = _outcome("orpo", beta=0.1)

    def log_odds(logp_sum: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        p = torch.exp(logp_sum / n)
        return torch.log(p / (1 - p))

    expected = -lc.sum() / nc.sum() - 0.1 * F.logsigmoid(log_odds(lc, nc) - log_odds(lr, nr)).mean()
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)


def test_dpo_needs_the_reference() -> None:
    with pytest.raises(ConfigError, match="reference log-probabilities"):
        PreferenceObjective("dpo").outcome(torch.zeros(4), torch.ones(4), None)


# --- the trainer --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(lorakit.METHODS))
def test_every_method_trains_with_dpo(method, tiny_run, pairs, tmp_path, one_thread) -> None:
    case = CASES[method]
    cfg = dpo_config(tiny_run, pairs, tmp_path / "run", method=method, options=dict(case.options), lr=case.lr,
                     max_steps=3)
    if case.quantize:
        cfg.write_text(cfg.read_text().replace("dtype: float32", f"dtype: float32\n  quantize: {case.quantize}"))
    result = Trainer(None, cfg, log=lambda m: None).fit()
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in train)
    assert {"reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"} <= set(train[0])
    start, end = result.eval_start, result.eval_end
    assert start["eval_reward_margin"] == pytest.approx(0.0, abs=1e-9 if case.starts_unchanged else 1e-3)
    assert end["eval_logps_chosen"] != start["eval_logps_chosen"]  # the policy moved away from the reference


def test_dpo_after_sft_continues_the_sft_adapter_against_the_sft_model(tiny_run, pairs, tmp_path,
                                                                       one_thread) -> None:
    sft = make_config(tiny_run, tmp_path / "sft", options={"r": 4, "alpha": 8})
    assert main(["train", str(sft)]) == 0
    fresh = Trainer(None, dpo_config(tiny_run, pairs, tmp_path / "fresh", options={"r": 4, "alpha": 8}),
                    log=lambda m: None).fit()
    cfg = dpo_config(tiny_run, pairs, tmp_path / "dpo", options={"r": 4, "alpha": 8,
                                                                "continue_from": str(tmp_path / "sft")})
    after_sft = Trainer(None, cfg, log=lambda m: None).fit()
    # the policy starts as the SFT model and so does the reference: margin 0, log-probs the SFT model's
    assert after_sft.eval_start["eval_reward_margin"] == 0.0
    assert after_sft.eval_start["eval_logps_chosen"] != pytest.approx(fresh.eval_start["eval_logps_chosen"],
                                                                      abs=1e-3)
    lineage = json.loads((after_sft.adapter_dir / "adapter.json").read_text())["extra"]["lineage"]
    assert lineage[0]["path"].endswith("sft/adapter")


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_dpo_on_a_quantized_base(quantize, tiny_run, pairs, tmp_path, one_thread) -> None:
    cfg = dpo_config(tiny_run, pairs, tmp_path / "run", options={"r": 4, "alpha": 8}, max_steps=3)
    cfg.write_text(cfg.read_text().replace("dtype: float32", f"dtype: float32\n  quantize: {quantize}"))
    result = Trainer(None, cfg, log=lambda m: None).fit()
    assert result.step == 3 and result.eval_end["eval_logps_chosen"] != result.eval_start["eval_logps_chosen"]
    assert result.eval_start["eval_reward_margin"] == 0.0  # the reference is the quantized starting model


def test_dpo_resumes_bit_exact_with_warmup_dropout_and_accumulation(tiny_run, pairs, tmp_path, one_thread) -> None:
    options = {"r": 4, "alpha": 8, "dropout": 0.1}
    kw = {"max_steps": 8, "warmup_steps": 3, "grad_accum": 2, "eval_every": 4}
    straight = dpo_config(tiny_run, pairs, tmp_path / "straight", options=options, **kw)
    broken = dpo_config(tiny_run, pairs, tmp_path / "broken", options=options, **kw)
    a = Trainer(None, straight, log=lambda m: None).fit()
    stopped = Trainer(None, broken, callbacks=[CtrlCAfter(5)], log=lambda m: None).fit()
    assert stopped.interrupted and stopped.step == 5
    cached = (tmp_path / "broken" / REFERENCE_FILE).stat().st_mtime_ns
    messages: list[str] = []
    b = Trainer(None, broken, log=messages.append).fit(resume=True)
    assert (tmp_path / "broken" / REFERENCE_FILE).stat().st_mtime_ns == cached  # read back, not recomputed
    assert not any("DPO reference:" in m for m in messages)
    ta, tb = (load_file(r.adapter_dir / "adapter.safetensors") for r in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    def logged(out: Path) -> list[tuple]:
        return [(r["step"], r.get("loss"), r.get("lr"), r.get("reward_accuracy"), r.get("eval_reward_margin"))
                for r in read_metrics(out / "metrics.jsonl") if r["kind"] in ("train", "eval")]

    assert logged(tmp_path / "straight") == logged(tmp_path / "broken")


def test_dpo_learns_a_preference_that_holds_on_held_out_prompts(tiny_run, tmp_path, one_thread) -> None:
    """A preference the tiny model can pick up in a few steps ("good" over "bad" after any prompt), measured on
    prompts it never trained on; the reference is the starting model (reward accuracy 0.5, loss log 2, at 0)."""
    prompts = [json.loads(x)["prompt"] for x in tiny_run["train"].read_text().splitlines()]
    rows = [{"prompt": p, "chosen": " good", "rejected": " bad"} for p in prompts]
    pairs = {"train": write_jsonl(tmp_path / "train.jsonl", rows[:40]),
             "eval": write_jsonl(tmp_path / "eval.jsonl", rows[40:])}
    cfg = dpo_config(tiny_run, pairs, tmp_path / "run", options={"r": 8, "alpha": 16}, max_steps=12, lr=2e-2,
                     warmup_steps=2, batch_size=8)
    trainer = Trainer(None, cfg, log=lambda m: None)
    result = trainer.fit()
    assert result.eval_start["eval_reward_accuracy"] == 0.5 and result.eval_start["eval_loss"] == pytest.approx(
        math.log(2), abs=1e-6)
    sft = lorakit.train.data.dataset_from(str(tiny_run["eval"]), trainer.config.data.model_copy(
        update={"format": "auto"}), trainer.tokenizer, task="causal-lm")
    assert set(trainer.evaluate(sft)) == {"eval_loss", "eval_ppl"}  # next-token data: the LM loss, not the objective
    assert result.eval_end["eval_reward_accuracy"] == 1.0 and result.eval_end["eval_loss"] < 0.65
    ref = load_file(tmp_path / "run" / REFERENCE_FILE)
    assert ref["eval.logps"].shape == (len(rows) - 40, 2)
    assert ref["train.index"].tolist() == list(range(40))  # 12 steps x 8 pairs draw all 40


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_reference_free_objectives_from_the_cli(objective, tiny_run, pairs, tmp_path, capsys, one_thread) -> None:
    out = tmp_path / "run"
    cfg = dpo_config(tiny_run, pairs, out, options={"r": 8, "alpha": 16}, objective=objective, max_steps=16,
                     lr=2e-2, batch_size=8)
    assert main(["train", str(cfg)]) == 0, capsys.readouterr().err
    assert not (out / REFERENCE_FILE).exists()  # no reference model at all
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_reward_margin"] > evals[0]["eval_reward_margin"]


def test_dpo_from_the_cli_then_eval(tiny_run, pairs, tmp_path, capsys, one_thread) -> None:
    out = tmp_path / "run"
    cfg = dpo_config(tiny_run, pairs, out, options={"r": 8, "alpha": 16}, max_steps=8, batch_size=8)
    assert main(["train", str(cfg)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["eval", str(cfg)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    end = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert res["examples"] == 12 and res["eval_reward_accuracy"] == pytest.approx(end["eval_reward_accuracy"])
    assert res["eval_loss"] == pytest.approx(end["eval_loss"], abs=1e-5)
    (out / REFERENCE_FILE).unlink()
    assert main(["eval", str(cfg)]) != 0
    assert "reference model's log-probabilities" in capsys.readouterr().err


def test_a_tiny_model_with_a_chat_template_trains_on_chat_pairs(tmp_path, one_thread) -> None:
    words = "the cat dog sat ran on mat to a big small red".split()
    rows = [{"prompt": [{"role": "user", "content": f"the {a}"}],
             "chosen": [{"role": "assistant", "content": f"{a} sat on the mat"}],
             "rejected": [{"role": "assistant", "content": f"{a} ran to the dog"}]} for a in words]
    tok = build_tokenizer([" ".join(words) + " user assistant"])
    base = tmp_path / "base"
    build_tiny_llama(len(tok), hidden=32).save_pretrained(base)
    tok.save_pretrained(base)
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = make_config({"base": base, "train": data, "eval": data}, tmp_path / "run",
                      data={"max_length": 48}, training={"objective": "dpo", "max_steps": 2, "batch_size": 4})
    result = Trainer(None, cfg, log=lambda m: None).fit()
    assert result.step == 2 and math.isfinite(result.eval_end["eval_loss"])


_values = st.one_of(st.none(), st.integers(), st.text(max_size=12), st.lists(
    st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=8)}),
              st.integers(), st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)), max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "text", "messages"]), _values,
                           min_size=1))
def test_any_row_is_a_pair_or_a_data_error_naming_its_line(tok, row) -> None:
    good = {"prompt": "What is", "chosen": " good", "rejected": " bad"}
    try:
        data = tokenize([(1, good), (2, row)], tok, max_length=32, source="f.jsonl")
    except DataError as e:
        assert "f.jsonl:2: " in str(e)
    else:
        assert data.format == "preference" and all(e.rejected is not None for e in data.examples)
