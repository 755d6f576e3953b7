"""Does the dynamic-rank method put its rank where the task needs it? A controlled experiment.

The seed article's dynamic-rank method (``rank1-sum``: gated rank-1 updates, pruned AdaLoRA-style to a global
budget, :mod:`lorakit.methods.rank1_sum_pruning`) claims that it gives more rank to the layers and the data that
need it. On a real task nobody knows which layers need rank, so this experiment builds a task where the answer is
known:

* **Teacher** = the base model with a known rank-``k`` change on a few chosen linears only (:data:`RELEVANT`):
  ``W <- W + dW``, ``dW = eps sigma_1(W) U V^T`` (:func:`perturb_`).
* **Student** = the base model with a rank1-sum adapter on *every* linear (``r_init`` each, global budget
  ``target_rank x layers``), trained to match the teacher's next-token distribution (KL(teacher || student) per
  token) on bundled text. Only the relevant linears differ, so a method that allocates well keeps its rank there.
* **Easier vs harder**: the same task with ``k`` small (:data:`EASY_RANK`) and large (:data:`HARD_RANK`). The
  harder version needs more rank in the relevant linears; under the same budget their share should grow.

``python scripts/rank_allocation.py`` runs it (3 seeds per version, a few minutes on a CPU) and writes
``results.json`` and ``report.md`` with the verdicts of :func:`lorakit.evaluation.claims.claim_rank_allocation` and
:func:`~lorakit.evaluation.claims.claim_dynamic_rank` (against a uniform fixed-rank LoRA at the same budget, run on
the harder teacher with the same seeds, steps and learning rate).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.adapt.model import attach, training_callbacks
from lorakit.evaluation.compare_config import resolve_data_path
from lorakit.methods.rank1_sum_pruning import live_ranks
from lorakit.train.data import read_jsonl
from lorakit.util import resources

#: The linears the teacher changes (of the bundled 4-layer model): one attention and one MLP projection.
RELEVANT = ("model.layers.1.self_attn.v_proj", "model.layers.2.mlp.down_proj")
EASY_RANK = 1
HARD_RANK = 6
#: Size of the teacher's change per direction, relative to the weight's top singular value.
EPS = 3.0


def perturb_(model: nn.Module, modules: Sequence[str], rank: int, eps: float, generator: torch.Generator) -> None:
    """Add ``dW = eps sigma_1 U V^T`` to each module's weight: ``V`` the top ``rank`` right singular vectors of
    ``W`` (inputs the layer responds to: a random input direction barely moves a trained model), ``U`` random
    orthonormal columns, ``sigma_1`` the top singular value; ``rank(dW) = rank``."""
    with torch.no_grad():
        for path in modules:
            w = model.get_submodule(path).weight
            _, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
            u, _ = torch.linalg.qr(torch.randn(w.shape[0], rank, generator=generator, dtype=torch.float64))
            w.add_((eps * sv[0] * u @ vh[:rank]).to(w.dtype))


def text_chunks(tokenizer: Any, path: str, length: int) -> Tensor:
    """The texts of a ``{"text"}`` JSONL file tokenized, concatenated and cut into rows of ``length`` tokens."""
    ids: list[int] = []
    for _, row in read_jsonl(path):
        if isinstance(row.get("text"), str):
            ids.extend(tokenizer(row["text"], add_special_tokens=False)["input_ids"])
    n = len(ids) // length
    if n < 2:
        raise ValueError(f"{path}: too little text for rows of {length} tokens")
    return torch.tensor(ids[:n * length]).view(n, length)


def kl_per_token(student_logits: Tensor, teacher_logp: Tensor) -> Tensor:
    """Mean over tokens of KL(teacher || student) in nats."""
    logq = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - logq)).sum(-1).mean()


def run_one(load: Callable[[], nn.Module], data: Tensor, *, rank: int, seed: int, steps: int = 150,
            batch_size: int = 16, lr: float = 1e-2, r_init: int = 8, target_rank: int = 2,
            relevant: Sequence[str] = RELEVANT, eps: float = EPS, fixed: bool = False) -> dict[str, Any]:
    """One (version, seed): the teacher's change of rank ``rank``, the student trained ``steps`` steps; the final
    rank of every adapted linear, KL before and after, and the relevant linears' share of the budget.

    ``fixed``: the baseline instead, LoRA with the uniform rank ``target_rank`` on every linear (the rank1-sum
    budget's parameters, less its gates) and the same scale ``2``, steps, learning rate and batches."""
    g = torch.Generator().manual_seed(seed)
    teacher = load().eval()
    perturb_(teacher, relevant, rank, eps, g)
    student = load()
    torch.manual_seed(seed)
    if fixed:
        attach(student, "lora", r=target_rank, alpha=2.0 * target_rank)
    else:
        attach(student, "rank1-sum", r_init=r_init, target_rank=target_rank)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    callbacks = training_callbacks(student, opt, total_steps=steps)
    probe = data[:batch_size]

    def kl(batch: Tensor) -> Tensor:
        with torch.no_grad():
            t = F.log_softmax(teacher(input_ids=batch).logits.float(), dim=-1)
        return kl_per_token(student(input_ids=batch).logits, t)

    with torch.no_grad():
        kl_before = kl(probe).item()
    t0 = time.perf_counter()
    student.train()
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=g)
        loss = callbacks.regularize(kl(data[idx]))
        loss.backward()
        callbacks.before_step()
        opt.step()
        callbacks.step()
        opt.zero_grad(set_to_none=True)
    student.eval()
    with torch.no_grad():
        kl_after = kl(probe).item()
    params = sum(p.numel() for p in student.parameters() if p.requires_grad)
    if fixed:
        return {"rank": rank, "seed": seed, "method": "lora", "r": target_rank, "kl_before": kl_before,
                "kl_after": kl_after, "trainable_params": params, "train_s": round(time.perf_counter() - t0, 1)}
    ranks = live_ranks(student)
    total = sum(ranks.values())
    kept = sum(ranks[p] for p in relevant)
    return {"rank": rank, "seed": seed, "ranks": ranks, "kl_before": kl_before, "kl_after": kl_after,
            "relevant_rank": kept, "budget": total, "relevant_share": kept / total if total else None,
            "relevant_mean_rank": kept / len(relevant), "trainable_params": params,
            "other_mean_rank": (total - kept) / (len(ranks) - len(relevant)), "train_s": round(time.perf_counter()
                                                                                            - t0, 1)}


