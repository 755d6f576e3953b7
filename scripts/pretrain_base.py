#!/usr/bin/env python3
"""Build lorakit's bundled tiny base model from scratch, reproducibly and offline.

The script does everything needed to regenerate ``src/lorakit/bundled/tiny-base``:

1. **Corpus.**  It fetches the Debian package ``python3.11-doc`` (the CPython
   3.11 documentation, licensed under the PSF License Version 2, which allows
   redistribution) with ``apt-get download`` into a cache directory, unpacks it
   with ``dpkg-deb`` and extracts the English prose paragraphs (``<p>``
   elements) of its HTML pages with the standard library's HTML parser.  Code
   samples, tables of contents and index pages are left out.
2. **Split.**  Pages are shuffled with a fixed seed; a few percent of pages are
   held out.  Up to ~200 KB of held-out text is written to
   ``src/lorakit/bundled/data/pretrain_heldout.jsonl`` and is exactly the text
   on which the held-out perplexity in the model card is measured.
3. **Tokenizer.**  A byte-level BPE tokenizer is trained on the training split
   with the ``tokenizers`` library and wrapped as a
   ``transformers.PreTrainedTokenizerFast`` with ``<s>``/``</s>``/``<pad>``/
   ``<unk>`` special tokens and a simple user/assistant chat template.
4. **Model.**  A small ``LlamaForCausalLM`` is trained from scratch with a
   seeded sampler, AdamW and a warm-up + cosine learning-rate schedule, then
   saved with ``save_pretrained(..., safe_serialization=True)`` together with
   ``MODEL_CARD.md`` and ``training_log.json``.

Regenerate (from the repository root, on Debian with ``apt-get update`` done)::

    nice -n 19 .venv/bin/python scripts/pretrain_base.py

Use ``--device cuda`` on a GPU machine and ``--deb PATH`` to reuse an already
downloaded ``python3.11-doc`` ``.deb`` file.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "lorakit" / "bundled" / "tiny-base"
DEFAULT_HELDOUT = REPO_ROOT / "src" / "lorakit" / "bundled" / "data" / "pretrain_heldout.jsonl"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorakit" / "pretrain"

DEB_PACKAGE = "python3.11-doc"
#: The exact Debian version the bundled model was built from.  If the archive no
#: longer serves it, the script falls back to the current candidate version and
#: records whichever version it actually used in the model card.
DEB_VERSION = "3.11.2-6+deb12u9"
DEB_LICENSE = "PSF-2.0 (Python Software Foundation License Version 2)"
HTML_ROOT_IN_DEB = Path("usr/share/doc/python3.11/html")

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}

#: A minimal chat template: ``User:``/``Assistant:`` turns separated by blank
#: lines.  Assistant content is wrapped in ``{% generation %}`` so that
#: ``apply_chat_template(..., return_assistant_tokens_mask=True)`` works.  The
#: generation prompt ends in ``Assistant:`` and the reply starts with a space,
#: matching how byte-level BPE attaches spaces to the following word.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ 'System: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant:' }}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{{ '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# --------------------------------------------------------------------------- #
# Corpus
# --------------------------------------------------------------------------- #
@dataclass
class CorpusSource:
    """Provenance of the pretraining text."""

    package: str
    version: str
    license: str
    deb_file: str
    sha256: str
    registry: str = "Debian (apt-get download)"


def _sha256(path: Path) -> str:
    """Return the hex SHA-256 digest of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _deb_version(deb: Path) -> str:
    """Read the ``Version`` field of a ``.deb`` file with ``dpkg-deb``."""
    out = subprocess.run(
        ["dpkg-deb", "--field", str(deb), "Version"], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def fetch_deb(cache_dir: Path, deb: Path | None = None) -> Path:
    """Return a local ``python3.11-doc`` ``.deb``, downloading it if needed.

    Args:
        cache_dir: Directory where the package is downloaded.
        deb: An already downloaded ``.deb`` file to use instead.

    Returns:
        The path of the ``.deb`` file.
    """
    if deb is not None:
        return deb
    cache_dir.mkdir(parents=True, exist_ok=True)
    pinned = sorted(cache_dir.glob(f"{DEB_PACKAGE}_{DEB_VERSION.replace(':', '%3a')}_all.deb"))
    if pinned:
        return pinned[0]
    for spec in (f"{DEB_PACKAGE}={DEB_VERSION}", DEB_PACKAGE):
        result = subprocess.run(
            ["apt-get", "download", spec], cwd=cache_dir, capture_output=True, text=True
        )
        if result.returncode == 0:
            break
        print(f"[corpus] apt-get download {spec} failed: {result.stderr.strip()}", file=sys.stderr)
    else:
        raise RuntimeError(
            f"could not download {DEB_PACKAGE}; run 'apt-get update' or pass --deb PATH"
        )
    found = sorted(cache_dir.glob(f"{DEB_PACKAGE}_*_all.deb"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"apt-get download left no {DEB_PACKAGE} .deb in {cache_dir}")
    return found[-1]


def unpack_deb(deb: Path, dest: Path) -> Path:
    """Unpack ``deb`` into ``dest`` (once) and return the HTML documentation root."""
    marker = dest / ".unpacked"
    if not marker.exists() or marker.read_text() != _sha256(deb):
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
        marker.write_text(_sha256(deb))
    return dest / HTML_ROOT_IN_DEB


class _ParagraphParser(HTMLParser):
    """Collect the text of ``<p>`` elements and the page's ``<h1>`` title.

    Paragraphs nested in ``<pre>``, tables, the sidebar/footer and header links
    are ignored, so only running prose remains.
    """

    _SKIP_CLASSES = ("sphinxsidebar", "footer", "related", "headerlink", "highlight")

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.title: str = ""
        self._stack: list[tuple[str, bool]] = []
        self._buf: list[str] | None = None
        self._h1: list[str] | None = None

    def _skipping(self) -> bool:
        return any(skip for _, skip in self._stack)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in {"br", "img", "meta", "link", "input", "hr", "wbr"}:
            return
        classes = dict(attrs).get("class") or ""
        skip = tag in {"pre", "table", "script", "style"} or any(
            c in classes for c in self._SKIP_CLASSES
        )
        self._stack.append((tag, skip))
        if tag == "p" and not self._skipping():
            self._buf = []
        elif tag == "h1" and not self.title and not self._skipping():
            self._h1 = []

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            open_tag, _ = self._stack.pop()
            if open_tag == tag:
                break
        if tag == "p" and self._buf is not None:
            self.paragraphs.append("".join(self._buf))
            self._buf = None
        elif tag == "h1" and self._h1 is not None:
            self.title = "".join(self._h1)
            self._h1 = None

    def handle_data(self, data: str) -> None:
        if self._skipping():
            return
        if self._buf is not None:
            self._buf.append(data)
        if self._h1 is not None:
            self._h1.append(data)


_WS = re.compile(r"\s+")
_EXCLUDED_PAGES = re.compile(r"(genindex|py-modindex|search|contents|copyright|license)\.html$")


_TYPOGRAPHY = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": " - ",
     "\u2026": "...", "\u00a0": " ", "\u00b6": ""}
)


