"""``lorakit bench``: step time, tokens/s, memory and MFU of every method against the frozen-base floor, PEFT
and full fine-tuning, in one process, on the workloads of ``PERFORMANCE.md``.

One step = forward + backward + optimizer step (AdamW) on a Llama-shaped model with random weights and random
tokens. Rows:

- ``floor``: the frozen base, forward + input-gradient backward (no weight gradient, no optimizer): the least
  any adapter method can cost.
- ``<method>``: a lorakit method with its fast paths (fused adapter linears, shared ``x A^T`` for q/k/v and
  gate/up, fused linear cross-entropy, and ``torch.compile`` of each decoder layer when ``compile`` is on).
- ``lora[plain]``: LoRA through the reference path (no fused op), the baseline of the fast paths.
- ``peft:<method>``: PEFT's equivalent (LoRA, DoRA, VeRA) on the same model and inputs.
- ``full``: full fine-tuning.

On the CPU the rows are interleaved (each measured round runs every row once, in a rotating order), so a
change in machine load hits every row alike, and the ratios compare each row's "fast median", the median of
its faster half of steps: on a shared 2-core machine interference (other jobs, the hypervisor, memory reclaim)
only adds time, one step at a time, so the slow half is where it lands; taking the median of the fast half
rather than the single fastest step keeps one lucky step from deciding a ratio. Every row keeps its median,
its minimum and all its step times as well. On CUDA the ratios compare medians.
Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated()``; on the CPU, where no
allocator reports a peak, the bytes of parameters, gradients and optimizer state plus the activations autograd
saves for backward (measured with ``torch.autograd.graph.saved_tensors_hooks``). MFU counts ``4 N`` FLOPs per
token for frozen-weight rows and ``6 N`` for full fine-tuning (N: matmul weights, head included), plus
``12 L T d`` for attention, against the matmul peak measured in the same process (the higher of its measurements
before and after the rows).

Run: ``python -m lorakit.bench --device cpu --compare-peft --out benchmarks/results/cpu.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__, kernels, speed
from .adapters import METHODS
from .errors import ConfigError


@dataclass(frozen=True)
class Workload:
    """A Llama-shaped model and batch (``PERFORMANCE.md``)."""

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

#: Options of each method in the benchmark (PERFORMANCE.md: r 16, alpha 32, dropout 0; VeRA's usual r 256).
BENCH_OPTIONS: dict[str, dict[str, Any]] = {
    "vera": {"r": 256},
    "rank1-sum": {"r_init": 16},
    "delta-lora": {"r": 16, "alpha": 32.0, "delta_start": 0},  # the base update runs in every measured step
    "full": {},
}
#: A row whose median step exceeds its fast median by more than this share ran on a busy machine.
NOISY = 0.15
#: Methods PEFT implements, and the PEFT config that matches lorakit's benchmark options.
PEFT_EQUIVALENT = ("lora", "dora", "vera")


def _options(method: str) -> dict[str, Any]:
    if method in BENCH_OPTIONS:
        return dict(BENCH_OPTIONS[method])
    fields = getattr(METHODS[method], "config_cls").model_fields
    return {k: v for k, v in {"r": 16, "alpha": 32.0}.items() if k in fields}


def build_model(w: Workload, device: str, seed: int = 0) -> nn.Module:
    """The workload's model with random weights (the same weights for every row: same seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=w.vocab, hidden_size=w.hidden, intermediate_size=w.mlp,
                      num_hidden_layers=w.layers, num_attention_heads=w.heads, num_key_value_heads=w.kv_heads,
                      max_position_embeddings=max(w.seq, 128), tie_word_embeddings=True, rope_theta=500000.0,
                      use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(getattr(torch, w.dtype)).train()


@dataclass
class Row:
    """One configuration being measured."""

    name: str
    kind: str  # floor | lorakit | plain | peft | full
    method: str | None
    options: dict[str, Any] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    mem_bytes: int | None = None
    saved_bytes: int | None = None
    trainable: int = 0
    error: str | None = None
    step: Callable[[], None] | None = field(default=None, repr=False)
    model: nn.Module | None = field(default=None, repr=False)


def _adamw(params: list[nn.Parameter], device: str) -> torch.optim.Optimizer | None:
    return torch.optim.AdamW(params, lr=1e-5, fused=True) if params else None


