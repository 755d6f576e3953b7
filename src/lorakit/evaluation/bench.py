"""``lorakit bench``: step time, tokens/s, memory and MFU of every method against the frozen-base floor, PEFT
and full fine-tuning, in one process, on the workloads of ``docs/performance.md``.

One step = forward + backward + optimizer step (AdamW) on a Llama-shaped model with random weights and random
tokens. Rows:

- ``floor``: the frozen base, forward + input-gradient backward (no weight gradient, no optimizer): the least
  any adapter method can cost, with the same loss kernel as the lorakit rows (the fused linear cross-entropy),
  so ``<method>_vs_floor`` is the adapter's own cost. ``floor[hf-loss]``: the same with the model's full-logit
  loss.
- ``<method>``: a lorakit method with its fast paths (fused adapter linears, shared ``x A^T`` for q/k/v and
  gate/up, fused linear cross-entropy, and ``torch.compile`` of each decoder layer when ``compile`` is on).
- ``lora[plain]``: LoRA through the reference path (no fused op, the model's loss), the baseline of the fast
  paths.
- ``peft:<method>``: PEFT's equivalent (LoRA, DoRA, VeRA) on the same model and inputs, with the same loss kernel
  as the lorakit rows (so ``<method>_vs_peft`` compares the adapters); ``peft:lora[hf-loss]``: PEFT's LoRA as
  its users run it, with the model's loss (``lora_vs_peft_hf_loss``).

Every row says which loss kernel it ran (``loss``: ``liger``, ``chunked`` or ``model``) and, for compiled rows,
how its compile went: dynamo is reset before each compiled row (its per-code-object cache would otherwise fill up
after a few rows and later rows would silently run eager), the graphs compiled (``frames``), the compiled-graph
calls per measured step and whether every decoder layer ran compiled in each step (``ran_compiled``), and the
extra time of the first warm-up step (``compile_s``). Rows are written to the JSON file as they finish.
- ``full``: full fine-tuning.
- ``qlora:<scheme>`` (with ``quantize``): LoRA on the base quantized by :func:`lorakit.quantize` (``nf4``,
  ``int8``, ``bnb-nf4``...), beside bf16 ``lora``; ``peft:qlora:<scheme>``: PEFT's LoRA on the same quantized
  base (bitsandbytes schemes only: what PEFT's QLoRA uses). ``base_weight_bytes`` is what the frozen weights
  occupy as stored.

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

Run: ``lorakit bench --device cpu --compare-peft --out benchmarks/results/cpu.json``.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapt.model import attach, training_callbacks
from lorakit.adapt.quantize import SCHEMES, quantize
from lorakit.core import lowrank
from lorakit.core.layers import AdaptedLayer
from lorakit.core.quant import is_quantized, weight_bytes
from lorakit.errors import ConfigError
from lorakit.evaluation.bench_results import WORKLOADS, Row, Workload, format_table, summarize_rows
from lorakit.fast import speed
from lorakit.methods import METHODS
from lorakit.util.files import write_json


def _options(method: str) -> dict[str, Any]:
    """The options a method is measured with: its declared :attr:`~lorakit.Method.bench_options`."""
    return dict(METHODS[method].bench_options)


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


def _adamw(params: list[nn.Parameter], device: str) -> torch.optim.Optimizer | None:
    return torch.optim.AdamW(params, lr=1e-5, fused=True) if params else None


def _prepare(row: Row, w: Workload, device: str, batch: tuple[Tensor, Tensor], compile_layers: bool,
             checkpointing: bool = False, backend: str = "inductor", reset: bool = True) -> None:
    """Build ``row``'s model, optimizer and step function."""
    ids, labels = batch
    model = build_model(w, device)
    model.requires_grad_(False)
    if row.quant:
        quantize(model, row.quant, device=device)
    if checkpointing:  # every row alike, before PEFT wraps the model (non-reentrant: works for every method)
        speed.enable_checkpointing(model)
    fused_ctx: Callable[[], Any] = nullcontext
    hf_loss = row.name.endswith("[hf-loss]")
    if row.kind == "floor":
        def loss_fn() -> Tensor:
            # the input gradient makes autograd run the whole backward without any weight gradient
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
            if hf_loss:
                return model(inputs_embeds=embeds, labels=labels).loss
            return speed.causal_lm_loss(model, labels=labels, inputs_embeds=embeds)
        row.loss = "model" if hf_loss else speed.loss_kernel(model)
    elif row.kind == "peft":
        model = _peft_model(model, row.method or "", row.options)
        inner = model.get_base_model()  # the transformers model, PEFT's layers inside it

        def loss_fn() -> Tensor:
            if hf_loss:
                return model(input_ids=ids, labels=labels).loss
            return speed.causal_lm_loss(inner, ids, labels)
        row.loss = "model" if hf_loss else speed.loss_kernel(inner)
    else:
        runtime = {"init_batches": [{"input_ids": ids, "labels": labels}]} \
            if METHODS[row.method or ""].needs_init_data else {}
        attach(model, row.method or "", **row.options, **runtime)
        if row.kind == "plain":
            fused_ctx = lambda: lowrank.fused(False)  # noqa: E731
            row.loss = "model"

            def loss_fn() -> Tensor:
                return model(input_ids=ids, labels=labels).loss
        else:
            speed.group_projections(model)
            if compile_layers:
                if reset:  # a fresh cache per row: the layers of every row share one code object
                    torch._dynamo.reset()
                row.graph_calls = [0]
                row.frames = [0]
                speed.compile_layers(model, backend=_counting_backend(backend, row.frames, row.graph_calls))
                row.compiled_layers = len(speed.decoder_layers(model))
            row.loss = speed.loss_kernel(model)

            def loss_fn() -> Tensor:
                return speed.causal_lm_loss(model, ids, labels)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _adamw(params, device)
    callbacks: list[Any] = []
    if row.kind in ("lorakit", "plain", "full"):
        callbacks = training_callbacks(model, opt, total_steps=10_000)

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
    row.base_weight_bytes = sum(weight_bytes(m) for m in model.modules()
                                if isinstance(m, nn.Linear) and not isinstance(m, AdaptedLayer))


