"""The training pipeline end to end: `lorakit train/merge/eval/generate/inspect` on a tiny model, resume,
crash safety, bad input, and the adapters inside `transformers.Trainer`."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import click
import pytest
import torch
import yaml
from safetensors.torch import load_file

import lorakit
from lorakit.cli import app, main
from lorakit.train.checkpoint import STATE_FILE, clean_incomplete, latest_checkpoint, list_checkpoints, load_state
from lorakit.train.config import load_config
from lorakit.train.metrics import read_metrics
from lorakit.train.trainer import Trainer

from .fixtures_train import kill_when_checkpointed, make_config
from .test_contract import CASES

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _evals(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# --- every method, end to end ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(lorakit.METHODS))
def test_train_then_merge_every_method(method: str, tiny_run, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    case = CASES[method]
    out = tmp_path / "run"
    cfg = make_config(tiny_run, out, method=method, options=dict(case.options), training={"lr": case.lr},
                      model={"quantize": case.quantize or "none"})
    assert main(["train", str(cfg)]) == 0, capsys.readouterr().err
    evals = _evals(out)
    assert [e["step"] for e in evals] == [0, 6]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1e-3
    for name in ("adapter/adapter.json", "adapter/adapter.safetensors", "metrics.jsonl", "loss.png",
                 "config.yaml", "run.json"):
        assert (out / name).is_file(), name
    assert load_config(out / "config.yaml").adapter.method == method  # the resolved config is a valid config
    if method == "rank1-sum":  # the pruner ran inside the loop and its per-layer ranks were logged
        ranks = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "ranks"]
        assert ranks and ranks[-1]["total_rank"] < ranks[0]["total_rank"]

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out / "adapter"), "--out", str(merged)]) == 0
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = case.base(AutoModelForCausalLM.from_pretrained(tiny_run["base"]))  # the base it trained on
    lorakit.load(reference, out / "adapter")
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("adapters" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain, ids), _logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_eval_generate_inspect_commands(tiny_run, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    cfg = make_config(tiny_run, out)
    assert main(["train", str(cfg), "training.max_steps=3"]) == 0
    trained_eval = _evals(out)[-1]["eval_loss"]
    capsys.readouterr()
    assert main(["eval", str(cfg)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 16 and result["eval_loss"] == pytest.approx(trained_eval, rel=1e-5)
    assert main(["eval", str(cfg), "--base-only"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] > trained_eval

    assert main(["generate", "--adapter", str(out / "adapter"), "--prompt", "Question: What is 2 plus 2?",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "lora" in text

    peft_dir = tmp_path / "peft"
    assert main(["export", "--adapter", str(out), "--out", str(peft_dir)]) == 0
    assert json.loads((peft_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert main(["export", "--adapter", str(out), "--out", str(peft_dir)]) == 1  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_every_option_has_help() -> None:
    group = typer_command()
    for name, cmd in group.commands.items():
        assert cmd.help, name
        for param in cmd.params:
            if param.name not in ("help", "ctx"):
                assert getattr(param, "help", None), f"{name} --{param.name} has no help"


def typer_command() -> click.Group:
    import typer.main

    return typer.main.get_command(app)  # type: ignore[return-value]


# --- resume ----------------------------------------------------------------------------------------------------
class _InterruptAt(lorakit.TrainingCallback):
    """Sends this process SIGINT (as Ctrl-C would) after optimizer step ``n``."""

    def __init__(self, n: int) -> None:
        self.n, self.steps = n, 0

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.n:
            signal.raise_signal(signal.SIGINT)


RESUME_METHODS = [m for m in ("lora", "rank1-sum", "delta-lora") if m in lorakit.METHODS]


@pytest.mark.parametrize("method", RESUME_METHODS)
def test_interrupted_and_resumed_run_is_bit_exact(method: str, tiny_run, tmp_path: Path) -> None:
    options = dict(CASES[method].options)
    sections = {"training": {"max_steps": 8, "lr": CASES[method].lr},
                "output": {"save_every": 3}}
    straight = make_config(tiny_run, tmp_path / "straight", method=method, options=options, **sections)
    assert main(["train", str(straight)]) == 0

    broken = make_config(tiny_run, tmp_path / "broken", method=method, options=options, **sections)
    result = Trainer(None, load_config(broken), callbacks=[_InterruptAt(5)]).fit()  # Ctrl-C after step 5
    assert result.interrupted and result.step == 5 and result.adapter_dir is None
    assert latest_checkpoint(tmp_path / "broken").name == "ckpt-00000005"
    assert main(["train", str(broken), "--resume"]) == 0

    a = load_file(tmp_path / "straight" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "broken" / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # Delta-LoRA too: its checkpoint holds the drifted base weights themselves
        assert torch.equal(a[k], b[k]), k
    train = [[(r["step"], r["loss"]) for r in read_metrics(p / "metrics.jsonl") if r["kind"] == "train"]
             for p in (tmp_path / "straight", tmp_path / "broken")]
    assert len(train[0]) == len(train[1]) == 8
    assert train[0] == train[1]


def test_sigkill_leaves_only_complete_checkpoints(tiny_run, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = make_config(tiny_run, out, training={"max_steps": 100_000, "eval_every": None},
                      output={"save_every": 1, "keep_checkpoints": 2}, data={"eval": None, "eval_fraction": 0})
    assert kill_when_checkpointed(cfg, out, 3)  # killed while still training
    for step, path in list_checkpoints(out):
        meta, tensors = lorakit.read_adapter(path / "adapter")  # verifies the checksum
        assert tensors and meta["method"] == "lora"
        assert load_state(path / STATE_FILE)["optimizer"]["state"]
        assert json.loads((path / "trainer.json").read_text())["step"] == step
    clean_incomplete(out)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names and all(n.startswith("ckpt-") and "." not in n for n in names), names
    assert latest_checkpoint(out) is not None


# --- bad input ------------------------------------------------------------------------------------------------
def _err(capsys) -> str:
    return capsys.readouterr().err


def test_bad_config_files(tiny_run, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\n")
    assert main(["train", str(bad)]) == 1
    assert "malformed YAML at line" in _err(capsys)

    cfg = make_config(tiny_run, tmp_path / "run")
    assert main(["train", str(cfg), "training.lrr=1"]) == 1
    err = _err(capsys)
    assert "training.lrr: unknown key" in err and "allowed:" in err and "lr," in err
    assert main(["train", str(cfg), "training.schedule=cosin"]) == 1
    assert "training.schedule" in (err := _err(capsys)) and "'cosine'" in err
    assert main(["train", str(cfg), "adapter.rank=4"]) == 1
    assert "rank: unknown option" in _err(capsys)
    assert main(["train", str(cfg), "adapter.method=lorra"]) == 1
    assert "adapter.method: unknown method 'lorra'" in _err(capsys)
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "completion": " b"}\n\n{"prompt": "c", "completion": " d"}\n', ":2: empty line"),
    ('{"prompt": "a", "completion": " b"}\n{"prompt": "c", "completion": \n', ":2: malformed JSON"),
    ('{"prompt": "a", "completion": " b"}\n{"text": "c"}\n', ":2: missing key(s) ['prompt', 'completion']"),
    ("", "no examples"),
])
def test_bad_jsonl_is_reported_with_its_line(content: str, message: str, tiny_run, tmp_path: Path,
                                             capsys) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    cfg = make_config(tiny_run, tmp_path / "run", data={"train": str(data)})
    assert main(["train", str(cfg)]) == 1
    err = _err(capsys)
    assert message in err and "data.jsonl" in err


def test_output_dir_of_another_run_is_refused(tiny_run, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    cfg = make_config(tiny_run, out, training={"max_steps": 1})
    assert main(["train", str(cfg)]) == 0
    assert main(["train", str(cfg), "training.lr=0.5"]) == 1
    assert "different run (differs in: training.lr)" in _err(capsys)
    assert main(["train", str(cfg)]) == 1
    assert "--resume" in _err(capsys)
    assert main(["train", str(cfg), "training.lr=0.5", "--overwrite"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["lr"] == 0.5


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path: Path, capsys, monkeypatch) -> None:
    calls = {"n": 0}
    real = Trainer._loss

    def poisoned(self, model, batch):
        calls["n"] += 1
        loss = real(self, model, batch)
        return loss * float("nan") if calls["n"] > 4 else loss  # training steps 1-4 are fine (evaluation: _lm_loss)

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    out = tmp_path / "run"
    cfg = make_config(tiny_run, out, output={"save_every": 2}, training={"eval_every": 100})
    assert main(["train", str(cfg)]) == 1
    err = _err(capsys)
    assert "loss is nan at step 5" in err and "ckpt-00000004" in err
    assert latest_checkpoint(out).name == "ckpt-00000004"
    assert not (out / "adapter").exists()


# --- classification, the Python API and transformers.Trainer ---------------------------------------------------
def test_classification_run_trains_head_and_reports_accuracy(tiny_run, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    cfg = make_config(tiny_run, out, model={"path": str(tiny_run["cls_base"]), "task": "classification"},
                      data={"train": str(tiny_run["cls_train"]), "eval": None, "eval_fraction": 0.25},
                      training={"max_steps": 10, "lr": 3e-2})
    assert main(["train", str(cfg)]) == 0, _err(capsys)
    evals = _evals(out)
    assert "eval_accuracy" in evals[-1] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert (out / "adapter" / "head" / "adapter.json").is_file()
    capsys.readouterr()
    assert main(["eval", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out)["eval_accuracy"] == pytest.approx(evals[-1]["eval_accuracy"])


def test_adapters_train_inside_transformers_trainer(tiny_run, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments
    from transformers import Trainer as HFTrainer

    from lorakit.train.data import read_jsonl, tokenize

    tok = AutoTokenizer.from_pretrained(tiny_run["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny_run["base"])
    lorakit.attach(model, "lora", r=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ds = tokenize(read_jsonl(tiny_run["train"]), tok, max_length=48)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in ds.examples]

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        from lorakit.train.batching import collate as pad
        from lorakit.train.data import Example

        return pad([Example(b["input_ids"], b["labels"]) for b in batch], tok.pad_token_id)

    losses: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=12, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    HFTrainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Record()]).train()
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all(".adapters.default." in n for n in changed)


# --- the GPU's default precision, on the CPU: bf16 autocast takes the fused path --------------------------------
def test_bf16_autocast_training_runs_the_fused_op_on_every_layer(tiny_run, tmp_path: Path) -> None:
    """``training.precision: bf16`` is what ``auto`` means on a GPU: every adapted projection of every step goes
    through the fused op (counted), the run matches the reference path under the same autocast, and run.json says
    how it computed."""
    from lorakit.core.lowrank import fused_calls

    sections = {"training": {"precision": "bf16", "max_steps": 3, "batch_size": 4, "warmup_steps": 2,
                             "eval_every": None},
                "data": {"eval": None, "eval_fraction": 0}}
    runs = {}
    for fused in (True, False):
        out = tmp_path / f"fused-{fused}"
        cfg = make_config(tiny_run, out, options={"r": 4, "dropout": 0.1}, **sections)
        before = fused_calls()
        assert main(["train", str(cfg), f"training.fused={str(fused).lower()}"]) == 0
        runs[fused] = (fused_calls() - before, [r["loss"] for r in read_metrics(out / "metrics.jsonl")
                                                if r["kind"] == "train"],
                       load_file(out / "adapter" / "adapter.safetensors"),
                       json.loads((out / "run.json").read_text())["runtime"])
    calls, losses, adapter, runtime = runs[True]
    assert calls == 3 * 14  # 3 steps x 7 projections x 2 layers, nothing on the reference path
    assert runs[False][0] == 0
    assert runtime["autocast"] == "bfloat16" and runtime["cross_entropy"] == "chunked" and runtime["fused"]
    assert runs[False][3]["cross_entropy"] == "model"
    # every step's loss, after the updates before it, as the reference path's (AdamW's sign-like first steps
    # turn bf16 noise in near-zero gradient entries into lr-sized weight differences, so weights are not compared)
    assert losses == pytest.approx(runs[False][1], rel=2e-3) and adapter.keys() == runs[False][2].keys()


def test_the_gpu_default_keeps_frozen_weights_in_bf16_and_trained_ones_in_fp32(tiny_run, tmp_path: Path) -> None:
    """On CUDA with precision and model.dtype auto, an fp32 checkpoint's frozen weights are stored in the autocast
    dtype; not when base weights train, or when the user chose a dtype (the decision, checked without a GPU)."""
    def decided(method: str = "lora", options: dict | None = None, **model: str) -> torch.dtype | None:
        cfg = yaml.safe_load(make_config(tiny_run, tmp_path / "run", method=method, options=options,
                                         model=model).read_text())
        cfg["training"].pop("device")
        trainer = Trainer(None, cfg)
        trainer.device, trainer.amp_dtype = torch.device("cuda"), torch.bfloat16  # what auto resolves to there
        return trainer.frozen_dtype()

    assert decided(dtype="auto") == torch.bfloat16
    assert decided("delta-lora", {"r": 4}, dtype="auto") == torch.bfloat16  # its fp32 master copy keeps W exact
    assert decided("full", {}, dtype="auto") is None
    assert decided(dtype="float32") is None
    cpu = Trainer(None, yaml.safe_load(make_config(tiny_run, tmp_path / "cpu").read_text()))
    assert cpu.frozen_dtype() is None and cpu.amp_dtype is None  # the CPU default is plain fp32
