"""`lorakit compare`: the runs, results.json, the report files, config validation, and the claim verdicts."""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.evaluation.claims import evaluate_claims, summarize
from lorakit.evaluation.compare_config import load_compare_config
from lorakit.evaluation.report import write_report

REPORT_FILES = ("results.json", "report.md", "report.html", "loss_curves.png", "accuracy_vs_params.png")


def _compare_yaml(tiny_run: dict[str, Path], tmp_path: Path, **compare: Any) -> Path:
    """A compare config on the tiny model; eval rows get an ``answer`` so accuracy is measured."""
    rows = [json.loads(line) for line in tiny_run["eval"].read_text().splitlines()]
    evalf = tmp_path / "eval.jsonl"
    evalf.write_text("".join(json.dumps({**r, "answer": r["completion"].strip()}) + "\n" for r in rows))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n" for r in rows))
    cfg = {
        "model": {"path": str(tiny_run["base"]), "dtype": "float32"},
        "adapter": {"r": 4},
        "data": {"train": str(tiny_run["train"]), "eval": str(evalf), "max_length": 48},
        "training": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1, "device": "cpu"},
        "compare": {"accuracy": {"examples": 6, "max_new_tokens": 3}, "forgetting": str(heldout), "threads": 1,
                    "seeds": [0], **compare},  # one seed keeps the pipeline tests fast (the default is three)
        "methods": {"lora": {"alpha": 8}, "vera": {"r": 16, "training": {"lr": 0.1}}},
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_compare_writes_every_file_and_measures_learning_curves(tiny_run, tmp_path: Path, capsys) -> None:
    """One comparison (two methods, two seeds: each run is its own process), every output checked: the report
    files, each run's measurements, budgets and the choice set (every run measured at each budget on the same
    items: per-item losses, choice accuracy where asked, seeds paired), the learning curves, the Holm-corrected
    verdicts, and the report rebuilt from results.json alone."""
    rows = [json.loads(line) for line in tiny_run["eval"].read_text().splitlines()]
    choice = tmp_path / "choice.jsonl"
    with choice.open("w") as f:
        for i, r in enumerate(rows):
            others = [rows[(i + k) % len(rows)]["completion"] for k in (1, 2, 3)]
            f.write(json.dumps({**r, "choices": [others[0], r["completion"], *others[1:]], "answer": 1}) + "\n")
    cfg = _compare_yaml(tiny_run, tmp_path, f1={"examples": 5, "max_new_tokens": 4}, seeds=[0, 1], budgets=[2, 4],
                        choice_at=[4], choice={"data": str(choice), "batch_size": 8})
    out = tmp_path / "out"
    assert main(["compare", str(cfg), "--methods", "lora,vera", "--out", str(out)]) == 0, capsys.readouterr().err
    for name in (*REPORT_FILES, "learning_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert sorted((r["label"], r["seed"], r["ok"]) for r in res["runs"]) == [
        ("lora", 0, True), ("lora", 1, True), ("vera", 0, True), ("vera", 1, True)]
    lora = next(r for r in res["runs"] if r["label"] == "lora")
    vera = next(r for r in res["runs"] if r["label"] == "vera")
    # the per-method override reached the run, the shared `r` did not override VeRA's own
    assert res["methods"]["vera"]["training"] == {"lr": 0.1} and res["methods"]["vera"]["r"] == 16
    assert lora["trainable_params"] > vera["trainable_params"] > 0
    assert lora["steps"] == vera["steps"] == 4 and len(lora["train_loss"]) == 4
    assert lora["eval_loss"] < res["base"]["eval_loss"]  # training moved the model
    assert res["base"]["budgets"][0]["step"] == 0 and len(res["base"]["budgets"][0]["item_loss"]) == len(rows)
    for r in res["runs"]:
        assert r["examples"] == 6 and 0.0 <= r["accuracy"] <= 1.0
        assert r["adapter_bytes"] > 0 and r["saved_activation_bytes"] > 0 and r["step_time_s"] > 0
        assert r["train_cpu_s"] > 0
        assert r["peak_rss_bytes"] >= r["rss_before_train_bytes"] > 0
        assert isinstance(r["heldout_loss"], float)
        assert r["f1_examples"] == 5 and 0.0 <= r["token_f1"] <= 1.0 and len(r["f1_samples"]) == 3
        run_dir = out / "runs" / f"{r['label']}-s{r['seed']}"
        assert not (run_dir / "checkpoints").exists() and (run_dir / "adapter" / "adapter.json").is_file()
        assert [b["step"] for b in r["budgets"]] == [2, 4]
        assert len(r["budgets"][0]["item_loss"]) == len(rows) and "choice_correct" not in r["budgets"][0]
        assert len(r["budgets"][1]["choice_correct"]) == len(rows)
        assert r["budgets"][1]["choice_loss"] < res["base"]["budgets"][0]["choice_loss"]  # it learned
    assert {c["id"] for c in res["claims"]} == {"lora-sb", "lora+", "vera", "lora-fa", "forgetting", "rank1-sum",
                                                "delta-lora", "dora", "lora-efficiency", "qlora", "lr-sensitivity",
                                                "latency", "swapping", "dynamic-rank"}
    claim_vera = next(c for c in res["claims"] if c["id"] == "vera")
    assert any(f"2 seeds x {len(rows)} items" in n for n in claim_vera["numbers"])
    assert any("by budget (steps): 2:" in n for n in claim_vera["numbers"])
    md = (out / "report.md").read_text()
    assert "| lora |" in md and "| vera |" in md and "lorakit compare" in md
    assert "token F1" in md and "Token F1: greedy generation" in md and isinstance(res["base"]["token_f1"], float)
    assert "Verdict: inconclusive (not compared: lora-fa)" in md  # claims without their methods say so
    assert "## Learning curves" in md and "| step 2 | step 4 |" in md and "Holm" in md
    html = (out / "report.html").read_text()
    assert "loss_curves.png" in html and "<table>" in html
    # the report can be rebuilt from results.json alone
    (out / "report.md").unlink()
    assert main(["compare", str(cfg), "--out", str(out), "--report-only"]) == 0
    assert (out / "report.md").read_text() == md