def _counting_backend(name: str, frames: list[int], calls: list[int]) -> Callable[..., Any]:
    """A ``torch.compile`` backend that compiles with backend ``name`` and counts the graphs it compiles
    (``frames``) and every call of a compiled forward graph (``calls``): proof that a row ran compiled."""
    from torch._dynamo import lookup_backend

    inner = lookup_backend(name)

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
        frames[0] += 1
        compiled = inner(gm, example_inputs)

        def run(*args: Any) -> Any:
            calls[0] += 1
            return compiled(*args)

        return run

    return backend


def _peft_model(model: nn.Module, method: str, opts: dict[str, Any]) -> nn.Module:
    """PEFT's counterpart of ``method`` (:attr:`~lorakit.Method.peft_counterpart`) with the same options."""
    import peft  # a comparison dependency only: lorakit itself never needs it

    counterpart = METHODS[method].peft_counterpart
    if counterpart == "vera":
        cfg: Any = peft.VeraConfig(r=opts.get("r", 256), target_modules="all-linear", vera_dropout=0.0)
    else:
        cfg = peft.LoraConfig(r=opts.get("r", 16), lora_alpha=opts.get("alpha", 32), lora_dropout=0.0,
                              target_modules="all-linear", use_dora=counterpart == "dora")
    return peft.get_peft_model(model, cfg)


# --- measuring --------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(row: Row, device: str, into: list[float] | None = None) -> None:
    _sync(device)
    t = time.perf_counter()
    assert row.step is not None
    row.step()
    _sync(device)
    (row.times if into is None else into).append(time.perf_counter() - t)


def _state_bytes(model: nn.Module, opt_like: Any = None) -> int:
    """Bytes of parameters, buffers, gradients and AdamW state (each storage once)."""
    seen: dict[int, int] = {}
    quantized = [m for m in model.modules() if is_quantized(m)]
    skip = {id(m.weight) for m in quantized}  # a quantized weight is a wrapper: count what it stores
    tensors: list[Tensor] = [t for t in [*model.parameters(), *model.buffers()] if id(t) not in skip]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    seen.update({-1 - i: weight_bytes(m) for i, m in enumerate(quantized)})
    # AdamW keeps two moments per trainable parameter, in the parameter's dtype
    moments = sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return sum(seen.values()) + moments


