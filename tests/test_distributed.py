"""Data-parallel training (:mod:`lorakit.distributed`): two CPU processes launched by ``torchrun`` (gloo) end
with the same adapter as one process with the same global batch, for plain LoRA (DDP and FSDP2), LoRA-SB's
init and rank1-sum's pruning decisions; a run resumed on two processes ends like an uninterrupted one.

One ``torchrun`` launch runs every two-process training (this file is also the worker: ``python -m
torch.distributed.run ... -m tests.test_distributed SPEC.json``), so the processes start only once.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PER_PROCESS_BATCH = 4
WORLD = 2
# name: (method, options, lr, extra training options)
RUNS: dict[str, tuple[str, dict[str, Any], float, dict[str, Any]]] = {
    "lora": ("lora", {"r": 4}, 1e-2, {}),
    "fsdp": ("lora", {"r": 4}, 1e-2, {"fsdp": True}),
    "lora-sb": ("lora-sb", {"r": 4, "init_examples": 40}, 3e-2, {}),
    # interval 1: the budget is re-masked every step from the scores, and the adapter shrinks at step 4
    "rank1-sum": ("rank1-sum", {"r_init": 4, "target_rank": 2, "interval": 1}, 1e-2, {}),
    # DPO on preference pairs: the reference computed on each process, the loss a mean over pairs
    "dpo": ("lora", {"r": 4, "alpha": 8}, 1e-2, {"objective": "dpo", "beta": 0.5}),
}


def _can_bind_localhost() -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
        return True
    except OSError:
        return False


def _varied_data(tiny_run: dict[str, Path]) -> Path:
    """The tiny training set with completions repeated 1-4 times: examples predict 2 to 5 tokens, so the
    shards of a micro-batch hold different numbers of loss tokens (a plain mean of per-process means would
    not match one process)."""
    path = tiny_run["train"].with_name("varied.jsonl")
    if not path.exists():
        rows = [json.loads(line) for line in tiny_run["train"].read_text().splitlines()]
        for i, r in enumerate(rows):
            r["completion"] = r["completion"] * (1 + (i * 7) % 4)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pair_data(tiny_run: dict[str, Path]) -> dict[str, str]:
    """Preference pairs from the varied data (answers of 2 to 5 tokens): the right completion over the next
    line's."""
    paths = {k: tiny_run["train"].with_name(f"pairs-{k}.jsonl") for k in ("train", "eval")}
    if not paths["train"].exists():
        rows = [json.loads(line) for line in _varied_data(tiny_run).read_text().splitlines()]
        pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[(i + 1) % len(rows)]["completion"]}
                 for i, r in enumerate(rows) if r["completion"] != rows[(i + 1) % len(rows)]["completion"]]
        paths["train"].write_text("".join(json.dumps(r) + "\n" for r in pairs))
        paths["eval"].write_text("".join(json.dumps(r) + "\n" for r in pairs[:10]))
    return {k: str(v) for k, v in paths.items()}


