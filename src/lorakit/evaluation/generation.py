"""Evaluation helpers for comparing fine-tuning methods: task accuracy by greedy generation, held-out loss
(forgetting), the activation memory one training step keeps for backward, and process memory.

* **Accuracy** (arithmetic task): greedy decoding of each eval prompt, then exact match of
  :func:`lorakit.evaluation.tasks.extract_answer` (the last ``"The answer is N"``) against the row's ``answer``.
* **Token F1** (generation tasks without one right answer, such as the bundled ``definitions`` task): greedy
  decoding of each eval prompt, cut at its first line break, scored against the row's ``completion`` by
  :func:`token_f1` (SQuAD-style bag-of-words F1 on lowercased alphanumeric tokens).
* **Forgetting**: the token-weighted loss on text the base model was pretrained on (the bundled
  ``pretrain_heldout.jsonl``) after fine-tuning minus before, in nats per token (Biderman et al. 2024,
  "LoRA Learns Less and Forgets Less", https://arxiv.org/abs/2405.09673, measure forgetting the same way
  on source-domain tasks).
* **Saved activations**: bytes autograd keeps for backward during one forward pass (each storage once,
  parameters and buffers excluded), measured with ``torch.autograd.graph.saved_tensors_hooks``. This is the
  quantity LoRA-FA (https://arxiv.org/abs/2308.03303) reduces, and it does not depend on allocator noise.
"""

from __future__ import annotations

import os
import re
import resource
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.evaluation.tasks import extract_answer
from lorakit.inference.decode import SamplingParams, complete

# --- task accuracy -------------------------------------------------------------------------------------------
from lorakit.train.batching import collate
from lorakit.train.data import Dataset, read_jsonl, tokenize


def answer_rows(path: str | os.PathLike[str], limit: int | None = None) -> list[dict[str, Any]]:
    """The ``{"prompt", "answer"}`` rows of a JSONL file (first ``limit``); empty if it has no answers."""
    return _prompt_rows(path, limit, lambda r: r.get("answer") is not None)


def _prompt_rows(path: str | os.PathLike[str], limit: int | None, keep: Callable[[dict[str, Any]], bool]
                 ) -> list[dict[str, Any]]:
    """The rows of a JSONL file with a string ``prompt`` that ``keep`` accepts (first ``limit``)."""
    rows = [obj for _, obj in read_jsonl(path) if isinstance(obj.get("prompt"), str) and keep(obj)]
    return rows[:limit] if limit is not None else rows


def choice_rows(path: str | os.PathLike[str], limit: int | None = None) -> list[dict[str, Any]]:
    """Multiple-choice rows (``prompt``, ``choices``, ``answer``) of a JSONL file, the first ``limit`` of them."""
    return _prompt_rows(path, limit, lambda r: isinstance(r.get("choices"), list) and len(r["choices"]) > 1
                        and isinstance(r.get("answer"), int) and 0 <= r["answer"] < len(r["choices"]))


def completion_rows(path: str | os.PathLike[str], limit: int | None = None) -> list[dict[str, Any]]:
    """The ``{"prompt", "completion"}`` rows of a JSONL file (first ``limit``), for :func:`completion_f1`."""
    return _prompt_rows(path, limit, lambda r: isinstance(r.get("completion"), str))


def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 48,
             batch_size: int = 32) -> list[str]:
    """Greedy completions of ``prompts`` (prompt excluded), batched by :func:`lorakit.inference.complete`.

    Prompts are tokenized with special tokens, exactly as the training data's prompts are
    (:func:`lorakit.train.data.encode_record`), so the model sees the same prefix it was trained on.
    """
    ids = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    return [c.text for c in complete(model, tokenizer, ids, SamplingParams(max_tokens=max_new_tokens),
                                     batch_size=batch_size)]


def task_accuracy(model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], *, max_new_tokens: int = 48,
                  batch_size: int = 32) -> dict[str, Any]:
    """Exact-match accuracy of greedy generations on ``rows`` (``{"prompt", "answer"}``).

    Returns:
        ``{"accuracy", "correct", "examples", "samples"}``; ``samples`` holds the first three
        ``{"prompt", "completion", "answer", "predicted"}`` for the report.
    """
    if not rows:
        return {"accuracy": None, "correct": 0, "examples": 0, "samples": []}
    completions = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                           batch_size=batch_size)
    predicted = [extract_answer(c) for c in completions]
    correct = sum(p is not None and p == str(r["answer"]) for p, r in zip(predicted, rows, strict=True))
    samples = [{"prompt": r["prompt"], "completion": c, "answer": str(r["answer"]), "predicted": p}
               for r, c, p in list(zip(rows, completions, predicted, strict=True))[:3]]
    return {"accuracy": correct / len(rows), "correct": correct, "examples": len(rows), "samples": samples}