def _prepare(row: Row, w: Workload, device: str, batch: tuple[Tensor, Tensor], compile_layers: bool,
             checkpointing: bool = False) -> None:
    """Build ``row``'s model, optimizer and step function."""
    ids, labels = batch
    model = build_model(w, device)
    model.requires_grad_(False)
    if checkpointing:  # every row alike, before PEFT wraps the model (non-reentrant: works for every method)
        speed.enable_checkpointing(model)
    fused_ctx: Callable[[], Any] = nullcontext
    if row.kind == "floor":
        def loss_fn() -> Tensor:
            # the input gradient makes autograd run the whole backward without any weight gradient
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
            return model(inputs_embeds=embeds, labels=labels).loss
    elif row.kind == "peft":
        model = _peft_model(model, row.method or "", row.options)

        def loss_fn() -> Tensor:
            return model(input_ids=ids, labels=labels).loss
    else:
        import lorakit

        runtime = {"init_batches": [{"input_ids": ids, "labels": labels}]} \
            if "init_batches" in getattr(METHODS[row.method or ""], "runtime_options", ()) else {}
        lorakit.attach(model, row.method or "", **row.options, **runtime)
        if row.kind == "plain":
            fused_ctx = lambda: kernels.fused(False)  # noqa: E731

            def loss_fn() -> Tensor:
                return model(input_ids=ids, labels=labels).loss
        else:
            speed.group_projections(model)
            if compile_layers:
                speed.compile_layers(model)

            def loss_fn() -> Tensor:
                return speed.causal_lm_loss(model, ids, labels)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _adamw(params, device)
    callbacks: list[Any] = []
    if row.kind in ("lorakit", "plain", "full"):
        import lorakit

        callbacks = lorakit.training_callbacks(model, opt, total_steps=10_000)

    def step() -> None:
        with fused_ctx():
            loss = loss_fn()
            for cb in callbacks:
                reg = cb.regularizer()
                if reg is not None:
                    loss = loss + reg
            loss.backward()
        for cb in callbacks:
            cb.before_step()
        if opt is not None:
            opt.step()
        for cb in callbacks:  # after the step, before the gradients are cleared (callbacks' contract)
            cb.step()
        if opt is not None:
            opt.zero_grad(set_to_none=True)

    row.model, row.step, row.trainable = model, step, sum(p.numel() for p in params)


def _peft_model(model: nn.Module, method: str, opts: dict[str, Any]) -> nn.Module:
    import peft

    if method == "vera":
        cfg: Any = peft.VeraConfig(r=opts.get("r", 256), target_modules="all-linear", vera_dropout=0.0)
    else:
        cfg = peft.LoraConfig(r=opts.get("r", 16), lora_alpha=opts.get("alpha", 32), lora_dropout=0.0,
                              target_modules="all-linear", use_dora=method == "dora")
    return peft.get_peft_model(model, cfg)


# --- measuring --------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(row: Row, device: str) -> None:
    _sync(device)
    t = time.perf_counter()
    assert row.step is not None
    row.step()
    _sync(device)
    row.times.append(time.perf_counter() - t)


def _state_bytes(model: nn.Module, opt_like: Any = None) -> int:
    """Bytes of parameters, buffers, gradients and AdamW state (each storage once)."""
    seen: dict[int, int] = {}
    tensors: list[Tensor] = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    # AdamW keeps two moments per trainable parameter, in the parameter's dtype
    moments = sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return sum(seen.values()) + moments