def clean_paragraph(text: str) -> str | None:
    """Normalise whitespace and typography; reject paragraphs that are not prose.

    Args:
        text: Raw paragraph text.

    Returns:
        The cleaned paragraph, or ``None`` if it is too short or symbol-heavy.
    """
    text = _WS.sub(" ", html.unescape(text).translate(_TYPOGRAPHY)).strip()
    words = text.split()
    if len(words) < 8:
        return None
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    if letters / len(text) < 0.85:
        return None
    if not text.isascii() and sum(not ch.isascii() for ch in text) > 5:
        return None
    return text


def extract_documents(html_root: Path) -> list[dict[str, str]]:
    """Extract one document per HTML page: its title and prose paragraphs.

    Args:
        html_root: The ``html`` folder of the unpacked documentation.

    Returns:
        A list of ``{"id": relative_path, "text": ...}`` sorted by path, where
        ``text`` is the title followed by the paragraphs separated by blank lines.
    """
    docs: list[dict[str, str]] = []
    for page in sorted(html_root.rglob("*.html")):
        rel = page.relative_to(html_root).as_posix()
        if rel.startswith("_") or _EXCLUDED_PAGES.search(rel):
            continue
        parser = _ParagraphParser()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        paragraphs = [p for p in (clean_paragraph(x) for x in parser.paragraphs) if p]
        if not paragraphs:
            continue
        title = _WS.sub(" ", parser.title.translate(_TYPOGRAPHY)).strip()
        body = "\n\n".join(([title] if title else []) + paragraphs)
        docs.append({"id": rel, "text": body})
    return docs


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split ``text`` at paragraph boundaries into chunks of at most ``max_chars``.

    A single paragraph longer than ``max_chars`` becomes its own chunk.
    """
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        if current and size + len(para) + 2 > max_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def split_corpus(
    docs: list[dict[str, str]], seed: int, heldout_fraction: float, heldout_max_bytes: int
) -> tuple[list[str], list[str]]:
    """Split documents (whole pages) into training texts and held-out chunks.

    Args:
        docs: Documents from :func:`extract_documents`.
        seed: Seed of the page shuffle.
        heldout_fraction: Fraction of pages held out.
        heldout_max_bytes: Cap on the UTF-8 size of the held-out chunks kept.

    Returns:
        ``(train_texts, heldout_chunks)``; held-out pages beyond the byte cap
        are neither trained on nor evaluated.
    """
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_heldout = max(1, round(len(docs) * heldout_fraction))
    heldout_ids, train_ids = order[:n_heldout], order[n_heldout:]
    train = [docs[i]["text"] for i in sorted(train_ids)]
    heldout: list[str] = []
    used = 0
    for i in heldout_ids:
        for chunk in chunk_text(docs[i]["text"], 1500):
            size = len(json.dumps({"text": chunk}, ensure_ascii=False).encode()) + 1
            if used + size > heldout_max_bytes:
                return train, heldout
            heldout.append(chunk)
            used += size
    return train, heldout


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #
def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer and wrap it for ``transformers``.

    The tokenizer prepends ``<s>`` to every encoded sequence (like LLaMA) and
    carries :data:`CHAT_TEMPLATE`.

    Args:
        texts: Training texts.
        vocab_size: Target vocabulary size, special tokens included.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("pad", "bos", "eos", "unk")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B:1",
        special_tokens=[(bos, tok.token_to_id(bos))],
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def make_tokenizer_config_portable(out: Path) -> None:
    """Make ``tokenizer_config.json`` loadable by transformers 4.x as well as 5.x.

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"`` and keeps the
    chat template only in ``chat_template.jinja``; older releases know neither.
    ``PreTrainedTokenizerFast`` is understood by both, and the template is also
    stored inline.
    """
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """``save_pretrained`` the tokenizer into ``out`` with a portable config."""
    tokenizer.save_pretrained(out)
    make_tokenizer_config_portable(out)


def encode_stream(tokenizer: Any, texts: Iterable[str]) -> list[int]:
    """Encode texts as one stream ``<s> text </s> <s> text </s> ...``."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    # The backend tokenizer applies the same post-processor (leading <s>) without
    # warning about texts longer than model_max_length.
    for encoding in tokenizer.backend_tokenizer.encode_batch(list(texts)):
        stream.extend(encoding.ids)
        stream.append(eos)
    return stream


