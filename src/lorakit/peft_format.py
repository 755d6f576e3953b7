"""Hugging Face PEFT's LoRA format, both ways: the format PEFT, vLLM and most serving stacks load.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (layout read
from PEFT 0.21's ``tuners/lora`` and checked against files it writes):

- ``base_model.model.<module>.lora_A.weight`` ``(r, d_in)`` and ``.lora_B.weight`` ``(d_out, r)``: lorakit's own
  ``A`` and ``B``. GPT-2 ``Conv1D`` layers use the same layout (PEFT keeps them as ``nn.Linear`` weights and
  transposes the product, ``fan_in_fan_out: true``). Embeddings use ``.lora_embedding_A`` ``(r, num_embeddings)``
  and ``.lora_embedding_B`` ``(embedding_dim, r)``: again lorakit's ``A`` and ``B``.
- DoRA (https://arxiv.org/abs/2402.09353) adds ``.lora_magnitude_vector`` ``(d_out,)``: the full magnitude ``m``
  (PEFT starts it at the row norms of ``W0 + s B A``), the same tensor as lorakit's ``magnitude``.
- ``r``, ``lora_alpha``, ``use_rslora`` give the scale ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``),
  ``use_dora`` the DoRA variant, ``target_modules`` the adapted modules.

Export writes one rank ``r`` for all layers (vLLM needs one; lower-rank layers are zero-padded, which is
exact) in the first form that applies to the method:

1. native: LoRA in disguise (a LoRA config, its own ``lora_A``/``lora_B``, and ``delta_weight = s B A`` on every
   layer: ``lora``, ``lora-fa``, a ``delta-lora`` whose base update has not started) or DoRA. ``A``, ``B``
   (and ``m``), ``r``, ``alpha``, ``use_rslora`` are written unchanged.
2. exact fold ``dW = B' A'``, written with ``lora_alpha = r`` (scale 1): a fold in :data:`FOLDS`, else the
   factors the method gives its fused kernel (``lowrank()``: ``dW = s diag(out) B mid A`` gives
   ``B' = s diag(out) B mid``, ``A' = A``). Components whose column of ``B'`` is exactly zero (masked gates)
   are dropped. VeRA (https://arxiv.org/abs/2310.11454): ``B' = diag(b) B_l diag(d)``, ``A' = A_l``;
   LoRA-XS/SB (https://arxiv.org/abs/2405.17604, https://arxiv.org/abs/2411.19557): ``B' = s B R``;
   rank1-sum: ``B' = s B diag(m g)``; Delta-LoRA (https://arxiv.org/abs/2309.02411) after its base update
   started: ``dW = s B A + D`` with the base drift ``D = lambda s (B_app A_app - B_K A_K)``, so
   ``B' = [s B, lambda s B_app, -lambda s B_K]``, ``A' = [A; A_app; A_K]`` (rank ``3r``; ``2r`` right after a
   step, when ``B_app A_app = B A``). This is exact relative to the *original* base weights, which is what a
   PEFT adapter is applied to: the trained model's own ``W`` already holds ``D``.
3. truncated SVD at the caller's ``rank`` (of the factors via two thin QRs when there are any, else of the
   dense ``delta_weight``); ``B' = U_k sqrt(S_k)``, ``A' = sqrt(S_k) V_k^T``.

Every exported layer is compared with the method's ``delta_weight`` (the single source of its math): the
report gives the relative error ``||dW - B'A'||_F / ||dW||_F`` per layer, and an exact form that disagrees is
an error, never a silent export.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .adapters.base import Adapter
from .adapters.dora import Dora
from .adapters.lora import LoraConfig
from .errors import AdapterFileError, AdapterStateError, ConfigError, IncompatibleAdapterError
from .io import META_FILE, _atomic_write
from .layers import AdaptedLayer, LayerKind, layer_kind, weight_view
from .model import SHARED, _record, adapter_modules, attach, remove

log = logging.getLogger("lorakit")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
#: Relative error above which an "exact" form is said to disagree with ``delta_weight`` (fp32 round-off ~1e-7).
EXACT_TOL = 1e-4

#: ``(B', A')`` with ``dW = B' A'``: ``B'`` ``(d_out, k)``, ``A'`` ``(k, d_in)``, fp32.
Factors = tuple[Tensor, Tensor]


# --- exact folds, by method --------------------------------------------------------------------------------
def _fold_vera(ad: Any) -> Factors:
    a, b = ad.sliced(ad.lambda_b.device)  # (r, d_in), (d_out, r)
    return ad.lambda_b.float()[:, None] * b.float() * ad.lambda_d.float()[None, :], a.float()


def _fold_middle(ad: Any) -> Factors:
    return ad.scale * ad.lora_B.float() @ ad.lora_R.float(), ad.lora_A.float()  # (d_out, r) @ (r, r)


def _fold_gates(ad: Any) -> Factors:
    return ad.lora_B.float() * ad._coef().float(), ad.lora_A.float()  # coef = s m g, (r,)


def _fold_delta(ad: Any) -> Factors:
    b, a = ad.scale * ad.lora_B.float(), ad.lora_A.float()
    if not ad._started:  # no base drift yet: plain LoRA
        return b, a
    k = ad.base_scale  # lambda * s
    if torch.equal(ad.applied_A, ad.lora_A) and torch.equal(ad.applied_B, ad.lora_B):
        # the usual state after a step: dW = (1 + lambda) s B A - lambda s B_K A_K, rank 2r
        return (torch.cat([b * (1 + ad.config.delta_lambda), -k * ad.anchor_B.float()], dim=1),  # (d_out, 2r)
                torch.cat([a, ad.anchor_A.float()], dim=0))  # (2r, d_in)
    return (torch.cat([b, k * ad.applied_B.float(), -k * ad.anchor_B.float()], dim=1),  # (d_out, 3r)
            torch.cat([a, ad.applied_A.float(), ad.anchor_A.float()], dim=0))  # (3r, d_in)


#: method name -> exact fold ``adapter -> (B', A')``. A method not listed here is folded from its ``lowrank()``
#: (when its update is the forward's low-rank product), then as LoRA in disguise, else only by SVD.
FOLDS: dict[str, Callable[[Any], Factors]] = {
    "vera": _fold_vera,
    "lora-xs": _fold_middle,
    "lora-sb": _fold_middle,
    "rank1-sum": _fold_gates,
    "delta-lora": _fold_delta,
}


def _lora_like(ad: Adapter) -> bool:
    """A LoRA config and its own ``lora_A (r, d_in)``, ``lora_B (d_out, r)`` and ``scale``."""
    cfg, a, b = ad.config, getattr(ad, "lora_A", None), getattr(ad, "lora_B", None)
    return (isinstance(cfg, LoraConfig) and isinstance(a, Tensor) and isinstance(b, Tensor)
            and a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1] == cfg.r
            and math.isclose(float(getattr(ad, "scale", math.nan)), cfg.scale, rel_tol=1e-12))


def _factors(ad: Adapter, layer: AdaptedLayer) -> Factors | None:
    """Exact ``(B', A')`` of the adapter's update, or ``None`` if no low-rank form is known."""
    if ad.method in FOLDS:
        return FOLDS[ad.method](ad)
    lowrank = getattr(ad, "lowrank", None)
    f = lowrank(layer) if callable(lowrank) else None
    if f is not None:
        b = f.b.float()  # (d_out, r)
        if f.mid is not None:
            b = b @ f.mid.float() if f.mid.dim() == 2 else b * f.mid.float()
        if f.out is not None:
            b = f.out.float()[:, None] * b
        return b * f.scale, f.a.float()
    if _lora_like(ad):
        return ad.scale * ad.lora_B.float(), ad.lora_A.float()  # type: ignore[operator,union-attr]
    return None


