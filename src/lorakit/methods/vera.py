"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2023, https://arxiv.org/abs/2310.11454).

::

    y  = W0 x + diag(b) B diag(d) A x
    dW = diag(b) B diag(d) A

``A`` ``(r, d_in_max)`` and ``B`` ``(d_out_max, r)`` are random, frozen, and shared by every layer of one
adapter; a layer of shape ``(d_out, d_in)`` uses the top-left slices ``A[:, :d_in]`` and ``B[:d_out, :]``.
Only the vectors ``d`` ``(r,)`` (init ``d_init`` = 0.1) and ``b`` ``(d_out,)`` (init 0, so the model starts
unchanged) train: ``r + d_out`` per layer. The shared matrices cost ``r (d_in_max + d_out_max)`` once.

``A`` and ``B`` are kaiming-uniform with gain sqrt(2) (``U(-sqrt(6/fan_in), sqrt(6/fan_in))``, fan-in of the whole
shared matrix, as the reference implementation and PEFT; ``projection_init="linear"`` gives 0.1.0's) drawn on the CPU
from a local generator seeded with ``projection_seed``, so the global RNG is untouched and the same seed gives
the same matrices on any device. They live as buffers of one shared module (``model.lorakit_shared[name]``,
saved once as ``__shared__.vera_A`` / ``vera_B``); each layer reaches them through a plain (unregistered)
reference to that module, so ``model.to(...)`` moves the one copy and every layer sees the moved tensors.

A checksum of the matrices (SHA-256 of their values rounded to bfloat16, so casting the model does not break
it) is kept as the shared buffer ``checksum`` and saved with the adapter. Loading verifies it; with
``save_projections=False`` the matrices are not saved at all but regenerated from the seed, and the checksum
proves the regeneration is exact.

Fast path: the update is ``s diag(out) B mid A`` with ``mid = d`` and ``out = b`` (:meth:`Vera.lowrank`), so the
fused low-rank linear (:mod:`lorakit.core.lowrank`) computes the layer in one autograd function that keeps only
``A x`` ``(N, r)``: ``b`` is folded into ``B`` (no ``(N, d_out)`` temporary) and its gradient is
``rowsum(B * (g^T (d * A x)))``. The reference path (:meth:`Vera.forward`, fused paths off) keeps ``A x`` for
``d``'s gradient and ``B diag(d) A x`` ``(N, d_out)`` for ``b``'s; neither keeps ``x`` itself.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lorakit.core.contract import Adapter, AdapterConfig, cast
from lorakit.core.layers import AdaptedLayer, LayerInfo
from lorakit.core.lowrank import LowRank
from lorakit.errors import AdapterStateError, IncompatibleAdapterError


class VeraConfig(AdapterConfig):
    """Options of VeRA.

    Attributes:
        r: rank of the shared random matrices (> 0). It may exceed ``min(d_in, d_out)``: only ``d`` grows.
        d_init: initial value of every entry of ``d`` (> 0; with ``d = 0`` nothing would receive a gradient).
        projection_seed: seed of the shared random matrices.
        save_projections: store the shared matrices in the adapter file (default). If false only the seed and
            checksum are stored and loading regenerates them, which fails loudly if this PyTorch's RNG
            produces different numbers.
        projection_init: ``"kaiming"``: kaiming-uniform with gain sqrt(2), ``U(-sqrt(6/fan_in), sqrt(6/fan_in))``,
            as the VeRA reference and PEFT draw them (default); ``"linear"``: ``nn.Linear``'s default
            (``a = sqrt(5)``, a sqrt(6) times smaller bound), what lorakit 0.1.0 drew (adapters saved by it
            without this option load with it).
    """

    r: int = Field(256, gt=0)
    d_init: float = Field(0.1, gt=0.0)
    projection_seed: int = Field(0, ge=0)
    save_projections: bool = True
    projection_init: Literal["kaiming", "linear"] = "kaiming"


def projections(r: int, d_in_max: int, d_out_max: int, seed: int, init: str = "kaiming") -> tuple[Tensor, Tensor]:
    """The shared ``A (r, d_in_max)`` and ``B (d_out_max, r)``, fp32 on the CPU, from a local generator.

    ``init="kaiming"``: ``U(-sqrt(6/fan_in), sqrt(6/fan_in))`` (kaiming-uniform, gain sqrt(2): ``a = 0``), as the
    reference and PEFT; ``"linear"``: ``a = sqrt(5)``, bound ``sqrt(1/fan_in)`` (lorakit 0.1.0)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    slope = 0.0 if init == "kaiming" else math.sqrt(5)
    a = nn.init.kaiming_uniform_(torch.empty(r, d_in_max), a=slope, generator=g)
    b = nn.init.kaiming_uniform_(torch.empty(d_out_max, r), a=slope, generator=g)
    return a, b


def checksum(a: Tensor, b: Tensor) -> int:
    """A signed 64-bit digest of ``a`` and ``b``'s shapes and bfloat16-rounded values."""
    h = hashlib.sha256()
    for t in (a, b):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


class VeraProjections(nn.Module):
    """The frozen random matrices shared by all layers of one VeRA adapter (buffers only)."""

    def __init__(self, r: int, d_in_max: int, d_out_max: int, config: VeraConfig, device: torch.device,
                 *, init: bool) -> None:
        super().__init__()
        # When loading, saved projections overwrite these, so only generate when they will be used.
        if init or not config.save_projections:
            a, b = projections(r, d_in_max, d_out_max, config.projection_seed, config.projection_init)
            digest = checksum(a, b)
        else:
            a, b, digest = torch.empty(r, d_in_max), torch.empty(d_out_max, r), 0
        self.register_buffer("vera_A", a.to(device), persistent=config.save_projections)
        self.register_buffer("vera_B", b.to(device), persistent=config.save_projections)
        self.register_buffer("checksum", torch.tensor([digest], dtype=torch.int64, device=device))
        self._verified = init

    def verify(self, where: str = "") -> None:
        """Raise :class:`IncompatibleAdapterError` unless the matrices match the stored checksum (once)."""
        if self._verified:
            return
        if checksum(self.vera_A, self.vera_B) != int(self.checksum.item()):
            raise IncompatibleAdapterError(
                f"{where}: VeRA's shared random matrices do not match the checksum saved with the adapter "
                "(with save_projections=False this PyTorch regenerates different numbers from the seed; "
                "re-save the adapter with save_projections=True)")
        self._verified = True


class Vera(Adapter):
    """``dW = diag(b) B diag(d) A`` with shared frozen ``A``, ``B`` and trainable vectors ``d``, ``b``."""

    method = "vera"
    config_cls = VeraConfig
    bench_options = {"r": 256}
    peft_counterpart = "vera"
    swap_free_options = frozenset({"targets", "d_init"})  # r sets the shared projections' shape: fixed
    relative_lr = 10.0  # scaling vectors only (the paper: about 10x LoRA's)
    legacy_defaults = {"projection_init": "linear"}
    config: VeraConfig
    projections: VeraProjections

    def __init__(self, layer: LayerInfo, config: VeraConfig, shared: nn.Module | None = None,
                 *, init: bool = True) -> None:
        super().__init__(layer, config, shared, init=init)
        if not isinstance(shared, VeraProjections):
            raise AdapterStateError("VeRA layers need the shared projections built by Vera.create_shared")
        if shared.vera_A.shape[1] < layer.d_in or shared.vera_B.shape[0] < layer.d_out:
            raise AdapterStateError(f"VeRA's shared projections are too small for layer {layer.name!r}")
        # Unregistered on purpose: registering would make every layer own (and save, and move) a copy.
        self.__dict__["projections"] = shared
        self.d_in, self.d_out = layer.d_in, layer.d_out
        kw = {"device": layer.device, "dtype": torch.float32}
        self.lambda_d = nn.Parameter(torch.full((config.r,), config.d_init, **kw))
        self.lambda_b = nn.Parameter(torch.zeros(layer.d_out, **kw))

    @classmethod
    def create_shared(cls, layers: list[LayerInfo], config: VeraConfig,  # type: ignore[override]
                      *, init: bool = True) -> VeraProjections:
        d_in_max = max(li.d_in for li in layers)
        d_out_max = max(li.d_out for li in layers)
        return VeraProjections(config.r, d_in_max, d_out_max, config, layers[0].device, init=init)

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """``b`` scales the output, like LoRA's ``B``: it is LoRA+'s "B" side; ``d`` (on ``A x``) is "A".

        This is a structural analogy; the LoRA+ paper does not study VeRA.
        """
        return {"A": [self.lambda_d], "B": [self.lambda_b]}

    def sliced(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """This layer's views ``A[:, :d_in]`` ``(r, d_in)`` and ``B[:d_out, :]`` ``(d_out, r)``."""
        a = self.projections.vera_A[:, : self.d_in]
        b = self.projections.vera_B[: self.d_out, :]
        if a.device != device:  # layers spread over devices (model parallel): copy per call
            a, b = a.to(device), b.to(device)
        return a, b

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        a, b = self.sliced(self.lambda_b.device)
        scaled_a = self.lambda_d.float()[:, None] * a.float()  # (r, d_in)
        return (self.lambda_b.float()[:, None] * b.float()) @ scaled_a  # (d_out, d_in)

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        a, b = self.sliced(x.device)
        h = layer.project(x, a) * cast(self.lambda_d, x)  # (..., r); keeps A x for d's gradient
        h = F.linear(h.to(base_out.dtype), cast(b, base_out))  # (..., d_out); B is frozen: keeps nothing
        return h * cast(self.lambda_b, base_out)  # keeps B d A x for b's gradient

    def lowrank(self, layer: AdaptedLayer) -> LowRank | None:
        """``A``, ``B`` (this layer's slices, frozen), ``mid = d``, ``out = b``: the fused path and the exact PEFT
        export ``B' = diag(b) B diag(d)``, ``A' = A``."""
        if type(self).forward is not Vera.forward:
            return None
        a, b = self.sliced(self.lambda_b.device)
        return LowRank(a, b, mid=self.lambda_d, out=self.lambda_b)

    def load_tensors(self, tensors: Mapping[str, Tensor], *, where: str = "") -> None:
        super().load_tensors(tensors, where=where)
        # io fills the shared module before the layers, so the loaded matrices can be checked here.
        self.projections.verify(where)
