"""Reading Hugging Face PEFT LoRA and DoRA adapters into lorakit (``lorakit.load`` of a PEFT directory).

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (layout read
from PEFT 0.21's ``tuners/lora`` and checked against files it writes; see :mod:`lorakit.formats.peft_export`
for the tensor names). The adapter becomes a lorakit ``lora`` (or ``dora``) adapter computing what PEFT does;
LoRA on mixture-of-experts parameters (``target_parameters``) becomes one layer per expert (:func:`_expert_entries`);
every PEFT feature whose math lorakit does not reproduce is refused by name, never silently dropped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from lorakit.adapt.model import attach_config, get_record
from lorakit.core.experts import PROJECTIONS, AdaptedExperts, ExpertLinear, is_experts
from lorakit.core.layers import AdaptedLayer, LayerKind, layer_kind, weight_shape
from lorakit.errors import AdapterFileError, ConfigError, IncompatibleAdapterError
from lorakit.formats.layout import PEFT_CONFIG_FILE as CONFIG_FILE
from lorakit.formats.layout import PEFT_PREFIX as PREFIX
from lorakit.formats.layout import PEFT_WEIGHTS_FILE as WEIGHTS_FILE
from lorakit.methods import get_method, method_for_peft
from lorakit.util.arguments import checked
from lorakit.util.validation import parse

#: Config fields that change PEFT's math in ways lorakit's LoRA/DoRA do not reproduce: must be falsy.
_UNSUPPORTED_FIELDS = ("lora_bias", "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config",
                       "velora_config", "monteclora_config", "kasa_config", "layer_replication",
                       "trainable_token_indices", "megatron_config", "lora_ga_config")
#: ``init_lora_weights`` values that change the base weights (the adapter needs the modified base) or the forward.
_UNSUPPORTED_INITS = re.compile(r"pissa.*|olora|corda|loftq|mica", re.IGNORECASE)
_KEY = re.compile(r"(?P<module>.+)\.(?P<tensor>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
                  r"|lora_magnitude_vector(?:\.weight)?|base_layer\.weight)")


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


class PeftFields(BaseModel):
    """The fields of ``adapter_config.json`` lorakit reads, with the types PEFT writes (others pass through)."""

    model_config = ConfigDict(extra="allow")

    r: StrictInt | None = Field(None, gt=0)
    lora_alpha: StrictInt | StrictFloat = Field(8, gt=0)  # PEFT's default
    lora_dropout: StrictInt | StrictFloat | None = Field(0.0, ge=0, lt=1)
    use_rslora: StrictBool | None = False
    use_dora: StrictBool | None = False
    rank_pattern: dict[str, StrictInt] | None = None
    alpha_pattern: dict[str, StrictInt | StrictFloat] | None = None


def _fields(config: dict[str, Any], where: Path) -> PeftFields:
    try:
        return parse(PeftFields, config, f"{where / CONFIG_FILE}: invalid PEFT config")
    except ConfigError as e:
        raise AdapterFileError(str(e)) from None


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


def _experts_module(model: nn.Module, path: str) -> nn.Module | None:
    """The experts module at ``path`` (the original one where lorakit already wraps it), or ``None``."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    module = module.base if isinstance(module, AdaptedExperts) else module
    return module if is_experts(module) else None


