"""Combining adapters into a new LoRA adapter: weighted sums, concatenation, SVD, TIES and DARE merges.

:func:`combine` builds, from named source adapters ``i`` with weights ``w_i`` and per-layer updates ``dW_i``
(each method's :meth:`~lorakit.Adapter.delta_weight`), one new **LoRA** adapter (method ``"lora"``, ``alpha = r``
so its scale is 1, ``use_rslora=False``, no dropout) on the union of the sources' target layers. It is an ordinary
adapter: active after the call (like :func:`lorakit.attach`), saved, loaded and exported like any LoRA. The
combination rules follow Hugging Face PEFT's ``add_weighted_adapter`` (read from PEFT 0.21,
``tuners/lora/model.py`` and ``utils/merge_utils.py``; the tests compare with it):

- ``"cat"`` (exact): from each source's exact factors ``dW_i = B_i' A_i'`` (:meth:`~lorakit.Adapter.lora_factors`),
  ``B = [w_1 B_1' | w_2 B_2' | ...]``, ``A = [A_1'; A_2'; ...]``, so ``B A = sum_i w_i dW_i`` exactly; the rank is
  the sum of the sources' ranks (layers of lower rank are zero-padded, which is exact). DoRA has no exact factors
  (its row normalisation is dense): use ``"svd"``.
- ``"linear"`` (PEFT's ``linear``): the *factors* are averaged, not the updates. With ``c_i = w_i s_i`` (``s_i`` the
  source's LoRA scale; 1 for a method given by its exact factors)::

      A = sum_i sign(c_i) sqrt(|c_i|) A_i,      B = sum_i sqrt(|c_i|) B_i

  so ``B A = sum_i c_i B_i A_i + sum_{i != j} (cross terms)``: **not** the weighted sum of the updates unless one
  source is given (or the cross terms vanish). Every source must have the same rank. Cheap, and the rank stays
  ``r``; the report's ``sum_rel_error`` says how far it is from ``sum_i w_i dW_i``.
- ``"svd"``: the best rank-``k`` approximation (truncated SVD, fp32, per layer) of the dense ``M = sum_i w_i dW_i``:
  ``B = U_k sqrt(S_k)``, ``A = sqrt(S_k) V_k^T``. ``k = rank``, default the largest source rank.
- ``"ties"`` (TIES-merging, Yadav et al. 2023, https://arxiv.org/abs/2306.01708), on the dense task vectors
  ``dW_i`` of each layer, then the SVD above (PEFT's ``ties_svd``)::

      t_i   = dW_i with all but its top-``density`` fraction of entries (by magnitude) set to 0     (trim)
      sigma = sign(sum_i t_i)  (entrywise, 0 counts as +)                                          (elect sign)
      M     = sum_i [sign(t_i) == sigma] w_i t_i / max(1, sum_i [sign(t_i) == sigma])              (disjoint mean)

  (as in PEFT, the sign is elected on the unweighted trimmed vectors and the weights enter the disjoint mean).
- ``"dare_linear"`` (DARE, Yu et al. 2023, https://arxiv.org/abs/2311.03099): each entry of each ``dW_i`` is dropped
  with probability ``1 - density`` and the survivors rescaled by ``1 / density``, ``t_i = m_i * dW_i / density``,
  ``m_i ~ Bernoulli(density)``; ``M = sum_i w_i t_i``; then the SVD (PEFT's ``dare_linear_svd``).
- ``"dare_ties"``: DARE's ``t_i``, then TIES' sign election and disjoint mean; then the SVD (``dare_ties_svd``).

DARE's masks come from a ``torch.Generator`` seeded with ``seed`` (one per device), drawn layer by layer in model
order and source by source in the order of ``weights``: the same call gives the same adapter; the global RNG is
untouched. (PEFT's non-SVD ``ties``/``dare_*`` apply the same rules to the ``A`` and ``B`` factors separately, which
has no clear meaning for the product; lorakit offers only the dense form.)

Errors (:class:`~lorakit.errors.ConfigError`, :class:`~lorakit.errors.AdapterStateError`) are raised before the
model is touched: it is unchanged after any of them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapt.model import attach_config
from lorakit.adapt.records import AdapterRecord, get_record, records_of
from lorakit.core.contract import Adapter, Factors
from lorakit.core.layers import AdaptedLayer, adapted_layers
from lorakit.errors import AdapterStateError, ConfigError
from lorakit.methods import get_method
from lorakit.util.arguments import Range, checked

log = logging.getLogger("lorakit")

#: The combination rules :func:`combine` offers.
HOWS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
_DENSE = ("svd", "ties", "dare_linear", "dare_ties")  # decomposed by a truncated SVD
_SPARSE = ("ties", "dare_linear", "dare_ties")  # take a density
_EXACT_TOL = 1e-4  # relative error above which a source's "exact" LoRA form is not used


# --- the merge rules on dense task vectors (PEFT's merge_utils semantics) -------------------------------------------
def trim(t: Tensor, density: float) -> Tensor:
    """TIES' trim: keep the ``int(density * numel)`` entries of largest magnitude, zero the rest."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * keep.view(t.shape)