def test_parallel_runs_give_the_sequential_results(tiny_run, tmp_path: Path, capsys) -> None:
    """compare.parallel: 2 runs jobs two at a time and writes the same losses, in job order, as one at a time."""
    seq, par = tmp_path / "seq", tmp_path / "par"
    cfg = _compare_yaml(tiny_run, tmp_path, accuracy=None, forgetting=None, seeds=[0, 1])
    assert main(["compare", str(cfg), "--methods", "lora", "--out", str(seq)]) == 0
    assert main(["compare", str(cfg), "--methods", "lora", "--out", str(par), "compare.parallel=2"]) == 0
    assert "running 2 jobs at a time" in capsys.readouterr().err
    a, b = (json.loads((d / "results.json").read_text()) for d in (seq, par))
    assert [(r["label"], r["seed"]) for r in b["runs"]] == [("lora", 0), ("lora", 1)]
    assert [r["eval_loss"] for r in b["runs"]] == [r["eval_loss"] for r in a["runs"]]
    assert b["base"] == a["base"] and b["compare"]["parallel"] == 2
    assert "runs go 2 at a time" in (par / "report.md").read_text()
    bad = _compare_yaml(tiny_run, tmp_path, threads=None, parallel=2)
    assert main(["compare", str(bad), "--methods", "lora", "--out", str(tmp_path / "bad")]) == 1
    assert "parallel=2 needs threads" in capsys.readouterr().err


def test_the_base_model_is_evaluated_by_one_job_that_succeeds(tiny_run, tmp_path: Path, monkeypatch) -> None:
    """Every job starts at once up to compare.parallel (no core waits while the first job also evaluates the base
    model); one job at a time evaluates it, and when that job fails the next to start does, or, when every other
    job had started, a finished one runs again to do it. The jobs here are stand-ins (no processes)."""
    from lorakit.evaluation import compare

    calls: list[tuple[str, int, bool]] = []
    others_started = threading.Event()
    lock = threading.Lock()

    def job(cc, label, cfg, run_dir, *, base, log, workers, resume=False):
        with lock:
            calls.append((label, cfg.training.seed, base))
            if len(calls) == 3:
                others_started.set()
        if label == "vera":  # fails; in parallel, once the other jobs have started without the base model
            others_started.wait(5 if cc.compare.parallel > 1 else 0)
            return {"ok": False, "error": "exit status 1"}
        return {"ok": True, "eval_loss": 1.0, **({"base": {"ok": True, "eval_loss": 2.0}} if base else {})}

    monkeypatch.setattr(compare, "_run_with_retries", job)
    monkeypatch.setattr(compare, "write_report", lambda results, out: None)
    cfg = _compare_yaml(tiny_run, tmp_path, accuracy=None, forgetting=None)
    cc = load_compare_config(cfg, ["compare.seeds=[0,1]"])
    res = compare.run_compare(cc, ["vera", "lora"], tmp_path / "seq", log=lambda _: None)
    assert calls == [("vera", 0, True), ("lora", 0, True), ("vera", 1, False), ("lora", 1, False)]
    assert res["base"] == {"ok": True, "eval_loss": 2.0}
    calls.clear()
    others_started.clear()
    cc = load_compare_config(cfg, ["compare.parallel=3", "compare.seeds=[0]"])
    res = compare.run_compare(cc, ["vera", "lora", "lora+"], tmp_path / "par", log=lambda _: None)
    assert calls[0] == ("vera", 0, True) and sorted(calls[1:3]) == [("lora", 0, False), ("lora+", 0, False)]
    assert calls[3:] == [("lora", 0, True)]  # the first finished job, again
    assert res["base"] == {"ok": True, "eval_loss": 2.0} and [r["ok"] for r in res["runs"]] == [False, True, True]


def test_progress_says_how_many_jobs_are_done_and_the_time_left() -> None:
    """After each job: how many are done and about how long the rest takes (mean wall time of the jobs run, kept
    ones not counted, over the jobs left, compare.parallel at a time)."""
    from lorakit.evaluation.compare import _progress

    runs = [{"wall_s": 500.0}, {"wall_s": 700.0}, {"wall_s": 0.1, "kept": True}]
    assert _progress(runs, 11, 2) == "3/11 done, about 40 min left"
    assert _progress(runs[:1], 16, 1) == "1/16 done, about 2 h 05 min left"
    assert _progress(runs, 4, 2) == "3/4 done, about 10 min left"  # one job left: not shared
    assert _progress(runs[2:], 5, 2) == "1/5 done" and _progress(runs, 3, 2) == "3/3 done"


def test_a_report_of_a_comparison_stopped_early_says_what_has_not_run(tmp_path: Path) -> None:
    """results.json is rewritten after each run, so its report can be written before every run has: the report
    then opens by saying which (label, seed) runs are missing; a complete one says nothing of the kind."""
    from lorakit.evaluation.report import unfinished_note

    full = _results(_seeds("lora") + _seeds("vera"))
    assert unfinished_note(full) is None
    write_report(full, tmp_path / "full")
    assert "Incomplete" not in (tmp_path / "full" / "report.md").read_text()
    part = {**full, "labels": ["lora", "vera", "dora"], "runs": [r for r in full["runs"]
                                                                 if r["label"] == "lora" or r["seed"] == 0]}
    note = unfinished_note(part)
    assert note is not None and note.startswith("Incomplete: 4 of 9 runs have results; not run yet: vera (seed 1, "
                                                "2); dora. ")
    write_report(part, tmp_path / "part")
    for name in ("report.md", "report.html"):
        assert "Incomplete: 4 of 9 runs" in (tmp_path / "part" / name).read_text()


def _until_training(proc: subprocess.Popen[str], logs: Sequence[Path]) -> list[Any]:
    """Wait until every run log in ``logs`` says its training started; the comparison's worker processes."""
    import psutil

    deadline = time.monotonic() + 120
    while not all(f.is_file() and "steps on cpu" in f.read_text() for f in logs):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "compare_worker" in " ".join(p.cmdline())]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_comparison_stops_its_workers_and_reports_what_has_not_run(tiny_run, tmp_path: Path,
                                                                                   sig: int) -> None:
    """Ctrl-C or SIGTERM to `lorakit compare` (two jobs at a time, both training): the running workers are killed
    (none outlives the comparison), no other starts, the killed runs are not recorded as failures, and results.json
    and a report saying what has not run are written; the exit status is 130."""
    import psutil

    cfg = _compare_yaml(tiny_run, tmp_path, accuracy=None, forgetting=None, parallel=2)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "compare", str(cfg), "--methods", "lora,vera,lora+",
                             "--out", str(out), "training.max_steps=1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers: list[psutil.Process] = []
    try:
        workers = _until_training(proc, [out / "runs" / f"{lab}-s0.log" for lab in ("lora", "vera")])
        assert len(workers) == 2  # both training
        proc.send_signal(sig)
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 130, output
        assert "interrupted: 0 of 3 runs have results" in output and "--resume" in output and "FAILED" not in output
        assert not psutil.wait_procs(workers, timeout=10)[1]  # none alive
    finally:  # a failure here leaves no million-step run behind
        for p in [*workers, proc]:
            with contextlib.suppress(Exception):
                p.kill()
    assert not (out / "runs" / "lora+-s0.log").exists()  # never started
    res = json.loads((out / "results.json").read_text())
    assert res["runs"] == [] and res["base"] is None
    md = (out / "report.md").read_text()
    assert "Incomplete: 0 of 3 runs have results; not run yet: lora; vera; lora+." in md and "Failed runs" not in md