def run(model_path: str = "bundled://tiny-base", *, text: str = "bundled://data/pretrain_heldout.jsonl",
        seeds: Sequence[int] = (0, 1, 2), ranks: Sequence[int] = (EASY_RANK, HARD_RANK), steps: int = 150,
        length: int = 64, log: Callable[[str], None] = print, **kwargs: Any) -> dict[str, Any]:
    """Every (teacher rank, seed) of the experiment: ``{"settings", "runs"}``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resources.resolve(model_path, model=True, what="model") if resources.is_bundled(model_path) \
        else model_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = text_chunks(tokenizer, resolve_data_path(text), length)

    def load() -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    runs = []
    for rank in ranks:
        for seed in seeds:
            r = run_one(load, data, rank=rank, seed=seed, steps=steps, **kwargs)
            log(f"teacher rank {rank}, seed {seed}: KL {r['kl_before']:.4f} -> {r['kl_after']:.4f}, relevant "
                f"linears keep {r['relevant_rank']} of {r['budget']} ({r['relevant_share']:.0%}), mean rank "
                f"{r['relevant_mean_rank']:.1f} vs {r['other_mean_rank']:.2f} elsewhere ({r['train_s']:.0f} s)")
            runs.append(r)
    fixed_runs = []
    for seed in seeds:  # the fixed-rank baseline at the same budget, on the harder teacher
        r = run_one(load, data, rank=max(ranks), seed=seed, steps=steps, fixed=True, **kwargs)
        log(f"teacher rank {max(ranks)}, seed {seed}: fixed-rank LoRA r={r['r']}: KL {r['kl_before']:.4f} -> "
            f"{r['kl_after']:.4f} ({r['train_s']:.0f} s)")
        fixed_runs.append(r)
    hard = [r for r in runs if r["rank"] == max(ranks)]
    fixed_rank = {"r": fixed_runs[0]["r"] if fixed_runs else None,
                  "lora_params": fixed_runs[0]["trainable_params"] if fixed_runs else None,
                  "rank1_sum_params": hard[0]["trainable_params"] if hard else None}
    settings = {"model": model_path, "text": text, "relevant": list(kwargs.get("relevant", RELEVANT)),
                "eps": kwargs.get("eps", EPS), "steps": steps, "length": length, "seeds": list(seeds),
                "ranks": list(ranks), "easy_rank": min(ranks), "hard_rank": max(ranks),
                **{k: kwargs[k] for k in ("batch_size", "lr", "r_init", "target_rank") if k in kwargs}}
    return {"settings": settings, "runs": runs, "fixed_rank_runs": fixed_runs, "fixed_rank": fixed_rank}


__all__ = ["EASY_RANK", "EPS", "HARD_RANK", "RELEVANT", "kl_per_token", "perturb_", "run", "run_one",
           "text_chunks"]