def _saved_activation_bytes(row: Row) -> int:
    """Bytes autograd keeps for backward during one step (each storage once, parameters excluded)."""
    assert row.model is not None and row.step is not None
    mine = [*row.model.parameters(), *row.model.buffers()]
    own = {t.untyped_storage().data_ptr() for t in mine if _plain(t)}
    weights = {id(t) for t in mine}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if id(t) in weights or not _plain(t):  # a quantized weight (a tensor subclass) is a parameter
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and ptr != 0:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        row.step()
    return sum(seen.values())


def _plain(t: Tensor) -> bool:
    """Whether ``t`` is an ordinary tensor (not a wrapper subclass such as torchao's NF4, which has no storage)."""
    return type(t) in (Tensor, nn.Parameter)


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


# --- running ----------------------------------------------------------------------------------------------------
#: The method docs/performance.md states its targets for: its reference-path row, PEFT-as-users-run-it row and the QLoRA
#: rows (LoRA on a quantized base, compared with it) are measured for it alone.
REFERENCE = "lora"


def _rows(methods: list[str], compare_peft: bool, quantize: list[str]) -> list[Row]:
    rows = [Row("floor", "floor", None), Row("floor[hf-loss]", "floor", None)]
    if quantize and REFERENCE not in methods:
        methods = [REFERENCE, *methods]  # QLoRA rows are compared with the bf16 reference
    for m in methods:
        if not METHODS[m].layer_method:  # full fine-tuning: measured last, beside the adapters
            continue
        rows.append(Row(m, "lorakit", m, _options(m)))
        if m == REFERENCE:
            rows.append(Row(f"{m}[plain]", "plain", m, _options(m)))
        if compare_peft and METHODS[m].peft_counterpart:
            rows.append(Row(f"peft:{m}", "peft", m, _options(m)))
            if m == REFERENCE:
                rows.append(Row(f"peft:{m}[hf-loss]", "peft", m, _options(m)))
    for scheme in quantize:
        rows.append(Row(f"qlora:{scheme}", "lorakit", REFERENCE, _options(REFERENCE), quant=scheme))
        if compare_peft and scheme.startswith("bnb-"):
            rows.append(Row(f"peft:qlora:{scheme}", "peft", REFERENCE, _options(REFERENCE), quant=scheme))
    rows += [Row(m, "full", m, _options(m)) for m in methods if not METHODS[m].layer_method]
    return rows


