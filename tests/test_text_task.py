"""The bundled ``definitions`` task (WordNet glosses + Jargon File prose): its builder, its files, token F1."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from lorakit.evaluation.compare_config import load_compare_config
from lorakit.evaluation.generation import completion_f1, token_f1
from lorakit.train.data import read_jsonl, tokenize
from lorakit.util.resources import BUNDLED_DIR

ROOT = Path(__file__).resolve().parents[1]
DATA = BUNDLED_DIR / "data"
TASK = "definitions"


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_text_task", ROOT / "scripts" / "build_text_task.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_text_task"] = mod
    spec.loader.exec_module(mod)
    return mod


builder = _load_builder()


# --- a tiny synthetic WordNet and Jargon File -------------------------------------------------------------------
def _word(i: int) -> str:
    return "word" + chr(97 + i // 26) + chr(97 + i % 26)


def _write_wordnet(d: Path, n: int = 60) -> None:
    """``n`` nouns with one sense each, plus cases the builder must drop or dedupe."""
    d.mkdir(parents=True)
    index = {"noun": ["  1 licence header line"], "verb": [], "adj": []}
    data = {"noun": ["  1 licence header line"], "verb": [], "adj": []}
    for i in range(n):
        off = f"{i + 1:08d}"
        index["noun"].append(f"{_word(i)} n 1 1 @ 1 1 {off}  ")
        data["noun"].append(f"{off} 05 n 01 {_word(i)} 0 000 | the meaning of {_word(i)} in a few words; "
                            f'"an example of {_word(i)}"  ')
    # a synonym of word 0 (same synset: never in both splits), a verb sense of word 1, filtered lemmas
    index["noun"] += ["synonymous n 1 0 1 1 00000001  ", "two_words n 1 0 1 1 00000002  ",
                      "untagged n 1 0 1 0 00000003  ", "short n 1 0 1 1 00009999  "]
    data["noun"].append("00009999 05 n 01 short 0 000 | tiny  ")
    index["verb"].append(f"{_word(1)} v 1 1 @ 1 1 00000100  ")
    data["verb"].append(f"00000100 30 v 01 {_word(1)} 0 000 | to do what {_word(1)} does  ")
    for pos in ("noun", "verb", "adj"):
        (d / f"index.{pos}").write_text("\n".join(index[pos]) + "\n")
        (d / f"data.{pos}").write_text("\n".join(data[pos]) + "\n")


def _b64(n: int) -> str:
    digits = ""
    while True:
        digits = builder._B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def _write_jargon(d: Path, n: int = 12) -> None:
    d.mkdir(parents=True)
    body, index = b"", []
    for i in range(n):
        prose = " ".join(f"Sentence {k} of entry {i} is plain prose about {{hacker}} culture." for k in range(12))
        lines = [f"entry{i}", " n.", ""] + ["    " + ln for ln in textwrap.wrap(prose, 70)] + [""]
        if i == 0:
            lines += ["        an indented example line", ""]  # not running prose: the entry is skipped
        chunk = ("\n".join(lines) + "\n").encode()
        index.append(f"entry{i}\t{_b64(len(body))}\t{_b64(len(chunk))}")
        body += chunk
    (d / "jargon.index").write_text("\n".join(index) + "\n")
    (d / "jargon.dict").write_bytes(body)


@pytest.fixture()
def sources(tmp_path: Path) -> tuple[Path, Path]:
    _write_wordnet(tmp_path / "wn")
    _write_jargon(tmp_path / "jg")
    return tmp_path / "wn", tmp_path / "jg"


def _build(sources: tuple[Path, Path], out: Path, seed: int = 0) -> dict[str, bytes]:
    builder.build(sources[0], sources[1], out, seed=seed, n_train=40, n_eval=10, n_general=8)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- the builder ------------------------------------------------------------------------------------------------
def test_builder_is_deterministic(sources: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = _build(sources, tmp_path / "a"), _build(sources, tmp_path / "b")
    assert a == b
    assert set(a) == {f"{TASK}_train.jsonl", f"{TASK}_eval.jsonl", f"{TASK}_heldout_general.jsonl",
                      f"{TASK}.LICENSE", f"{TASK}_build.json"}
    other = _build(sources, tmp_path / "c", seed=1)
    assert other[f"{TASK}_eval.jsonl"] != a[f"{TASK}_eval.jsonl"]  # the seed decides the split


def test_builder_rows_and_filters(sources: tuple[Path, Path], tmp_path: Path) -> None:
    _build(sources, tmp_path / "out")
    train, held = _rows(tmp_path / "out" / f"{TASK}_train.jsonl"), _rows(tmp_path / "out" / f"{TASK}_eval.jsonl")
    assert len(train) == 40 and len(held) == 10
    words = {r["word"] for r in train + held}
    assert not words & {"two_words", "untagged", "short"}  # multiword, not in SemCor, too short a gloss
    row = next(r for r in train + held if r["word"] == _word(5))
    assert row["prompt"] == f"Word: {_word(5)} (noun)\nDefinition:"
    assert row["completion"] == f" the meaning of {_word(5)} in a few words"  # the example sentence is dropped
    general = _rows(tmp_path / "out" / f"{TASK}_heldout_general.jsonl")
    assert len(general) == 8
    assert all("{" not in r["text"] and "indented example" not in r["text"] for r in general)
    assert all(r["text"].endswith(".") and len(r["text"]) <= 700 for r in general)


def test_choice_items_are_held_out_with_same_pos_distractors(sources: tuple[Path, Path], tmp_path: Path) -> None:
    builder.build(*sources, tmp_path / "c", seed=0, n_train=40, n_eval=10, n_general=8, n_choice=8)
    plain = _build(sources, tmp_path / "plain")
    for name in (f"{TASK}_train.jsonl", f"{TASK}_eval.jsonl"):  # the choice set comes after both: they are unchanged
        assert (tmp_path / "c" / name).read_bytes() == plain[name]
    train, held = _rows(tmp_path / "c" / f"{TASK}_train.jsonl"), _rows(tmp_path / "c" / f"{TASK}_eval.jsonl")
    choice = _rows(tmp_path / "c" / f"{TASK}_choice.jsonl")
    assert len(choice) == 8 and not {r["word"] for r in choice} & {r["word"] for r in train + held}
    glosses = {r["completion"] for r in choice}
    for r in choice:
        assert len(r["choices"]) == 4 and r["choices"][r["answer"]] == r["completion"]
        others = [c for i, c in enumerate(r["choices"]) if i != r["answer"]]
        assert all(c in glosses and c != r["completion"] for c in others)  # other choice words' glosses


def test_eval_items_are_disjoint_from_training(sources: tuple[Path, Path], tmp_path: Path) -> None:
    for seed in range(5):
        out = tmp_path / f"s{seed}"
        _build(sources, out, seed=seed)
        train, held = _rows(out / f"{TASK}_train.jsonl"), _rows(out / f"{TASK}_eval.jsonl")
        assert not {r["word"] for r in train} & {r["word"] for r in held}
        assert not {r["completion"] for r in train} & {r["completion"] for r in held}  # synonyms share a gloss
        # everything kept (61 distinct synsets): the synonym pair still gives one item
        builder.build(*sources, out / "all", seed=seed, n_train=51, n_eval=10, n_general=8)
        rows = _rows(out / "all" / f"{TASK}_train.jsonl") + _rows(out / "all" / f"{TASK}_eval.jsonl")
        assert len(rows) == 61 and len([r for r in rows if r["word"] in ("synonymous", _word(0))]) == 1


def test_builder_reads_a_debian_package(tmp_path: Path) -> None:
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for name, text in (("./usr/share/wordnet/index.noun", b"x n 1 0 1 1 00000001\n"), ("./usr/doc/other", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    members = [(b"debian-binary", b"2.0\n"), (b"data.tar.xz", tar_bytes.getvalue())]
    ar = b"!<arch>\n" + b"".join(name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) +
                                 b"100644".ljust(8) + str(len(data)).encode().ljust(10) + b"`\n" + data +
                                 (b"\n" if len(data) % 2 else b"") for name, data in members)
    deb = tmp_path / "x_all.deb"
    deb.write_bytes(ar)
    assert builder.read_source(deb, {"index.noun"}) == {"index.noun": b"x n 1 0 1 1 00000001\n"}
    with pytest.raises(FileNotFoundError):
        builder.read_source(deb, {"index.noun", "data.noun"})


def test_dict_numbers_and_gloss_split() -> None:
    assert builder.dict_number("A") == 0 and builder.dict_number("BA") == 64 and builder.dict_number("/") == 63
    assert builder.split_gloss(' a port;  a haven; "ships came in"; "x"') == "a port; a haven"
    assert builder.cut_text("One. Two three. Four five six.", 18) == "One. Two three."


# --- the bundled files ------------------------------------------------------------------------------------------
def test_bundled_files_parse_with_lorakits_readers() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BUNDLED_DIR / "tiny-base"))
    for name, fmt in (("train", "prompt_completion"), ("eval", "prompt_completion"),
                      ("heldout_general", "text")):
        path = DATA / f"{TASK}_{name}.jsonl"
        ds = tokenize(read_jsonl(path), tok, max_length=256, source=str(path))
        assert ds.format == fmt and len(ds) == len(path.read_text(encoding="utf-8").splitlines()) and ds.n_dropped == 0
    train, held = _rows(DATA / f"{TASK}_train.jsonl"), _rows(DATA / f"{TASK}_eval.jsonl")
    assert (len(train), len(held)) == (3000, 150)
    assert not {r["word"] for r in train} & {r["word"] for r in held}
    assert not {r["completion"] for r in train} & {r["completion"] for r in held}
    licence = (DATA / f"{TASK}.LICENSE").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in licence and "public domain" in licence
    build = json.loads((DATA / f"{TASK}_build.json").read_text())
    assert build["rows"][f"{TASK}_train.jsonl"] == 3000


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                         if p.read_text().count("\ncompare:") + p.read_text().count("\nmethods:") == 2))
def test_every_committed_compare_config_validates(name: str, tmp_path: Path) -> None:
    """Every comparison and sweep config in configs/ validates, each label's run config too (without loading a
    model): a committed config broken by a renamed option is found here, not by the next person who runs it."""
    cc = load_compare_config(ROOT / "configs" / name)
    for label in cc.labels():
        cc.run_config(label, 0, tmp_path / label)


def test_compare_config_validates_for_every_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cc = load_compare_config(ROOT / "configs" / "compare-smollm2-text.yaml")
    assert cc.base["model"]["path"] == "bundled://smollm2-135m"
    assert len(cc.compare.seeds) == 3
    for label in cc.labels():
        cfg = cc.run_config(label, 0, tmp_path / label)  # validates; loads no model
        assert cfg.data.train.endswith(f"{TASK}_train.jsonl")
    # its repository paths (the sweep, the experiments) resolve from any working directory
    sweep = cc.compare.lr_sweep
    assert sweep is not None and Path(sweep).is_file() and sweep.endswith("lr-sweep/results.json")
    monkeypatch.chdir(tmp_path)
    assert load_compare_config(ROOT / "configs" / "compare-smollm2-text.yaml").compare.lr_sweep == sweep


# --- token F1 ---------------------------------------------------------------------------------------------------
def test_token_f1() -> None:
    assert token_f1("a sheltered port", "a port where ships shelter") == pytest.approx(0.5)
    assert token_f1("The Port.", "the port") == 1.0  # case and punctuation ignored
    assert token_f1("port port", "port") == pytest.approx(2 * 0.5 * 1 / 1.5)  # a token counts once per match
    assert token_f1("", "") == 1.0 and token_f1("...", "port") == 0.0 and token_f1("ship", "port") == 0.0


def test_completion_f1_on_the_tiny_model() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(BUNDLED_DIR / "tiny-base")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    rows = _rows(DATA / f"{TASK}_eval.jsonl")[:3]
    res = completion_f1(model, tok, rows, max_new_tokens=8, batch_size=2)
    assert res["examples"] == 3 and 0.0 <= res["token_f1"] <= 1.0
    assert [s["completion"] for s in res["samples"]] == [r["completion"] for r in rows]
    assert all("\n" not in s["predicted"] for s in res["samples"])
    assert completion_f1(model, tok, [{"text": "x"}])["token_f1"] is None


def test_batched_generation_equals_model_generate_alone() -> None:
    """The evaluation's generations run lorakit's one decode loop (left-padded batches, finished rows dropped);
    each equals ``model.generate`` greedy on its prompt alone, on a real tokenizer with special tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.evaluation.generation import generate

    from .conftest import hf_greedy

    path = str(BUNDLED_DIR / "tiny-base")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    prompts = [r["prompt"] for r in _rows(DATA / f"{TASK}_eval.jsonl")[:5]] + ["A"]
    model.train()
    got = generate(model, tok, prompts, max_new_tokens=10, batch_size=4)
    assert model.training  # put back as it was
    assert got == hf_greedy(model.eval(), tok, prompts, 10)