def drop(t: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE's drop-and-rescale: each entry kept with probability ``density`` and divided by it."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def disjoint_mean(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """TIES' sign election and disjoint mean of trimmed (or dropped) task vectors ``t_i``.

    ``sigma = sign(sum_i t_i)`` (0 counts as +), ``M = sum_i [sign t_i = sigma] w_i t_i / max(1, #agreeing)``.
    """
    t = torch.stack(tensors)  # (n, d_out, d_in)
    sigma = torch.where(t.sum(0) >= 0, 1.0, -1.0).to(t.dtype)
    agree = t.sign() == sigma  # zeros never agree
    w = torch.tensor(weights, dtype=t.dtype, device=t.device).view(-1, 1, 1)
    return (t * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def truncated_svd(m: Tensor, k: int) -> Factors:
    """``(B, A)`` with ``B A`` the best rank-``k`` approximation of ``m`` ``(d_out, d_in)``: ``B = U_k sqrt(S_k)``,
    ``A = sqrt(S_k) V_k^T`` (an exact fp32 SVD)."""
    u, s, vh = torch.linalg.svd(m.float(), full_matrices=False)  # (d_out, q), (q,), (q, d_in)
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


# --- sources ------------------------------------------------------------------------------------------------------
@dataclass
class _Source:
    name: str
    weight: float
    record: AdapterRecord


def _linear_factors(src: _Source, adapter: Adapter, layer: AdaptedLayer, dw: Tensor) -> tuple[Tensor, Tensor, float]:
    """``(A, B, s)`` with ``dW = s B A`` as PEFT's ``linear`` sees it: LoRA's own ``A``, ``B`` and scale when the
    method *is* LoRA, else its exact factors at scale 1."""
    form = adapter.lora_form()
    if form is not None and form.magnitude is None:
        s = form.scale
        if _rel(dw, s * form.b @ form.a) <= _EXACT_TOL:
            return form.a, form.b, s
    fac = adapter.lora_factors(layer)
    if fac is None:
        raise ConfigError(
            f"combine(how='linear'): source {src.name!r} ({src.record.method}) has no low-rank factors (DoRA's row "
            "normalisation is dense); use how='svd'")
    return fac[1], fac[0], 1.0


def _exact_factors(src: _Source, adapter: Adapter, layer: AdaptedLayer) -> Factors:
    fac = adapter.lora_factors(layer)
    if fac is None:
        raise ConfigError(
            f"combine(how='cat'): source {src.name!r} ({src.record.method}) has no exact low-rank factors (DoRA's "
            "row normalisation is dense); use how='svd' (a truncated SVD of the weighted sum, error reported)")
    return fac


def _source_rank(adapter: Adapter, layer: AdaptedLayer) -> int:
    """The rank a source has at one layer: its exact factors' width, else its config's ``r``, at most full rank."""
    fac = adapter.lora_factors(layer)
    r = fac[1].shape[0] if fac is not None else getattr(adapter.config, "r", None)
    full = min(layer.weight.shape)
    return full if r is None else min(int(r), full)


def _rel(target: Tensor, approx: Tensor) -> float:
    """``||target - approx||_F / ||target||_F`` (the absolute error when ``target = 0``)."""
    norm = target.norm().item()
    diff = (target - approx).norm().item()
    return diff / norm if norm > 0 else diff


# --- validation -----------------------------------------------------------------------------------------------------
def _check(model: nn.Module, weights: Mapping[str, float], how: str, name: str, rank: int | None,
           density: float | None) -> list[_Source]:
    if how not in HOWS:
        raise ConfigError(f"combine: unknown how={how!r}; choose one of {', '.join(HOWS)}")
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError("combine needs weights: a non-empty mapping {adapter name: weight}")
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"combine: the new adapter's name must be a non-empty string without '.', got {name!r}")
    if name in records_of(model):
        raise AdapterStateError(f"combine: model already has an adapter named {name!r}; pick another name= or remove it")
    sources = []
    for src, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(float(w)):
            raise ConfigError(f"combine: the weight of {src!r} must be a finite number, got {w!r}")
        rec = get_record(model, src)  # AdapterStateError for an unknown name
        if not rec.is_layer_method:
            raise AdapterStateError(
                f"combine: {src!r} is full fine-tuning ({rec.method!r}): its update is the trained base weights "
                "themselves, not an adapter that can be combined; combine mixes layer adapters")
        sources.append(_Source(src, float(w), rec))
    if any(layer.merged for _, layer in adapted_layers(model)):
        raise AdapterStateError("combine: some adapters are merged; call lorakit.unmerge(model) first")
    if how in _SPARSE:
        if density is None or isinstance(density, bool) or not isinstance(density, Real) \
                or not 0 < float(density) <= 1:
            raise ConfigError(f"combine(how={how!r}) needs density in (0, 1], the fraction of each update's entries "
                              f"kept (e.g. 0.2, the TIES paper's top-20%); got {density!r}")
    elif density is not None:
        raise ConfigError(f"combine: density applies to how='ties', 'dare_linear', 'dare_ties' only, not {how!r}")
    if how in _DENSE:
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
            raise ConfigError(f"combine: rank must be a positive int, got {rank!r}")
    elif rank is not None:
        raise ConfigError(f"combine(how={how!r}) fixes the rank itself (cat: the sum of the sources' ranks, linear: "
                          "their common rank); rank= applies to the SVD-based rules")
    return sources


# --- the combination ------------------------------------------------------------------------------------------------
@checked(rank=Range(ge=1), density=Range(gt=0, le=1), seed=Range(ge=0))
def combine(model: nn.Module, weights: Mapping[str, float], how: str = "svd", name: str = "mix",
            rank: int | None = None, density: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Attach a new LoRA adapter ``name`` combining the adapters in ``weights`` (see the module docstring).

    Args:
        model: a model holding the source adapters (unmerged).
        weights: ``{adapter name: weight}``; weights may be negative (task negation).
        how: ``"linear"``, ``"cat"``, ``"svd"`` (default, as in PEFT), ``"ties"``, ``"dare_linear"``,
            ``"dare_ties"``.
        name: the new adapter's name.
        rank: the SVD rank (``svd``, ``ties``, ``dare_*``); default the largest source rank, capped at the smallest
            ``min(d_in, d_out)`` of the target layers.
        density: fraction of entries kept by ``ties`` / ``dare_*`` (required there, refused elsewhere).
        seed: seed of DARE's random masks.

    Returns:
        A report: ``name``, ``how``, ``weights``, ``rank``, ``density``, ``seed``, ``sum_rel_error`` (overall
        ``||B A - sum_i w_i dW_i||_F / ||sum_i w_i dW_i||_F`` over all layers: 0 for ``cat``, the approximation
        of ``linear``, the truncation plus the trim/drop for the others), ``svd_rel_error`` (SVD-based rules: the
        truncation error relative to the matrix decomposed) and ``layers``: the same per target layer. Also
        logged (``lorakit`` logger, INFO).

    Raises:
        ConfigError: unknown ``how``, empty or non-finite weights, a bad ``rank``/``density``, sources without
            the factors ``cat``/``linear`` need, ranks ``linear`` cannot combine, a rank above a layer's full rank.
        AdapterStateError: an unknown source, a full fine-tuning source, a taken ``name``, merged adapters.
        The model is unchanged after any error.
    """
    sources = _check(model, weights, how, name, rank, density)
    targets = [t for t, _ in adapted_layers(model) if any(t in s.record.modules for s in sources)]
    layers: dict[str, AdaptedLayer] = {t: model.get_submodule(t) for t in targets}
    smallest = min(min(layer.weight.shape) for layer in layers.values())
    if how in _DENSE:
        default = max(_source_rank(s.record.modules[t], layers[t]) for t in targets for s in sources
                      if t in s.record.modules)
        k = min(default, smallest) if rank is None else rank
        if k > smallest:
            raise ConfigError(f"combine: rank={k} exceeds the smallest min(d_in, d_out) = {smallest} of the target "
                              "layers (a LoRA rank above it adds nothing)")
    generators: dict[torch.device, torch.Generator] = {}

    factors: dict[str, Factors] = {}  # target -> (B (d_out, k_t), A (k_t, d_in))
    per_layer: dict[str, dict[str, float]] = {}
    num = den = svd_num = svd_den = 0.0
    for t in targets:
        layer = layers[t]
        here = [(s, s.record.modules[t]) for s in sources if t in s.record.modules]
        w0 = layer.weight
        dws = [ad.delta_weight(w0).float() for _, ad in here]  # (d_out, d_in) each
        wsum = sum(s.weight * dw for (s, _), dw in zip(here, dws))  # sum_i w_i dW_i
        decomposed = None
        if how == "cat":
            fs = [_exact_factors(s, ad, layer) for s, ad in here]
            b = torch.cat([s.weight * f[0].float() for (s, _), f in zip(here, fs)], dim=1)  # (d_out, sum r_i)
            a = torch.cat([f[1].float() for f in fs], dim=0)  # (sum r_i, d_in)
        elif how == "linear":
            trip = [_linear_factors(s, ad, layer, dw) for (s, ad), dw in zip(here, dws)]
            ranks = sorted({f[0].shape[0] for f in trip})
            if len(ranks) > 1:
                raise ConfigError(f"combine(how='linear') needs sources of one rank; at {t} they have ranks {ranks} "
                                  "(use how='cat' or 'svd')")
            a = torch.zeros_like(trip[0][0], dtype=torch.float32)
            b = torch.zeros_like(trip[0][1], dtype=torch.float32)
            for (s, _), (fa, fb, sc) in zip(here, trip):
                c = s.weight * sc
                root = math.sqrt(abs(c))
                a = a + (root if c >= 0 else -root) * fa.float()  # the sign on one side only
                b = b + root * fb.float()
        else:
            if how == "svd":
                decomposed = wsum
            else:
                if how == "ties":
                    ts = [trim(dw, float(density)) for dw in dws]  # type: ignore[arg-type]
                else:
                    g = generators.get(w0.device)
                    if g is None:
                        g = generators[w0.device] = torch.Generator(device=w0.device).manual_seed(seed)
                    ts = [drop(dw, float(density), g) for dw in dws]  # type: ignore[arg-type]
                ws = [s.weight for s, _ in here]
                decomposed = sum(w * tt for w, tt in zip(ws, ts)) if how == "dare_linear" else disjoint_mean(ts, ws)
            b, a = truncated_svd(decomposed, k)
        approx = b @ a  # (d_out, d_in)
        factors[t] = (b, a)
        err = {"rank": int(a.shape[0]), "sum_rel_error": _rel(wsum, approx)}
        num += (wsum - approx).norm().item() ** 2
        den += wsum.norm().item() ** 2
        if decomposed is not None:
            err["svd_rel_error"] = _rel(decomposed, approx)
            svd_num += (decomposed - approx).norm().item() ** 2
            svd_den += decomposed.norm().item() ** 2
        per_layer[t] = err

    r = max(a.shape[0] for _, a in factors.values())
    too_big = {t: a.shape[0] for t, (_, a) in factors.items() if a.shape[0] > min(layers[t].weight.shape)}
    if too_big:
        raise ConfigError(f"combine(how='cat') would need ranks {too_big} above those layers' min(d_in, d_out); "
                          "use how='svd' (exact at full rank)")
    tensors: dict[str, Tensor] = {}
    for t, (b, a) in factors.items():
        pad = r - a.shape[0]  # zero components: exact
        tensors[f"{t}.lora_A"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a  # (r, d_in)
        tensors[f"{t}.lora_B"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1) if pad else b  # (d_out, r)
    config = get_method("lora").config_cls.parse(
        {"r": r, "alpha": float(r), "dropout": 0.0, "use_rslora": False, "targets": targets})
    attach_config(model, config, "lora", name=name, targets=targets, init=False, tensors=tensors,
                  where=f"combine({how!r}) ")

    def overall(n: float, d: float) -> float:
        return math.sqrt(n / d) if d > 0 else math.sqrt(n)

    report: dict[str, Any] = {"name": name, "how": how, "weights": {s.name: s.weight for s in sources}, "rank": r,
                              "density": density, "seed": seed, "sum_rel_error": overall(num, den)}
    if how in _DENSE:
        report["svd_rel_error"] = overall(svd_num, svd_den)
    report["layers"] = per_layer
    log.info("combine(%s) -> adapter %r: rank %d on %d layers, relative error vs the weighted sum %.3e%s", how, name,
             r, len(targets), report["sum_rel_error"],
             f", SVD truncation {report['svd_rel_error']:.3e}" if how in _DENSE else "")
    return report


__all__ = ["HOWS", "combine", "disjoint_mean", "drop", "trim", "truncated_svd"]
