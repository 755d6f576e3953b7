"""Tiny models and tokenizers built on the spot, for tests (lorakit's and yours): nothing to download.

A tiny Llama from a config (random weights) and a word-level tokenizer trained on any JSONL data file, such as
the bundled question/answer file ``bundled/data/demo.jsonl`` (:data:`DEMO_DATA`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from lorakit.train.data import read_jsonl
from lorakit.util.resources import BUNDLED_DIR

DEMO_DATA = BUNDLED_DIR / "data" / "demo.jsonl"

#: A minimal chat template; ``render_chat`` locates assistant turns by rendering prefixes, so no markers
#: are needed.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' </s> ' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")


def build_tokenizer(texts: Iterable[str], *, chat_template: bool = True) -> Any:
    """A word-level tokenizer over ``texts`` (words and punctuation), as a ``PreTrainedTokenizerFast``.

    Special tokens: ``<pad>`` (0), ``<unk>``, ``<s>`` (prepended to every encoded text), ``</s>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def record_texts(path: str | os.PathLike[str]) -> list[str]:
    """Every string in a JSONL data file (any format), for training a tokenizer on it."""
    out = []
    for _, obj in read_jsonl(path):
        for key in ("text", "prompt", "completion"):
            if isinstance(obj.get(key), str):
                out.append(obj[key])
        for m in obj.get("messages") or []:
            out.append(f"{m.get('role', '')}: {m.get('content', '')}")
    return out


def build_tiny_llama(vocab_size: int, *, seed: int = 0, hidden: int = 64, layers: int = 2,
                     classification: bool = False, **overrides: Any) -> torch.nn.Module:
    """A small ``LlamaForCausalLM`` (or ``...ForSequenceClassification``) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    cls = LlamaForSequenceClassification if classification else LlamaForCausalLM
    return cls(LlamaConfig(**cfg))
