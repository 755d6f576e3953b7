"""Preference pairs: TRL's preference formats read, checked and tokenized into one :class:`Example` per pair.

A record is ``{"prompt", "chosen", "rejected"}``, as text or as chat messages, the prompt optional (an *implicit*
prompt: the part the two answers share is the prompt)::

    {"prompt": "Define: cat", "chosen": " a small feline", "rejected": " a large river"}
    {"chosen": "Define: cat a small feline", "rejected": "Define: cat a large river"}          # implicit prompt
    {"prompt": [{"role": "user", "content": "Define: cat"}],
     "chosen": [{"role": "assistant", "content": "a small feline"}],
     "rejected": [{"role": "assistant", "content": "a large river"}]}
    {"chosen": [user turn, assistant turn A], "rejected": [the same user turn, assistant turn B]}  # implicit prompt

The pair becomes one :class:`Example`: ``input_ids``/``labels`` are prompt + chosen completion (labels only on the
completion, as for prompt/completion data), ``rejected`` the same for the rejected completion. Text completions
end with the end-of-sequence token (``data.add_eos``); chat completions are what the template renders after the
prompt's generation header (its end-of-turn marker included). Prompts are tokenized on their own, the way they are
at generation time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorakit.core.collectives import IGNORE
from lorakit.train.example import Example
from lorakit.train.sources import DataError


def _is_messages(value: Any) -> bool:
    return isinstance(value, list)


def _check_messages(value: Any, key: str, where: str) -> None:
    if not isinstance(value, list):
        raise DataError(f"{where}: {key!r} must be a list of messages like the other fields of this pair, got "
                        f"{type(value).__name__}")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key}[{j}] must be an object with string 'role' and 'content'")


def _text_prefix(a: str, b: str) -> str:
    """The shared start of two texts, ending before a space (so the answers keep their leading space)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    if 0 < n < min(len(a), len(b)) and a[n - 1] == " ":
        n -= 1
    return a[:n]


def split_pair(obj: dict[str, Any], where: str) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of a preference record, the prompt made explicit; :class:`DataError` naming
    ``where`` (file:line) for a record that is not a pair."""
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        raise DataError(f"{where}: not a preference pair: missing {missing} (keys present: {sorted(obj)}); a pair "
                        "needs 'chosen' and 'rejected' (and optionally 'prompt')")
    chosen, rejected = obj["chosen"], obj["rejected"]
    chat = _is_messages(chosen)
    if chat:
        _check_messages(chosen, "chosen", where)
        _check_messages(rejected, "rejected", where)
    else:
        for k in ("chosen", "rejected"):
            if not isinstance(obj[k], str):
                raise DataError(f"{where}: {k!r} must be a string or a list of messages, got "
                                f"{type(obj[k]).__name__}")
    if chosen == rejected:
        raise DataError(f"{where}: not a preference pair: 'chosen' and 'rejected' are the same")
    prompt = obj.get("prompt")
    if prompt is None:  # implicit prompt: what the two share
        if chat:
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        else:
            prompt = _text_prefix(chosen, rejected)
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    elif chat:
        _check_messages(prompt, "prompt", where)
    elif not isinstance(prompt, str):
        raise DataError(f"{where}: 'prompt' must be a string (the answers are text), got {type(prompt).__name__}")
    for k, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer:
            raise DataError(f"{where}: not a preference pair: the {k} answer is empty once the prompt is taken off "
                            "(one answer is a prefix of the other)")
    if chat and not any(m["role"] == "assistant" for m in chosen + rejected):
        raise DataError(f"{where}: the chosen and rejected answers hold no 'assistant' message")
    return prompt, chosen, rejected


def encode_pair(tokenizer: Any, obj: dict[str, Any], *, add_eos: bool, where: str,
                render_chat: Callable[[Any, list[dict[str, str]], bool], str]) -> Example:
    """Tokenize one preference record (not truncated): the chosen sequence, with the rejected one in
    ``rejected``; ``render_chat(tokenizer, messages, generation_prompt)`` renders chat messages as text."""
    prompt, chosen, rejected = split_pair(obj, where)
    template = bool(getattr(tokenizer, "chat_template", None))
    if _is_messages(chosen):
        head = render_chat(tokenizer, prompt, True) if prompt else ""
        answers = []
        for k, msgs in (("chosen", chosen), ("rejected", rejected)):
            try:
                full = render_chat(tokenizer, prompt + msgs, False)
            except Exception as e:  # template errors (jinja raises its own types)
                raise DataError(f"{where}: chat template failed on the {k} conversation: {e}") from None
            if not full.startswith(head):
                raise DataError(f"{where}: the chat template is not prefix-consistent; cannot tell the {k} answer "
                                "from the prompt (use text prompt/chosen/rejected instead)")
            answers.append(full[len(head):])
        ids = list(tokenizer(head, add_special_tokens=not template)["input_ids"]) if head else []
        eos = [tokenizer.eos_token_id] if not template and tokenizer.eos_token_id is not None else []
    else:
        answers = [chosen, rejected]
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    seqs = []
    for text in answers:
        c = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + eos
        seqs.append(Example(ids + c, [IGNORE] * len(ids) + c))
    return Example(seqs[0].input_ids, seqs[0].labels, rejected=seqs[1])


def truncate_pair(ex: Example, max_length: int) -> bool:
    """Cut both sequences of a pair to ``max_length`` tokens (in place); whether anything was cut."""
    cut = False
    for seq in (ex, ex.rejected):
        assert seq is not None and isinstance(seq.labels, list)
        if len(seq.input_ids) > max_length:
            seq.input_ids, seq.labels = seq.input_ids[:max_length], seq.labels[:max_length]
            cut = True
    return cut


def pair_is_empty(ex: Example) -> bool:
    """Whether truncation left either answer of a pair without a predicted token."""
    return any(all(y == IGNORE for y in seq.labels[1:]) for seq in (ex, ex.rejected)
               if seq is not None and isinstance(seq.labels, list))


__all__ = ["encode_pair", "pair_is_empty", "split_pair", "truncate_pair"]