# --- linear algebra ------------------------------------------------------------------------------------------
def _drop_zero(b: Tensor, a: Tensor) -> Factors:
    """Drop components whose column of ``B'`` is exactly zero (masked gates, unstarted terms): exact."""
    keep = b.ne(0).any(dim=0)
    return (b, a) if bool(keep.all()) else (b[:, keep], a[keep])


def _truncate(k: int, *, factors: Factors | None = None, dense: Tensor | None = None) -> Factors:
    """Best rank-``k`` factors of ``B' A'`` (or of ``dense``) by SVD: ``U_k sqrt(S_k)``, ``sqrt(S_k) V_k^T``.

    From factors, ``B' = Qb Rb`` and ``A'^T = Qa Ra`` (thin QRs) give ``B' A' = Qb (Rb Ra^T) Qa^T``: only the
    small core is decomposed, ``O((d_out + d_in) r^2)``, in fp64. A dense update gets an fp32 SVD, randomized
    (``torch.svd_lowrank``, 10 extra columns, 6 power iterations: near-optimal, and the reported error is
    measured, not assumed) when ``k`` is far below full rank, since an exact SVD of every large layer of a
    big model takes hours on a CPU.
    """
    if factors is not None:
        b, a = factors
        qb, rb = torch.linalg.qr(b.double())  # (d_out, m), (m, r)
        qa, ra = torch.linalg.qr(a.double().T)  # (d_in, n), (n, r)
        u, s, vh = torch.linalg.svd(rb @ ra.T)  # core (m, n)
        u, vh = qb @ u, vh @ qa.T  # (d_out, .), (., d_in)
    else:
        assert dense is not None
        full = min(dense.shape)
        if 4 * (k + 10) < full:
            u, s, v = torch.svd_lowrank(dense.float(), q=k + 10, niter=6)  # (d_out, q), (q,), (d_in, q)
            vh = v.T
        else:
            u, s, vh = torch.linalg.svd(dense.float(), full_matrices=False)
    k = min(k, s.numel())
    root = s[:k].sqrt()
    return (u[:, :k] * root).float(), (root[:, None] * vh[:k]).float()