_WORD = re.compile(r"[a-z0-9]+")


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between two texts (as SQuAD scores free-form answers), in ``[0, 1]``.

    Both texts are lowercased and split into alphanumeric tokens (punctuation and spacing ignored); precision
    and recall count each token at most as often as it occurs in the other text. Two texts without tokens
    score 1.0; exactly one without tokens scores 0.0.

    >>> token_f1("a sheltered port", "a port where ships shelter")
    0.5
    """
    pred, ref = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    if not pred or not ref:
        return float(pred == ref)
    ref_counts: dict[str, int] = {}
    for t in ref:
        ref_counts[t] = ref_counts.get(t, 0) + 1
    common = 0
    for t in pred:
        if ref_counts.get(t, 0) > 0:
            ref_counts[t] -= 1
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def completion_f1(model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], *, max_new_tokens: int = 40,
                  batch_size: int = 32) -> dict[str, Any]:
    """Mean :func:`token_f1` of greedy generations against the rows' ``completion`` (``{"prompt", "completion"}``).

    Each generation is cut at its first line break (one-line targets; an untuned model tends to go on with a
    next item).

    Returns:
        ``{"token_f1", "examples", "samples"}``; ``samples`` holds the first three
        ``{"prompt", "completion", "predicted", "f1"}``.
    """
    rows = [r for r in rows if isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str)]
    if not rows:
        return {"token_f1": None, "examples": 0, "samples": []}
    outputs = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                       batch_size=batch_size)
    predicted = [o.strip().split("\n", 1)[0].strip() for o in outputs]
    scores = [token_f1(p, r["completion"]) for p, r in zip(predicted, rows, strict=True)]
    samples = [{"prompt": r["prompt"], "completion": r["completion"], "predicted": p, "f1": round(f, 4)}
               for r, p, f in list(zip(rows, predicted, scores, strict=True))[:3]]
    return {"token_f1": sum(scores) / len(scores), "examples": len(rows), "samples": samples}


def text_dataset(path: str | os.PathLike[str], tokenizer: Any, max_length: int) -> Dataset:
    """A JSONL file of ``{"text"}`` rows tokenized for loss evaluation (truncated to ``max_length``)."""
    return tokenize(read_jsonl(path), tokenizer, fmt="text", max_length=max_length, source=str(path))


# --- memory ----------------------------------------------------------------------------------------------------
def tensor_storages(t: Tensor) -> list[tuple[int, int]]:
    """``(data_ptr, nbytes)`` of the storages behind ``t``: its own, or for a wrapper tensor subclass that has
    none (torchao's NF4 / int8 weights) those of the plain tensors it is made of (``__tensor_flatten__``)."""
    if type(t) in (Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        try:
            st = t.untyped_storage()
            return [(st.data_ptr(), st.nbytes())]
        except (RuntimeError, NotImplementedError):
            return []
    names, _ = t.__tensor_flatten__()
    return [s for n in names if isinstance(inner := getattr(t, n, None), Tensor) for s in tensor_storages(inner)]


def saved_activation_bytes(model: nn.Module, step: Callable[[], Tensor]) -> int:
    """Bytes autograd keeps for backward while ``step()`` builds the graph (then it runs backward).

    Each storage is counted once; the model's parameters and buffers are not activations and are excluded.
    Gradients are zeroed afterwards, so the model's state is left as it was.
    """
    own = {ptr for t in [*model.parameters(), *model.buffers()] for ptr, _ in tensor_storages(t)}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        for ptr, nbytes in tensor_storages(t):
            if ptr != 0 and ptr not in own:
                seen[ptr] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def training_batch(data: Dataset, batch_size: int, pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """The first ``batch_size`` examples of ``data`` as one padded batch on ``device``."""
    batch = collate(data.examples[:batch_size], pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``; ``ru_maxrss`` elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) so a later :func:`window_peak_rss` covers only what
    follows; ``False`` where unsupported (then the process-wide peak is all there is)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def window_peak_rss() -> int | None:
    """Peak RSS since the last :func:`reset_peak_rss` (Linux ``VmHWM``), or ``None`` where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def dir_bytes(path: str | os.PathLike[str]) -> int:
    """Total size of the files under ``path`` (an adapter directory)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


__all__ = [
    "answer_rows",
    "completion_f1",
    "completion_rows",
    "dir_bytes",
    "generate",
    "peak_rss_bytes",
    "reset_peak_rss",
    "rss_bytes",
    "saved_activation_bytes",
    "task_accuracy",
    "tensor_storages",
    "text_dataset",
    "token_f1",
    "training_batch",
    "window_peak_rss",
]