# --------------------------------------------------------------------------- #
# Model and training
# --------------------------------------------------------------------------- #
@dataclass
class TrainConfig:
    """Hyper-parameters of the pretraining run (all recorded in the log)."""

    seed: int = 0
    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 688
    max_position_embeddings: int = 512
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 400
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    heldout_fraction: float = 0.05
    heldout_max_bytes: int = 195_000
    eval_batch_size: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 1


def build_model(cfg: TrainConfig, tokenizer: Any) -> Any:
    """Create a freshly initialised ``LlamaForCausalLM`` for ``cfg``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up followed by cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def evaluate_loss(model: Any, stream: list[int], cfg: TrainConfig, max_windows: int | None = None) -> tuple[float, int]:
    """Mean next-token loss over non-overlapping ``seq_len`` windows of ``stream``.

    Returns:
        ``(mean loss in nats per predicted token, number of predicted tokens)``.
    """
    import torch

    n_windows = len(stream) // cfg.seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    data = torch.tensor(stream[: n_windows * cfg.seq_len], dtype=torch.long).view(n_windows, cfg.seq_len)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, n_windows, cfg.eval_batch_size):
            batch = data[start : start + cfg.eval_batch_size].to(cfg.device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += batch[:, 1:].numel()
    model.train()
    return total / max(1, count), count


def train(model: Any, train_stream: list[int], heldout_stream: list[int], cfg: TrainConfig) -> dict[str, Any]:
    """Train ``model`` on random ``seq_len`` windows of ``train_stream``.

    Returns:
        A dictionary with the loss curve, timings and final metrics.
    """
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    data = torch.tensor(train_stream, dtype=torch.long)
    model.to(cfg.device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    curve: list[dict[str, float]] = []
    window_losses: list[float] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        for group in optim.param_groups:
            group["lr"] = lr_at(step, cfg)
        offsets = torch.randint(0, len(data) - cfg.seq_len, (cfg.batch_size,), generator=gen)
        batch = torch.stack([data[o : o + cfg.seq_len] for o in offsets.tolist()]).to(cfg.device)
        loss = model(input_ids=batch, labels=batch).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        window_losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            elapsed = time.perf_counter() - start
            mean = sum(window_losses) / len(window_losses)
            lr = lr_at(step, cfg)
            curve.append({"step": step + 1, "train_loss": round(mean, 4), "lr": lr, "elapsed_s": round(elapsed, 1)})
            print(f"[train] step {step + 1}/{cfg.steps} loss {mean:.4f} lr {lr:.2e} {elapsed:.0f}s", flush=True)
            window_losses = []
    train_seconds = time.perf_counter() - start
    heldout_loss, heldout_tokens = evaluate_loss(model, heldout_stream, cfg)
    # Train loss measured the same way as the held-out loss, on the first windows of the train stream.
    train_eval_loss, train_eval_tokens = evaluate_loss(
        model, train_stream, cfg, max_windows=max(1, len(heldout_stream) // cfg.seq_len)
    )
    return {
        "curve": curve,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": curve[-1]["train_loss"],
        "train_eval_loss": round(train_eval_loss, 4),
        "train_eval_tokens": train_eval_tokens,
        "heldout_loss": round(heldout_loss, 4),
        "heldout_perplexity": round(math.exp(heldout_loss), 2),
        "heldout_tokens": heldout_tokens,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
    }


def greedy_sample(model: Any, tokenizer: Any, prompt: str, device: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt`` (for the model card)."""
    import torch

    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2)
    return tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)