def _rel_error(dw: Tensor, approx: Tensor) -> float:
    """``||dW - approx||_F / ||dW||_F`` (the absolute error when ``dW = 0``)."""
    norm = dw.norm().item()
    diff = (dw - approx.to(dw.device)).norm().item()
    return diff / norm if norm > 0 else diff


def _dora_delta(w0: Tensor, a: Tensor, b: Tensor, m: Tensor, scale: float) -> Tensor:
    """PEFT's DoRA update ``m * V / ||V||_row - W0`` with ``V = W0 + s B A`` (fp32, ``(d_out, d_in)``)."""
    v = w0.float() + scale * b @ a
    return v * (m / v.norm(dim=1))[:, None] - w0.float()


# --- export ---------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """One layer as written: ``dW = s b a`` (``s`` from the config), plus DoRA's magnitude."""

    kind: LayerKind
    a: Tensor  # (k, d_in)
    b: Tensor  # (d_out, k)
    error: float
    magnitude: Tensor | None = None
    svd: bool = False  # made by an SVD (exact unless truncated)
    truncated: bool = False  # rank cut below the update's: error is the approximation's


def _native(adapters: dict[str, Adapter], model: nn.Module) -> dict[str, _Layer] | None:
    """Every layer as its own ``A``, ``B`` (``m``), or ``None`` if one layer's update is not LoRA's/DoRA's."""
    out = {}
    for target, ad in adapters.items():
        layer: AdaptedLayer = model.get_submodule(target)
        dw = ad.delta_weight(layer.weight).float()  # (d_out, d_in)
        a, b = ad.lora_A.float(), ad.lora_B.float()  # type: ignore[union-attr]
        if isinstance(ad, Dora):
            m = ad.magnitude.float()
            ex = _Layer(layer.kind, a, b, _rel_error(dw, _dora_delta(layer.weight, a, b, m, ad.scale)), m)
        else:
            ex = _Layer(layer.kind, a, b, _rel_error(dw, ad.scale * b @ a))  # type: ignore[operator]
        if ex.error > EXACT_TOL:
            return None
        out[target] = ex
    return out


