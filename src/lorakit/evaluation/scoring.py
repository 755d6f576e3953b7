"""Likelihood scoring of completions: multiple choice without generation noise, and per-item losses.

A choice row is a prompt with several candidate completions, one right (``{"prompt", "choices", "answer"}``, as in
``bundled://data/definitions_choice.jsonl``: a held-out word and four glosses of the same part of speech). Each
candidate is scored by its mean log-probability per token as the completion of the prompt, tokenized exactly as
training tokenizes a prompt/completion record (completion tokens plus end-of-sequence); the model picks the best
scored one. Mean rather than total log-probability, so a short gloss is not preferred for being short (the rule is
fixed here, before any run).

All of a row's candidates are scored in one sequence, ``prompt + c_1 + ... + c_k``, whose attention mask lets each
candidate see the prompt and its own earlier tokens only, with positions restarting after the prompt: the prompt is
computed once, and each candidate's log-probabilities are exactly those of ``prompt + c_j`` alone. Only the
positions that predict candidate tokens go through the output head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.train.data import IGNORE, encode_record


def _tokens(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    ex = encode_record(tokenizer, {"prompt": prompt, "completion": completion}, "prompt_completion", add_eos=True,
                       where="choice row")
    n_prompt = sum(1 for label in ex.labels if label == IGNORE)
    return list(ex.input_ids[:n_prompt]), list(ex.input_ids[n_prompt:])


def _pack(prompt: list[int], choices: list[list[int]]) -> tuple[list[int], list[int], Tensor, list[list[int]]]:
    """``(ids, positions, allowed (T, T), predictor positions of each choice's tokens)``."""
    p = len(prompt)
    ids, pos, owner = list(prompt), list(range(p)), [-1] * p
    spans = []
    for j, c in enumerate(choices):
        start = len(ids)
        ids += c
        pos += list(range(p, p + len(c)))
        owner += [j] * len(c)
        # token t of choice j is predicted from the token before it: the prompt's last, then its own
        spans.append([p - 1] + list(range(start, start + len(c) - 1)))
    n = len(ids)
    own = torch.tensor(owner)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    same = (own[:, None] == own[None, :]) | (own[None, :] == -1)  # own choice, or the shared prompt
    return ids, pos, causal & same, spans


@torch.no_grad()
def choice_scores(model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], *,
                  batch_size: int = 16) -> list[list[float]]:
    """Mean log-probability per token of every candidate of every row (``[row][choice]``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    split = isinstance(head, nn.Linear) and isinstance(body, nn.Module) and body is not model
    out: list[list[float]] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            packed, targets = [], []
            for r in chunk:
                prompt, first = _tokens(tokenizer, r["prompt"], r["choices"][0])
                cands = [first] + [_tokens(tokenizer, r["prompt"], c)[1] for c in r["choices"][1:]]
                packed.append(_pack(prompt, cands))
                targets.append(cands)
            width = max(len(ids) for ids, *_ in packed)
            ids_t = torch.full((len(chunk), width), int(tokenizer.pad_token_id), dtype=torch.long)
            pos_t = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.eye(width, dtype=torch.bool).repeat(len(chunk), 1, 1)  # padding attends to itself
            for i, (ids, pos, allowed, _) in enumerate(packed):
                n = len(ids)
                ids_t[i, :n], pos_t[i, :n] = torch.tensor(ids), torch.tensor(pos)
                mask[i, :n, :n] = allowed
            kwargs = {"input_ids": ids_t.to(device), "position_ids": pos_t.to(device),
                      "attention_mask": mask[:, None].to(device)}
            rows_idx, cols, toks, owner = [], [], [], []
            for i, ((*_, spans), cands) in enumerate(zip(packed, targets, strict=True)):
                for j, (span, c) in enumerate(zip(spans, cands, strict=True)):
                    rows_idx += [i] * len(c)
                    cols += span
                    toks += c
                    owner += [(i, j)] * len(c)
            if split:
                hidden = body(**kwargs, use_cache=False)[0]  # (B, T, H)
                logits = head(hidden[torch.tensor(rows_idx), torch.tensor(cols)]).float()  # (N, V): needed rows
            else:
                logits = model(**kwargs).logits[torch.tensor(rows_idx), torch.tensor(cols)].float()
            logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(toks, device=device)[:, None])[:, 0]
            sums: dict[tuple[int, int], list[float]] = {}
            for key, v in zip(owner, logp.tolist(), strict=True):
                sums.setdefault(key, []).append(v)
            for i, cands in enumerate(targets):
                out.append([sum(sums[(i, j)]) / len(sums[(i, j)]) for j in range(len(cands))])
    finally:
        model.train(was_training)
    return out


def choice_eval(model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], *,
                batch_size: int = 16) -> dict[str, Any]:
    """Multiple-choice accuracy and the per-item loss of the right answer.

    Returns:
        ``choice_accuracy`` (share of rows whose right answer scores highest; a tie counts as wrong),
        ``choice_correct`` (1/0 per row), ``item_loss`` (per row: the right answer's mean negative log-likelihood
        per token, in nats) and ``choice_loss`` (their mean), ``choice_items``.
    """
    scores = choice_scores(model, tokenizer, rows, batch_size=batch_size)
    correct, loss = [], []
    for r, s in zip(rows, scores, strict=True):
        right = s[int(r["answer"])]
        correct.append(int(all(right > v for j, v in enumerate(s) if j != int(r["answer"]))))
        loss.append(-right)
    n = len(rows)
    return {"choice_accuracy": sum(correct) / n if n else math.nan, "choice_correct": correct,
            "item_loss": [round(v, 6) for v in loss], "choice_loss": sum(loss) / n if n else math.nan,
            "choice_items": n}


__all__ = ["choice_eval", "choice_scores"]
