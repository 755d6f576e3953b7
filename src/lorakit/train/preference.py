"""Preference objectives on ``{prompt, chosen, rejected}`` pairs (``training.objective``), and DPO's reference.

For a pair with prompt ``x``, chosen answer ``y_w`` and rejected answer ``y_l``, ``log pi(y|x)`` is the sum of the
answer tokens' log-probabilities (:func:`lorakit.fast.speed.token_logprobs`; the prompt's tokens do not count) and
``|y|`` the answer's token count. Each loss is a mean over pairs; ``sigma`` is the logistic function.

- **DPO** (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290), with conservative label smoothing ``eps``::

      h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
      L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)          rewards r = beta (log pi - log pi_ref)

  The reference ``pi_ref`` is the model as it starts the run, before any update: the base with the fresh adapter
  (whose update starts at zero, so the base itself), or the parent adapter's model with ``adapter.continue_from``
  (an SFT adapter: the usual SFT-then-DPO recipe). The policy is the configured adapter. Its log-probabilities are
  computed once, before the first step, for exactly the training pairs the run will draw and for every held-out
  pair, and cached in the run directory (:data:`REFERENCE_FILE`, read back on ``--resume``): no second model in
  memory, and no reference forward per step.
- **SimPO** (Meng et al., 2024, https://arxiv.org/abs/2405.14734), reference-free, length-normalised, with a target
  margin ``gamma``::

      L = -log sigma(beta / |y_w| log pi(y_w|x) - beta / |y_l| log pi(y_l|x) - gamma)    r = beta / |y| log pi(y|x)

- **ORPO** (Hong et al., 2024, https://arxiv.org/abs/2403.07691), reference-free, the SFT loss plus an odds ratio
  (``beta`` is the paper's lambda)::

      P(y|x) = exp(log pi(y|x) / |y|),  odds(y|x) = P / (1 - P)
      L = NLL(y_w|x) - beta log sigma(log odds(y_w|x) - log odds(y_l|x))      r = beta log pi(y|x) / |y|

  (``NLL``: the mean over the chosen answers' tokens of the micro-batch).

Metrics (per logged step and on the held-out pairs): the loss, ``reward_accuracy`` (the share of pairs whose chosen
reward is above the rejected one; an exact tie counts one half, so a DPO policy that has not moved scores 0.5,
chance), ``reward_margin`` (mean chosen minus rejected reward), the mean rewards and the mean sequence
log-probabilities of the chosen and rejected answers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from lorakit.core.collectives import IGNORE
from lorakit.errors import ConfigError
from lorakit.fast.speed import token_logprobs
from lorakit.train.batching import collate, iter_batches
from lorakit.train.config import TrainingConfig
from lorakit.train.data import Dataset
from lorakit.train.example import Example
from lorakit.util.files import atomic_write

#: The default ``beta`` of each objective (DPO's and ORPO's papers and TRL: 0.1; SimPO's paper: 2.0).
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.1}
#: SimPO's default target margin: gamma / beta = 0.5, the ratio of the paper's Llama-3 setting.
DEFAULT_SIMPO_GAMMA = 1.0
#: DPO's cached reference log-probabilities, in the run directory.
REFERENCE_FILE = "reference_logps.safetensors"
STATS = ("reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected")


@dataclass
class PairOutcome:
    """One batch's objective: the loss and the per-pair rewards and sequence log-probabilities ``(B,)``."""

    loss: Tensor
    rewards_chosen: Tensor
    rewards_rejected: Tensor
    logps_chosen: Tensor
    logps_rejected: Tensor

    def sums(self) -> Tensor:
        """``[pairs, accurate pairs, then the sums over pairs of margin, chosen and rejected rewards, chosen and
        rejected log-probabilities]`` (fp64): what :meth:`PreferenceObjective.pop_stats` and evaluation add up."""
        c, r = self.rewards_chosen.detach().double(), self.rewards_rejected.detach().double()
        accurate = (c > r).double() + 0.5 * (c == r).double()
        return torch.stack([torch.tensor(float(c.numel()), dtype=torch.float64, device=c.device), accurate.sum(),
                            (c - r).sum(), c.sum(), r.sum(), self.logps_chosen.detach().double().sum(),
                            self.logps_rejected.detach().double().sum()])