def test_a_worker_stopped_by_a_signal_is_a_failed_run_not_a_short_one(tiny_run, tmp_path: Path) -> None:
    """SIGTERM to one worker (not to the comparison): its trainer stops between steps and saves a checkpoint, and
    the worker then exits with an error instead of reporting the shorter run as the job's result."""
    cfg = _compare_yaml(tiny_run, tmp_path, accuracy=None, forgetting=None)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "compare", str(cfg), "--methods", "lora", "--out",
                             str(out), "training.max_steps=1000000"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        worker, = _until_training(proc, [out / "runs" / "lora-s0.log"])
        worker.terminate()
        output = proc.communicate(timeout=60)[0]
    finally:
        with contextlib.suppress(Exception):
            proc.kill()
    assert proc.returncode == 1, output
    run, = json.loads((out / "results.json").read_text())["runs"]
    assert run["ok"] is False and "exit status 130" in run["error"]
    assert re.search(r"interrupted at step \d+/1000000 \(Ctrl-C or SIGTERM\): no result", run["error"])
    assert not (out / "runs" / "lora-s0.result.json").exists()


def test_resume_keeps_finished_runs_of_the_same_job(tiny_run, tmp_path: Path, capsys) -> None:
    """--resume: a finished run of exactly the same job is kept (not run again), anything else runs: a new label,
    a changed setting; without --resume everything runs."""
    cfg = _compare_yaml(tiny_run, tmp_path, accuracy=None, forgetting=None)
    out = tmp_path / "out"
    assert main(["compare", str(cfg), "--methods", "lora", "--out", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(["compare", str(cfg), "--methods", "lora,vera", "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert err.count("kept (--resume)") == 1 and "lora (seed 0) kept (--resume)" in err
    assert "vera (seed 0) done: " in err  # each finished job named: with several at a time, they end out of order
    res = json.loads((out / "results.json").read_text())
    lora = next(r for r in res["runs"] if r["label"] == "lora")
    assert lora["kept"] and lora["eval_loss"] == first["runs"][0]["eval_loss"] and res["base"] == first["base"]
    assert next(r for r in res["runs"] if r["label"] == "vera")["ok"]
    assert main(["compare", str(cfg), "--methods", "lora", "--out", str(out), "--resume",
                 "methods.lora.training.lr=0.02"]) == 0  # another job: runs
    assert "kept (--resume)" not in capsys.readouterr().err


def test_failed_run_is_recorded_not_fatal(tiny_run, tmp_path: Path, capsys) -> None:
    cfg = _compare_yaml(tiny_run, tmp_path, timeout_s=0.01)
    out = tmp_path / "out"
    assert main(["compare", str(cfg), "--methods", "lora", "--out", str(out)]) == 1
    assert "failed runs" in capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["runs"][0]["ok"] is False and "timed out" in res["runs"][0]["error"]
    assert "## Failed runs" in (out / "report.md").read_text()
    for name in REPORT_FILES:
        assert (out / name).is_file(), name


def test_a_run_that_times_out_keeps_the_budgets_it_measured(tiny_run, tmp_path: Path, capsys) -> None:
    """Each budget measurement is written as it is made: a run killed by the timeout (here long before its last
    step) keeps its learning curve up to that point in results.json, and stays out of every verdict."""
    rows = [json.loads(line) for line in tiny_run["eval"].read_text().splitlines()]
    choice = tmp_path / "choice.jsonl"
    choice.write_text("".join(json.dumps({**r, "choices": [r["completion"], "x"], "answer": 0}) + "\n" for r in rows))
    cfg = _compare_yaml(tiny_run, tmp_path, timeout_s=20, accuracy=None, forgetting=None, budgets=[2, 100_000],
                        choice={"data": str(choice), "batch_size": 8})
    out = tmp_path / "out"
    assert main(["compare", str(cfg), "--methods", "lora", "--out", str(out), "training.max_steps=100000"]) == 1
    assert "kept its measurements at steps 2" in capsys.readouterr().err
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["ok"] is False and "timed out" in run["error"]
    assert [b["step"] for b in run["budgets"]] == [2] and len(run["budgets"][0]["item_loss"]) == len(rows)
    assert "its measurements at steps 2 are kept" in (out / "report.md").read_text()


def test_partial_budgets_drop_a_torn_last_line(tmp_path: Path) -> None:
    from lorakit.evaluation.compare import _partial_budgets

    path = tmp_path / "r.budgets.jsonl"
    assert _partial_budgets(path) == []
    path.write_text('{"step": 2, "choice_loss": 1.5}\n{"step": 4, "choi')
    assert _partial_budgets(path) == [{"step": 2, "choice_loss": 1.5}]


@pytest.mark.parametrize(("yaml_extra", "methods", "message"), [
    ({"methods": {"lora": {"training": {"max_steps": 9}}}}, "lora", "must be the same for every method"),
    ({}, "lora,nonsense", "'nonsense' is neither a method"),
    ({"adapter": {"rr": 4}}, "lora", "rr is an option of none"),
    ({"methods": {"lora": {"r": -1}}}, "lora", "methods.lora"),
    ({"compare": {"seeds": []}}, "lora", "compare: seeds"),
])
def test_bad_compare_config_is_refused_before_any_run(tiny_run, tmp_path: Path, capsys, yaml_extra, methods,
                                                      message) -> None:
    path = _compare_yaml(tiny_run, tmp_path)
    cfg = yaml.safe_load(path.read_text())
    for key, value in yaml_extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if key != "methods" else value
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["compare", str(path), "--methods", methods, "--out", str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_variant_and_seeds(tiny_run, tmp_path: Path) -> None:
    cc = load_compare_config(_compare_yaml(tiny_run, tmp_path), ["compare.seeds=[3,4]"])
    assert cc.compare.seeds == [3, 4]
    plus = cc.run_config("lora+", 4, tmp_path / "x")  # inherits methods.lora and adds the LoRA+ ratio
    assert plus.adapter.method == "lora" and plus.adapter.options == {"r": 4, "alpha": 8}
    assert plus.training.loraplus_ratio == 16.0 and plus.training.seed == 4
    full = cc.run_config("full", 3, tmp_path / "y")  # the shared `r` is not an option of full
    assert full.adapter.options == {}
    q = cc.run_config("qlora", 0, tmp_path / "z")  # LoRA on an NF4 base, methods.lora's options
    assert q.adapter.method == "lora" and q.model.quantize == "nf4" and q.adapter.options == {"r": 4, "alpha": 8}
    assert cc.run_config("lora", 0, tmp_path / "w").model.quantize == "none"
    bad = load_compare_config(_compare_yaml(tiny_run, tmp_path), ["methods.lora.model={dtype: float16}"])
    with pytest.raises(ConfigError, match="methods.lora.model: dtype must be the same for every method"):
        bad.run_config("lora", 0, tmp_path / "v")


# --- verdicts on synthetic results --------------------------------------------------------------------------------
def _run(label: str, seed: int = 0, **values: Any) -> dict[str, Any]:
    base = {"label": label, "method": label, "seed": seed, "ok": True, "trainable_params": 1000,
            "eval_loss": 1.0, "accuracy": 0.5, "correct": 100, "examples": 200, "heldout_loss": 3.1,
            "train_loss": [[s, 2.0 - s / 100] for s in range(1, 101)], "saved_activation_bytes": 1000}
    return {**base, **values}


def _seeds(label: str, **values: Any) -> list[dict[str, Any]]:
    """Three seeds of ``label``: the given numbers plus a small seed-to-seed jitter of its own (eval loss,
    forgetting and accuracy +-0.002), so paired differences have a spread."""
    import random

    runs = []
    for seed in range(3):
        r = random.Random(f"{label}-{seed}")
        run = _run(label, seed, **values)
        run["eval_loss"] += r.uniform(-0.002, 0.002)
        run["accuracy"] += r.uniform(-0.002, 0.002)
        run["heldout_loss"] += r.uniform(-0.002, 0.002)
        runs.append(run)
    return runs


def _results(runs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    labels = list(dict.fromkeys(r["label"] for r in runs))
    return {"labels": labels, "seeds": sorted({r["seed"] for r in runs}), "runs": runs,
            "base": {"ok": True, "heldout_loss": 3.0},
            "methods": {lab: {"method": lab, "r": 8, "r_init": 12, "target_rank": 8, "training": {}}
                        for lab in labels}, **extra}


def _verdicts(runs: list[dict[str, Any]], **extra: Any) -> dict[str, str]:
    return {c["id"]: c["verdict"] for c in evaluate_claims(_results(runs, **extra))}


def _all(*groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for g in groups for r in g]


def test_verdicts_follow_the_numbers() -> None:
    slow = [[s, 2.0 - s / 200] for s in range(1, 101)]  # LoRA+ never reaches LoRA's final loss
    v = _verdicts(_all(_seeds("lora"), _seeds("lora+", train_loss=slow), _seeds("lora-fa", saved_activation_bytes=600),
                       _seeds("full", heldout_loss=3.5),
                       _seeds("vera", trainable_params=50, eval_loss=1.3, accuracy=0.2, correct=40),
                       _seeds("lora-xs", trainable_params=30, eval_loss=1.2, accuracy=0.3, correct=60),
                       _seeds("lora-sb", trainable_params=30),
                       _seeds("rank1-sum", eval_loss=1.004), _seeds("delta-lora", eval_loss=0.9, correct=120)))
    assert v == {"lora+": "refuted", "lora-fa": "supported", "forgetting": "supported", "vera": "refuted",
                 "lora-sb": "supported", "rank1-sum": "supported", "delta-lora": "supported",
                 "lora-efficiency": "inconclusive (no time, memory or loss measurement)",
                 "qlora": "inconclusive (not compared: qlora)", "dora": "inconclusive (not compared: dora)",
                 "lr-sensitivity": "inconclusive (no learning-rate grid: 0 LoRA and 0 LoRA-SB learning rates in this "
                                   "comparison's runs; set compare.lr_sweep)",
                 "latency": "inconclusive (the latency experiment was not run)",
                 "swapping": "inconclusive (the swapping experiment was not run)",
                 "dynamic-rank": "inconclusive (the rank-allocation experiment was not run)"}
    fast = [[s, 2.0 - s / 50] for s in range(1, 101)]
    v = _verdicts(_all(_seeds("lora", step_time_s=0.5), _seeds("lora+", train_loss=fast),
                       _seeds("lora-fa", saved_activation_bytes=1000), _seeds("full", heldout_loss=3.05, step_time_s=0.4),
                       _seeds("lora-sb", trainable_params=10, eval_loss=1.5, accuracy=0.2, correct=40),
                       _seeds("lora-xs")))
    assert v["lora+"] == "supported" and v["lora-fa"] == "refuted"
    assert v["forgetting"] == "refuted"  # full forgets measurably (3.05 > 3.0) and LoRA (3.1) more
    assert v["lora-sb"] == "refuted"
    assert v["rank1-sum"].startswith("inconclusive (not compared")
    assert v["lora-efficiency"].startswith("inconclusive (no time, memory")  # no memory numbers


def _curves(label: str, loss: Sequence[float], acc: float = 0.5, items: int = 60, **values: Any) -> list[dict]:
    """Three seeds of ``label`` measured at budgets 50 and 100 on ``items`` choice items: per-item losses around
    ``loss[k]`` at budget ``k`` and ``acc`` of them right (seed- and item-level noise of their own)."""
    import random

    runs = []
    for seed in range(3):
        r = random.Random(f"{label}-{seed}")
        budgets = []
        for step, mean in zip((50, 100), loss, strict=True):
            item = [round(mean + r.gauss(0, 0.05), 5) for _ in range(items)]
            budgets.append({"step": step, "item_loss": item, "choice_loss": sum(item) / items,
                            "choice_correct": [int(r.random() < acc) for _ in range(items)]})
        runs.append({**_run(label, seed, **values), "budgets": budgets})
    return runs


def test_item_paired_verdicts_across_budgets_and_settings() -> None:
    """The learning-curve rules: a gap that held across budgets refutes, one that shrinks is 'not reproduced at
    this budget', and on a model over 10x smaller than the paper's a held gap is 'not reproduced in this setting'."""
    cmp = {"compare": {"budgets": [50, 100], "margins": {"loss": 0.03, "accuracy": 0.1}}}
    held = _all(_curves("lora", (2.0, 1.8)), _curves("delta-lora", (2.3, 2.1)))
    shrinking = _all(_curves("lora", (2.0, 1.8)), _curves("delta-lora", (2.6, 1.95)))
    big = {"total_params": 5_000_000_000}
    assert _verdicts([{**r, **big} for r in held], **cmp)["delta-lora"] == "refuted"
    assert _verdicts([{**r, **big} for r in shrinking], **cmp)["delta-lora"].startswith(
        "not reproduced at this budget (choice-set loss: the gap was +0.5")
    small = {"total_params": 5_000_000}
    assert _verdicts([{**r, **small} for r in held], **cmp)["delta-lora"].startswith("not reproduced in this setting")
    better = _all(_curves("lora", (2.0, 1.8)), _curves("delta-lora", (1.9, 1.7)))
    assert _verdicts(better, **cmp)["delta-lora"] == "supported"
    dora = [{**r, "label": "dora", "trainable_params": 1060} for r in _curves("dora", (1.9, 1.7))]
    assert _verdicts(_curves("lora", (2.0, 1.8)) + dora, **cmp)["dora"] == "supported"
    big_dora = [{**r, "trainable_params": 1500} for r in dora]  # not the same rank's budget
    assert _verdicts(_curves("lora", (2.0, 1.8)) + big_dora, **cmp)["dora"].startswith("inconclusive (budgets")
    # rank1-sum's two modes: the verdict is the default (prune) mode's; the AdaLoRA-style mode is tested beside it
    modes = _all(_curves("lora", (2.0, 1.8)), _curves("rank1-sum", (2.3, 2.1)),
                 _curves("rank1-sum-adalora", (2.0, 1.8)))
    r1 = next(c for c in evaluate_claims(_results(modes, **cmp)) if c["id"] == "rank1-sum")
    assert not r1["verdict"].startswith("supported"), r1
    assert any(n.startswith("AdaLoRA-style mode: final trainable parameters 1,000") for n in r1["numbers"]), r1
    assert "AdaLoRA-style mode vs physical pruning (two-sided): the AdaLoRA-style mode is better" in r1["numbers"]
    r1 = next(c for c in evaluate_claims(_results(modes[:6], **cmp)) if c["id"] == "rank1-sum")
    assert any("not compared (label rank1-sum-adalora)" in n for n in r1["numbers"])
    lora = _curves("lora", (2.0, 1.8))
    qlora = [{**r, "label": "qlora", "budgets": [  # the same items as LoRA's, each a little off (paired)
        {**b, "item_loss": [x + 0.004 * ((i * 7 + r["seed"]) % 3 - 1) for i, x in enumerate(b["item_loss"])]}
        for b in r["budgets"]]} for r in lora]
    same = lora + qlora
    claim = next(c for c in evaluate_claims(_results(same, **cmp)) if c["id"] == "qlora")
    assert claim["verdict"] == "supported", claim  # equivalent within the margins (TOST), items paired
    assert any("x 60 items" in n for n in claim["numbers"]) and any("by budget" in n for n in claim["numbers"])
    # independent noise on every item (nothing paired but the seeds): no equivalence shown, and no difference
    noisy = _all(_curves("lora", (2.0, 1.8)), _curves("qlora", (2.0, 1.8)))
    assert _verdicts(noisy, **cmp)["qlora"].startswith("inconclusive (neither equivalence")


def test_holm_correction_decides_the_family() -> None:
    """A difference significant alone (p just under 5%) is not once the report's other tests are counted."""
    from lorakit.evaluation.evidence import Evidence, quality

    lora = [_run("lora", i, eval_loss=v, accuracy=0.5) for i, v in enumerate((2.42, 2.50, 2.46))]
    other = [_run("other", i, eval_loss=v, accuracy=0.5) for i, v in enumerate((2.40, 2.475, 2.44))]
    ev = Evidence(_results(lora + other))
    assert quality(ev, "other", "lora", kind="beats", paper_params=1, paper="x")[0] == "supported"  # alone: p < 5%
    for i in range(40):  # 40 more tests in the family, none significant
        ev.register(f"filler {i}", 0.5)
    ev.decide()
    verdict, lines = quality(ev, "other", "lora", kind="beats", paper_params=1, paper="x")
    assert verdict == "inconclusive (no significant difference)" and "after Holm" not in " ".join(lines)


def test_a_significant_win_inside_the_margin_is_marked_negligible_and_keeps_its_verdict() -> None:
    """'Beats' follows the declared rule (significant, none worse); a win whose whole 95% interval lies inside the
    margin of no practical difference says so in the numbers, and one that reaches past it does not."""
    from lorakit.evaluation.evidence import Evidence, quality

    base = (2.42, 2.50, 2.46)
    lora = [_run("lora", i, eval_loss=v, accuracy=0.5) for i, v in enumerate(base)]
    for gain, negligible in ((0.01, True), (0.2, False)):
        other = [_run("other", i, eval_loss=v - gain - 0.001 * i, accuracy=0.5) for i, v in enumerate(base)]
        verdict, lines = quality(Evidence(_results(lora + other)), "other", "lora", kind="beats", paper_params=1,
                                 paper="x")
        assert verdict == "supported", lines
        assert any("negligible: the whole 95% interval lies inside ±0.03 nats" in n for n in lines) is negligible


def test_lora_efficiency_is_time_to_a_target_loss_and_memory() -> None:
    mem = {"rss_before_train_bytes": 1000, "peak_rss_bytes": 1500}
    full_mem = {"rss_before_train_bytes": 1000, "peak_rss_bytes": 3000}
    same = _verdicts(_all(_seeds("lora", step_time_s=0.5, **mem), _seeds("full", step_time_s=1.0, **full_mem)))
    assert same["lora-efficiency"] == "supported"  # same curve, half the step time, a third of the memory
    # full fine-tuning gets to LoRA's final loss in 10 steps (17 once smoothed): 17 x 1.0 s beats 100 x 0.5 s
    quick = [[s, 2.0 - min(s, 10) / 10] for s in range(1, 101)]
    v = evaluate_claims(_results(_all(_seeds("lora", step_time_s=0.5, **mem),
                                      _seeds("full", step_time_s=1.0, train_loss=quick, **full_mem))))
    eff = next(c for c in v if c["id"] == "lora-efficiency")
    assert eff["verdict"] == "refuted" and "full at step 17 x 1.000 s = 17.0 s" in eff["numbers"][0]  # smoothed


def _grid_results(lora: dict[float, float], sb: dict[float, float | None]) -> dict[str, Any]:
    runs, methods = [], {}
    for method, grid in (("lora", lora), ("lora-sb", sb)):
        for lr, loss in grid.items():
            lab = f"{method}-{lr:g}"
            runs.append({**_run(lab, eval_loss=loss), "method": method, "ok": loss is not None})
            methods[lab] = {"method": method, "training": {"lr": lr}}
    runs.append({**_run("plus", eval_loss=9.0), "method": "lora"})  # a LoRA+ run is not LoRA's grid
    methods["plus"] = {"method": "lora", "training": {"lr": 1e-3, "loraplus_ratio": 16}}
    runs.append({**_run("q", eval_loss=9.0), "method": "lora"})  # nor is a QLoRA run (a quantized base)
    methods["q"] = {"method": "lora", "quantize": "nf4", "training": {"lr": 3e-3}}
    return {"labels": list(methods), "seeds": [0], "runs": runs, "methods": methods, "training": {"lr": 1e-3}}


def test_lr_sensitivity_compares_the_ranges_over_same_shape_grids() -> None:
    """On the rates both grids share when there are 3 or more (the same place: a point only one grid has is left
    out), else on grids of about the same span."""
    from lorakit.evaluation.claims import claim_lr_sensitivity

    lora = {3e-4: 3.0, 1e-3: 2.8, 3e-3: 2.7, 1e-2: 3.2}  # range 0.5 on the shared 1e-3, 3e-3, 1e-2
    shared = claim_lr_sensitivity(_grid_results(lora, {1e-3: 2.9, 3e-3: 2.8, 1e-2: 2.75, 3e-2: 2.95}))
    assert shared["verdict"] == "supported"  # range 0.15 <= 0.25
    assert shared["numbers"][2] == ("on the 3 learning rates both grids share; lora's lr 0.0003 left out; "
                                    "lora-sb's lr 0.03 left out") and "lr 0.03" not in shared["numbers"][1]
    assert claim_lr_sensitivity(_grid_results(lora, {1e-3: 2.9, 3e-3: 2.8, 1e-2: 3.4, 3e-2: 2.95}))["verdict"] \
        == "refuted"  # range 0.6 >= 0.5
    diverged = claim_lr_sensitivity(_grid_results(lora, {1e-3: 2.9, 3e-3: 2.8, 1e-2: None, 3e-2: 2.9}))
    assert diverged["verdict"] == "refuted" and "lr 0.01 -> inf" in diverged["numbers"][1]
    outside = claim_lr_sensitivity(_grid_results(lora, {1e-3: 2.9, 3e-3: 2.8, 1e-2: 2.75, 3e-2: None}))
    assert outside["verdict"] == "supported"  # diverged at a rate LoRA's grid does not have: not compared
    shifted = claim_lr_sensitivity(_grid_results(lora, {2e-3: 2.9, 6e-3: 2.8, 2e-2: 2.75, 6e-2: 3.5}))
    assert shifted["verdict"] == "refuted" and "share" not in " ".join(shifted["numbers"])  # same span, range 0.75
    narrow = claim_lr_sensitivity(_grid_results(lora, {1e-3: 2.9, 2e-3: 2.8, 3e-3: 2.75}))
    assert narrow["verdict"].startswith("inconclusive (the grids span 33x and 3x")
    # a comparison carries its sweep's grid (compare.lr_sweep); the claim reads it from there
    sweep = _grid_results(lora, {1e-3: 2.9, 3e-3: 2.8, 1e-2: 2.75, 3e-2: 2.95})
    from lorakit.evaluation.claims import lr_grid

    main_results = {**_results(_seeds("lora")), "lr_sweep": {"path": "x/results.json", "grid": lr_grid(sweep)}}
    c = next(c for c in evaluate_claims(main_results) if c["id"] == "lr-sensitivity")
    assert c["verdict"] == "supported" and c["numbers"][-2] == "from sweep `x/results.json`"


def test_rank_allocation_claim_and_teacher_change() -> None:
    import torch

    from lorakit.evaluation.claims import claim_rank_allocation
    from lorakit.evaluation.rank_allocation import perturb_

    lin = torch.nn.Sequential(torch.nn.Linear(16, 12))
    w0 = lin[0].weight.detach().clone()
    perturb_(lin, ["0"], 3, 1.0, torch.Generator().manual_seed(0))
    assert torch.linalg.matrix_rank(lin[0].weight.detach() - w0).item() == 3

    def runs(rank: int, shares: list[float], ratio: list[float]) -> list[dict[str, Any]]:
        return [{"rank": rank, "seed": i, "relevant_share": sh, "relevant_mean_rank": 2.0 * r,
                 "other_mean_rank": 2.0, "kl_before": 0.1, "kl_after": 0.01} for i, (sh, r) in
                enumerate(zip(shares, ratio, strict=True))]

    st = {"settings": {"easy_rank": 1, "hard_rank": 6, "relevant": ["a", "b"]}}
    ok = claim_rank_allocation({**st, "runs": runs(1, [0.10, 0.11, 0.09], [1.5] * 3)
                                + runs(6, [0.18, 0.20, 0.19], [2.5, 3.0, 2.2])})
    assert ok["verdict"] == "supported", ok
    flat = claim_rank_allocation({**st, "runs": runs(1, [0.10, 0.11, 0.09], [1.0] * 3)
                                  + runs(6, [0.10, 0.10, 0.11], [0.9, 1.0, 0.8])})
    assert flat["verdict"] == "refuted"
    assert claim_rank_allocation({**st, "runs": runs(6, [0.2], [3.0])})["verdict"].startswith("inconclusive")


def test_one_seed_gives_no_quality_verdict() -> None:
    """Without a measured seed spread there is no interval: LoRA vs another method with one seed is not judged."""
    v = _verdicts([_run("lora"), _run("vera", trainable_params=50, eval_loss=1.3)])
    assert v["vera"].startswith("inconclusive (one seed")


def test_t_margins_and_settings() -> None:
    from lorakit.evaluation.claims import in_setting, t95, vera_width_for, welch_margin

    assert t95(2) == pytest.approx(4.303, abs=1e-3) and t95(11) == pytest.approx(2.201, abs=1e-3)
    a = {"mean": 1.0, "std": 0.1, "n": 3}
    assert welch_margin(a, a) == pytest.approx(t95(4) * math.sqrt(2 * 0.01 / 3))
    assert welch_margin({**a, "n": 1}, a) is None
    assert vera_width_for(10, 8, 256) == pytest.approx(2560 / 6)
    small = {"runs": [{"total_params": 5_000_000}]}
    assert in_setting("refuted", small, 125e6, "RoBERTa-base").startswith("not reproduced in this setting")
    assert in_setting("refuted", {"runs": [{"total_params": 135_000_000}]}, 125e6, "RoBERTa-base") == "refuted"
    assert in_setting("supported", small, 125e6, "RoBERTa-base") == "supported"


def test_several_seeds_give_mean_and_spread(tmp_path: Path) -> None:
    runs = [_run("lora", 0, eval_loss=1.0), _run("lora", 1, eval_loss=1.2), _run("full", 0), _run("full", 1)]
    res = {**_results(runs), "seeds": [0, 1]}
    s = summarize(res)["lora"]["eval_loss"]
    assert s["n"] == 2 and s["mean"] == pytest.approx(1.1) and s["std"] == pytest.approx(0.1414, abs=1e-3)
    write_report(res, tmp_path)
    assert "1.1000 ± 0.1414" in (tmp_path / "report.md").read_text()


def test_bundled_demo_reports_before_and_after(tmp_path: Path) -> None:
    """`make demo` in miniature: the bundled model, DoRA on the one_more task, accuracy and samples before/after."""
    from lorakit.evaluation.demo import DEMO_METHOD, DEMO_TASK, run_bundled_demo

    lines: list[str] = []
    res = run_bundled_demo(tmp_path / "demo", steps=2, examples=2, log=lines.append, progress=False)
    assert res["task"] == DEMO_TASK and res["method"] == DEMO_METHOD and res["steps"] == 2 and res["examples"] == 2
    assert (tmp_path / "demo" / "adapter" / "adapter.safetensors").is_file()
    assert (tmp_path / "demo" / "loss.png").is_file()
    assert res["eval_loss_after"] < res["eval_loss_before"]
    assert res["sample_after"] != res["sample_before"] and 0.0 <= res["accuracy_after"] <= 1.0
    text = "\n".join(lines)
    for expected in ("before training: ", "after 2 steps: ", "result: held-out accuracy ", "2 held-out problems",
                     "lorakit generate --adapter", "lorakit compare", "prompt:     Question: "):
        assert expected in text, expected


def test_an_interrupted_demo_stops_instead_of_scoring_a_half_trained_adapter(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C during the demo's training (a stop request, as the signal handler makes it): the demo stops
    (KeyboardInterrupt: `lorakit demo` exits 130) instead of scoring the model and pointing at an adapter that was
    never written."""
    from lorakit.evaluation.demo import run_bundled_demo
    from lorakit.train.trainer import Trainer

    step = Trainer._step

    def step_then_ctrl_c(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        self._request_stop()
        return out

    monkeypatch.setattr(Trainer, "_step", step_then_ctrl_c)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_bundled_demo(tmp_path / "demo", steps=5, examples=2, log=lines.append, progress=False)
    text = "\n".join(lines)
    assert re.search(r"interrupted at step [12]/5", text), text
    assert "result: held-out accuracy" not in text and "lorakit generate" not in text
    assert not (tmp_path / "demo" / "adapter").exists()


def test_bundled_demo_runs_the_arithmetic_task_and_rejects_unknown_ones(tmp_path: Path) -> None:
    """The earlier demo (LoRA-SB on arithmetic) still runs through the same path; a wrong task name is a
    ConfigError that names the choices."""
    from lorakit.errors import ConfigError
    from lorakit.evaluation.demo import run_bundled_demo

    lines: list[str] = []
    res = run_bundled_demo(tmp_path / "demo", steps=1, examples=1, log=lines.append, progress=False,
                           task="arithmetic", method="lora-sb", r=4, init_examples=8)
    assert res["task"] == "arithmetic" and (tmp_path / "demo" / "adapter" / "adapter.safetensors").is_file()
    with pytest.raises(ConfigError, match="one_more"):
        run_bundled_demo(tmp_path / "other", steps=1, log=lines.append, progress=False, task="nope")


def test_cpu_contention_is_detected_and_reported(tmp_path: Path) -> None:
    from lorakit.evaluation.report import cpu_use

    clean = _run("lora", train_s=10.0, train_cpu_s=19.0, threads=2, step_time_s=0.4)
    shared = _run("full", train_s=10.0, train_cpu_s=8.0, threads=2, step_time_s=1.5)
    assert cpu_use(clean) == pytest.approx(0.95) and cpu_use(shared) == pytest.approx(0.4)
    assert cpu_use({**shared, "peak_gpu_bytes": 1}) is None  # GPU runs wait on the device, not the CPU
    write_report(_results([clean, shared]), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Warning: full (seed 0) trained while another job shared the CPU (40% of 2 threads' time)" in md
    assert "Warning: lora" not in md
    assert "can differ by 1.5x or more between runs" not in md  # no device recorded: no CPU note
    write_report({**_results([clean, shared]), "training": {"device": "cpu"}}, tmp_path)
    assert "can differ by 1.5x or more between runs" in (tmp_path / "report.md").read_text()


def test_merge_compare_parts(tmp_path: Path) -> None:
    """scripts/merge_compare.py: parts of one comparison become one results.json and report, in config order."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("merge_compare", Path(__file__).parent.parent / "scripts" /
                                                  "merge_compare.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = {**_results(_seeds("vera")), "model": "m", "data": {}, "training": {}, "command": "one"}
    b = {**_results(_seeds("lora")), "model": "m", "data": {}, "training": {}, "command": "two"}
    merged = mod.merge([a, b], order=["lora", "vera"])
    assert merged["labels"] == ["lora", "vera"] and merged["command"] == "one ; two" and "merged" in merged["note"]
    assert [(r["label"], r["seed"]) for r in merged["runs"]][:2] == [("lora", 0), ("vera", 0)]
    with pytest.raises(SystemExit, match="parts differ in 'model'"):
        mod.merge([a, {**b, "model": "other"}])
    with pytest.raises(SystemExit, match="more than one part with the same seed"):
        mod.merge([a, a])
    by_seed = [{**a, "seeds": [s], "runs": [r for r in a["runs"] if r["seed"] == s]} for s in (2, 0, 1)]
    pooled = mod.merge(by_seed)  # one label split over three parts by seed: a long comparison stopped and resumed
    assert pooled["seeds"] == pooled["compare"]["seeds"] == [0, 1, 2] and pooled["runs"] == a["runs"]
    assert pooled["note"].endswith("disjoint runs") and mod.merge(by_seed[:2], seeds=[0, 1, 2])["note"].endswith(
        "; vera ran for seeds [0, 2] only")
    with pytest.raises(SystemExit, match="'vera' is configured differently"):
        mod.merge([by_seed[0], {**by_seed[1], "methods": {"vera": {"method": "vera", "r": 2}}}])
    newer = {**_results(_seeds("vera")), "model": "m", "data": {"replay": None},
             "training": {"objective": "sft"}, "command": "x"}
    assert mod.merge([newer, b])["labels"] == ["vera", "lora"]  # options added since, at their defaults
    with pytest.raises(SystemExit, match="parts differ in 'data'"):
        mod.merge([{**newer, "data": {"replay": 0.2}}, b])
    with pytest.raises(SystemExit, match="parts differ in 'training'"):
        mod.merge([{**newer, "training": {"objective": "dpo"}}, b])
    rerun = {**_results(_seeds("vera")), "model": "m", "data": {}, "training": {}, "command": "three"}
    replaced = mod.merge([rerun, mod.drop(merged, {"vera"})], order=["lora", "vera"])  # vera rerun, lora kept
    assert replaced["labels"] == ["lora", "vera"] and sum(r["label"] == "vera" for r in replaced["runs"]) == len(
        [r for r in rerun["runs"] if r["label"] == "vera"])
    dora = {**_results(_seeds("dora")), "model": "m", "data": {}, "training": {}, "command": "four"}
    again = mod.merge([dora, merged])  # a part that was itself merged is flattened: 3 runs, no nested note
    assert again["note"] == ("merged from 3 parts (scripts/merge_compare.py): the same model, data and training "
                             "section, disjoint runs") and again["command"] == "four ; one ; two"
    assert mod.merge([again, {**_results(_seeds("full")), "model": "m", "data": {}, "training": {},
                              "command": "five"}])["note"].startswith("merged from 4 parts")
    stopped = {**b, "labels": ["lora", "dora", "vera"],
               "runs": [r for r in b["runs"] if r["seed"] == 0] + [{**r, "label": "vera"} for r in b["runs"]
                                                                   if r["seed"] != 1]}
    alone = mod.merge([stopped])  # a comparison stopped before dora's turn, with vera's seed 1 run lost
    assert alone["labels"] == ["lora", "vera"] and "dora" not in alone["methods"]
    assert alone["note"].endswith("; not run: dora; lora ran for seeds [0] only; vera ran for seeds [0, 2] only")
    finished = mod.merge([mod.drop(dora, set()), alone], order=["lora", "dora", "vera", "full"])
    assert finished["note"].endswith("; not run: full; lora ran for seeds [0] only; vera ran for seeds [0, 2] only")
    assert finished["note"].startswith("merged from 2 parts") and finished["note"].count("merged from") == 1
    redo = mod.merge([rerun, mod.drop({**merged, "note": merged["note"] + f"; vera {mod.RERUN}"}, {"vera"})])
    assert redo["note"].endswith(f"; vera {mod.RERUN}")  # what --drop noted survives a later merge


def test_a_run_saved_before_an_option_existed_is_the_same_job(tmp_path) -> None:
    """--resume keeps a finished run whose saved config predates options added since (at their defaults)."""
    from lorakit.evaluation.compare import _same_config
    from lorakit.train.config import TrainConfig

    cfg = TrainConfig.parse({"model": {"path": "bundled://tiny-base"}, "data": {"train": "x.jsonl"},
                             "output": {"dir": str(tmp_path)}})
    saved = cfg.to_dict()
    for section, key in (("training", "objective"), ("training", "beta"), ("data", "replay"), ("adapter", "grow")):
        saved[section].pop(key)  # as written by a lorakit without these options
    assert _same_config(saved, cfg)
    saved["training"]["lr"] = 1.0
    assert not _same_config(saved, cfg)
    assert not _same_config({"model": 3}, cfg)


def test_the_report_says_whether_lora_has_flattened() -> None:
    """The learning-curve section states whether LoRA's held-out loss still falls by more than the loss margin
    between the last two budgets (a verdict on a falling curve describes the budget)."""
    from lorakit.evaluation.report import plateau_note

    cmp = {"compare": {"budgets": [50, 100], "margins": {"loss": 0.03, "accuracy": 0.1}}}
    falling = plateau_note(_results(_curves("lora", (2.0, 1.8)), **cmp))
    assert falling is not None and "has not flattened" in falling, falling
    assert 0.18 < float(falling.split("still fell ")[1].split()[0]) < 0.22  # 2.0 -> 1.8, with item noise
    flat = plateau_note(_results(_curves("lora", (1.81, 1.8)), **cmp))
    assert flat is not None and "has flattened at this budget" in flat
    rising = plateau_note(_results(_curves("lora", (1.8, 2.0)), **cmp))
    assert rising is not None and "rose 0." in rising and "past its minimum" in rising
    assert plateau_note(_results(_curves("vera", (2.0, 1.8)), **cmp)) is None  # no LoRA to read it on
    assert plateau_note(_results(_curves("lora", (2.0, 1.8)))) is None  # no budgets declared


def test_readme_report_rewrites_only_its_own_section(tmp_path: Path) -> None:
    """scripts/readme_report.py: the table and verdicts come from results.json, into the named section only; a README
    without that section is an error, not a silent no-op."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_report", Path(__file__).parent.parent / "scripts" /
                                                  "readme_report.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    write_report({**_results(_seeds("lora", eval_loss=2.5) + _seeds("vera", eval_loss=2.6)),
                  "command": "lorakit compare x.yaml"}, tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- report:begin -->\nold 80-step\n<!-- report:end -->\nmiddle\n"
                      "<!-- report-epoch:begin -->\nold epoch\n<!-- report-epoch:end -->\nend\n")
    results = str(tmp_path / "results.json")
    assert mod.main([results, "--readme", str(readme), "--marker", "report-epoch"]) == 0
    text = readme.read_text()
    assert "old 80-step" in text and "old epoch" not in text and text.endswith("<!-- report-epoch:end -->\nend\n")
    epoch = text.split("<!-- report-epoch:begin -->")[1]
    assert "| lora | " in epoch and "| vera | " in epoch and "made by `lorakit compare x.yaml`" in epoch
    assert "2.50" in epoch.split("| lora | ")[1].split("\n")[0]  # lora's eval loss, from the summary
    assert mod.main([results, "--readme", str(readme), "--marker", "report-other"]) == 1
    assert readme.read_text() == text
