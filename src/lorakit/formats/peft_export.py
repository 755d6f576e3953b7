"""Hugging Face PEFT's LoRA format, both ways: the format PEFT, vLLM and most serving stacks load.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (layout read
from PEFT 0.21's ``tuners/lora`` and checked against files it writes):

- ``base_model.model.<module>.lora_A.weight`` ``(r, d_in)`` and ``.lora_B.weight`` ``(d_out, r)``: lorakit's own
  ``A`` and ``B``. GPT-2 ``Conv1D`` layers use the same layout (PEFT keeps them as ``nn.Linear`` weights and
  transposes the product, ``fan_in_fan_out: true``). Embeddings use ``.lora_embedding_A`` ``(r, num_embeddings)``
  and ``.lora_embedding_B`` ``(embedding_dim, r)``: again lorakit's ``A`` and ``B``.
- DoRA (https://arxiv.org/abs/2402.09353) adds ``.lora_magnitude_vector`` ``(d_out,)``: the full magnitude ``m``
  (PEFT starts it at the row norms of ``W0 + s B A``), the same tensor as lorakit's ``magnitude``.
- Mixture-of-experts experts (3-D parameters, :mod:`lorakit.core.experts`) in PEFT's ``target_parameters`` form:
  one ``lora_A`` ``(r E, d_in)`` and ``lora_B`` ``(d_out, r E)`` per parameter (:func:`_expert_tensors`).
- ``r``, ``lora_alpha``, ``use_rslora`` give the scale ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``),
  ``use_dora`` the DoRA variant, ``target_modules`` the adapted modules.

Export writes one rank ``r`` for all layers (vLLM needs one; lower-rank layers are zero-padded, which is
exact) in the first form that applies to the method:

1. native: every layer's :meth:`~lorakit.Adapter.lora_form` (LoRA itself: ``lora``, ``lora-fa``, a
   ``delta-lora`` whose base update has not started; or DoRA) whose ``s B A`` equals ``delta_weight``. ``A``,
   ``B`` (and ``m``), ``r``, ``alpha``, ``use_rslora`` are written unchanged.
2. exact fold ``dW = B' A'``, written with ``lora_alpha = r`` (scale 1): the method's
   :meth:`~lorakit.Adapter.lora_factors` (by default from the factors it gives its fused kernel, ``lowrank()``:
   ``dW = s diag(out) B mid A`` gives ``B' = s diag(out) B mid``, ``A' = A``). Components whose column of ``B'`` is exactly zero (masked gates)
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

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lorakit.adapt.model import SHARED, get_record
from lorakit.core.contract import Adapter, Factors, LoraForm
from lorakit.core.experts import expert_paths
from lorakit.core.layers import AdaptedLayer, LayerKind, weight_shape
from lorakit.errors import AdapterStateError, ConfigError
from lorakit.formats.layout import PEFT_CONFIG_FILE as CONFIG_FILE
from lorakit.formats.layout import PEFT_PREFIX as PREFIX
from lorakit.formats.layout import PEFT_WEIGHTS_FILE as WEIGHTS_FILE
from lorakit.formats.layout import output_dir
from lorakit.util.arguments import Range, checked
from lorakit.util.files import atomic_write, write_json

log = logging.getLogger("lorakit")

#: Relative error above which an "exact" form is said to disagree with ``delta_weight`` (fp32 round-off ~1e-7).
EXACT_TOL = 1e-4


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
        form = ad.lora_form()
        if form is None:
            return None
        dw = ad.delta_weight(layer.weight).float()  # (d_out, d_in)
        ex = _Layer(layer.kind, form.a, form.b, _rel_error(dw, form.delta_weight(layer.weight)), form.magnitude)
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
        fac = ad.lora_factors(layer)
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


def _expert_tensors(model: nn.Module, layers: dict[str, _Layer], r: int) -> tuple[dict[str, Tensor], list[str]]:
    """The experts' layers (``<experts>.<projection>.<e>``) in PEFT's ``target_parameters`` form, and those names.

    PEFT (``lora.ParamWrapper``) keeps one ``lora_A`` ``(r E, d_in)`` and one ``lora_B`` ``(d_out, r E)`` per 3-D
    parameter, expert ``e``'s factors being ``A.reshape(E, r, d_in)[e]`` and ``B.reshape(d_out, r, E)[:, :, e]``
    (its ``einsum("o r e, e r i -> e o i")``), the scale ``s`` of the config; an expert without an adapter is
    written as zeros (exact). The parameters of one experts module are nested wrappers, the first in the module's
    parameter order innermost: ``<experts>.base_layer.lora_A.weight`` for ``gate_up_proj`` below
    ``<experts>.lora_A.weight`` for ``down_proj``. Popped from ``layers``."""
    out: dict[str, Tensor] = {}
    groups = expert_paths(list(layers))
    by_module: dict[str, list[str]] = {}
    for head in groups:
        by_module.setdefault(head.rpartition(".")[0], []).append(head.rpartition(".")[2])
    for path, projs in by_module.items():
        experts = model.get_submodule(path)
        order = [n for n, _ in experts.base.named_parameters(recurse=False) if n in projs]
        for i, proj in enumerate(order):
            views = getattr(experts, proj)
            n_exp = len(views)
            d_out, d_in = weight_shape(views[0])
            a = torch.zeros(n_exp, r, d_in)
            b = torch.zeros(d_out, r, n_exp)
            for e in range(n_exp):
                ex = layers.pop(f"{path}.{proj}.{e}", None)
                if ex is None:
                    continue
                if ex.magnitude is not None:
                    raise ConfigError(f"{path}.{proj}: PEFT's expert adapters (target_parameters) have no DoRA "
                                      "form; export DoRA adapters without expert targets, or merge the model")
                k = ex.a.shape[0]
                a[e, :k], b[:, :k, e] = ex.a.float().cpu(), ex.b.float().cpu()
            key = f"{PREFIX}{path}." + "base_layer." * (len(order) - 1 - i)
            out[key + "lora_A.weight"] = a.reshape(n_exp * r, d_in)
            out[key + "lora_B.weight"] = b.reshape(d_out, r * n_exp)
    return out, [h for h in groups]


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


def lora_layers(model: nn.Module, name: str, rank: int | None = None) -> tuple[dict[str, _Layer], LoraForm | None]:
    """Every adapted layer of adapter ``name`` as LoRA factors, in the first form that applies (module docstring):
    ``(layers, form)``, ``form`` being the method's own :class:`~lorakit.LoraForm` when the layers are native
    (``dW = form.scale * b a``, DoRA's magnitude included), ``None`` when they are folds or SVDs at scale 1.

    Raises:
        ConfigError: full fine-tuning, a bad ``rank``, or no exact LoRA form and no ``rank``.
        AdapterStateError: the adapter is merged, or a fold disagrees with ``delta_weight``.
    """
    rec = get_record(model, name)
    if not rec.is_layer_method:
        raise ConfigError(f"adapter {name!r} is full fine-tuning, not an adapter, so no LoRA format can hold it; "
                          "use lorakit.detach(model, merge=True) and save or export the model")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive int, got {rank!r}")
    adapters = dict(rec.modules)
    merged = [t for t in adapters if name in model.get_submodule(t).merged]
    if merged:
        raise AdapterStateError(f"adapter {name!r} is merged into {len(merged)} layer(s) (e.g. {merged[0]!r}); "
                                "call lorakit.unmerge(model) before exporting")
    form = next(iter(adapters.values())).lora_form()
    with torch.no_grad():
        if form is not None and (rank is None or (form.magnitude is None and rank >= form.r)):
            native = _native(adapters, model)
            if native is not None:
                return native, form
        return _folded(adapters, model, rec.method, rank), None


@checked(rank=Range(ge=1))
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
    rec = get_record(model, name)
    layers, cfg = lora_layers(model, name, rank)
    native = cfg is not None
    dora = cfg is not None and cfg.magnitude is not None
    r = max(1, *(ex.a.shape[0] for ex in layers.values()))
    alpha = cfg.alpha if cfg is not None else float(r)  # folded: scale 1

    all_layers = dict(layers)
    expert_tensors, parameters = _expert_tensors(model, layers, r)  # pops the experts' layers
    out = output_dir(path)
    tensors = {**_peft_tensors(layers, r), **expert_tensors}
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        # PEFT refuses dropout on expert parameters (it cannot factor x out of its dense delta); none at inference
        "lora_dropout": cfg.dropout if cfg is not None and not parameters else 0.0,
        "use_rslora": cfg.use_rslora if cfg is not None else False,
        "use_dora": dora,
        "target_modules": _target_modules(model, list(layers)) if layers else None,
        **({"target_parameters": parameters} if parameters else {}),
        "fan_in_fan_out": any(ex.kind is LayerKind.CONV1D for ex in layers.values()),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    write_json(out / CONFIG_FILE, config)
    layers = all_layers
    mode = "native" if native else "svd" if any(ex.svd for ex in layers.values()) else "fold"
    report = {
        "path": str(out), "method": rec.method, "mode": mode, "exact": not any(ex.truncated for ex in layers.values()),
        "r": r, "lora_alpha": config["lora_alpha"],
        "use_rslora": config["use_rslora"], "use_dora": dora, "target_modules": config["target_modules"],
        "target_parameters": parameters,
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