def means(sums: Tensor) -> dict[str, float]:
    """The metrics (:data:`STATS`) from summed :meth:`PairOutcome.sums`."""
    n = max(float(sums[0]), 1.0)
    return {k: float(v) / n for k, v in zip(STATS, sums[1:].tolist(), strict=True)}


def sequence_logprobs(model: nn.Module, batch: dict[str, Tensor], *, fused: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(log pi(y|x), |y|, per-token log-probs)`` of every row of a pair batch (``2B`` rows: chosen, then
    rejected): sums over each row's labelled (answer) tokens."""
    per_token = token_logprobs(model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"],
                               position_ids=batch.get("position_ids"), fused=fused)  # (2B, T), 0 off the answer
    counts = (batch["labels"][:, 1:] != IGNORE).sum(-1)
    return per_token.sum(-1), counts, per_token


class PreferenceObjective:
    """``training.objective`` ``dpo``, ``simpo`` or ``orpo`` as a loss on pair batches (module docstring).

    Call it as the trainer's loss function, ``objective(model, batch)``; it keeps the batches' metrics until
    :meth:`pop_stats`.
    """

    def __init__(self, objective: str, *, beta: float | None = None, simpo_gamma: float | None = None,
                 label_smoothing: float | None = None, fused: bool = True) -> None:
        if objective not in DEFAULT_BETA:
            raise ConfigError(f"unknown preference objective {objective!r}; choose one of {sorted(DEFAULT_BETA)}")
        self.objective = objective
        self.beta = DEFAULT_BETA[objective] if beta is None else float(beta)
        self.gamma = DEFAULT_SIMPO_GAMMA if simpo_gamma is None else float(simpo_gamma)
        self.eps = float(label_smoothing or 0.0)
        self.fused = fused
        self._sums: Tensor | None = None

    @classmethod
    def from_config(cls, t: TrainingConfig, *, fused: bool) -> PreferenceObjective:
        return cls(t.objective, beta=t.beta, simpo_gamma=t.simpo_gamma, label_smoothing=t.label_smoothing,
                   fused=fused)

    @property
    def needs_reference(self) -> bool:
        return self.objective == "dpo"

    def outcome(self, logps: Tensor, counts: Tensor, reference: Tensor | None) -> PairOutcome:
        """The objective from the ``2B`` rows' sequence log-probs and answer lengths (and DPO's reference)."""
        lc, lr = logps.chunk(2)
        nc, nr = counts.clamp(min=1).to(logps.dtype).chunk(2)
        b = self.beta
        if self.objective == "dpo":
            if reference is None:
                raise ConfigError("DPO needs the reference log-probabilities of every pair (computed before the "
                                  "first step); this batch has none")
            rc, rr = reference.to(logps.device, logps.dtype).chunk(2)
            h = (lc - rc) - (lr - rr)
            loss = -(1 - self.eps) * F.logsigmoid(b * h) - self.eps * F.logsigmoid(-b * h)
            return PairOutcome(loss.mean(), b * (lc - rc).detach(), b * (lr - rr).detach(), lc, lr)
        ac, ar = lc / nc, lr / nr
        if self.objective == "simpo":
            loss = -F.logsigmoid(b * ac - b * ar - self.gamma)
            return PairOutcome(loss.mean(), b * ac.detach(), b * ar.detach(), lc, lr)
        # ORPO: log odds = log P - log(1 - P), with log(1 - exp(a)) = log(-expm1(a)) (a < 0)
        ac_, ar_ = ac.clamp(max=-1e-7), ar.clamp(max=-1e-7)
        log_odds = (ac_ - ar_) - (torch.log(-torch.expm1(ac_)) - torch.log(-torch.expm1(ar_)))
        nll = -lc.sum() / nc.sum()
        loss = nll - b * F.logsigmoid(log_odds).mean()
        return PairOutcome(loss, b * ac.detach(), b * ar.detach(), lc, lr)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logps, counts, _ = sequence_logprobs(model, batch, fused=self.fused)
        out = self.outcome(logps, counts, batch.get("reference_logps"))
        sums = out.sums()
        self._sums = sums if self._sums is None else self._sums + sums
        return out.loss

    def pop_stats(self, reduce: Callable[[Tensor], Tensor] = lambda t: t) -> dict[str, float]:
        """The metrics of the batches since the last call (``reduce``: a sum over processes)."""
        sums, self._sums = self._sums, None
        return {} if sums is None else means(reduce(sums))


# --- the reference ---------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_logprobs(model: nn.Module, examples: Sequence[Example], *, batch_size: int, pad_id: int,
                       device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager[Any]],
                       fused: bool, desc: str = "reference", progress: bool = True) -> Tensor:
    """``(n, 2)`` fp64: ``log pi(y_w|x)`` and ``log pi(y_l|x)`` of every pair under ``model`` as it is now (in eval
    mode: no dropout), ``batch_size`` pairs per forward."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(examples), 2, dtype=torch.float64)
    bar = tqdm(total=len(examples), desc=desc, unit="pair", disable=not progress, leave=False)
    try:
        for i in range(0, len(examples), batch_size):
            chunk = [replace(e, reference=None) for e in examples[i:i + batch_size]]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            with autocast():
                logps, _, _ = sequence_logprobs(model, batch, fused=fused)
            out[i:i + len(chunk)] = logps.double().cpu().reshape(2, -1).t()
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return out


def with_reference(data: Dataset, indices: Sequence[int], values: Tensor) -> Dataset:
    """A copy of ``data`` whose examples ``indices`` carry the reference log-probabilities ``values`` ``(n, 2)``."""
    examples = list(data.examples)
    for i, (c, r) in zip(indices, values.tolist(), strict=True):
        examples[i] = replace(examples[i], reference=(c, r))
    return replace(data, examples=examples)


def used_indices(order: Any, micro_batches: int) -> list[int]:
    """The training examples the run's first ``micro_batches`` micro-batches draw (sorted, each once)."""
    seen: set[int] = set()
    for k in range(micro_batches):
        seen.update(order.indices(k))
    return sorted(seen)


