"""Model-level speed options: shared ``x A^T`` for sibling projections, per-layer ``torch.compile``, activation
checkpointing, and the causal-LM loss through a fused linear cross-entropy.

Each option computes the same function as the plain model; ``tests/test_kernels.py`` checks it.

Typical use (what ``lorakit bench`` and the trainer do)::

    lorakit.attach(model, "lora", r=16)
    lorakit.fast.speed.group_projections(model)       # one x [A_q; A_k; A_v]^T GEMM per attention block
    lorakit.fast.speed.compile_layers(model)          # GPU: torch.compile each decoder layer
    loss = lorakit.fast.speed.causal_lm_loss(model, input_ids, labels)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lorakit.core import lowrank
from lorakit.core.layers import AdaptedLayer
from lorakit.errors import ConfigError
from lorakit.fast.cross_entropy import kernel as cross_entropy_kernel
from lorakit.fast.cross_entropy import linear_cross_entropy, linear_token_logprobs, next_token_labels

#: Sibling projections that read the same input in common architectures (Llama/Mistral/Qwen attention and
#: MLP, BERT attention, Mixtral experts).
SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)


class ProjectionGroup:
    """Adapted layers that read the same input: ``x [A_1; ...; A_k]^T`` is computed once for all of them.

    The first member called with an input ``x`` computes ``H = x A_cat^T`` (``(..., sum r)``, one GEMM and,
    in backward, one GEMM for ``A``'s gradient and one for ``x``'s) and keeps the slices for the others; a
    member called with that same tensor object (checked by identity) takes its slice instead of recomputing
    ``x A_i^T``. The result is the same function: each slice is ``x A_i^T``. Anything unusual (a member with
    several pending adapters, a method without low-rank factors, dropout, a different input, fused paths
    off, tracing by ``torch.compile``) makes the members fall back to their own GEMM. The state is cleared
    when the last member has taken its slice and by a forward hook on the parent module, so no activation
    outlives the parent's forward.
    """

    def __init__(self, layers: list[AdaptedLayer]) -> None:
        self.layers = layers
        self.handles: list[RemovableHandle] = []
        self._x: Tensor | None = None
        self._hs: dict[int, Tensor] = {}

    def clear(self) -> None:
        """Drop the kept input and slices."""
        self._x, self._hs = None, {}

    def lookup(self, layer: AdaptedLayer, x: Tensor) -> Tensor | None:
        """``dropout(x) A^T`` of ``layer``'s pending adapter from the shared GEMM, or ``None``."""
        if torch.compiler.is_compiling():  # Inductor schedules the GEMMs itself; keep the graph pure
            return None
        if self._x is not x:
            self.clear()
            hs = self._project(x)
            if hs is None:
                return None
            self._x, self._hs = x, hs
        h = self._hs.pop(id(layer), None)
        if not self._hs:
            self.clear()
        return h

    def _project(self, x: Tensor) -> dict[int, Tensor] | None:
        factors = []
        for m in self.layers:
            pending = m.pending()
            if len(pending) != 1 or not lowrank.supports(m, x):
                return None
            get = getattr(m.adapters[pending[0]], "lowrank", None)
            f = get(m) if callable(get) else None
            if f is None or f.dropout > 0:  # one shared mask would change the function
                return None
            factors.append(f)
        a = torch.cat([f.a.to(x.dtype) for f in factors])  # (sum r, d_in)
        parts = F.linear(x, a).split([f.a.shape[0] for f in factors], dim=-1)  # each (..., r_i)
        return {id(m): p for m, p in zip(self.layers, parts, strict=True)}


def group_projections(model: nn.Module, siblings: tuple[tuple[str, ...], ...] = SIBLINGS) -> int:
    """Share one ``x A^T`` GEMM between adapted sibling projections (see :class:`ProjectionGroup`).

    Safe to call again after attaching or removing adapters (groups are rebuilt). Returns the number of
    groups made.
    """
    ungroup_projections(model)
    count = 0
    for parent in list(model.modules()):
        for names in siblings:
            members = [getattr(parent, n, None) for n in names]
            layers = [m for m in members if isinstance(m, AdaptedLayer)]
            if len(layers) < 2:
                continue
            group = ProjectionGroup(layers)
            group.handles.append(parent.register_forward_hook(lambda *_, g=group: g.clear()))
            for layer in layers:
                layer.projection_group = group
            count += 1
    return count


