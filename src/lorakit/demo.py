"""``lorakit demo``: a complete fine-tuning run in under a minute on a CPU, with nothing to download.

It builds a tiny Llama from a config (random weights) and a word-level tokenizer trained on the bundled
question/answer file ``bundled/data/demo.jsonl``, saves both, then trains an adapter on that file and
reports the held-out loss before and after. The same helpers give the test suite its tiny models.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .config import BUNDLED_DIR, TrainConfig
from .data import read_jsonl

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


def save_tiny_base(out: str | os.PathLike[str], data: str | os.PathLike[str] = DEMO_DATA, **model_kw: Any) -> Path:
    """Build a tokenizer on ``data`` and a tiny Llama sized for it; save both into ``out``."""
    out = Path(out)
    tokenizer = build_tokenizer(record_texts(data))
    model = build_tiny_llama(len(tokenizer), **model_kw)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_demo(out: str | os.PathLike[str], *, steps: int = 60, method: str = "lora",
             log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Build the tiny base in ``out/base`` and train ``method`` on the bundled data into ``out/run``."""
    from .trainer import Trainer

    out = Path(out)
    base = save_tiny_base(out / "base")
    cfg = TrainConfig.parse({
        "model": {"path": str(base), "dtype": "float32"},
        "adapter": {"method": method},
        "data": {"train": str(DEMO_DATA), "eval_fraction": 0.1, "max_length": 64},
        "training": {"max_steps": steps, "batch_size": 16, "lr": 1e-2, "warmup_steps": 5, "device": "cpu",
                     "eval_every": max(1, steps // 3)},
        "output": {"dir": str(out / "run"), "progress": progress},
    })
    result = Trainer(None, cfg, log=log).fit(overwrite=True)
    before, after = result.eval_start.get("eval_loss"), result.eval_end.get("eval_loss")
    log(f"held-out loss: {before:.4f} before -> {after:.4f} after {result.step} steps of {method}")
    log(f"adapter: {result.adapter_dir}")
    log(f"metrics: {out / 'run' / 'metrics.jsonl'}, plot: {out / 'run' / 'loss.png'}")
    return {"eval_loss_before": before, "eval_loss_after": after, "adapter": str(result.adapter_dir),
            "base": str(base)}