def save_reference(path: Path, parts: dict[str, tuple[Sequence[int], Tensor]], sizes: dict[str, int]) -> None:
    """Write the cached reference: per part (``train``, ``eval``) the example indices and their ``(n, 2)`` values."""
    tensors: dict[str, Tensor] = {}
    for name, (idx, vals) in parts.items():
        tensors[f"{name}.index"] = torch.tensor(list(idx), dtype=torch.int64)
        tensors[f"{name}.logps"] = vals.contiguous()
    meta = {f"{k}.examples": str(v) for k, v in sizes.items()}
    atomic_write(path, lambda tmp: save_file(tensors, os.fspath(tmp), metadata=meta))


def load_reference(path: Path, sizes: dict[str, int]) -> dict[str, tuple[list[int], Tensor]]:
    """Read :func:`save_reference`'s file; :class:`ConfigError` if it is missing or was made for other data."""
    if not path.is_file():
        raise ConfigError(f"{path}: the run's cached DPO reference log-probabilities are missing, so the reference "
                          "model (the model as the run started) cannot be recovered on resume; start the run again "
                          "(--overwrite)")
    with safe_open(os.fspath(path), "pt") as f:
        meta = f.metadata() or {}
    for name, n in sizes.items():
        if meta.get(f"{name}.examples") != str(n):
            raise ConfigError(f"{path}: made for {meta.get(f'{name}.examples')} {name} examples, the data now has "
                              f"{n}; the data changed since the run started (start it again with --overwrite)")
    t = load_file(os.fspath(path))
    return {name: (t[f"{name}.index"].tolist(), t[f"{name}.logps"]) for name in sizes if f"{name}.index" in t}


