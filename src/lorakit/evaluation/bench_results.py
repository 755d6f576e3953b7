"""What ``lorakit bench`` measures and how it reports it: workloads, rows, ratios and the table.

The running (building each row's model and timing its steps) is :mod:`lorakit.evaluation.bench`.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit._version import __version__
from lorakit.core import lowrank


@dataclass(frozen=True)
class Workload:
    """A Llama-shaped model and batch (``docs/performance.md``)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    batch: int
    seq: int
    dtype: str
    threads: int | None = None
    warmup: int = 3
    steps: int = 8


WORKLOADS: dict[str, Workload] = {
    "gpu": Workload(2048, 16, 32, 8, 8192, 128256, 4, 2048, "bfloat16"),  # Llama-3.2-1B shape
    # 2 warm-up steps + 1 step measuring saved activations + 6 timed rounds: about 4 minutes on 2 cores
    "cpu": Workload(512, 4, 8, 4, 1536, 8192, 4, 256, "float32", threads=2, warmup=2, steps=6),
    "tiny": Workload(64, 2, 4, 2, 96, 256, 2, 32, "float32", warmup=1, steps=2),  # smoke tests
}

#: A row whose median step exceeds its fast median by more than this share ran on a busy machine.
NOISY = 0.15


@dataclass
class Row:
    """One configuration being measured."""

    name: str
    kind: str  # floor | lorakit | plain | peft | full
    method: str | None
    options: dict[str, Any] = field(default_factory=dict)
    quant: str | None = None  # the frozen base's quantization (QLoRA rows)
    times: list[float] = field(default_factory=list)
    mem_bytes: int | None = None
    saved_bytes: int | None = None
    trainable: int = 0
    error: str | None = None
    base_weight_bytes: int | None = None
    loss: str | None = None  # the loss kernel the row ran: liger | chunked | model
    warmup_times: list[float] = field(default_factory=list)
    # compiled rows: graphs compiled, compiled-graph calls (counted by the backend), decoder layers compiled
    frames: list[int] | None = None
    graph_calls: list[int] | None = None
    compiled_layers: int | None = None
    graph_calls_per_step: float | None = None
    ran_compiled: bool | None = None
    step: Callable[[], None] | None = field(default=None, repr=False)
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def compile_s(self) -> float | None:
        """The first warm-up step's time beyond a measured step's: what compiling cost (compiled rows)."""
        if self.frames is None or not self.warmup_times or not self.times:
            return None
        return max(0.0, self.warmup_times[0] - statistics.median(self.times))