def _folded(adapters: dict[str, Adapter], model: nn.Module, method: str, rank: int | None) -> dict[str, _Layer]:
    """Every layer as ``B' A'`` at scale 1: exact folds, or truncated SVDs when ``rank`` is smaller."""
    out = {}
    for target, ad in adapters.items():
        layer: AdaptedLayer = model.get_submodule(target)
        dw = ad.delta_weight(layer.weight).float()  # (d_out, d_in): what every form is checked against
        full = min(dw.shape)  # no more components than this can be independent
        limit = full if rank is None else min(rank, full)
        fac = None if isinstance(ad, Dora) else _factors(ad, layer)
        if fac is None:
            if rank is None:
                raise ConfigError(
                    f"method {method!r} has no exact LoRA form; pass rank=K to export the best rank-K "
                    "approximation of each layer's update (truncated SVD; the error is reported)")
            b, a = _truncate(limit, dense=dw)
            svd, cut = True, limit < full
        else:
            b, a = _drop_zero(*fac)
            svd, cut = b.shape[1] > limit, b.shape[1] > limit and limit < full
            if svd:
                b, a = _truncate(limit, factors=(b, a))
        ex = _Layer(layer.kind, a, b, _rel_error(dw, b @ a), svd=svd, truncated=cut)
        if not math.isfinite(ex.error) or (not cut and ex.error > EXACT_TOL):
            raise AdapterStateError(
                f"{target}: the LoRA form of method {method!r} disagrees with its delta_weight (relative error "
                f"{ex.error:.2e}); pass rank=K to export by truncated SVD instead")
        out[target] = ex
    return out


def _peft_tensors(layers: dict[str, _Layer], r: int) -> dict[str, Tensor]:
    """PEFT's keys, every layer zero-padded to rank ``r`` (exact: the extra components are zero)."""
    out: dict[str, Tensor] = {}
    for target, ex in layers.items():
        pad = r - ex.a.shape[0]
        a = torch.cat([ex.a, ex.a.new_zeros(pad, ex.a.shape[1])]) if pad else ex.a  # (r, d_in)
        b = torch.cat([ex.b, ex.b.new_zeros(ex.b.shape[0], pad)], dim=1) if pad else ex.b  # (d_out, r)
        names = ("lora_embedding_A", "lora_embedding_B") if ex.kind is LayerKind.EMBEDDING else \
            ("lora_A.weight", "lora_B.weight")
        out[f"{PREFIX}{target}.{names[0]}"] = a
        out[f"{PREFIX}{target}.{names[1]}"] = b
        if ex.magnitude is not None:
            out[f"{PREFIX}{target}.lora_magnitude_vector"] = ex.magnitude
    # clone: safetensors refuses views and shared storage
    return {k: t.detach().to("cpu", torch.float32, copy=True).contiguous() for k, t in out.items()}


def _plain_names(model: nn.Module) -> list[str]:
    """Module names as the model has them without lorakit (what PEFT's ``target_modules`` is matched with)."""
    inside = tuple(n + "." for n, m in model.named_modules() if isinstance(m, AdaptedLayer)) + (SHARED + ".",)
    return [n for n, _ in model.named_modules() if n and n != SHARED and not n.startswith(inside)]


def _target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Name suffixes (``q_proj``) when, in PEFT's matching, they select exactly ``targets``; else full names."""
    suffixes = sorted({t.rsplit(".", 1)[-1] for t in targets})
    hits = {n for n in _plain_names(model) if any(n == s or n.endswith("." + s) for s in suffixes)}
    return suffixes if hits == set(targets) else list(targets)


def _task_type(model: nn.Module) -> str | None:
    return "CAUSAL_LM" if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) else None


