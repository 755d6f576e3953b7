"""Mixture-of-experts weights as layers: every expert's projection seen as one linear layer an adapter can wrap.

Transformers 5 keeps the experts of Mixtral, Qwen-MoE, gpt-oss... as 3-D parameters of one ``*Experts`` module
(decorated with ``use_experts_implementation``): ``gate_up_proj`` ``(E, 2f, d)`` and ``down_proj`` ``(E, d, f)``
(``(E, d_in, d_out)`` when the module says ``is_transposed``), optional ``*_bias`` ``(E, d_out)``. Its eager forward
sends each token to its top-k experts and, per expert ``e``, computes ``h = gate(x W_gu[e]^T)``,
``y = h W_down[e]^T``, weighted by the router.

:class:`ExpertLinear` is a view of one slice ``W[e]`` as an ``nn.Linear`` (``(d_out, d_in)``, sharing storage with
the 3-D parameter, owning no parameter of its own), so the whole adapter contract applies to an expert unchanged:
each method's ``delta_weight``/forward per expert (rank ``r`` per expert, the usual scale), merge into the slice in
place, the fused low-rank path (``(W[e] x) + s B_e (A_e x)``: no ``(d_out, d_in)`` expert delta is ever formed),
save/load by name (``model.layers.0.mlp.experts.gate_up_proj.3``).

:class:`AdaptedExperts` replaces the experts module while any of its projections carries an adapter: it holds the
original module as ``base`` and, per 3-D projection, a ``ModuleList`` of its experts' layers, and computes the
eager forward through them (the same operations as transformers' eager loop, so an unadapted wrapper is the model's
function exactly). Detaching puts the original module back.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The 3-D projections of a ``use_experts_implementation`` experts module, in forward order.
PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


class ExpertLinear(nn.Linear):
    """Expert ``index`` of the 3-D parameter ``owner.<param>``, as a linear layer ``y = W[e] x (+ b[e])``.

    It holds no parameter: ``weight`` is a ``(d_out, d_in)`` view of the slice (its transpose when the experts are
    stored transposed), so writing into it (a merge) writes into the model's parameter.
    """

    def __init__(self, owner: nn.Module, param: str, index: int) -> None:
        nn.Module.__init__(self)
        self.__dict__["_owner"] = owner  # not a submodule: the owner is the wrapper's ``base``
        self.param, self.index = param, index
        self.transposed = bool(getattr(owner, "is_transposed", False))
        bias = f"{param}_bias"
        self.bias_name = bias if getattr(owner, "has_bias", False) and isinstance(getattr(owner, bias, None),
                                                                                     Tensor) else None
        w = self.weight
        self.out_features, self.in_features = int(w.shape[0]), int(w.shape[1])

    @property  # type: ignore[override]
    def weight(self) -> Tensor:
        w = getattr(self._owner, self.param)[self.index]
        return w.t() if self.transposed else w

    @property  # type: ignore[override]
    def bias(self) -> Tensor | None:
        return None if self.bias_name is None else getattr(self._owner, self.bias_name)[self.index]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"expert={self.index}, in_features={self.in_features}, out_features={self.out_features}"


def is_experts(module: nn.Module) -> bool:
    """An experts module lorakit can adapt: transformers' ``use_experts_implementation`` layout (3-D projections)."""
    if isinstance(module, AdaptedExperts) or not hasattr(module, "has_gate") or not hasattr(module, "num_experts"):
        return False
    names = ("gate_up_proj", "down_proj") if module.has_gate else ("up_proj", "down_proj")
    return all(isinstance(getattr(module, n, None), nn.Parameter) and getattr(module, n).dim() == 3 for n in names) \
        and bool(getattr(module, "is_concatenated", True)) and not getattr(module, "_is_expert_parallel", False)