# --------------------------------------------------------------------------- #
# Outputs
# --------------------------------------------------------------------------- #
def folder_size(path: Path) -> int:
    """Total size in bytes of the files directly inside ``path``."""
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def write_model_card(out: Path, log: dict[str, Any]) -> None:
    """Write ``MODEL_CARD.md`` from the training log (all numbers come from ``log``)."""
    c, m, r, t = log["corpus"], log["model"], log["results"], log["config"]
    samples = "\n".join(
        f"- {json.dumps(s['prompt'])} -> {json.dumps(s['continuation'])}" for s in log["samples"]
    )
    card = f"""# lorakit tiny-base

A tiny LLaMA-architecture causal language model trained from scratch by
`scripts/pretrain_base.py`, bundled with lorakit so that fine-tuning code can be
exercised and tested offline.  It is a test fixture, not a useful assistant:
it writes English-looking text about Python, but it knows little and reasons not at all.

## Training text

- Source: Debian package `{c['package']}` version `{c['version']}`
  (CPython 3.11 documentation), file `{c['deb_file']}`, sha256 `{c['sha256']}`.
- Licence: {c['license']}; the documentation may be redistributed.
- Extraction: the `<p>` paragraphs of {c['documents']} HTML pages (index, search,
  licence and contents pages skipped; code blocks and tables dropped; paragraphs
  under 8 words or with under 85% letters/spaces dropped; typographic quotes and dashes made ASCII).
- Corpus size: {c['total_chars']:,} characters ({c['total_bytes'] / 1e6:.2f} MB) in {c['documents']} documents.
- Split: pages shuffled with seed {t['seed']}; {c['heldout_documents']} pages
  ({t['heldout_fraction']:.0%}) held out.  Training split: {c['train_chars']:,} characters,
  {c['train_tokens']:,} tokens.  Held-out evaluation text: {c['heldout_chunks']} chunks,
  {c['heldout_chars']:,} characters, {c['heldout_tokens']:,} tokens, shipped as
  `lorakit/bundled/data/pretrain_heldout.jsonl`.

## Tokenizer

Byte-level BPE trained with `tokenizers` {log['versions']['tokenizers']} on the training split:
vocabulary {m['vocab_size']} including special tokens `<pad>`={m['pad_token_id']},
`<s>`={m['bos_token_id']}, `</s>`={m['eos_token_id']}, `<unk>`={m['unk_token_id']}.
Encoding prepends `<s>`.  It has a chat template with `User:` / `Assistant:`
turns (assistant replies end with `</s>` and are marked for
`return_assistant_tokens_mask`).

## Architecture

`LlamaForCausalLM`: hidden size {t['hidden_size']}, {t['num_hidden_layers']} layers,
{t['num_attention_heads']} attention heads, {t['num_key_value_heads']} key/value heads,
MLP {t['intermediate_size']}, max positions {t['max_position_embeddings']}, RoPE theta 10000,
tied input/output embeddings.  Parameters: {m['parameters']:,}.
Weights stored as {t['dtype']} safetensors; folder size {m['folder_bytes'] / 1e6:.2f} MB.

## Training

- {t['steps']} steps, batch {t['batch_size']} x sequence length {t['seq_len']}
  ({r['tokens_seen']:,} tokens, {r['tokens_seen'] / max(1, c['train_tokens']):.2f} epochs of the training split),
  random windows drawn with seed {t['seed']}.
- AdamW (betas 0.9/0.95, weight decay {t['weight_decay']}), peak learning rate {t['lr']},
  {t['warmup_steps']} warm-up steps then cosine decay to {t['min_lr_ratio']:.0%} of the peak,
  gradient clipping {t['grad_clip']}.
- Device: {log['device']['name']}, torch threads: {t['threads']}; wall time {r['train_seconds']:.0f} s
  for training ({log['wall_seconds']:.0f} s for the whole script).  Wall time depends on what else
  the machine runs; `training_log.json` has the loss curve with elapsed seconds.

## Results

- Final train loss (mean of the last 50 steps): {r['final_train_loss']:.3f}
- Train-split loss (first {r['train_eval_tokens']:,} tokens, non-overlapping windows): {r['train_eval_loss']:.3f}
- Held-out loss: {r['heldout_loss']:.3f} nats/token, **held-out perplexity {r['heldout_perplexity']:.2f}**
  over {r['heldout_tokens']:,} predicted tokens (non-overlapping {t['seq_len']}-token windows
  of `pretrain_heldout.jsonl`, encoded as `<s> text </s>` and concatenated).

Greedy samples (repetition penalty 1.2):

{samples}

## Reproduce

```
apt-get update   # once, so that apt-get download finds the package
nice -n 19 .venv/bin/python scripts/pretrain_base.py
```

Library versions: {', '.join(f'{k} {v}' for k, v in log['versions'].items())}.
Full numbers are in `training_log.json`.
"""
    (out / "MODEL_CARD.md").write_text(card)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    defaults = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model output folder")
    ap.add_argument("--heldout-out", type=Path, default=DEFAULT_HELDOUT, help="held-out JSONL path")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="download/unpack cache")
    ap.add_argument("--deb", type=Path, default=None, help=f"use this {DEB_PACKAGE} .deb instead of downloading")
    ap.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--seq-len", type=int, default=defaults.seq_len)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    ap.add_argument("--layers", type=int, default=defaults.num_hidden_layers)
    ap.add_argument(
        "--threads", type=int, default=defaults.threads, help="torch CPU threads (1 keeps CPU results bit-identical)"
    )
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=defaults.dtype, help="dtype of saved weights")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the whole pipeline: corpus, split, tokenizer, model, card."""
    args = parse_args(argv)
    script_start = time.perf_counter()
    cfg = TrainConfig(
        seed=args.seed,
        vocab_size=args.vocab_size,
        num_hidden_layers=args.layers,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        warmup_steps=max(1, min(TrainConfig.warmup_steps, args.steps // 10)),
    )

    if cfg.device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    import tokenizers
    import torch
    import transformers
    from transformers import GenerationConfig

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    # 1. corpus
    deb = fetch_deb(args.cache_dir, args.deb)
    source = CorpusSource(
        package=DEB_PACKAGE, version=_deb_version(deb), license=DEB_LICENSE, deb_file=deb.name, sha256=_sha256(deb)
    )
    if source.version != DEB_VERSION:
        print(f"[corpus] warning: using {source.version}; the bundled model used {DEB_VERSION}", file=sys.stderr)
    html_root = unpack_deb(deb, args.cache_dir / "unpacked")
    docs = extract_documents(html_root)
    train_texts, heldout_chunks = split_corpus(docs, cfg.seed, cfg.heldout_fraction, cfg.heldout_max_bytes)
    print(f"[corpus] {len(docs)} documents, {sum(len(d['text']) for d in docs):,} chars; "
          f"train {len(train_texts)} docs, held-out {len(heldout_chunks)} chunks", flush=True)
    args.heldout_out.parent.mkdir(parents=True, exist_ok=True)
    with args.heldout_out.open("w", encoding="utf-8") as handle:
        for chunk in heldout_chunks:
            handle.write(json.dumps({"text": chunk}, ensure_ascii=False) + "\n")

    # 2. tokenizer
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    train_stream = encode_stream(tokenizer, train_texts)
    heldout_stream = encode_stream(tokenizer, heldout_chunks)
    print(
        f"[tokenizer] vocab {len(tokenizer)}; train tokens {len(train_stream):,}; "
        f"held-out tokens {len(heldout_stream):,}",
        flush=True,
    )

    # 3. model
    model = build_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[model] {n_params:,} parameters", flush=True)
    results = train(model, train_stream, heldout_stream, cfg)
    print(f"[eval] held-out loss {results['heldout_loss']:.4f} ppl {results['heldout_perplexity']:.2f}", flush=True)

    # 4. save
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=64,
    )
    prompts = ["The function returns", "In this tutorial, we", "A list is"]
    samples = [{"prompt": p, "continuation": greedy_sample(model, tokenizer, p, cfg.device)} for p in prompts]
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.to("cpu").to(getattr(torch, cfg.dtype)).save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)

    log: dict[str, Any] = {
        "script": "scripts/pretrain_base.py",
        "command": " ".join(["scripts/pretrain_base.py", *(argv if argv is not None else sys.argv[1:])]),
        "corpus": {
            **asdict(source),
            "documents": len(docs),
            "total_chars": sum(len(d["text"]) for d in docs),
            "total_bytes": sum(len(d["text"].encode()) for d in docs),
            "train_documents": len(train_texts),
            "heldout_documents": len(docs) - len(train_texts),
            "train_chars": sum(map(len, train_texts)),
            "train_tokens": len(train_stream),
            "heldout_chunks": len(heldout_chunks),
            "heldout_chars": sum(map(len, heldout_chunks)),
            "heldout_tokens": len(heldout_stream),
            "heldout_file": "lorakit/bundled/data/pretrain_heldout.jsonl",
        },
        "config": asdict(cfg),
        "model": {
            "class": "LlamaForCausalLM",
            "parameters": n_params,
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "unk_token_id": tokenizer.unk_token_id,
            "folder_bytes": 0,
        },
        "results": results,
        "samples": samples,
        "device": {
            "name": (
                torch.cuda.get_device_name()
                if cfg.device.startswith("cuda")
                else f"CPU ({platform.processor() or platform.machine()})"
            ),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "wall_seconds": 0.0,
    }
    # The card and log sizes barely change with these two numbers; write twice so both are final.
    for _ in range(2):
        log["wall_seconds"] = round(time.perf_counter() - script_start, 1)
        (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
        write_model_card(out, log)
        log["model"]["folder_bytes"] = folder_size(out)
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    write_model_card(out, log)
    size = folder_size(out)
    print(f"[save] {out} ({size / 1e6:.2f} MB) in {log['wall_seconds']:.0f} s", flush=True)
    if size > 25 * 1024 * 1024:
        print("[save] warning: model folder is larger than 25 MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
