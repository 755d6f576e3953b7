"""Continuing an adapter on new data (``adapter.continue_from``): it starts from the parent's weights and options,
records its lineage, refuses what would silently change the adapter, and resumes like any run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from lorakit.core.callbacks import TrainingCallback
from lorakit.errors import ConfigError, IncompatibleAdapterError
from lorakit.formats.describe import describe, format_description
from lorakit.testing import build_tiny_llama
from lorakit.train.lineage import file_sha256
from lorakit.train.metrics import read_metrics
from lorakit.train.sources import DataError
from lorakit.train.trainer import Trainer

from .fixtures_train import CtrlCAfter, make_config


def _fit(cfg: Path, *, resume: bool = False, callbacks: tuple[TrainingCallback, ...] = ()) -> Any:
    return Trainer(None, cfg, callbacks=callbacks, log=lambda m: None).fit(resume=resume, overwrite=not resume)


def _evals(out: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"}


@pytest.fixture(scope="module")
def parent(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """A rank1-sum run (its shape changes as it prunes) on the first half of the training lines, and the rest as
    the "new data" an update continues on."""
    root = tmp_path_factory.mktemp("lineage")
    lines = tiny_run["train"].read_text().splitlines()
    old, new = root / "old.jsonl", root / "new.jsonl"
    old.write_text("\n".join(lines[:32]) + "\n")
    new.write_text("\n".join(lines[32:]) + "\n")
    out = root / "v1"
    cfg = make_config(tiny_run, out, method="rank1-sum", options={"r_init": 4, "target_rank": 2},
                      data={"train": str(old)})
    _fit(cfg)
    return {"root": root, "v1": out, "old": old, "new": new}


def test_an_update_starts_from_the_parent_and_records_its_lineage(tiny_run, parent, one_thread) -> None:
    v2, v3 = parent["root"] / "v2", parent["root"] / "v3"
    cfg = make_config(tiny_run, v2, method="rank1-sum", options={}, adapter={"continue_from": str(parent["v1"])},
                      data={"train": str(parent["new"])}, training={"max_steps": 4})
    _fit(cfg)
    # the update's step 0 is the parent's last step: the same weights, measured on the same eval file
    assert _evals(v2)[0] == pytest.approx(_evals(parent["v1"])[6], abs=1e-6)
    meta = json.loads((v2 / "adapter" / "adapter.json").read_text())
    assert meta["config"]["r_init"] == 4 and meta["config"]["target_rank"] == 2  # the parent's options
    (entry,) = meta["extra"]["lineage"]
    assert entry["path"] == str((parent["v1"] / "adapter").resolve()) and entry["trained_steps"] == 6
    assert entry["sha256"] == file_sha256(parent["v1"] / "adapter" / "adapter.safetensors")
    assert entry["data"]["sha256"] == file_sha256(parent["old"])
    assert meta["extra"]["data"] == {"train": str(parent["new"]), "sha256": file_sha256(parent["new"])}
    # a third version: the whole chain, oldest first; inspect shows it
    cfg = make_config(tiny_run, v3, method="rank1-sum", options={}, adapter={"continue_from": str(v2 / "adapter")},
                      data={"train": str(parent["old"])}, training={"max_steps": 2})
    _fit(cfg)
    d = describe(v3 / "adapter")
    assert [e["trained_steps"] for e in d["lineage"]] == [6, 4]
    text = format_description(d)
    assert "lineage:     oldest first" in text and "-> this adapter: 2 more steps on" in text


def test_an_update_refuses_a_changed_method_option_or_base(tiny_run, parent, tmp_path) -> None:
    cont = {"continue_from": str(parent["v1"])}
    cfg = make_config(tiny_run, tmp_path / "a", method="lora", adapter=cont)
    with pytest.raises(ConfigError, match="is a 'rank1-sum' adapter but adapter.method is 'lora'"):
        _fit(cfg)
    cfg = make_config(tiny_run, tmp_path / "b", method="rank1-sum", options={"r_init": 8}, adapter=cont)
    with pytest.raises(ConfigError, match=r"r_init=8 \(parent: 4\)"):
        _fit(cfg)
    other = tmp_path / "other-base"  # the same architecture and tokenizer, other weights
    build_tiny_llama(len(AutoTokenizer.from_pretrained(tiny_run["base"])), hidden=32, seed=1).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_run["base"]).save_pretrained(other)
    cfg = make_config(tiny_run, tmp_path / "c", method="rank1-sum", options={}, adapter=cont,
                      model={"path": str(other)})
    with pytest.raises(IncompatibleAdapterError, match="base"):
        _fit(cfg)
    cfg = make_config(tiny_run, tmp_path / "d", method="rank1-sum", options={},
                      adapter={"continue_from": str(tmp_path / "nowhere")})
    with pytest.raises(Exception, match="nowhere"):
        _fit(cfg)


def test_an_interrupted_update_resumes(tiny_run, parent, tmp_path, one_thread) -> None:
    out = tmp_path / "v2"
    cfg = make_config(tiny_run, out, method="rank1-sum", options={}, adapter={"continue_from": str(parent["v1"])},
                      data={"train": str(parent["new"])}, training={"max_steps": 4}, output={"save_every": 1})
    assert _fit(cfg, callbacks=(CtrlCAfter(2),)).interrupted
    result = _fit(cfg, resume=True)
    assert result.step == 4
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert len(meta["extra"]["lineage"]) == 1 and meta["extra"]["trained_steps"] == 4


def test_what_the_model_knows_is_measured_and_known_examples_can_be_skipped(tiny_run, parent, tmp_path,
                                                                            one_thread) -> None:
    # the parent's own training data is largely known to it; with a threshold below its typical confidence,
    # skip_known drops those examples, says how many, and trains on the rest
    out = tmp_path / "v2"
    cfg = make_config(tiny_run, out, method="rank1-sum", options={}, adapter={"continue_from": str(parent["v1"])},
                      data={"train": str(parent["old"])}, training={"max_steps": 2})
    _fit(cfg)
    seen = json.loads((out / "adapter" / "adapter.json").read_text())["extra"]["update"]
    assert seen["examples"] == 32 and seen["mean_nll"] > 0 and "skipped" not in seen
    threshold = math.exp(-seen["median_nll"])  # about half the examples are at least this well predicted
    out2 = tmp_path / "v2-skip"
    cfg = make_config(tiny_run, out2, method="rank1-sum", options={}, adapter={"continue_from": str(parent["v1"])},
                      data={"train": str(parent["old"]), "skip_known": threshold}, training={"max_steps": 2})
    _fit(cfg)
    skip = json.loads((out2 / "adapter" / "adapter.json").read_text())["extra"]["update"]
    assert 8 <= skip["skipped"] <= 24 and 0 < skip["skipped_tokens_share"] < 1
    info = next(r for r in read_metrics(out2 / "metrics.jsonl") if r["kind"] == "info")
    assert info["train_examples"] == 32 - skip["skipped"] and info["update_skipped"] == skip["skipped"]
    cfg = make_config(tiny_run, tmp_path / "none-left", method="rank1-sum", options={},
                      adapter={"continue_from": str(parent["v1"])},
                      data={"train": str(parent["old"]), "skip_known": 1e-9})
    with pytest.raises(ConfigError, match="nothing left to train on"):
        _fit(cfg)
    with pytest.raises(ConfigError, match="not with data.packing"):
        _fit(make_config(tiny_run, tmp_path / "packed", data={"skip_known": 0.5, "packing": True}))


def test_three_updates_from_the_cli_measure_every_earlier_update(tiny_run, tmp_path, capsys, one_thread) -> None:
    """v1 on one part of the data, v2 and v3 each continuing on another (v3 replaying earlier ones): every saved
    adapter keeps its update's held-out and replay sets; each update measures the earlier ones before and after,
    records it and shows it in `lorakit inspect`; an interrupted update resumes to the same record."""
    from lorakit.cli import main
    from lorakit.train.history import read_index

    lines = tiny_run["train"].read_text().splitlines()
    parts = []
    for k in range(3):
        train, held = tmp_path / f"part{k}.jsonl", tmp_path / f"held{k}.jsonl"
        train.write_text("\n".join(lines[k * 20:k * 20 + 16]) + "\n")
        held.write_text("\n".join(lines[k * 20 + 16:k * 20 + 20]) + "\n")
        parts.append((train, held))
    runs = [tmp_path / f"v{k + 1}" for k in range(3)]
    for k, out in enumerate(runs):
        adapter = {"continue_from": str(runs[k - 1])} if k else {}
        data = {"train": str(parts[k][0]), "eval": str(parts[k][1]), **({"replay": 0.5} if k == 2 else {})}
        cfg = make_config(tiny_run, out, method="rank1-sum", options={"r_init": 4, "target_rank": 2} if not k else {},
                          adapter=adapter, data=data, training={"max_steps": 4, "lr": 3e-2})
        assert main(["train", str(cfg)]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "update 1 (" in err and "held-out loss" in err and "replay: 8 examples of 2 earlier update(s)" in err
    index = read_index(runs[2] / "adapter")
    assert [e["update"] for e in index] == [1, 2, 3] and index[2]["data"]["train"] == str(parts[2][0])
    meta = json.loads((runs[2] / "adapter" / "adapter.json").read_text())
    retention = meta["extra"]["update"]["retention"]
    assert [r["update"] for r in retention] == [1, 2] and meta["extra"]["update"]["replayed"] == 8
    v2 = json.loads((runs[1] / "adapter" / "adapter.json").read_text())["extra"]["update"]["retention"]
    # update 1's loss before v3 is v2's loss after (the same model, the same held-out tokens)
    assert retention[0]["loss_before"] == pytest.approx(v2[0]["loss_after"], abs=1e-4)
    for r in retention:
        assert r["change"] == pytest.approx(r["loss_after"] - r["loss_before"], abs=1e-4)
    assert main(["inspect", str(runs[2] / "adapter")]) == 0
    text = capsys.readouterr().out
    assert "retention:" in text and "update 1 (" in text and "replay:      8 examples" in text
    # the same third update, interrupted and resumed: the same record
    again = make_config(tiny_run, tmp_path / "v3b", method="rank1-sum", options={},
                        adapter={"continue_from": str(runs[1])},
                        data={"train": str(parts[2][0]), "eval": str(parts[2][1]), "replay": 0.5},
                        training={"max_steps": 4, "lr": 3e-2})
    assert _fit(again, callbacks=(CtrlCAfter(2),)).interrupted
    _fit(again, resume=True)
    meta_b = json.loads((tmp_path / "v3b" / "adapter" / "adapter.json").read_text())
    assert meta_b["extra"]["update"]["retention"] == retention


def test_replay_needs_a_parent_with_a_history(tiny_run, parent, tmp_path, one_thread) -> None:
    import shutil

    with pytest.raises(ConfigError, match="data.replay replays earlier updates of a continued adapter"):
        _fit(make_config(tiny_run, tmp_path / "a", data={"replay": 0.2}))
    old = tmp_path / "old"  # an adapter saved without a history (as by earlier lorakit versions)
    shutil.copytree(parent["v1"] / "adapter", old)
    shutil.rmtree(old / "history")
    cfg = make_config(tiny_run, tmp_path / "b", method="rank1-sum", options={}, adapter={"continue_from": str(old)},
                      data={"train": str(parent["new"]), "replay": 0.2})
    with pytest.raises(ConfigError, match="keeps no replay examples of earlier updates"):
        _fit(cfg)
    assert not (tmp_path / "b" / "adapter").exists()  # nothing half-written


def test_growth_adds_rank_where_the_new_data_pulls_and_the_pruner_returns_to_budget(tiny_run, parent, tmp_path,
                                                                                   capsys, one_thread) -> None:
    from lorakit.cli import main

    out = tmp_path / "v2"
    cfg = make_config(tiny_run, out, method="rank1-sum", options={}, training={"max_steps": 8},
                      adapter={"continue_from": str(parent["v1"]), "grow": 12}, data={"train": str(parent["new"])})
    assert main(["train", str(cfg)]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "growth: 100.0% of the new data is unknown to the model: +12 of adapter.grow=12" in err
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    growth = meta["extra"]["update"]["growth"]
    assert growth["added"] == 12 and sum(growth["layers"].values()) == 12 and growth["unknown_share"] == 1.0
    ranks = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "ranks"]
    layers = len(meta["targets"])
    assert ranks[0]["total_rank"] > 2 * layers  # grown above the budget (v1 ended at target_rank 2 per layer) ...
    assert describe(out / "adapter")["total_rank"] == 2 * layers  # ... and pruned back to it by the end
    assert growth["total_rank_before"] == 2 * layers and growth["total_rank_grown"] == 2 * layers + 12
    assert f"total rank {2 * layers} -> {2 * layers + 12} grown -> {2 * layers} after pruning" in \
        format_description(describe(out / "adapter"))
    # interrupted after the growth and resumed: the same adapter
    again = make_config(tiny_run, tmp_path / "v2b", method="rank1-sum", options={}, training={"max_steps": 8},
                        adapter={"continue_from": str(parent["v1"]), "grow": 12}, data={"train": str(parent["new"])})
    assert _fit(again, callbacks=(CtrlCAfter(3),)).interrupted
    _fit(again, resume=True)
    a, b = (load_file(str(d / "adapter" / "adapter.safetensors")) for d in (out, tmp_path / "v2b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_growth_scores_are_the_weight_gradient_norms(tiny_run, tmp_path, one_thread) -> None:
    from lorakit.adapt.model import adapted_layers
    from lorakit.train.growth import layer_scores

    cfg = make_config(tiny_run, tmp_path / "run", method="rank1-sum", options={"r_init": 4, "target_rank": 2},
                      training={"batch_size": 64, "eval_batch_size": 64})
    trainer = Trainer(None, cfg, log=lambda m: None)
    trainer.prepare()
    trainer._attach(total=6, warmup=0)
    data = trainer.train_data
    scores = layer_scores(trainer, data, "default")
    layers = dict(adapted_layers(trainer.model))
    for p in trainer.model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.base.weight.requires_grad_(True)
    batch = trainer._to_device(next(iter(__import__("lorakit").train.batching.iter_batches(data, 64, trainer._pad_id))))
    trainer.model.eval()
    trainer._lm_loss(trainer.model, batch).backward()
    for path, layer in layers.items():  # one batch: the score is the norm of dL/dW of that batch
        assert scores[path] == pytest.approx(float(layer.base.weight.grad.norm()), rel=1e-3), path


def test_growth_allocation_and_refusals(tiny_run, parent, tmp_path) -> None:
    from lorakit.train.growth import allocate

    assert allocate(10, {"a": 3.0, "b": 1.0, "c": 0.0}, {"a": 100, "b": 100, "c": 100}) == {"a": 8, "b": 2, "c": 0}
    assert allocate(10, {"a": 3.0, "b": 1.0}, {"a": 2, "b": 100}) == {"a": 2, "b": 8}  # a full layer passes on
    assert allocate(10, {"a": 1.0}, {"a": 3}) == {"a": 3}
    with pytest.raises(ConfigError, match="adapter.grow adds rank to a continued adapter"):
        _fit(make_config(tiny_run, tmp_path / "a", method="rank1-sum", options={}, adapter={"grow": 4}))
    lora_v1 = tmp_path / "lora-v1"
    _fit(make_config(tiny_run, lora_v1, training={"max_steps": 1}))
    cfg = make_config(tiny_run, tmp_path / "b", options={}, adapter={"continue_from": str(lora_v1), "grow": 4})
    with pytest.raises(ConfigError, match="lora adapters cannot gain rank; rank1-sum can"):
        _fit(cfg)


def test_an_update_refuses_unreadable_data_and_a_smaller_budget_writing_nothing(tiny_run, parent, tmp_path) -> None:
    cont = {"continue_from": str(parent["v1"])}
    pairs = tmp_path / "pairs.jsonl"  # preference pairs: not what a supervised update of this adapter reads
    pairs.write_text((json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n") * 20)
    for name, data, options, match in (
            ("pairs", {"train": str(pairs), "eval": None, "eval_fraction": 0}, {}, "pairs.jsonl.*holds preference pairs"),
            ("budget", {"train": str(parent["new"])}, {"target_rank": 1}, r"target_rank=1 \(parent: 2\)")):
        out = tmp_path / name
        cfg = make_config(tiny_run, out, method="rank1-sum", options=options, adapter=cont, data=data)
        with pytest.raises((ConfigError, DataError), match=match):
            _fit(cfg)
        assert not (out / "adapter").exists() and not (out / "checkpoints").exists()  # nothing half-written