def evaluate_pairs(objective: PreferenceObjective, model: nn.Module, batches: Iterable[dict[str, Tensor]],
                   autocast: Callable[[], contextlib.AbstractContextManager[Any]],
                   reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
    """``eval_loss`` (the objective, a mean over pairs) and the ``eval_`` metrics of :data:`STATS` on held-out
    pair batches (already on the device)."""
    total = None
    loss_sum = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        with autocast():
            logps, counts, _ = sequence_logprobs(model, batch, fused=objective.fused)
        out = objective.outcome(logps.float(), counts, batch.get("reference_logps"))
        s = out.sums().cpu()
        loss_sum += float(out.loss) * float(s[0])
        total = s if total is None else total + s
    if total is None:
        return {}
    summed = reduce(torch.cat([loss_sum.reshape(1), total]))
    res = {"eval_loss": float(summed[0]) / max(float(summed[1]), 1.0)}
    res.update({f"eval_{k}": v for k, v in means(summed[1:]).items()})
    return res


__all__ = ["DEFAULT_BETA", "REFERENCE_FILE", "PairOutcome", "PreferenceObjective", "evaluate_pairs", "load_reference",
           "reference_logprobs", "save_reference", "used_indices", "with_reference"]


# --- the trainer's side ------------------------------------------------------------------------------------------
def check_data(objective: str, train: Dataset, evald: Dataset | None) -> None:
    """Preference data for a preference objective, next-token data otherwise (a clear error, not a silent misfit)."""
    for name, data in (("data.train", train), ("data.eval", evald)):
        if data is None:
            continue
        if objective == "sft" and data.format == "preference":
            raise ConfigError(f"{name} ({data.source}) holds preference pairs (chosen/rejected); train them with "
                              "training.objective: dpo, simpo or orpo")
        if objective != "sft" and data.format != "preference":
            raise ConfigError(f"training.objective={objective} trains on preference pairs ({{prompt, chosen, "
                              f"rejected}}), but {name} ({data.source}) is {data.format!r} data")


def prepare(trainer: Any, order: Any, total: int, out: Path, *, fresh: bool) -> PreferenceObjective:
    """The run's objective; for DPO, the reference log-probabilities of the pairs the run will draw and of every
    held-out pair attached to the trainer's data: computed now with the model as it starts (a fresh run) and
    cached in ``out``, or read back from there (a resumed run)."""
    t = trainer.config.training
    objective = PreferenceObjective.from_config(t, fused=t.fused and not trainer.dist.fsdp)
    if not objective.needs_reference:
        return objective
    train, evald = trainer.train_data, trainer.eval_data
    sizes = {"train": len(train), **({"eval": len(evald)} if evald is not None else {})}
    path = out / REFERENCE_FILE
    if fresh:
        parts = {"train": used_indices(order, total * t.grad_accum)}
        if evald is not None:
            parts["eval"] = list(range(len(evald)))
        values = {}
        for name, idx in parts.items():
            data = train if name == "train" else evald
            values[name] = (idx, reference_logprobs(
                trainer.model, [data.examples[i] for i in idx], batch_size=t.eval_batch_size or t.batch_size,
                pad_id=trainer._pad_id, device=trainer.device, autocast=trainer._autocast, fused=objective.fused,
                desc=f"DPO reference ({name})", progress=trainer.config.output.progress and trainer.dist.is_main))
        trainer.dist.main_only(save_reference, path, values, sizes)
        trainer._log(f"DPO reference: log-probabilities of {len(parts['train'])} training pairs"
                     + (f" and {len(parts['eval'])} held-out pairs" if "eval" in parts else "")
                     + f" under the starting model, cached in {path}")
    else:
        values = trainer.dist.main_only(load_reference, path, sizes)
    trainer.train_data = with_reference(train, *values["train"])
    if evald is not None and "eval" in values:
        trainer.eval_data = with_reference(evald, *values["eval"])
    return objective


def evaluate(trainer: Any, data: Dataset) -> dict[str, float]:
    """:meth:`lorakit.Trainer.evaluate` on preference pairs: the objective and its metrics (``eval_`` keys). DPO
    outside a run (``lorakit eval``) reads the held-out pairs' reference from the run directory's cache."""
    t = trainer.config.training
    objective = trainer._objective or PreferenceObjective.from_config(t, fused=t.fused and not trainer.dist.fsdp)
    if objective.needs_reference and any(e.reference is None for e in data.examples):
        path = Path(trainer.config.output.dir) / REFERENCE_FILE
        cached = load_reference(path, {"eval": len(data)}) if path.is_file() else {}
        if "eval" not in cached:
            raise ConfigError(f"DPO evaluation compares with the reference model's log-probabilities, cached by "
                              f"`lorakit train` in {path}; none there for these {len(data)} held-out pairs")
        data = with_reference(data, *cached["eval"])
    model = trainer.model
    was_training = model.training
    model.eval()
    bs = t.eval_batch_size or t.batch_size
    try:
        with torch.no_grad():
            batches = (trainer._to_device(b) for b in iter_batches(trainer.dist.eval_shard(data), bs,
                                                                    trainer._pad_id))
            return evaluate_pairs(objective, model, batches, trainer._autocast, trainer.dist.eval_total)
    finally:
        model.train(was_training)
