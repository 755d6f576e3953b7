"""The one decode loop of lorakit (``lorakit serve``, ``lorakit generate`` and the evaluation's generations): one
batch of sequences, prefilled together, then decoded one token per step with the KV cache, each row streaming
its text as it grows.

A batch is left-padded (every prompt ends at the same column, so each step appends one column for all rows) and
carries an attention mask; positions count real tokens only (``cumsum(mask) - 1``), so a padded row sees
exactly the positions, keys and values it would see alone, and greedy decoding gives the same tokens as a
single-request run (``tests/test_serve.py`` checks it). A row that finishes is dropped from the batch (and from
the cache) at once, and its adapter context is rebuilt for the rows left.

Text is produced incrementally: each step decodes a short window of the row's last tokens and emits what it
adds to the text, holding back a trailing replacement character (a multi-byte character cut between tokens)
and any tail that could be the start of a stop string. The text of a response is the concatenation of its
deltas, so a streamed and a whole response are the same text.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class SamplingParams:
    """How a row picks its tokens.

    Attributes:
        max_tokens: tokens to generate at most (``finish_reason="length"`` when reached).
        temperature: 0 is greedy (argmax); above 0 samples from ``softmax(logits / temperature)``.
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``.
        seed: seeds the row's own generator, so a seeded request samples the same tokens whatever it is
            batched with.
        stop: strings that end the completion; the text stops before the first one found.
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


class Row(Protocol):
    """What the loop needs from one sequence (:class:`Completion`, :class:`lorakit.serve.engine.Request`)."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams

    @property
    def cancelled(self) -> bool: ...

    def emit_text(self, text: str) -> None: ...

    def emit_done(self, finish_reason: str, completion_tokens: int) -> None: ...


#: Tokens decoded before the new ones, so that tokenizers whose pieces depend on their left neighbour (a leading
#: space dropped at the start of a text) produce the right delta.
_CONTEXT_TOKENS = 6


@dataclass
class _State:
    row: Row
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0  # tokens before it are already text
    read_offset: int = 0
    text: str = ""  # everything decoded so far (stop strings excluded once found)
    sent: int = 0  # characters of ``text`` already emitted
    done: bool = False


class Decoder:
    """Runs batches of rows on ``model`` (owned by one thread: the engine's worker).

    Args:
        adapters: ``adapters(names)`` returns the context under which row ``i`` of the batch uses adapter
            ``names[i]`` (``None``: the base model).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, adapters: Callable[[list[str | None]], Any]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_ids = _eos_ids(model, tokenizer)
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed ``past_key_values`` to ``cache``
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._positions = "position_ids" in params  # models with ALiBi (Bloom...) take none

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def run(self, rows: Sequence[Row]) -> None:
        """Generate every row to its end, emitting text deltas and a final ``done`` per row."""
        states = [_State(r, _generator(r.params)) for r in rows]
        dev = self.device
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=dev)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows],
                            device=dev)  # (B, T)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding does not shift positions
        alive = list(range(len(rows)))
        cache = None
        while alive:
            with self.adapters([states[i].row.adapter for i in alive]):
                while True:
                    extra = {"position_ids": pos} if self._positions else {}
                    out = self.model(input_ids=ids, attention_mask=mask, use_cache=True,
                                     **{self._cache_arg: cache}, **self._keep, **extra)
                    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
                    tokens = self._pick(out.logits[:, -1], [states[i] for i in alive])
                    for i, tok in zip(alive, tokens, strict=True):
                        self._advance(states[i], tok)
                    keep = [j for j, i in enumerate(alive) if not states[i].done]
                    if not keep:
                        alive = []
                        break
                    ids = torch.tensor([[tokens[j]] for j in keep], device=dev)  # (B', 1)
                    mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=-1)
                    pos = pos[:, -1:] + 1
                    if len(keep) < len(alive):  # drop finished rows; their adapters leave the context
                        index = torch.tensor(keep, device=dev)
                        cache.batch_select_indices(index)
                        mask, pos = mask[index], pos[index]
                        alive = [alive[j] for j in keep]
                        break

    def _pick(self, logits: Tensor, states: list[_State]) -> list[int]:
        """Next token of each row: argmax for greedy rows, a draw from the row's own generator otherwise."""
        picked = logits.argmax(dim=-1).tolist()  # (B,)
        for j, s in enumerate(states):
            p = s.row.params
            if p.temperature > 0:
                probs = torch.softmax(logits[j].float() / p.temperature, dim=-1).cpu()
                if p.top_p < 1.0:
                    probs = _nucleus(probs, p.top_p)
                picked[j] = int(torch.multinomial(probs, 1, generator=s.generator))
        return picked

    def _advance(self, s: _State, token: int) -> None:
        row = s.row
        if row.cancelled:
            s.done = True
            row.emit_done("cancelled", len(s.ids))
            return
        if token in self.eos_ids:
            self._finish(s, "stop")
            return
        s.ids.append(token)
        s.text += self._delta(s)
        stop_at = _first_stop(s.text, row.params.stop)
        if stop_at is not None:
            s.text = s.text[:stop_at]
            self._finish(s, "stop")
        elif len(s.ids) >= row.params.max_tokens:
            self._finish(s, "length")
        else:
            ready = len(s.text) - _held_back(s.text, row.params.stop)
            if ready > s.sent:
                row.emit_text(s.text[s.sent:ready])
                s.sent = ready

    def _delta(self, s: _State, final: bool = False) -> str:
        """Text the latest tokens add, decoded with a few tokens of left context."""
        before = self.tokenizer.decode(s.ids[s.prefix_offset:s.read_offset], skip_special_tokens=True)
        now = self.tokenizer.decode(s.ids[s.prefix_offset:], skip_special_tokens=True)
        if not final and (now.endswith("\ufffd") or not now.startswith(before)):
            return ""  # an incomplete character, or earlier text the next token may still change: wait
        s.read_offset = len(s.ids)
        s.prefix_offset = max(s.prefix_offset, s.read_offset - _CONTEXT_TOKENS)
        return now[len(before):]

    def _finish(self, s: _State, reason: str) -> None:
        if s.read_offset < len(s.ids):  # text held back for an incomplete character
            s.text += self._delta(s, final=True)
            stop_at = _first_stop(s.text, s.row.params.stop)
            if stop_at is not None:
                s.text, reason = s.text[:stop_at], "stop"
        if len(s.text) > s.sent:
            s.row.emit_text(s.text[s.sent:])
            s.sent = len(s.text)
        s.done = True
        s.row.emit_done(reason, len(s.ids))