def ungroup_projections(model: nn.Module) -> None:
    """Undo :func:`group_projections`."""
    for m in model.modules():
        group = getattr(m, "projection_group", None) if isinstance(m, AdaptedLayer) else None
        if group is not None:
            m.projection_group = None
            for h in group.handles:
                h.remove()
            group.handles.clear()
            group.clear()


# --- compile, checkpointing --------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer: the longest ``nn.ModuleList`` whose items share one type."""
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and len({type(c) for c in m}) == 1:
            best = list(m)
    return best


def compile_layers(model: nn.Module, **compile_kwargs: Any) -> int:
    """``torch.compile`` each decoder layer in place (``nn.Module.compile``: names and state dict unchanged).

    Compiling per layer rather than the whole model keeps compile time to one layer's graph (the layers
    share their code) and leaves the loss, the embedding and Python control flow in eager mode. The fused
    adapter paths trace without graph breaks. Returns the number of layers compiled.

    Raises:
        ConfigError: no repeated layers were found.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"found no decoder layers to compile in {type(model).__name__}")
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing of each decoder layer, non-reentrant, for any lorakit method.

    Non-reentrant checkpointing recomputes each layer in backward with the same random state, so every
    method (fused or not, with dropout or not) gets the gradients it gets without checkpointing.

    Raises:
        ConfigError: the model has no Hugging Face checkpointing support.
    """
    kwargs = {"use_reentrant": False}
    if getattr(model, "supports_gradient_checkpointing", False):
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing")


# --- loss --------------------------------------------------------------------------------------------------
#: Causal LMs whose logits are exactly ``lm_head(last_hidden_state)`` (no softcapping or logit scaling).
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3"})


def causal_lm_loss(model: nn.Module, input_ids: Tensor | None = None, labels: Tensor | None = None, *,
                   attention_mask: Tensor | None = None, inputs_embeds: Tensor | None = None,
                   position_ids: Tensor | None = None) -> Tensor:
    """The model's causal-LM loss, through :func:`lorakit.fast.cross_entropy.linear_cross_entropy` when possible.

    Same value as ``model(input_ids, labels=labels).loss``, without the ``(N, V)`` logits (and without the
    head weight's gradient when the head is frozen). Falls back to the model's own loss for architectures
    not in :data:`PLAIN_HEAD_MODELS`, for an adapted output head, or when fused paths are off.
    """
    if labels is None:
        raise ConfigError("causal_lm_loss needs labels")
    parts = _body_and_head(model)
    if parts is None:
        return model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                     position_ids=position_ids, labels=labels).loss
    body, head = parts
    hidden = body(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                  position_ids=position_ids,
                  use_cache=False)[0]  # (B, T, H)
    return linear_cross_entropy(hidden, head.weight, labels, head.bias)


def token_logprobs(model: nn.Module, input_ids: Tensor, labels: Tensor, *, attention_mask: Tensor | None = None,
                   position_ids: Tensor | None = None, fused: bool = True) -> Tensor:
    """``(B, T)`` fp32 log-probabilities of each next label under ``model`` (0 where the label is ignored; see
    :func:`lorakit.fast.cross_entropy.linear_token_logprobs`), through the fused head when ``fused`` and the
    architecture allows it (no ``(B, T, V)`` logits), else from the model's logits."""
    parts = _body_and_head(model) if fused else None
    if parts is not None:
        body, head = parts
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False)[0]
        return linear_token_logprobs(hidden, head.weight, labels, head.bias)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    shifted = next_token_labels(labels)
    valid = shifted.ne(-100)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, shifted.masked_fill(~valid, 0).unsqueeze(-1))
    return logp.squeeze(-1) * valid


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The decoder and the plain linear head :func:`causal_lm_loss` fuses with the loss, or ``None`` when it
    must use the model's own loss."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if (not lowrank.fused_enabled() or model_type not in PLAIN_HEAD_MODELS or type(head) is not nn.Linear
            or not isinstance(body, nn.Module) or body is model):
        return None
    return body, head


def loss_kernel(model: nn.Module) -> str:
    """Which loss :func:`causal_lm_loss` computes for ``model`` now: ``liger`` or ``chunked`` (the fused linear
    cross-entropy, :func:`lorakit.fast.cross_entropy.kernel`), or ``model`` (the model's own full-logit loss)."""
    parts = _body_and_head(model)
    return "model" if parts is None else cross_entropy_kernel(parts[1].weight.device)
