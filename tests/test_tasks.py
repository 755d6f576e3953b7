"""Tests for the synthetic task generators and the bundled tiny base model."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.evaluation.tasks import (
    BUNDLED_FILES,
    ONE_MORE_HELDOUT_NAMES,
    ONE_MORE_TRAIN_NAMES,
    TASKS,
    extract_answer,
    generate_arithmetic,
    generate_domain_shift,
    generate_one_more,
    generate_sentiment,
    read_jsonl,
    write_bundled_data,
    write_jsonl,
)
from lorakit.util.resources import BUNDLED_DIR

BUNDLED = BUNDLED_DIR
MODEL_DIR = BUNDLED / "tiny-base"
DATA_DIR = BUNDLED / "data"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generators_are_deterministic_for_a_seed(task: str) -> None:
    """The same ``(n, seed)`` gives identical rows."""
    assert TASKS[task](50, 7) == TASKS[task](50, 7)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generators_differ_across_seeds(task: str) -> None:
    """Different seeds give different rows."""
    assert TASKS[task](50, 0) != TASKS[task](50, 1)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generators_return_n_rows_and_prefix_stable(task: str) -> None:
    """``n`` rows come back, and a smaller ``n`` is a prefix of a larger one."""
    rows = TASKS[task](31, 3)
    assert len(rows) == 31
    assert TASKS[task](10, 3) == rows[:10]
    assert TASKS[task](0, 3) == []
    with pytest.raises(ValueError):
        TASKS[task](-1, 0)


def test_generators_do_not_touch_global_random_state() -> None:
    """Generators use their own RNG, leaving :mod:`random` untouched."""
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    for task in TASKS.values():
        task(5, 0)
    assert random.random() == expected


def test_arithmetic_rows_and_extract_answer() -> None:
    """Every completion ends in 'The answer is N.' and extract_answer recovers N."""
    rows = generate_arithmetic(2000, 0)
    for row in rows:
        assert set(row) == {"prompt", "completion", "answer"}
        assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:")
        assert row["completion"].startswith(" ")
        assert row["completion"].endswith(f"The answer is {row['answer']}.")
        assert extract_answer(row["completion"]) == row["answer"]
        assert extract_answer(row["prompt"] + row["completion"]) == row["answer"]
        assert extract_answer(row["completion"], strict=True) == row["answer"]
        assert 0 <= int(row["answer"]) <= 200
    assert len({r["prompt"] for r in rows}) > 1900


def test_extract_answer_edge_cases() -> None:
    """Normalisation, last-match wins, fallback and strict mode."""
    assert extract_answer("The answer is 1,200.") == "1200"
    assert extract_answer("the answer is 7.0") == "7"
    assert extract_answer("The answer is 3. No, the answer is 4.") == "4"
    assert extract_answer("3 + 4 = 7") == "7"
    assert extract_answer("3 + 4 = 7", strict=True) is None
    assert extract_answer("no digits here") is None
    assert extract_answer("The answer is -5.") == "-5"


_ONE_MORE = re.compile(r"Question: (\w+) has (\d) (\w+) and (.+)\. How many (\w+) does (\w+) have now\?\nAnswer:")


def _check_one_more(row: dict[str, str], names: tuple[str, ...]) -> str:
    """Assert that a one_more row is well formed and its answer right; returns its name."""
    assert set(row) == {"prompt", "completion", "answer"}
    m = _ONE_MORE.fullmatch(row["prompt"])
    assert m, row["prompt"]
    name, count, _, verb, _, name2 = m.groups()
    assert name == name2 and name in names
    expected = int(count) + 1 if "more" in verb else int(count) - 1
    assert row["answer"] == str(expected) and row["completion"] == f" {expected}"
    assert extract_answer(row["completion"]) == row["answer"]
    return name


def test_one_more_rows_are_deterministic_and_eval_is_held_out(tmp_path: Path) -> None:
    """The demo's task: same seed, same rows; answers are right; the bundled eval file uses only held-out
    names, so no eval prompt (nor name) occurs in the training file."""
    assert not set(ONE_MORE_TRAIN_NAMES) & set(ONE_MORE_HELDOUT_NAMES)
    rows = generate_one_more(300, 0)
    assert rows == generate_one_more(300, 0) and rows != generate_one_more(300, 1)
    assert generate_one_more(50, 2, names=ONE_MORE_HELDOUT_NAMES) == generate_one_more(50, 2, ONE_MORE_HELDOUT_NAMES)
    assert {_check_one_more(r, ONE_MORE_TRAIN_NAMES) for r in rows} == set(ONE_MORE_TRAIN_NAMES)
    assert {r["answer"] for r in rows} == {str(i) for i in range(11)}
    with pytest.raises(ValueError):
        generate_one_more(3, 0, names=())

    write_bundled_data(tmp_path)  # what `lorakit tasks bundle` writes (the shipped files are checked above)
    train, evaluation = (read_jsonl(tmp_path / f"one_more_{split}.jsonl") for split in ("train", "eval"))
    assert len(train) == 2000 and len(evaluation) == 200
    assert {_check_one_more(r, ONE_MORE_TRAIN_NAMES) for r in train} == set(ONE_MORE_TRAIN_NAMES)
    assert {_check_one_more(r, ONE_MORE_HELDOUT_NAMES) for r in evaluation} == set(ONE_MORE_HELDOUT_NAMES)
    assert len({r["prompt"] for r in evaluation}) == 200
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    # no majority-answer shortcut: the most common answer of the first 100 eval rows is far below 70%
    assert max(Counter(r["answer"] for r in evaluation[:100]).values()) <= 20


def test_domain_and_sentiment_rows() -> None:
    """Recipes are text rows; sentiment labels are balanced 0/1."""
    recipes = generate_domain_shift(100, 0)
    assert all(set(r) == {"text"} and r["text"].startswith("Recipe: ") for r in recipes)
    reviews = generate_sentiment(200, 0)
    assert all(set(r) == {"text", "label"} and r["label"] in (0, 1) and r["text"] for r in reviews)
    assert Counter(r["label"] for r in reviews) == {0: 100, 1: 100}


def test_jsonl_round_trip_and_cli(tmp_path: Path) -> None:
    """write_jsonl/read_jsonl round-trip, and the CLI writes the same rows."""
    rows = generate_sentiment(20, 4)
    assert read_jsonl(write_jsonl(rows, tmp_path / "a" / "rows.jsonl")) == rows
    out = tmp_path / "cli.jsonl"
    assert main(["tasks", "arithmetic", "--n", "15", "--seed", "2", "--out", str(out)]) == 0
    assert read_jsonl(out) == generate_arithmetic(15, 2)


def test_bundled_data_matches_generators(tmp_path: Path) -> None:
    """The shipped JSONL files are exactly what ``write_bundled_data`` produces."""
    if not all((DATA_DIR / name).exists() for name in BUNDLED_FILES):
        pytest.skip("bundled task data not present")
    write_bundled_data(tmp_path)
    for name, (_, n, _) in BUNDLED_FILES.items():
        shipped = (DATA_DIR / name).read_bytes()
        assert shipped == (tmp_path / name).read_bytes(), name
        assert shipped.count(b"\n") == n
    for task in ("one_more", "arithmetic", "domain", "sentiment"):
        key = "prompt" if task in ("one_more", "arithmetic") else "text"
        train = {r[key] for r in read_jsonl(DATA_DIR / f"{task}_train.jsonl")}
        evaluation = {r[key] for r in read_jsonl(DATA_DIR / f"{task}_eval.jsonl")}
        assert not train & evaluation


def test_pretrain_heldout_file() -> None:
    """The held-out pretraining sample is small JSONL of text rows."""
    path = DATA_DIR / "pretrain_heldout.jsonl"
    if not path.exists():
        pytest.skip("pretrain_heldout.jsonl not present")
    assert path.stat().st_size <= 200_000
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows and all(set(r) == {"text"} and r["text"].strip() for r in rows)


def test_bundled_model_loads_and_generates() -> None:
    """The bundled tiny base model loads with transformers and writes text."""
    if not (MODEL_DIR / "config.json").exists():
        pytest.skip("bundled tiny-base model not present")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    model.eval()
    assert model.config.model_type == "llama"
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    assert tokenizer.chat_template

    inputs = tokenizer("The function returns", return_tensors="pt")
    assert inputs["input_ids"][0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert sum(ch.isalpha() for ch in text) >= 5

    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.startswith("<s>") and chat.endswith("Assistant:")