class AdaptedExperts(nn.Module):
    """An experts module whose projections are per-expert layers (module docstring).

    Attributes:
        base: the original experts module (its 3-D parameters stay where they were).
        <projection>: a ``ModuleList`` of ``num_experts`` layers per 3-D projection (``gate_up_proj`` or
            ``up_proj``, and ``down_proj``): :class:`ExpertLinear` views, or adapted layers wrapping them.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not is_experts(base):
            raise TypeError(f"{type(base).__name__} is not an experts module lorakit can adapt")
        self.base = base
        self.projections = [p for p in PROJECTIONS if isinstance(getattr(base, p, None), nn.Parameter)
                            and getattr(base, p).dim() == 3]
        for p in self.projections:
            # (straight into _modules: add_module would see the base's parameter of that name through __getattr__)
            self._modules[p] = nn.ModuleList(ExpertLinear(base, p, e) for e in range(base.num_experts))

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """transformers' eager experts loop, each projection through its expert's layer."""
        base = self.base
        n = base.num_experts
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)  # (experts + 1, k, tokens)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        first = self.gate_up_proj if base.has_gate else self.up_proj
        for e in hit:
            if e == n:  # the sentinel of dropped tokens
                continue
            pos, tok = torch.where(mask[e])
            h = first[e](hidden_states[tok])
            h = base._apply_gate(h) if base.has_gate else base.act_fn(h)
            y = self.down_proj[e](h)
            if getattr(base, "has_post_expert_norm", False):
                y = base.post_expert_norm(y)
            y = y * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def layers(self) -> Iterator[nn.Module]:
        """Every per-expert layer (views and adapted layers)."""
        for p in self.projections:
            yield from getattr(self, p)

    def __getattr__(self, name: str):  # the experts' own attributes (num_experts, config...) stay readable
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self._modules["base"], name)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def uninstall(model: nn.Module, paths: list[str] | None = None) -> None:
    """Put the original experts module back wherever a wrapper (of ``paths``, default: any) holds no adapter."""
    from lorakit.core.layers import AdaptedLayer

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedExperts)]
    for path, module in wrapped:
        if (paths is None or path in paths) and not any(isinstance(x, AdaptedLayer) for x in module.layers()):
            _set(model, path, module.base)


def expert_paths(names: list[str]) -> dict[str, list[str]]:
    """``{"<experts>.<projection>": [target names]}`` for the per-expert targets among ``names``
    (``<experts>.<projection>.<e>``)."""
    out: dict[str, list[str]] = {}
    for n in names:
        head, _, idx = n.rpartition(".")
        if idx.isdigit() and head.rpartition(".")[2] in PROJECTIONS:
            out.setdefault(head, []).append(n)
    return out


def expert_views(path: str, module: nn.Module) -> Iterator[tuple[str, ExpertLinear]]:
    """``(name, view)`` of every expert of every 3-D projection of the experts module at ``path`` (not wrapped)."""
    for p in PROJECTIONS:
        w = getattr(module, p, None)
        if isinstance(w, nn.Parameter) and w.dim() == 3:
            for e in range(module.num_experts):
                yield f"{path}.{p}.{e}", ExpertLinear(module, p, e)


def find_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``, where a per-expert name (``<experts>.<projection>.<e>``) of an experts module
    that is not wrapped yet gives a view of that expert (:class:`ExpertLinear`)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        head, _, idx = name.rpartition(".")
        path, _, proj = head.rpartition(".")
        if idx.isdigit() and proj in PROJECTIONS:
            try:
                owner = model.get_submodule(path)
            except AttributeError:
                owner = None
            if owner is not None and is_experts(owner) and isinstance(getattr(owner, proj, None), nn.Parameter) \
                    and int(idx) < owner.num_experts:
                return ExpertLinear(owner, proj, int(idx))
        raise


def wrap_for(model: nn.Module, names: list[str]) -> None:
    """Wrap the experts modules that ``names`` (targets) reach into, where not wrapped yet."""
    for head in expert_paths(names):
        path = head.rpartition(".")[0]
        module = model.get_submodule(path)
        if is_experts(module):
            _set(model, path, AdaptedExperts(module))