@dataclass
class Completion:
    """A :class:`Row` that collects its text (and passes each delta to ``on_text``, to stream it)."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    on_text: Callable[[str], None] | None = None
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0

    @property
    def cancelled(self) -> bool:
        return False

    def emit_text(self, text: str) -> None:
        self.text += text
        if self.on_text is not None:
            self.on_text(text)

    def emit_done(self, finish_reason: str, completion_tokens: int) -> None:
        self.finish_reason, self.completion_tokens = finish_reason, completion_tokens


def _no_adapters(names: list[str | None]) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def complete(model: nn.Module, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
             batch_size: int = 32) -> list[Completion]:
    """Each prompt (token ids) completed with ``params``, in batches of ``batch_size``, on the adapters active
    in ``model``.

    With ``temperature=0`` (greedy) the tokens equal ``model.generate(..., do_sample=False)`` of each prompt
    alone; the text is the decode of those tokens without special tokens, cut before the first stop string.
    """
    rows = [Completion(list(ids), params) for ids in prompt_ids]
    run_rows(model, tokenizer, rows, batch_size=batch_size)
    return rows


def run_rows(model: nn.Module, tokenizer: Any, rows: Sequence[Completion], *, batch_size: int = 32) -> None:
    """Decode ``rows`` in batches of ``batch_size`` (the model in eval mode for the call, then back as it was)."""
    if not rows:
        return
    was_training = model.training
    model.eval()
    try:
        decoder = Decoder(model, tokenizer, _no_adapters)
        for i in range(0, len(rows), batch_size):
            decoder.run(rows[i:i + batch_size])
    finally:
        model.train(was_training)


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The tokenizer's end-of-sequence token and the model's generation-config ones (chat models add their
    end-of-turn token there), as ``model.generate`` stops on them."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen is not None:
        ids.update(int(i) for i in (gen if isinstance(gen, list | tuple) else [gen]))
    return ids


def _generator(params: SamplingParams) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    g = torch.Generator()
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """``probs`` restricted to the smallest top set whose mass reaches ``top_p`` (renormalised by multinomial)."""
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the mass before this token already suffices
    sorted_probs[outside] = 0.0
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is the start of a stop string (it may still become one)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


__all__ = ["Completion", "Decoder", "Row", "SamplingParams", "complete", "run_rows"]
