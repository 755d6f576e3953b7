"""Choosing which modules of a model get adapters."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

from torch import nn

from lorakit.core.layers import AdaptedLayer, LayerKind, layer_kind
from lorakit.errors import TargetError

ALL_LINEAR = "all-linear"
#: Task heads of Hugging Face models (``*ForSequenceClassification``, ``*ForQuestionAnswering``...):
#: they map to labels, not to hidden states, and are trained in full when needed, not adapted.
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs"})


def adaptable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every adaptable layer in model order; an :class:`AdaptedLayer` counts once."""
    inside: str | None = None  # prefix of the AdaptedLayer being skipped over
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(module, AdaptedLayer):
            inside = name + "."
            yield name, module
        elif name and layer_kind(module) is not None:
            yield name, module


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the modules that produce the model's outputs (excluded from ``all-linear``): the output
    embedding and anything under a top-level task head (:data:`HEAD_NAMES`)."""
    heads: set[str] = {n for n, _ in model.named_modules() if n.split(".", 1)[0] in HEAD_NAMES}
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    for name, module in model.named_modules():
        if out is not None and (module is out or (isinstance(module, AdaptedLayer) and module.base is out)):
            heads.add(name)
    return heads


def _is_linear(module: nn.Module) -> bool:
    return layer_kind(module) in (LayerKind.LINEAR, LayerKind.CONV1D)


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of 3 or more dimensions outside adaptable layers: the stacked expert weights of
    mixture-of-experts models (transformers 5 keeps Mixtral's, Qwen-MoE's... as ``experts x out x in``)."""
    adapted = tuple(n + "." for n, _ in adaptable_modules(model))
    convs = tuple(n + "." for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd))
    return {n: p for n, p in model.named_parameters() if p.dim() >= 3 and not n.startswith(adapted + convs)}


def describe_linear_layers(model: nn.Module, limit: int = 40) -> str:
    """A short listing of the model's linear layers, for error messages."""
    names = [n for n, m in adaptable_modules(model) if _is_linear(m)]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"linear layers: {shown or 'none'}; name suffixes: {', '.join(suffixes) or 'none'}"


def find_targets(model: nn.Module, targets: str | list[str] | tuple[str, ...]) -> list[str]:
    """Names of the modules selected by ``targets``, in model order.

    Args:
        targets: ``"all-linear"``: every ``nn.Linear``/``Conv1D`` except the output head;
            a list of exact module names or dotted suffixes (``"q_proj"`` matches ``...self_attn.q_proj``);
            any other string: a regular expression that must match the whole module name.

    Raises:
        TargetError: nothing matched (the message lists the model's linear layers), or a matched module
            is of a type no adapter supports.
    """
    if isinstance(targets, str) and targets == ALL_LINEAR:
        heads = _output_head_names(model)
        chosen = [n for n, m in adaptable_modules(model) if _is_linear(m) and n not in heads]
        if not chosen:
            raise TargetError(f"'all-linear' found no linear layer in the model (a {type(model).__name__}) "
                              "besides an output head")
        left = expert_parameters(model)
        if left:
            total = sum(p.numel() for p in model.parameters())
            share = sum(p.numel() for p in left.values()) / max(total, 1)
            names = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in left})
            warnings.warn(f"'all-linear' adapts linear layers only: {len(left)} expert parameter tensor(s), "
                          f"{100 * share:.1f}% of the model's weights ({', '.join(names[:4])}), are 3-D "
                          "(experts x out x in) and stay frozen without an adapter; lorakit has no expert "
                          "adapters yet", UserWarning, stacklevel=3)
        return chosen

    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise TargetError(f"targets {targets!r} is not a valid regular expression: {e}") from None
        matches = lambda name: pattern.fullmatch(name) is not None  # noqa: E731
    else:
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise TargetError(f"targets must be 'all-linear', a regex, or a non-empty list of names; got {targets!r}")
        wanted = tuple(targets)
        matches = lambda name: any(name == t or name.endswith("." + t) for t in wanted)  # noqa: E731

    adaptable = dict(adaptable_modules(model))
    chosen = [n for n in adaptable if matches(n)]
    unsupported = [n for n, m in model.named_modules() if n and n not in adaptable and matches(n)
                   and not any(n.startswith(a + ".") for a in adaptable)]
    if unsupported:
        kinds = {n: type(model.get_submodule(n)).__name__ for n in unsupported[:5]}
        experts = [n for n in expert_parameters(model) if any(n.startswith(u + ".") for u in unsupported)]
        why = (f" ({', '.join(experts[:2])} hold mixture-of-experts weights as 3-D parameters, which lorakit "
               "cannot adapt yet)") if experts else ""
        raise TargetError(
            f"targets {targets!r} matched modules that cannot be adapted: {kinds}{why}; supported types are "
            f"nn.Linear, transformers Conv1D and nn.Embedding. {describe_linear_layers(model)}")
    if not chosen:
        raise TargetError(f"targets {targets!r} matched no module. {describe_linear_layers(model)}")
    return chosen
