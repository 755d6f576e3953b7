"""JSONL reading, label masking, truncation, packing and batching (no model needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.testing import build_tokenizer
from lorakit.train.batching import BatchOrder, collate
from lorakit.train.data import IGNORE, DataError, pack, read_jsonl, split_records, tokenize

from .fixtures_train import write_jsonl

TEXTS = ["hello world how are you", "the cat sat on the mat", "question answer user assistant system",
         "one two three four five six seven eight nine ten"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TEXTS)


def _records(tmp_path: Path, rows: list[dict]) -> list:
    return read_jsonl(write_jsonl(tmp_path / "d.jsonl", rows))


def _words(tok, ids: list[int]) -> str:
    return tok.decode([i for i in ids if i != IGNORE])


def test_prompt_completion_masks_the_prompt(tok, tmp_path: Path) -> None:
    ds = tokenize(_records(tmp_path, [{"prompt": "the cat sat", "completion": " on the mat"}]), tok)
    ex = ds.examples[0]
    assert ds.format == "prompt_completion"
    n_prompt = len(tok("the cat sat")["input_ids"])  # with <s>
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert _words(tok, ex.labels[n_prompt:]) == "on the mat </s>"


def test_text_trains_on_every_token(tok, tmp_path: Path) -> None:
    ex = tokenize(_records(tmp_path, [{"text": "hello world"}]), tok).examples[0]
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id


def test_chat_trains_only_on_assistant_turns(tok, tmp_path: Path) -> None:
    msgs = [{"role": "system", "content": "one two"}, {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "how are you"}, {"role": "user", "content": "the cat"},
            {"role": "assistant", "content": "sat on the mat"}]
    ex = tokenize(_records(tmp_path, [{"messages": msgs}]), tok).examples[0]
    trained = [t for t, y in zip(ex.input_ids, ex.labels, strict=True) if y != IGNORE]
    assert tok.decode(trained) == "how are you </s> sat on the mat </s>"
    assert tok.decode(ex.input_ids).count("hello world") == 1  # each turn appears once


def test_chat_without_template_uses_plain_layout(tmp_path: Path) -> None:
    plain = build_tokenizer(TEXTS, chat_template=False)
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    ex = tokenize(_records(tmp_path, [{"messages": msgs}]), plain).examples[0]
    assert _words(plain, ex.labels) == "world </s>"


def test_truncation_is_counted_and_empty_examples_dropped(tok, tmp_path: Path) -> None:
    rows = [{"prompt": "one two three four five six", "completion": " seven"},  # completion cut away
            {"text": "one two three four five six seven eight"},  # cut, kept
            {"text": "hello"}]
    with pytest.raises(DataError, match=":2: missing key"):  # formats may not be mixed
        tokenize(_records(tmp_path, rows), tok, max_length=4)
    ds = tokenize(_records(tmp_path, rows[1:]), tok, max_length=4)
    assert ds.n_truncated == 1 and len(ds.examples[0].input_ids) == 4 and len(ds) == 2
    ds = tokenize(_records(tmp_path, rows[:1] * 2 + [{"prompt": "one", "completion": " two"}]), tok, max_length=4)
    assert ds.n_truncated == 2 and ds.n_dropped == 2 and len(ds) == 1


def test_packing_fills_blocks_with_whole_examples(tok, tmp_path: Path) -> None:
    ds = tokenize(_records(tmp_path, [{"text": t} for t in TEXTS * 3]), tok)
    packed = pack(ds, 16)
    assert all(len(b.input_ids) <= 16 for b in packed.examples) and len(packed) < len(ds)
    assert sum(len(b.input_ids) for b in packed.examples) == ds.n_tokens  # nothing cut: every example fits
    flat = [i for b in packed.examples for i in b.input_ids]
    assert flat == [i for e in ds.examples for i in e.input_ids]  # in order, whole
    assert any(len(set(b.segments)) > 1 for b in packed.examples)
    for b in packed.examples:  # each example's first token is never predicted from the one before it
        starts = [k for k in range(1, len(b.segments)) if b.segments[k] != b.segments[k - 1]]
        assert all(b.labels[k] == IGNORE for k in starts)


def test_classification_labels(tok, tmp_path: Path) -> None:
    rows = [{"text": "hello world", "label": "pos"}, {"text": "the cat", "label": 0}]
    ds = tokenize(_records(tmp_path, rows), tok, task="classification", label_names=["neg", "pos"])
    assert [e.labels for e in ds.examples] == [1, 0]
    with pytest.raises(DataError, match=r":1: label 'pos' is not in data.labels"):
        tokenize(_records(tmp_path, rows), tok, task="classification")
    with pytest.raises(DataError, match=r":1: label must be an integer in \[0, 2\)"):
        tokenize(_records(tmp_path, [{"text": "hi", "label": 5}]), tok, task="classification")


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n   \n', ":2: empty line"),
    ('{"text": "a"}\n{"text": \n', ":2: malformed JSON"),
    ('[1, 2]\n', ":1: expected a JSON object"),
    ('{"text": 3}\n', ":1: 'text' must be a string"),
    ('{"text": "  "}\n', ":1: 'text' is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: no 'assistant' message"),
    ('{"messages": [{"role": "user"}]}\n', ":1: messages[0] must be an object"),
])
def test_bad_lines_name_file_and_line(content: str, message: str, tok, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        tokenize(read_jsonl(path), tok, source=str(path))
    assert message in str(e.value) and "bad.jsonl" in str(e.value)


def test_collate_pads_right_with_ignored_labels(tok, tmp_path: Path) -> None:
    ds = tokenize(_records(tmp_path, [{"text": "hello"}, {"text": "the cat sat on"}]), tok)
    b = collate(ds.examples, tok.pad_token_id)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (2, 6)
    assert b["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert b["labels"][0, 3:].tolist() == [IGNORE] * 3 and b["input_ids"][0, 3:].tolist() == [0] * 3


def test_batch_order_is_a_reproducible_function_of_the_position() -> None:
    order = BatchOrder(10, 4, seed=3)
    assert order.batches_per_epoch == 3
    epoch0 = [i for k in range(3) for i in order.indices(k)]
    assert sorted(epoch0) == list(range(10))
    fresh = BatchOrder(10, 4, seed=3)
    assert fresh.indices(4) == order.indices(4) and fresh.indices(1) == order.indices(1)
    assert [i for k in range(3, 6) for i in order.indices(k)] != epoch0  # reshuffled each epoch
    assert BatchOrder(10, 4, seed=4).indices(0) != order.indices(0)


def test_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    records = _records(tmp_path, [{"text": f"t{i}"} for i in range(20)])
    train, held = split_records(records, 0.25, seed=1)
    assert len(held) == 5 and len(train) == 15
    assert {r[0] for r in train}.isdisjoint({r[0] for r in held})
    assert split_records(records, 0.25, seed=1) == (train, held)
    with pytest.raises(DataError, match="too few examples"):
        split_records(records[:1], 0.5, seed=0)
