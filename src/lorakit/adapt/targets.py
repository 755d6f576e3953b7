"""Choosing which modules of a model get adapters."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

from torch import nn

from lorakit.core.experts import AdaptedExperts, expert_paths, expert_views, is_experts
from lorakit.core.layers import AdaptedLayer, LayerKind, layer_kind, weight_shape
from lorakit.errors import TargetError

ALL_LINEAR = "all-linear"
#: Task heads of Hugging Face models (``*ForSequenceClassification``, ``*ForQuestionAnswering``...):
#: they map to labels, not to hidden states, and are trained in full when needed, not adapted.
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs"})


def adaptable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every adaptable layer in model order; an :class:`AdaptedLayer` counts once. The
    experts of a mixture-of-experts module count one layer per expert and projection
    (``<experts>.gate_up_proj.<e>``: :mod:`lorakit.core.experts`), as views until an adapter wraps them."""
    inside: str | None = None  # prefix of the AdaptedLayer (or experts' base) being skipped over
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(module, AdaptedLayer):
            inside = name + "."
            yield name, module
        elif isinstance(module, AdaptedExperts):
            inside = name + ".base"  # its 3-D parameters are seen through the per-expert layers
        elif name and is_experts(module):
            inside = name + "."
            yield from expert_views(name, module)
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
    covered = tuple(n + "." for n, m in model.named_modules() if is_experts(m) or isinstance(m, AdaptedExperts)
                    or isinstance(m, nn.modules.conv._ConvNd))
    return {n: p for n, p in model.named_parameters() if p.dim() >= 3 and not n.startswith(adapted + covered)}


def describe_linear_layers(model: nn.Module, limit: int = 40) -> str:
    """A short listing of the model's linear layers, for error messages."""
    names = [n for n, m in adaptable_modules(model) if _is_linear(m)]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"linear layers: {shown or 'none'}; name suffixes: {', '.join(suffixes) or 'none'}"


def find_targets(model: nn.Module, targets: str | list[str] | tuple[str, ...]) -> list[str]:
    """Names of the modules selected by ``targets``, in model order.

    Args:
        targets: ``"all-linear"``: every ``nn.Linear``/``Conv1D`` except the output head and scalar gates (one
            output), and every expert of a mixture-of-experts experts module (not its router);
            a list of exact module names or dotted suffixes (``"q_proj"`` matches ``...self_attn.q_proj``);
            any other string: a regular expression that must match the whole module name.

    Raises:
        TargetError: nothing matched (the message lists the model's linear layers), or a matched module
            is of a type no adapter supports.
    """
    if isinstance(targets, str) and targets == ALL_LINEAR:
        heads = _output_head_names(model)
        # a linear layer with one output is a scalar gate (Qwen-MoE's shared_expert_gate), not a projection
        chosen = [n for n, m in adaptable_modules(model) if _is_linear(m) and n not in heads and weight_shape(m)[0] > 1]
        if not chosen:
            raise TargetError(f"'all-linear' found no linear layer in the model (a {type(model).__name__}) "
                              "besides an output head")
        left = expert_parameters(model)
        if left:
            total = sum(p.numel() for p in model.parameters())
            share = sum(p.numel() for p in left.values()) / max(total, 1)
            names = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in left})
            warnings.warn(f"'all-linear' left {len(left)} parameter tensor(s) of 3 or more dimensions, "
                          f"{100 * share:.1f}% of the model's weights ({', '.join(names[:4])}), frozen without an "
                          "adapter: lorakit adapts experts kept in transformers' use_experts_implementation "
                          "layout (3-D gate_up_proj/up_proj/down_proj), and these are not", UserWarning,
                          stacklevel=3)
        return chosen

    adaptable = dict(adaptable_modules(model))
    experts = {n for names in expert_paths(list(adaptable)).values() for n in names}
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

    # an expert is chosen by its own name, its 3-D parameter's (``experts.gate_up_proj``: each of its experts) or
    # its experts module's (``experts``: both projections of every expert)
    chosen = [n for n in adaptable if matches(n) or (n in experts and (
        matches(n.rpartition(".")[0]) or matches(n.rpartition(".")[0].rpartition(".")[0])))]
    unsupported = [n for n, m in model.named_modules() if n and n not in adaptable and matches(n)
                   and not any(n.startswith(a + ".") for a in adaptable)
                   and not any(a.startswith(n + ".") for a in chosen)]
    if unsupported:
        kinds = {n: type(model.get_submodule(n)).__name__ for n in unsupported[:5]}
        stacked = [n for n in expert_parameters(model) if any(n.startswith(u + ".") for u in unsupported)]
        why = (f" ({', '.join(stacked[:2])} hold mixture-of-experts weights as 3-D parameters in a layout lorakit "
               "cannot adapt: it adapts transformers' use_experts_implementation experts)") if stacked else ""
        if any(type(model.get_submodule(n)).__name__.endswith("Router") for n in unsupported):
            why += (" (a mixture-of-experts router is not a linear layer and gets no adapter; train it with "
                    "method 'full' if it must change)")
        raise TargetError(
            f"targets {targets!r} matched modules that cannot be adapted: {kinds}{why}; supported types are "
            f"nn.Linear, transformers Conv1D and nn.Embedding. {describe_linear_layers(model)}")
    if not chosen:
        raise TargetError(f"targets {targets!r} matched no module. {describe_linear_layers(model)}")
    return chosen
