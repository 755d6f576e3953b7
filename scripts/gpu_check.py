"""The phases of ``scripts/gpu_check.sh`` (read its header first): each phase runs in its own process with its own
time cap, inside one overall budget, and ``$OUT/gpu_check.json`` is rewritten after each one.

    python scripts/gpu_check.py run --out DIR --device cuda --budget 520     # the whole check
    python scripts/gpu_check.py train --out DIR --device cuda                 # one phase (what `run` calls)

``--device cpu`` is the dry run: the same phases on tiny workloads (it checks the script, not CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: The other methods' bench, after LoRA's, as time allows.
OTHER_METHODS = "lora-fa,vera,dora,delta-lora,lora-xs,lora-sb,rank1-sum,full"
#: Tests that carry the cuda marker: the contract matrix, the fused kernels, QLoRA, the fingerprint.
CUDA_TESTS = ["tests/test_contract.py", "tests/test_kernels.py", "tests/test_qlora.py", "tests/test_core.py"]


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


class Check:
    """The summary file, rewritten after every phase."""

    def __init__(self, out: Path, device: str, budget: float, sizes: dict[str, int]) -> None:
        self.out, self.device, self.budget = out, device, budget
        self.start = time.monotonic()
        self.data: dict[str, Any] = {"device": device, "budget_s": budget, "carried": sizes, "phases": {},
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.save()

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.out / "gpu_check.json")

    def phase(self, name: str, cmd: list[str], cap: float, *, env: dict[str, str] | None = None,
              reserve: float = 0.0, result: Path | None = None) -> bool:
        """Run ``cmd`` with at most ``cap`` seconds (less if the budget, minus ``reserve`` for later phases, is
        shorter); record its status, time, output tail and the JSON it wrote to ``result``."""
        limit = min(cap, self.left() - reserve)
        rec: dict[str, Any] = {"cmd": " ".join(cmd), "limit_s": round(limit, 1)}
        self.data["phases"][name] = rec
        if limit < 10:
            rec.update(status="skipped", reason=f"{self.left():.0f} s of the budget left")
            self.save()
            return False
        t = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                                  timeout=limit)
            rec.update(status="ok" if proc.returncode == 0 else "failed", rc=proc.returncode,
                       output=_tail(proc.stdout + proc.stderr))
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"") + (e.stderr or b"")
            rec.update(status="timeout", output=_tail(out.decode(errors="replace") if isinstance(out, bytes) else out))
        rec["s"] = round(time.monotonic() - t, 1)
        if result is not None and result.is_file():
            try:
                rec["result"] = json.loads(result.read_text())
            except json.JSONDecodeError as e:
                rec["result_error"] = str(e)
        elif result is None and rec["status"] != "timeout":  # a phase that prints one JSON line last
            lines = [ln for ln in (proc.stdout or "").splitlines() if ln.startswith("{")]
            if lines:
                try:
                    rec["result"] = json.loads(lines[-1])
                except json.JSONDecodeError:
                    pass
        print(f"[gpu-check] {name}: {rec['status']} in {rec['s']} s", flush=True)
        self.save()
        return rec["status"] == "ok"


ENV_SNIPPET = """
import json, platform, subprocess, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                bf16=torch.cuda.is_bf16_supported())
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    except Exception as e:
        info["nvidia_smi"] = repr(e)
print(json.dumps(info))
"""

IMPORT_SNIPPET = """
import importlib, json
out = {}
for name in ("lorakit", "pydantic", "transformers", "peft", "torchao", "bitsandbytes", "liger_kernel", "triton"):
    try:
        m = importlib.import_module(name)
        out[name] = getattr(m, "__version__", "?")
    except Exception as e:
        out[name] = f"MISSING: {type(e).__name__}: {e}"