def export_peft(model: nn.Module, path: str | os.PathLike[str], name: str = "default", *,
                rank: int | None = None, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """Write adapter ``name`` as a PEFT LoRA (or DoRA) adapter directory, loadable by PEFT and vLLM.

    Args:
        model: the model carrying the adapter (unmerged).
        path: output directory (created if needed); gets ``adapter_config.json`` + ``adapter_model.safetensors``.
        name: the lorakit adapter to export.
        rank: export at most this rank, by truncated SVD where the exact rank is higher. Required for methods
            with no exact LoRA form; a rank at or above the exact one changes nothing. DoRA with a ``rank`` is
            exported as plain LoRA (SVD of its dense update).
        base_model_name_or_path: written to the config (default: the model's ``name_or_path``).

    Returns:
        A report: ``mode`` (``native``, ``fold`` or ``svd``), ``exact`` (no rank was cut below the update's
        own), ``r``, ``lora_alpha``, ``use_rslora``, ``use_dora``, ``target_modules``, ``layers`` (module ->
        ``{"rank", "error"}``, ``error`` being the relative Frobenius error of the written update against
        ``delta_weight``) and ``max_error``.

    Raises:
        ConfigError: full fine-tuning (not an adapter), a bad ``rank``, or no exact LoRA form and no ``rank``.
        AdapterStateError: the adapter is merged, or a fold disagrees with ``delta_weight``.
    """
    rec = _record(model, name)
    if not rec.is_layer_method:
        raise ConfigError(f"adapter {name!r} is full fine-tuning, not an adapter, so PEFT cannot hold it; use "
                          "lorakit.detach(model, merge=True) then model.save_pretrained(...)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive int, got {rank!r}")
    adapters = adapter_modules(model, name)
    merged = [t for t in adapters if name in model.get_submodule(t).merged]
    if merged:
        raise AdapterStateError(f"adapter {name!r} is merged into {len(merged)} layer(s) (e.g. {merged[0]!r}); "
                                "call lorakit.unmerge(model) before exporting")
    first = next(iter(adapters.values()))
    with torch.no_grad():
        layers = None
        if (isinstance(first, Dora) and rank is None) or \
                (_lora_like(first) and not isinstance(first, Dora) and (rank is None or rank >= first.config.r)):
            layers = _native(adapters, model)
        native = layers is not None
        if layers is None:
            layers = _folded(adapters, model, rec.method, rank)
    cfg: LoraConfig | None = first.config if native else None  # type: ignore[assignment]
    dora = native and isinstance(first, Dora)
    r = max(1, *(ex.a.shape[0] for ex in layers.values()))
    alpha = cfg.alpha if cfg is not None else float(r)  # folded: scale 1
    assert alpha is not None

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _peft_tensors(layers, r)
    _atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": cfg.dropout if cfg is not None else 0.0,
        "use_rslora": cfg.use_rslora if cfg is not None else False,
        "use_dora": dora,
        "target_modules": _target_modules(model, list(layers)),
        "fan_in_fan_out": any(ex.kind is LayerKind.CONV1D for ex in layers.values()),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    _atomic_write(out / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    mode = "native" if native else "svd" if any(ex.svd for ex in layers.values()) else "fold"
    report = {
        "path": str(out), "method": rec.method, "mode": mode, "exact": not any(ex.truncated for ex in layers.values()),
        "r": r, "lora_alpha": config["lora_alpha"],
        "use_rslora": config["use_rslora"], "use_dora": dora, "target_modules": config["target_modules"],
        "layers": {t: {"rank": int(ex.a.shape[0]), "error": ex.error} for t, ex in layers.items()},
        "max_error": max(ex.error for ex in layers.values()),
    }
    # an approximate export is worth a warning: the served model is not the trained one
    log.log(logging.INFO if report["exact"] else logging.WARNING,
            "exported %s adapter %r to %s as a PEFT LoRA (%s, r=%d, max relative error %.3g)",
            rec.method, name, out, mode, r, report["max_error"])
    return report


def format_report(report: dict[str, Any]) -> str:
    """A few lines for humans: the form, the rank, and the approximation error (worst layers first)."""
    lines = [f"exported {report['method']} to {report['path']} as PEFT LoRA: {report['mode']}, r={report['r']}, "
             f"lora_alpha={report['lora_alpha']}{', DoRA' if report['use_dora'] else ''}",
             f"max relative error ||dW - B'A'||_F / ||dW||_F = {report['max_error']:.3e}"]
    if not report["exact"]:
        worst = sorted(report["layers"].items(), key=lambda kv: -kv[1]["error"])[:5]
        lines += [f"  {t}: rank {v['rank']}, error {v['error']:.3e}" for t, v in worst]
    return "\n".join(lines)


# --- import -------------------------------------------------------------------------------------------------
#: Config fields that change PEFT's math in ways lorakit's LoRA/DoRA do not reproduce: must be falsy.
_UNSUPPORTED_FIELDS = ("lora_bias", "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config",
                       "velora_config", "monteclora_config", "kasa_config", "layer_replication",
                       "target_parameters", "trainable_token_indices", "megatron_config", "lora_ga_config")
#: ``init_lora_weights`` values that change the base weights (the adapter needs the modified base) or the forward.
_UNSUPPORTED_INITS = re.compile(r"pissa.*|olora|corda|loftq|mica", re.IGNORECASE)
_KEY = re.compile(r"(?P<module>.+)\.(?P<tensor>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
                  r"|lora_magnitude_vector(?:\.weight)?|base_layer\.weight)")


def is_peft_dir(path: str | os.PathLike[str]) -> bool:
    """``path`` is a PEFT adapter directory (``adapter_config.json``) and not a lorakit one."""
    d = Path(path)
    return (d / CONFIG_FILE).is_file() and not (d / META_FILE).is_file()


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not (path / CONFIG_FILE).is_file():
        raise AdapterFileError(f"{path}: not a PEFT adapter directory (no {CONFIG_FILE})")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path / CONFIG_FILE}: corrupted config ({e})") from None
    if not (path / WEIGHTS_FILE).is_file():
        pickled = (path / "adapter_model.bin").is_file()
        raise AdapterFileError(
            f"{path}: no {WEIGHTS_FILE}" + ("; adapter_model.bin is a pickle, which lorakit never loads: re-save it "
                                            "with save_pretrained(..., safe_serialization=True)" if pickled else ""))
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{path / WEIGHTS_FILE}: unreadable tensor file ({e})") from None
    return config, tensors


def _check_config(config: dict[str, Any], where: Path) -> None:
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise IncompatibleAdapterError(f"{where}: PEFT adapter type {kind!r} is not LoRA; lorakit reads PEFT LoRA "
                                       "and DoRA adapters")
    problems = [f"{k}={config[k]!r}" for k in _UNSUPPORTED_FIELDS if config.get(k)]
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (trained base biases)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']!r} (fully trained modules)")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and _UNSUPPORTED_INITS.fullmatch(init):
        problems.append(f"init_lora_weights={init!r} (the adapter expects modified base weights)")
    if problems:
        raise IncompatibleAdapterError(f"{where}: this PEFT adapter uses features lorakit does not reproduce: "
                                       + "; ".join(problems))


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the end of the module name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _group(tensors: dict[str, Tensor], where: Path) -> dict[str, dict[str, Tensor]]:
    """``{module: {slot: tensor}}`` from PEFT's flat keys; slots ``A``, ``B`` (linear), ``eA``, ``eB``
    (embedding), ``magnitude`` (DoRA) and ``base`` (an embedding's base weight, saved by PEFT alongside)."""
    groups: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        m = _KEY.fullmatch(key.removeprefix(PREFIX))
        if m is None:
            unknown.append(key)
            continue
        kind = m["tensor"]
        slot = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "eA", "lora_embedding_B": "eB",
                "base_layer.weight": "base"}.get(kind, "magnitude")
        groups.setdefault(m["module"], {})[slot] = t
    if unknown:
        shown = ", ".join(unknown[:4]) + (f", ... ({len(unknown)} keys)" if len(unknown) > 4 else "")
        raise IncompatibleAdapterError(f"{where}: tensors lorakit cannot map onto a LoRA/DoRA adapter: {shown}")
    return groups