def flops_per_token(w: Workload, full: bool) -> float:
    """``4 N`` (frozen weights: forward + input gradients) or ``6 N`` (full), plus attention ``12 L T d``."""
    kv = w.hidden // w.heads * w.kv_heads
    per_layer = 2 * w.hidden * w.hidden + 2 * w.hidden * kv + 3 * w.hidden * w.mlp
    n = w.layers * per_layer + w.vocab * w.hidden  # head counted, embedding lookup not
    return (6 if full else 4) * n + 12 * w.layers * w.seq * w.hidden


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version(), "lorakit": __version__}
    for pkg in ("torch", "transformers", "peft", "liger-kernel"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        model = None
    return model or platform.processor() or platform.machine()


def fast_median(times: list[float]) -> float | None:
    """Median of the faster half of ``times`` (``None`` if empty): a step-time estimate that ignores
    interference (which only adds time) without resting on one lucky step."""
    if not times:
        return None
    return statistics.median(sorted(times)[:max(1, (len(times) + 1) // 2)])


def summarize_rows(rows: list[Row], w: Workload, device: str, peak: float, steps: int, warmup: int,
             compiled: bool, threads: int | None, methods: list[str], interleaved: bool = False) -> dict[str, Any]:
    tokens = w.batch * w.seq
    by_name: dict[str, dict[str, Any]] = {}
    for row in rows:
        med = statistics.median(row.times) if row.times else None
        fpt = flops_per_token(w, full=row.kind == "full")
        by_name[row.name] = {
            "name": row.name, "kind": row.kind, "method": row.method, "options": row.options,
            "step_s": med, "step_s_min": min(row.times) if row.times else None,
            "step_s_fast": fast_median(row.times),
            "step_s_all": [round(t, 5) for t in row.times],
            "tokens_per_s": tokens / med if med else None,
            "peak_mem_bytes": row.mem_bytes, "saved_activation_bytes": row.saved_bytes,
            "trainable_params": row.trainable, "quantize": row.quant, "base_weight_bytes": row.base_weight_bytes,
            "mfu": fpt * tokens / med / peak if med else None, "error": row.error, "loss": row.loss,
            "compiled": row.frames is not None, "compile_s": row.compile_s,
            "frames": row.frames[0] if row.frames else None, "graph_calls_per_step": row.graph_calls_per_step,
            "ran_compiled": row.ran_compiled,
        }
    floor = by_name.get("floor")

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
        if a is None or b is None:
            return None
        if interleaved and key == "step_s":
            key = "step_s_fast"
        return a[key] / b[key] if a.get(key) and b.get(key) else None

    ratios: dict[str, float | None] = {}
    for name, r in by_name.items():
        if r["kind"] == "lorakit" and r.get("quantize"):  # QLoRA: against bf16 LoRA, and PEFT's QLoRA if run
            key = "qlora_" + r["quantize"].replace("-", "_")
            lora = by_name.get("lora")
            if lora is not None:
                r["vs_lora"] = ratios[f"{key}_vs_lora"] = ratio(r, lora, "step_s")
                ratios[f"{key}_mem_vs_lora"] = ratio(r, lora, "peak_mem_bytes")
                ratios[f"{key}_base_bytes_vs_lora"] = ratio(r, lora, "base_weight_bytes")
            p = by_name.get(f"peft:{name}")
            if p is not None:
                r["vs_peft"] = ratios[f"{key}_vs_peft"] = ratio(r, p, "step_s")
                ratios[f"{key}_mem_vs_peft"] = ratio(r, p, "peak_mem_bytes")
            continue
        if r["kind"] not in ("lorakit", "full") or not r["method"]:
            continue
        key = r["method"].replace("-", "_")
        r["vs_floor"] = ratios[f"{key}_vs_floor"] = ratio(r, floor, "step_s")
        ratios[f"{key}_mem_vs_floor"] = ratio(r, floor, "peak_mem_bytes")
        p = by_name.get(f"peft:{r['method']}")
        if p is not None:
            r["vs_peft"] = ratios[f"{key}_vs_peft"] = ratio(r, p, "step_s")
            ratios[f"{key}_mem_vs_peft"] = ratio(r, p, "peak_mem_bytes")
            ratios[f"{key}_tokens_per_s_vs_peft"] = ratio(p, r, "step_s")
    for name in ("lora[plain]", "peft:lora", "peft:lora[hf-loss]", "peft:dora", "peft:vera"):
        if name in by_name:
            by_name[name]["vs_floor"] = ratio(by_name[name], floor, "step_s")
    if "lora" in by_name and "peft:lora[hf-loss]" in by_name:  # lorakit as it runs vs PEFT as its users run it
        ratios["lora_vs_peft_hf_loss"] = ratio(by_name["lora"], by_name["peft:lora[hf-loss]"], "step_s")
        ratios["lora_mem_vs_peft_hf_loss"] = ratio(by_name["lora"], by_name["peft:lora[hf-loss]"], "peak_mem_bytes")
    if floor is not None and "floor[hf-loss]" in by_name:
        ratios["fused_loss_floor_vs_hf_loss_floor"] = ratio(floor, by_name["floor[hf-loss]"], "step_s")
    return {
        "workload": asdict(w), "device": {"type": device, "name": _device_name(device), "threads": threads},
        "versions": _versions(),
        "settings": {"steps": steps, "warmup": warmup, "compile_layers": compiled, "methods": methods,
                     "interleaved": interleaved, "fused": lowrank.fused_enabled(),
                     "time_ratios": "ratio of fast medians (median of each row's faster half of steps)"
                     if interleaved else "ratio of median step times",
                     "memory": "torch.cuda.max_memory_allocated" if device == "cuda" else
                     "parameters + gradients + AdamW state + saved activations (saved_tensors_hooks)"},
        "matmul_peak_tflops": peak / 1e12,
        "rows": list(by_name.values()),
        "noisy_rows": [r["name"] for r in by_name.values() if r["step_s"] and r["step_s_fast"]
                       and r["step_s"] > (1 + NOISY) * r["step_s_fast"]],
        "ratios": ratios,
        "failed_rows": [r["name"] for r in by_name.values() if r["error"]],
        "not_compiled_rows": [r["name"] for r in by_name.values() if r["ran_compiled"] is False],
    }


def format_table(result: dict[str, Any]) -> str:
    """The results as a plain-text table (one line per row) followed by the ratios."""
    dev = result["device"]
    head = (f"lorakit bench: {dev['name']} ({dev['type']}), torch {result['versions']['torch']}, "
            f"peft {result['versions']['peft']}, matmul peak {result['matmul_peak_tflops']:.3g} TFLOP/s"
            + (", activation checkpointing" if result["settings"].get("checkpointing") else "")
            + (", layers compiled" if result["settings"].get("compile_layers") else ""))
    lines = [head, f"{'row':<20}{'step s':>9}{'tok/s':>10}{'mem MiB':>10}{'MFU':>7}{'vs floor':>10}"
                   f"{'vs PEFT':>9}  loss     compiled"]

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in result["rows"]:
        if r["error"]:
            lines.append(f"{r['name']:<20} error: {r['error']}")
            continue
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20
        compiled = "-" if not r.get("compiled") else "yes" if r.get("ran_compiled") else "NO (ran eager)"
        lines.append(f"{r['name']:<20}{f(r['step_s'], '.4f'):>9}{f(r['tokens_per_s'], ',.0f'):>10}"
                     f"{f(mem, ',.0f'):>10}{f(r['mfu'] and 100 * r['mfu'], '.1f'):>7}"
                     f"{f(r.get('vs_floor'), '.3f'):>10}{f(r.get('vs_peft'), '.3f'):>9}  {r.get('loss') or '-':<8} "
                     f"{compiled}")
    lines.append("ratios: " + ", ".join(f"{k}={v:.3f}" for k, v in result["ratios"].items() if v is not None))
    noisy = result.get("noisy_rows")
    if noisy:
        lines.append(f"warning: {len(noisy)} of {len(result['rows'])} rows had a median step over {NOISY:.0%} above "
                     f"their fast median ({', '.join(noisy)}): the machine was busy; re-run for firmer ratios")
    return "\n".join(lines)