import torch
from lorakit.fast import cross_entropy
out["cross_entropy_kernel"] = cross_entropy.kernel("cuda" if torch.cuda.is_available() else "cpu")
print(json.dumps(out))
bad = [k for k, v in out.items() if str(v).startswith("MISSING") and k in ("lorakit", "pydantic")]
raise SystemExit(1 if bad else 0)
"""


def run(a: argparse.Namespace) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = a.device == "cpu"
    py = sys.executable
    check = Check(out, a.device, a.budget, {"tree_bytes": a.tree_bytes, "whl_bytes": a.carried_bytes,
                                            "total_bytes": a.tree_bytes + a.carried_bytes, "limit_bytes": 64 * 2**20})
    check.phase("env", [py, "-c", ENV_SNIPPET], 60)
    check.phase("import", [py, "-c", IMPORT_SNIPPET], 90)

    tests = ["-k", "formula and lora and nodrop and fp32"] if cpu else []
    check.phase("pytest_cuda", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                                "--tb=line", "-rf", *CUDA_TESTS, *tests],
                40 if cpu else 150, env={"LORAKIT_TEST_DEVICE": a.device}, reserve=0 if cpu else 300)

    train_json = out / "train.json"
    check.phase("train", [py, str(Path(__file__)), "train", "--out", str(out), "--device", a.device],
                90 if cpu else 120, reserve=0 if cpu else 240, result=train_json)
    train_json.unlink(missing_ok=True)
    dpo_json = out / "dpo.json"
    check.phase("dpo", [py, str(Path(__file__)), "dpo", "--out", str(out), "--device", a.device],
                60 if cpu else 90, reserve=0 if cpu else 200, result=dpo_json)
    dpo_json.unlink(missing_ok=True)

    tiny = ["--workload", "tiny", "--steps", "1", "--warmup", "0"] if cpu else []
    check.phase("bench_lora", [py, "-m", "lorakit", "bench", "--device", a.device, "--methods", "lora",
                               "--compare-peft", "--quantize", "nf4,bnb-nf4", "--strict", *tiny,
                               "--out", str(out / "bench-lora.json")], 60 if cpu else 270, reserve=0 if cpu else 20)
    check.phase("bench_methods", [py, "-m", "lorakit", "bench", "--device", a.device, "--methods",
                                  "lora-fa" if cpu else OTHER_METHODS, "--compare-peft", "--strict", *tiny,
                                  "--out", str(out / "bench-methods.json")], 60 if cpu else 400)
    bundle = ROOT / ".whl" / "unsloth.tgz"
    anchor = ROOT / ".whl" / "anchor_unsloth_gpu.py"
    if bundle.is_file() and anchor.is_file() and not cpu:
        site = tempfile.mkdtemp()
        check.phase("unsloth", ["sh", "-c", f"tar xzf {bundle} -C {site} && PYTHONPATH={site} {py} {anchor}"], 150)
    else:
        check.data["phases"]["unsloth"] = {"status": "skipped", "reason": "no .whl/unsloth.tgz and anchor carried"
                                           if not cpu else "dry run"}
    check.data["finished"] = True
    check.save()
    print(f"[gpu-check] done in {check.data['elapsed_s']} s: {out / 'gpu_check.json'}")
    return 0


def train(a: argparse.Namespace) -> int:
    """A run with lorakit train's GPU defaults (precision, compile and model dtype all auto), its adapter loaded
    back on the CPU, and the fused op counted under the default precision."""
    import torch

    import lorakit
    from lorakit.core import lowrank
    from lorakit.evaluation.tasks import TASKS, write_jsonl
    from lorakit.train.loading import load_trained
    from lorakit.train.trainer import Trainer

    cpu = a.device == "cpu"
    work = Path(tempfile.mkdtemp())
    write_jsonl(TASKS["one_more"](400, 0), work / "train.jsonl")
    steps = 3 if cpu else 30
    cfg = {"model": {"path": "bundled://tiny-base"},
           "adapter": {"method": "lora", "r": 16, "alpha": 32, "targets": "all-linear", "dropout": 0.05},
           "data": {"train": str(work / "train.jsonl"), "eval_fraction": 0.05, "max_length": 128},
           "training": {"max_steps": steps, "batch_size": 8, "lr": 2e-4, "warmup_ratio": 0.1, "device": a.device},
           "output": {"dir": str(work / "run"), "save_every": max(1, steps // 3), "progress": False, "plot": False,
                      "tensorboard": False}}
    t = time.perf_counter()
    result = Trainer(None, cfg, log=lambda m: print(m, flush=True)).fit().finished()
    seconds = time.perf_counter() - t
    run_info = json.loads((work / "run" / "run.json").read_text())
    metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if m["kind"] == "train"]

    # the trained adapter on the training device, eager, under the default precision: the fused op on every layer
    dev = torch.device("cuda" if a.device == "cuda" else "cpu")
    model, tok = load_trained(result.adapter_dir)
    model.to(dev).eval()
    layers = len(lorakit.adapter_modules(model))
    ids = tok("Rosa has 8 apples and buys one more. How many apples does Rosa have now?",
              return_tensors="pt")["input_ids"]
    before = lowrank.fused_calls()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        model(input_ids=ids.to(dev))
    fused_under_autocast = lowrank.fused_calls() - before
    with torch.no_grad():
        on_device = model(input_ids=ids.to(dev)).logits.float().cpu()
    # ... and on the CPU (a fresh load: the base fingerprint taken on the GPU must match there)
    cpu_model, _ = load_trained(result.adapter_dir)
    with torch.no_grad():
        on_cpu = cpu_model.eval()(input_ids=ids).logits.float()
    rel = float((on_device - on_cpu).norm() / on_cpu.norm())
    out = {"steps": result.step, "seconds": round(seconds, 1), "steps_per_s": round(result.step / seconds, 2),
           "loss_first": losses[0], "loss_last": losses[-1], "eval_start": result.eval_start,
           "eval_end": result.eval_end, "runtime": run_info.get("runtime"), "adapted_layers": layers,
           "fused_calls_under_bf16_autocast": fused_under_autocast,
           "cpu_load_ok": True, "logits_rel_diff_device_vs_cpu": rel}
    (Path(a.out) / "train.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(json.dumps(out, default=str))
    ok = fused_under_autocast == layers and rel < 1e-3 and losses[-1] == losses[-1]
    return 0 if ok else 1


def dpo(a: argparse.Namespace) -> int:
    """DPO with lorakit train's GPU defaults (bf16 autocast): finite losses and rewards, the reference cached, and
    the fused per-token log-probability head under the compute dtype against fp32 log-softmax."""
    import torch
    import torch.nn.functional as F

    from lorakit.evaluation.tasks import TASKS, write_jsonl
    from lorakit.fast.cross_entropy import linear_token_logprobs
    from lorakit.train.trainer import Trainer

    cpu = a.device == "cpu"
    work = Path(tempfile.mkdtemp())
    rows = TASKS["one_more"](200, 0)
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[(i + 1) % len(rows)]["completion"]}
             for i, r in enumerate(rows) if r["completion"] != rows[(i + 1) % len(rows)]["completion"]]
    write_jsonl(pairs, work / "pairs.jsonl")
    steps = 3 if cpu else 20
    cfg = {"model": {"path": "bundled://tiny-base"}, "adapter": {"method": "lora", "r": 16, "alpha": 32},
           "data": {"train": str(work / "pairs.jsonl"), "eval_fraction": 0.1, "max_length": 128},
           "training": {"objective": "dpo", "max_steps": steps, "batch_size": 8, "lr": 1e-3, "device": a.device},
           "output": {"dir": str(work / "run"), "progress": False, "plot": False, "tensorboard": False}}
    t = time.perf_counter()
    result = Trainer(None, cfg, log=lambda m: print(m, flush=True)).fit().finished()
    seconds = time.perf_counter() - t
    metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    dev = torch.device("cuda" if a.device == "cuda" else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 96, 64, generator=g).to(dev, dtype)
    w = (0.1 * torch.randn(8192, 64, generator=g)).to(dev, dtype)
    labels = torch.randint(0, 8192, (4, 96), generator=g).to(dev)
    ours = linear_token_logprobs(h, w, labels)[:, :-1].float().cpu()
    ref = torch.log_softmax(F.linear(h.float(), w.float()), -1)[:, :-1].gather(
        -1, labels[:, 1:, None]).squeeze(-1).cpu()
    out = {"steps": result.step, "seconds": round(seconds, 1), "loss_first": train[0]["loss"],
           "loss_last": train[-1]["loss"], "reward_accuracy_last": train[-1]["reward_accuracy"],
           "eval_start": result.eval_start, "eval_end": result.eval_end,
           "reference_cached": (work / "run" / "reference_logps.safetensors").is_file(),
           "kernel_max_abs_diff_vs_fp32": float((ours - ref).abs().max())}
    (Path(a.out) / "dpo.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(json.dumps(out, default=str))
    finite = all(m["loss"] == m["loss"] and abs(m["loss"]) < 1e6 for m in train)
    return 0 if finite and out["reference_cached"] and out["kernel_max_abs_diff_vs_fp32"] < 0.1 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    r.add_argument("--budget", type=float, default=520.0, help="seconds for every phase together")
    r.add_argument("--tree-bytes", type=int, default=0)
    r.add_argument("--carried-bytes", type=int, default=0)
    for name in ("train", "dpo"):
        t = sub.add_parser(name)
        t.add_argument("--out", required=True)
        t.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = p.parse_args()
    return {"run": run, "train": train, "dpo": dpo}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