def load_peft(model: nn.Module, path: str | os.PathLike[str], name: str | None = None) -> nn.Module:
    """Attach the PEFT LoRA or DoRA adapter in directory ``path`` to ``model`` as a lorakit adapter.

    The adapter becomes a lorakit ``"lora"`` (or ``"dora"``) adapter with the same ``r``, ``alpha``,
    ``use_rslora`` and dropout, on exactly the modules the file holds tensors for, and computes what PEFT does.

    Args:
        model: the base model the adapter was trained on.
        path: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        name: the adapter's name on ``model`` (default ``"default"``).

    Returns:
        ``model``.

    Raises:
        AdapterFileError: missing, pickled or unreadable files.
        IncompatibleAdapterError: not a LoRA adapter, a PEFT feature lorakit does not reproduce (trained biases,
            ``modules_to_save``, per-layer ranks or alphas that differ, DoRA on embeddings, ...), or tensors that
            do not fit the model. The model is left unchanged on any error.
    """
    where = Path(path)
    config, tensors = _read(where)
    _check_config(config, where)
    groups = _group(tensors, where)
    dora = bool(config.get("use_dora"))
    modules = dict(model.named_modules())
    plan: dict[str, dict[str, Tensor]] = {}
    settings: set[tuple[int, float]] = set()
    for module, g in groups.items():
        target = modules.get(module)
        kind = layer_kind(target) if target is not None else None
        if kind is None:
            raise IncompatibleAdapterError(f"{where}: module {module!r} is missing from the model or cannot be adapted")
        emb = kind is LayerKind.EMBEDDING
        a, b = (g.get("eA"), g.get("eB")) if emb else (g.get("A"), g.get("B"))
        w = weight_view(target)  # (d_out, d_in)
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] \
                or (a.shape[1], b.shape[0]) != (w.shape[1], w.shape[0]):
            raise IncompatibleAdapterError(
                f"{where}: {module}: LoRA tensors missing or of the wrong shape for this "
                f"{kind.value} layer (d_out, d_in) = {tuple(w.shape)}: "
                f"{ {k: tuple(v.shape) for k, v in g.items()} }")
        own = (target.base if isinstance(target, AdaptedLayer) else target).weight.detach()
        if "base" in g and (g["base"].shape != own.shape or not torch.allclose(
                g["base"].float(), own.float().cpu(), rtol=1e-2, atol=1e-3)):
            raise IncompatibleAdapterError(f"{where}: {module}: the adapter carries base weights that differ from "
                                           "this model's (a resized or trained embedding); lorakit cannot load them")
        entry = {"lora_A": a, "lora_B": b}
        if dora:
            if emb or "magnitude" not in g:
                raise IncompatibleAdapterError(f"{where}: {module}: DoRA needs a magnitude vector on a linear layer "
                                               "(lorakit has no DoRA for embeddings)")
            entry["magnitude"] = g["magnitude"].reshape(-1)
        elif "magnitude" in g:
            raise IncompatibleAdapterError(f"{where}: {module}: a DoRA magnitude in an adapter with use_dora false")
        r = int(a.shape[0])
        r_cfg = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", r))
        if r_cfg != r:
            raise AdapterFileError(f"{where}: {module}: rank {r} in the tensors but {r_cfg} in the config")
        alpha = config.get("lora_alpha", 8)  # PEFT's default
        settings.add((r, float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha))))
        plan[module] = entry
    if not plan:
        raise AdapterFileError(f"{where}: {WEIGHTS_FILE} holds no LoRA tensors")
    if len(settings) > 1:
        raise IncompatibleAdapterError(
            f"{where}: the layers use different (rank, alpha) pairs {sorted(settings)} (rank_pattern/alpha_pattern); "
            "a lorakit adapter has one rank and one alpha")
    (r, alpha), = settings
    order = [n for n in modules if n in plan]  # model order
    name = name or "default"
    attach(model, "dora" if dora else "lora", name=name, _init=False, _modules=order, targets=order, r=r,
           alpha=alpha, use_rslora=bool(config.get("use_rslora", False)),
           dropout=float(config.get("lora_dropout") or 0.0))
    try:
        with torch.no_grad():
            for target, adapter in adapter_modules(model, name).items():
                adapter.load_tensors(plan[target], where=f"{where}:{target}")
                # new modules start in training mode: follow the model's, or an eval model would drop out
                adapter.train(model.get_submodule(target).base.training)
    except BaseException:
        remove(model, name)
        raise
    _record(model, name).extra = {"imported_from": "peft"}
    return model