def _expert_entries(model: nn.Module, config: dict[str, Any], groups: dict[str, dict[str, Tensor]],
                    where: Path) -> dict[str, dict[str, Tensor]]:
    """PEFT's ``target_parameters`` tensors (``lora.ParamWrapper``) as lorakit's per-expert layers, popped from
    ``groups``: ``{"<experts>.<projection>.<e>": {"lora_A", "lora_B"}}``.

    PEFT keeps one ``lora_A`` ``(r E, d_in)`` and ``lora_B`` ``(d_out, r E)`` per 3-D parameter, expert ``e``'s
    factors being ``A.reshape(E, r, d_in)[e]`` and ``B.reshape(d_out, r, E)[:, :, e]``; the targeted parameters of
    one module are nested wrappers, the first in the module's parameter order innermost (its key carries one
    ``base_layer.`` per wrapper above it). The inverse of :func:`lorakit.formats.peft_export._expert_tensors`."""
    targets = list(config.get("target_parameters") or [])
    if not targets:
        return {}
    nested: dict[str, tuple[nn.Module, dict[int, dict[str, Tensor]]]] = {}
    for module in list(groups):
        path, depth = module, 0
        while path.endswith(".base_layer"):
            path, depth = path.removesuffix(".base_layer"), depth + 1
        owner = _experts_module(model, path)
        if owner is not None:
            nested.setdefault(path, (owner, {}))[1][depth] = groups.pop(module)
    out: dict[str, dict[str, Tensor]] = {}
    for path, (experts, by_depth) in nested.items():
        chosen = [n for n, w in experts.named_parameters(recurse=False) if n in PROJECTIONS and w.dim() == 3
                  and any(f"{path}.{n}" == t or f"{path}.{n}".endswith(f".{t}") for t in targets)]
        if sorted(by_depth) != list(range(len(chosen))):
            raise IncompatibleAdapterError(
                f"{where}: {path}: {len(by_depth)} nested PEFT parameter adapter(s) in the file but target_parameters "
                f"selects {len(chosen)} of its 3-D weights ({', '.join(chosen) or 'none'})")
        n_exp = int(experts.num_experts)
        for i, proj in enumerate(chosen):
            g = by_depth[len(chosen) - 1 - i]
            d_out, d_in = weight_shape(ExpertLinear(experts, proj, 0))
            a, b = g.get("A"), g.get("B")
            if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] \
                    or a.shape[0] % n_exp or (a.shape[1], b.shape[0]) != (d_in, d_out) or set(g) - {"A", "B"}:
                raise IncompatibleAdapterError(
                    f"{where}: {path}.{proj}: PEFT parameter-adapter tensors missing or of the wrong shape for "
                    f"{n_exp} experts of (d_out, d_in) = {(d_out, d_in)}: {({k: tuple(v.shape) for k, v in g.items()})}")
            r = a.shape[0] // n_exp
            a3, b3 = a.reshape(n_exp, r, d_in), b.reshape(d_out, r, n_exp)
            for e in range(n_exp):
                out[f"{path}.{proj}.{e}"] = {"lora_A": a3[e].contiguous(), "lora_B": b3[:, :, e].contiguous()}
    return out


@checked
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
    fields = _fields(config, where)
    dora = bool(fields.use_dora)
    modules = dict(model.named_modules())
    plan: dict[str, dict[str, Tensor]] = {}
    settings: set[tuple[int, float]] = set()
    experts = _expert_entries(model, config, groups, where)
    if experts and dora:
        raise IncompatibleAdapterError(f"{where}: DoRA on expert parameters (target_parameters): lorakit reads "
                                       "PEFT's parameter adapters as LoRA only")
    for module, entry in experts.items():
        if fields.r is not None and entry["lora_A"].shape[0] != fields.r:
            raise AdapterFileError(f"{where}: {module}: rank {entry['lora_A'].shape[0]} per expert in the tensors "
                                   f"but {fields.r} in the config")
        settings.add((int(entry["lora_A"].shape[0]), float(fields.lora_alpha)))
    for module, g in groups.items():
        target = modules.get(module)
        kind = layer_kind(target) if target is not None else None
        if kind is None:
            raise IncompatibleAdapterError(f"{where}: module {module!r} is missing from the model or cannot be adapted")
        emb = kind is LayerKind.EMBEDDING
        a, b = (g.get("eA"), g.get("eB")) if emb else (g.get("A"), g.get("B"))
        d_out, d_in = weight_shape(target)
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] \
                or (a.shape[1], b.shape[0]) != (d_in, d_out):
            raise IncompatibleAdapterError(
                f"{where}: {module}: LoRA tensors missing or of the wrong shape for this "
                f"{kind.value} layer (d_out, d_in) = {(d_out, d_in)}: "
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
        r_cfg = _pattern_value(fields.rank_pattern or {}, module, fields.r if fields.r is not None else r)
        if r_cfg != r:
            raise AdapterFileError(f"{where}: {module}: rank {r} in the tensors but {r_cfg} in the config")
        settings.add((r, float(_pattern_value(fields.alpha_pattern or {}, module, fields.lora_alpha))))
        plan[module] = entry
    if not plan and not experts:
        raise AdapterFileError(f"{where}: {WEIGHTS_FILE} holds no LoRA tensors")
    if len(settings) > 1:
        raise IncompatibleAdapterError(
            f"{where}: the layers use different (rank, alpha) pairs {sorted(settings)} (rank_pattern/alpha_pattern); "
            "a lorakit adapter has one rank and one alpha")
    (r, alpha), = settings
    order = [n for n in modules if n in plan] + list(experts)  # model order, then the experts' layers
    plan.update(experts)
    name = "default" if name is None else name
    method = method_for_peft("dora" if dora else "lora")
    options = get_method(method).config_cls.parse({"targets": order, "r": r, "alpha": alpha,
                                                   "use_rslora": bool(fields.use_rslora),
                                                   "dropout": float(fields.lora_dropout or 0.0)})
    tensors = {f"{target}.{key}": v for target, entry in plan.items() for key, v in entry.items()}
    attach_config(model, options, method, name=name, targets=order, init=False, tensors=tensors, where=f"{where}:")
    get_record(model, name).extra = {"imported_from": "peft"}
    return model