def run_bench(device: str = "cpu", methods: list[str] | None = None, compare_peft: bool = False,
              out: str | Path | None = None, *, workload: str | None = None, steps: int | None = None,
              warmup: int | None = None, compile_layers: bool | None = None, threads: int | None = None,
              checkpointing: bool = False, quiet: bool = False, quantize: list[str] | None = None,
              compile_backend: str = "inductor", interleave: bool | None = None) -> dict[str, Any]:
    """Measure the rows described in the module docstring; print a table; write JSON to ``out``.

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        methods: lorakit methods to measure (default: every registered method, full fine-tuning included).
        compare_peft: add PEFT's LoRA/DoRA/VeRA rows for the requested methods it implements.
        out: JSON file to write (directories are created), rewritten as rows finish.
        workload: ``"cpu"``, ``"gpu"`` or ``"tiny"`` (default: ``"gpu"`` on CUDA, ``"cpu"`` on the CPU).
        steps, warmup: measured and warm-up steps per row (default: the workload's: 8 and 3 on the GPU
            workload, 6 and 2 on the CPU one, where the step that measures saved activations is one more).
        compile_layers: ``torch.compile`` each decoder layer of the lorakit rows (default: on CUDA only).
        threads: CPU threads (default: the workload's, 2 for ``"cpu"``).
        checkpointing: activation checkpointing of every decoder layer in every row (floor and PEFT included).
        quantize: add QLoRA rows: LoRA on the base quantized with each of these schemes (and PEFT's LoRA on the
            bitsandbytes ones, with ``compare_peft``).
        compile_backend: the ``torch.compile`` backend of compiled rows (``aot_eager`` traces without code
            generation: what the tests use).
        interleave: time the rows in interleaved rounds (default: on the CPU) rather than one after the other
            (the GPU's way: one row's model on the device at a time).

    Returns:
        The results dictionary written to ``out`` (``rows``, ``ratios``, versions, device, ``failed_rows``...).
    """
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch sees no CUDA device")
    wname = workload or ("gpu" if device == "cuda" else "cpu")
    if wname not in WORKLOADS:
        raise ConfigError(f"unknown workload {wname!r}; available: {', '.join(WORKLOADS)}")
    w = WORKLOADS[wname]
    # an init from the dense weights of a quantized base (LoftQ) trains as LoRA does on that base: the QLoRA rows
    methods = [m for m in METHODS if not METHODS[m].needs_dense_weights] if methods is None else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; available: {', '.join(sorted(METHODS))}")
    quantize = list(quantize or [])
    bad = [q for q in quantize if q not in SCHEMES]
    if bad:
        raise ConfigError(f"unknown quantization(s) {bad}; available: {', '.join(SCHEMES)}")
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
    rows = _rows(methods, compare_peft, quantize)
    interleave = device == "cpu" if interleave is None else interleave
    t0 = time.perf_counter()

    def report(peak: float) -> dict[str, Any]:
        result = summarize_rows(rows, w, device, peak, steps, warmup, compile_layers, threads, methods,
                                interleaved=interleave)
        result["settings"].update(checkpointing=checkpointing, quantize=quantize, compile_backend=compile_backend
                                  if compile_layers else None)
        result["elapsed_s"] = round(time.perf_counter() - t0, 1)
        result["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
        if out is not None:  # rewritten as rows finish: a run cut short keeps what it measured
            write_json(out, result, indent=2)
        return result

    live: list[Row] = []
    limits = _recompile_room(sum(r.kind in ("lorakit", "full") for r in rows) if compile_layers and interleave else 0)
    for row in rows:
        try:
            # interleaved rows all stay live: one reset up front, and room in dynamo's cache for every row's graphs
            _prepare(row, w, device, batch, compile_layers and row.kind in ("lorakit", "full"), checkpointing,
                     compile_backend, reset=not interleave)
            if device == "cuda":  # after the build, whose fp32 init would otherwise set the peak
                torch.cuda.reset_peak_memory_stats()
            for _ in range(warmup):
                _timed(row, device, row.warmup_times)
            if not interleave:
                calls = row.graph_calls[0] if row.graph_calls else 0
                for _ in range(steps):
                    _timed(row, device)
                _check_compiled(row, calls, steps)
                if not compile_layers or row.kind not in ("lorakit", "full"):
                    row.saved_bytes = _saved_activation_bytes(row)
                row.mem_bytes = torch.cuda.max_memory_allocated() if device == "cuda" else \
                    _state_bytes(row.model) + (row.saved_bytes or 0)  # type: ignore[arg-type]
                row.model = row.step = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            else:
                row.saved_bytes = _saved_activation_bytes(row)  # a real step: the last warm-up step
                row.mem_bytes = _state_bytes(row.model) + row.saved_bytes  # type: ignore[arg-type]
                live.append(row)
        except Exception as e:  # one broken row must not lose the others
            row.error = f"{type(e).__name__}: {e}"
            row.model = row.step = None
        report(peak_before)
    before = {id(r): r.graph_calls[0] if r.graph_calls else 0 for r in live}
    for k in range(steps if interleave and live else 0):
        order = live[k % len(live):] + live[:k % len(live)]  # rotate so no row always runs first
        for row in order:
            _timed(row, device)
    for row in live:
        _check_compiled(row, before[id(row)], steps)
        row.model = row.step = None
    limits.restore()
    result = report(max(peak_before, matmul_peak(device, dtype)))
    if not quiet:
        print(format_table(result))
    return result


class _recompile_room:  # noqa: N801 - used like a function
    """Raise dynamo's per-code-object recompile limit for ``rows`` compiled rows alive at once (every row's layers
    share one code object, and each row needs its own few cache entries); :meth:`restore` puts it back."""

    def __init__(self, rows: int) -> None:
        import torch._dynamo.config as cfg

        self.cfg, self.before = cfg, cfg.recompile_limit
        if rows:
            torch._dynamo.reset()
            cfg.recompile_limit = max(self.before, 8 * rows)

    def restore(self) -> None:
        self.cfg.recompile_limit = self.before


def _check_compiled(row: Row, calls_before: int, steps: int) -> None:
    """Whether every decoder layer of a compiled row ran a compiled graph in every measured step."""
    if row.graph_calls is None or steps == 0:
        return
    row.graph_calls_per_step = (row.graph_calls[0] - calls_before) / steps
    row.ran_compiled = row.graph_calls_per_step >= (row.compiled_layers or 1)
