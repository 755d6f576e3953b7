"""Tiny models built from transformers configs (no download), shared by every test.

Device: tests marked ``cuda`` (the kernel, QLoRA and contract tests) take the ``device`` fixture, which is
``LORAKIT_TEST_DEVICE`` (default ``cpu``). On a GPU machine, ``LORAKIT_TEST_DEVICE=cuda pytest -m cuda`` runs them
there; without a GPU they run on the CPU as every other test does. Tests that only mean something on a GPU (CPU vs
GPU results) skip on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models gain nothing from threads, and spinning OpenMP threads slow a shared machine down a lot
torch.set_num_threads(1)

#: Where the tests marked ``cuda`` run: ``cpu`` (default) or ``cuda`` / ``cuda:N``.
TEST_DEVICE = torch.device(os.environ.get("LORAKIT_TEST_DEVICE", "cpu"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: runs on LORAKIT_TEST_DEVICE (a GPU when set to cuda; the CPU otherwise)")
    if TEST_DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("LORAKIT_TEST_DEVICE=cuda but torch sees no CUDA device")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of the tests marked ``cuda``."""
    return TEST_DEVICE


@pytest.fixture(scope="session")
def gpu(device: torch.device) -> torch.device:
    """The GPU; skips a test that only means something there."""
    if device.type != "cuda":
        pytest.skip("needs LORAKIT_TEST_DEVICE=cuda on a GPU machine")
    return device


def on_gpu(t: torch.Tensor | torch.nn.Module) -> bool:
    p = t if isinstance(t, torch.Tensor) else next(t.parameters(), None)
    return p is not None and p.device.type == "cuda"


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def batch_for(model, seed: int = 1, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """A fixed input batch with labels for ``model``, on the model's device."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    if "SequenceClassification" in type(model).__name__:
        out = {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), generator=g)}
    else:
        out = {"input_ids": ids, "labels": ids.clone()}
    dev = next(model.parameters()).device
    return {k: v.to(dev) for k, v in out.items()}


def perturb(model: torch.nn.Module, seed: int = 3, size: float = 0.1, *, buffers: bool = False) -> None:
    """Move every trainable tensor (and, with ``buffers``, every adapter's tensors, active or not: parameters and
    floating buffers but rank1-sum's 0/1 mask, e.g. Delta-LoRA's drift factors, LoRA-FA's frozen A) by
    ``size`` x N(0, 1), so the update is clearly non-zero."""
    g = torch.Generator().manual_seed(seed)
    tensors = [p for n, p in model.named_parameters() if p.requires_grad or (buffers and ".adapters." in n)]
    if buffers:
        tensors += [t for n, t in model.named_buffers() if ".adapters." in n and t.is_floating_point()
                    and not n.endswith(".mask")]
    with torch.no_grad():
        for t in tensors:
            t.add_(size * torch.randn(t.shape, generator=g).to(t.device))


def output_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


@pytest.fixture(params=sorted(MODELS))
def model_name(request) -> str:
    return request.param


from .fixtures_train import one_thread, tiny_run  # noqa: E402,F401  (session fixture: a saved tiny Llama + JSONL files)


def hf_greedy(model: torch.nn.Module, tokenizer, prompts, max_new_tokens: int) -> list[str]:
    """The reference for lorakit's decode loop: ``model.generate`` greedy, each prompt alone (no padding), text
    decoded without special tokens."""
    out = []
    for p in prompts:
        ids = torch.tensor([tokenizer(p)["input_ids"]], device=next(model.parameters()).device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out