def _saved_activation_bytes(row: Row) -> int:
    """Bytes autograd keeps for backward during one step (each storage once, parameters excluded)."""
    assert row.model is not None and row.step is not None
    own = {t.untyped_storage().data_ptr() for t in [*row.model.parameters(), *row.model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and ptr != 0:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        row.step()
    return sum(seen.values())


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """Measured matmul throughput in FLOP/s (best of a few square GEMMs), the MFU denominator."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6 if device == "cuda" else 16):  # ~0.5 s on 2 cores: a busy host must not hide the peak
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(w: Workload, full: bool) -> float:
    """``4 N`` (frozen weights: forward + input gradients) or ``6 N`` (full), plus attention ``12 L T d``."""
    kv = w.hidden // w.heads * w.kv_heads
    per_layer = 2 * w.hidden * w.hidden + 2 * w.hidden * kv + 3 * w.hidden * w.mlp
    n = w.layers * per_layer + w.vocab * w.hidden  # head counted, embedding lookup not
    return (6 if full else 4) * n + 12 * w.layers * w.seq * w.hidden


# --- running ----------------------------------------------------------------------------------------------------
def _rows(methods: list[str], compare_peft: bool) -> list[Row]:
    rows = [Row("floor", "floor", None)]
    for m in methods:
        if m == "full":
            continue
        rows.append(Row(m, "lorakit", m, _options(m)))
        if m == "lora":
            rows.append(Row("lora[plain]", "plain", m, _options(m)))
        if compare_peft and m in PEFT_EQUIVALENT:
            rows.append(Row(f"peft:{m}", "peft", m, _options(m)))
    if "full" in methods:
        rows.append(Row("full", "full", "full", {}))
    return rows


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


def run_bench(device: str = "cpu", methods: list[str] | None = None, compare_peft: bool = False,
              out: str | Path | None = None, *, workload: str | None = None, steps: int | None = None,
              warmup: int | None = None, compile_layers: bool | None = None, threads: int | None = None,
              checkpointing: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Measure the rows described in the module docstring; print a table; write JSON to ``out``.

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        methods: lorakit methods to measure (default: every registered method, full fine-tuning included).
        compare_peft: add PEFT's LoRA/DoRA/VeRA rows for the requested methods it implements.
        out: JSON file to write (directories are created).
        workload: ``"cpu"``, ``"gpu"`` or ``"tiny"`` (default: ``"gpu"`` on CUDA, ``"cpu"`` on the CPU).
        steps, warmup: measured and warm-up steps per row (default: the workload's: 8 and 3 on the GPU
            workload, 6 and 2 on the CPU one, where the step that measures saved activations is one more).
        compile_layers: ``torch.compile`` each decoder layer of the lorakit rows (default: on CUDA only).
        threads: CPU threads (default: the workload's, 2 for ``"cpu"``).
        checkpointing: activation checkpointing of every decoder layer in every row (floor and PEFT included).

    Returns:
        The results dictionary written to ``out`` (``rows``, ``ratios``, versions, device...).
    """
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch sees no CUDA device")
    wname = workload or ("gpu" if device == "cuda" else "cpu")
    if wname not in WORKLOADS:
        raise ConfigError(f"unknown workload {wname!r}; available: {', '.join(WORKLOADS)}")
    w = WORKLOADS[wname]
    methods = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; available: {', '.join(sorted(METHODS))}")
    steps, warmup = steps or w.steps, w.warmup if warmup is None else warmup
    compile_layers = device == "cuda" if compile_layers is None else compile_layers
    threads = threads or w.threads
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    dtype = getattr(torch, w.dtype)
    peak_before = matmul_peak(device, dtype)  # measured at both ends: a drifting machine must not inflate MFU
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, w.vocab, (w.batch, w.seq), generator=g).to(device)
    batch = (ids, ids.clone())
    rows = _rows(methods, compare_peft)
    interleave = device == "cpu"
    t0 = time.perf_counter()
    live: list[Row] = []
    for row in rows:
        try:
            _prepare(row, w, device, batch, compile_layers and row.kind in ("lorakit", "full"), checkpointing)
            if device == "cuda":  # after the build, whose fp32 init would otherwise set the peak
                torch.cuda.reset_peak_memory_stats()
            for _ in range(warmup):
                assert row.step is not None
                row.step()
            if not interleave:
                for _ in range(steps):
                    _timed(row, device)
                row.mem_bytes = torch.cuda.max_memory_allocated()
                if not compile_layers or row.kind not in ("lorakit", "full"):
                    row.saved_bytes = _saved_activation_bytes(row)
                row.model = row.step = None
                gc.collect()
                torch.cuda.empty_cache()
            else:
                row.saved_bytes = _saved_activation_bytes(row)  # a real step: the last warm-up step
                row.mem_bytes = _state_bytes(row.model) + row.saved_bytes  # type: ignore[arg-type]
                live.append(row)
        except Exception as e:  # one broken row must not lose the others
            row.error = f"{type(e).__name__}: {e}"
            row.model = row.step = None
    for k in range(steps if interleave else 0):
        order = live[k % len(live):] + live[:k % len(live)]  # rotate so no row always runs first
        for row in order:
            _timed(row, device)
    for row in live:
        row.model = row.step = None
    peak = max(peak_before, matmul_peak(device, dtype))
    result = _results(rows, w, device, peak, steps, warmup, compile_layers, threads, methods, interleaved=interleave)
    result["settings"]["checkpointing"] = checkpointing
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    result["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    if not quiet:
        print(format_table(result))
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def fast_median(times: list[float]) -> float | None:
    """Median of the faster half of ``times`` (``None`` if empty): a step-time estimate that ignores
    interference (which only adds time) without resting on one lucky step."""
    if not times:
        return None
    return statistics.median(sorted(times)[:max(1, (len(times) + 1) // 2)])


def _results(rows: list[Row], w: Workload, device: str, peak: float, steps: int, warmup: int,
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
            "trainable_params": row.trainable,
            "mfu": fpt * tokens / med / peak if med else None, "error": row.error,
        }
    floor = by_name["floor"]

    def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
        if interleaved and key == "step_s":
            key = "step_s_fast"
        return a[key] / b[key] if a.get(key) and b.get(key) else None

    ratios: dict[str, float | None] = {}
    for name, r in by_name.items():
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
    for name in ("lora[plain]", "peft:lora", "peft:dora", "peft:vera"):
        if name in by_name:
            by_name[name]["vs_floor"] = ratio(by_name[name], floor, "step_s")
    return {
        "workload": asdict(w), "device": {"type": device, "name": _device_name(device), "threads": threads},
        "versions": _versions(),
        "settings": {"steps": steps, "warmup": warmup, "compile_layers": compiled, "methods": methods,
                     "interleaved": interleaved, "fused": kernels.fused_enabled(),
                     "time_ratios": "ratio of fast medians (median of each row's faster half of steps)"
                     if interleaved else "ratio of median step times",
                     "memory": "torch.cuda.max_memory_allocated" if device == "cuda" else
                     "parameters + gradients + AdamW state + saved activations (saved_tensors_hooks)"},
        "matmul_peak_tflops": peak / 1e12,
        "rows": list(by_name.values()),
        "noisy_rows": [r["name"] for r in by_name.values() if r["step_s"] and r["step_s_fast"]
                       and r["step_s"] > (1 + NOISY) * r["step_s_fast"]],
        "ratios": ratios,
    }


def format_table(result: dict[str, Any]) -> str:
    """The results as a plain-text table (one line per row) followed by the ratios."""
    dev = result["device"]
    head = (f"lorakit bench: {dev['name']} ({dev['type']}), torch {result['versions']['torch']}, "
            f"peft {result['versions']['peft']}, matmul peak {result['matmul_peak_tflops']:.3g} TFLOP/s"
            + (", activation checkpointing" if result["settings"].get("checkpointing") else "")
            + (", layers compiled" if result["settings"].get("compile_layers") else ""))
    lines = [head, f"{'row':<16}{'step s':>9}{'tok/s':>10}{'mem MiB':>10}{'MFU':>7}{'vs floor':>10}"
                   f"{'vs PEFT':>9}"]

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in result["rows"]:
        if r["error"]:
            lines.append(f"{r['name']:<16} error: {r['error']}")
            continue
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20
        lines.append(f"{r['name']:<16}{f(r['step_s'], '.4f'):>9}{f(r['tokens_per_s'], ',.0f'):>10}"
                     f"{f(mem, ',.0f'):>10}{f(r['mfu'] and 100 * r['mfu'], '.1f'):>7}"
                     f"{f(r.get('vs_floor'), '.3f'):>10}{f(r.get('vs_peft'), '.3f'):>9}")
    lines.append("ratios: " + ", ".join(f"{k}={v:.3f}" for k, v in result["ratios"].items() if v is not None))
    noisy = result.get("noisy_rows")
    if noisy:
        lines.append(f"warning: {len(noisy)} of {len(result['rows'])} rows had a median step over {NOISY:.0%} above "
                     f"their fast median ({', '.join(noisy)}): the machine was busy; re-run for firmer ratios")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m lorakit.bench [--device cpu|cuda] [--methods ...] [--compare-peft] --out F``."""
    p = argparse.ArgumentParser(prog="lorakit bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", default=None, help="methods to measure (default: all)")
    p.add_argument("--compare-peft", action="store_true", help="add PEFT's LoRA/DoRA/VeRA rows")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--compile", dest="compile_layers", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each decoder layer (default: on CUDA)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing in every row (PEFT and the floor included)")
    a = p.parse_args(argv)
    try:
        run_bench(a.device, a.methods, a.compare_peft, a.out, workload=a.workload, steps=a.steps,
                  warmup=a.warmup, compile_layers=a.compile_layers, threads=a.threads,
                  checkpointing=a.checkpointing)
    except ConfigError as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