def _config(tiny_run: dict[str, Path], out: Path, name: str, *, processes: int) -> Path:
    from .fixtures_train import make_config

    method, options, lr, extra = RUNS[name]
    # same global batch either way: 8 examples per micro-batch, 2 micro-batches per step (tests no_sync)
    training = {"batch_size": PER_PROCESS_BATCH * WORLD // processes, "grad_accum": 2, "lr": lr, **extra}
    data = _pair_data(tiny_run) if extra.get("objective") else {"train": str(_varied_data(tiny_run))}
    return make_config(tiny_run, out, method=method, options=options, training=training, data=data,
                       output={"plot": False, "save_every": 3, "keep_checkpoints": 3})


def _tensors(run: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter.safetensors"))


def _assert_same_adapter(got: Path, want: Path, *, atol: float = 2e-5) -> None:
    import torch

    a, b = _tensors(got), _tensors(want)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(tiny_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every run of :data:`RUNS` on two processes (``<name>``) and on one (``<name>-1``), plus ``resumed``: the
    two-process LoRA run stopped after its step-3 checkpoint and resumed on two processes."""
    import torch

    from lorakit.cli import main

    if not _can_bind_localhost():
        pytest.skip("torchrun needs to bind a localhost port")
    root = tmp_path_factory.mktemp("dist")
    out = {name: root / name for name in RUNS}
    configs = [str(_config(tiny_run, out[name], name, processes=WORLD)) for name in RUNS]
    out["resumed"] = root / "resumed"
    spec = {"train": configs, "resume": str(_config(tiny_run, out["resumed"], "lora", processes=WORLD))}
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "tests.test_distributed", str(root / "spec.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:  # the workers' own errors, before torchrun's summary
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "File " in line]
        pytest.fail("torchrun failed:\n" + "\n".join(errors[:40]) + "\n...\n" + proc.stderr[-3000:])
    assert f"DDP over {WORLD} processes (gloo)" in proc.stderr  # logged by process 0 only
    assert proc.stderr.count(f"FSDP2 over {WORLD} processes (gloo)") == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in RUNS:
            if name == "fsdp":  # FSDP changes where tensors live, not the math: its reference is plain LoRA's
                continue
            out[f"{name}-1"] = root / f"{name}-1"
            assert main(["train", str(_config(tiny_run, out[f"{name}-1"], name, processes=1))]) == 0
    finally:
        torch.set_num_threads(threads)
    out["fsdp-1"] = out["lora-1"]
    return out


def _metrics(run: Path) -> list[dict[str, Any]]:
    from lorakit.train.metrics import read_metrics

    return read_metrics(run / "metrics.jsonl")


@pytest.mark.parametrize("name", ["lora", "fsdp", "dpo"])
def test_two_processes_train_like_one(runs: dict[str, Path], name: str) -> None:
    _assert_same_adapter(runs[name], runs[f"{name}-1"])
    # process 0 alone wrote the logs; the logged loss and the (sharded) evaluation are the global ones
    two, one = _metrics(runs[name]), _metrics(runs[f"{name}-1"])
    losses = [(r["step"], r["loss"]) for r in two if r["kind"] == "train"]
    assert [s for s, _ in losses] == list(range(1, 7))
    ref = [r["loss"] for r in one if r["kind"] == "train"]
    assert [v for _, v in losses] == pytest.approx(ref, rel=1e-5)
    evals = [r["eval_loss"] for r in two if r["kind"] == "eval"]
    assert evals == pytest.approx([r["eval_loss"] for r in one if r["kind"] == "eval"], rel=1e-5)
    assert evals[-1] < evals[0]  # it trained
    assert len(list((runs[name] / "checkpoints").iterdir())) == 2  # steps 3 and 6, written once


def test_lora_sb_init_is_the_one_process_init(runs: dict[str, Path]) -> None:
    import torch

    a, b = _tensors(runs["lora-sb"]), _tensors(runs["lora-sb-1"])
    frozen = [k for k in a if k.endswith(("lora_A", "lora_B"))]  # set by the init only: G was all-reduced
    assert frozen
    for k in frozen:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    _assert_same_adapter(runs["lora-sb"], runs["lora-sb-1"])


def test_rank1_sum_prunes_like_one_process(runs: dict[str, Path]) -> None:
    meta = [json.loads((runs[n] / "adapter" / "adapter.json").read_text()) for n in ("rank1-sum", "rank1-sum-1")]
    ranks = meta[0]["extra"]["ranks"]
    assert ranks == meta[1]["extra"]["ranks"]
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1  # a real global choice
    logged = [[r["ranks"] for r in _metrics(runs[n]) if r["kind"] == "ranks"] for n in ("rank1-sum", "rank1-sum-1")]
    assert logged[0] == logged[1]  # the same decision at every step
    _assert_same_adapter(runs["rank1-sum"], runs["rank1-sum-1"])  # shrunk mid-run: DDP was rebuilt


def test_resume_on_two_processes(runs: dict[str, Path]) -> None:
    _assert_same_adapter(runs["resumed"], runs["resumed"].with_name("resumed-uninterrupted"), atol=0)


def test_resume_with_another_process_count_is_refused(runs: dict[str, Path], tiny_run: dict[str, Path],
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main

    run = tmp_path / "run"  # a copy of a complete two-process run, resumed on one process
    shutil.copytree(runs["resumed"].with_name("resumed-uninterrupted"), run)
    shutil.rmtree(run / "adapter")
    assert main(["train", str(_config(tiny_run, run, "lora", processes=WORLD)), "--resume"]) == 1
    assert "written by a run of 2 process(es)" in capsys.readouterr().err


# --- in one process: the sharding arithmetic and the launch checks ------------------------------------------------
def test_shards_weight_their_loss_by_their_share_of_loss_tokens() -> None:
    from lorakit.train.data import IGNORE, Example
    from lorakit.train.distributed import Distributed

    # predicted tokens (labels after the first, not ignored): 3, 1, 2, 0, 4
    examples = [Example([1] * 4, [5, 6, 7, 8]), Example([1] * 3, [IGNORE, IGNORE, 7]),
                Example([1] * 3, [IGNORE, 6, 7]), Example([1] * 2, [5, IGNORE]), Example([1] * 5, [1, 2, 3, 4, 5])]
    idx = [4, 0, 2, 1, 3]
    shards = [Distributed(rank=r, world=2).micro_batch(examples, idx, pad_id=0) for r in (0, 1)]
    assert [s[0]["input_ids"].shape for s in shards] == [(3, 5), (2, 4)]  # rows [4, 2, 3] and [0, 1]
    assert [s[1] for s in shards] == pytest.approx([2 * 6 / 10, 2 * 4 / 10])  # N n_r / n
    assert shards[0][2] == shards[1][2] == 17  # tokens of the whole global micro-batch
    one = Distributed().micro_batch(examples, idx, pad_id=0)
    assert one[1] == 1.0 and one[0]["input_ids"].shape == (5, 5)
    # a global batch smaller than the world: the empty process still runs (one example), with weight 0
    batch, weight, _ = Distributed(rank=2, world=3).micro_batch(examples, [0, 1], pad_id=0)
    assert weight == 0.0 and batch["input_ids"].shape[0] == 1


def test_launch_environment_is_checked(monkeypatch: pytest.MonkeyPatch, tiny_run: dict[str, Path],
                                       tmp_path: Path) -> None:
    import torch

    from lorakit.errors import ConfigError
    from lorakit.train.config import load_config
    from lorakit.train.distributed import DistributedError, setup

    from .fixtures_train import make_config

    cfg = load_config(make_config(tiny_run, tmp_path / "run"))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    ctx, device = setup(cfg, torch.device("cpu"))  # a plain launch: one process, nothing changes
    assert not ctx.active and ctx.is_main and device == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="RANK, MASTER_ADDR, MASTER_PORT not set"):
        setup(cfg, torch.device("cpu"))
    for method in ("delta-lora", "lora-sb"):  # refused before any process group is joined
        bad = load_config(make_config(tiny_run, tmp_path / method, method=method, training={"fsdp": True}))
        with pytest.raises(ConfigError, match=f"training.fsdp: method '{method}'"):
            setup(bad, torch.device("cpu"))


# --- the worker: run inside each torchrun process ---------------------------------------------------------------
def _worker(spec_path: str) -> int:
    import torch.distributed as dist

    from lorakit.cli import main

    spec = json.loads(Path(spec_path).read_text())
    for cfg in spec["train"]:
        if main(["train", cfg]) != 0:
            return 1
    # resume: train fully, keep that adapter, then drop everything after the step-3 checkpoint and resume
    cfg = spec["resume"]
    if main(["train", cfg]) != 0:
        return 1
    out = Path(_output_dir(cfg))
    if dist.get_rank() == 0:
        shutil.copytree(out, out.with_name(out.name + "-uninterrupted"))
        shutil.rmtree(out / "adapter")
        shutil.rmtree(out / "checkpoints" / "ckpt-00000006")
    dist.barrier()
    return main(["train", cfg, "--resume"])


def _output_dir(cfg: str) -> str:
    import yaml

    return yaml.safe_load(Path(cfg).read_text())["output"]["dir"]


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
