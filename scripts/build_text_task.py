#!/usr/bin/env python3
"""Build lorakit's bundled *definitions* task from real, human-written, redistributable English text.

Two sources, both Debian packages fetched with ``apt-get download`` (pinned versions and SHA-256 below):

* **WordNet 3.0** (``wordnet-base``, Princeton University, WordNet 3.0 licence: use, copy, modify and
  distribute for any purpose, provided the copyright notice and disclaimer go with every copy). Each item is
  a common English word (attested in the sense-tagged SemCor corpus), its part of speech, and the gloss of
  its most frequent sense, without the gloss's example sentences::

      {"prompt": "Word: harbor (noun)\\nDefinition:", "completion": " a sheltered port where ships can ..."}

* **The Jargon File 4.4.7** (``dict-jargon``, public domain, cite as "Jargon File 4.4.7"): prose paragraphs
  of its lexicon entries become ``{"text"}`` rows, the *general text* of the forgetting measure (loss on it
  after fine-tuning minus before). None of it is trained on.

Held-out items: words are shuffled with ``--seed`` and split by *word* (every part of speech of a word goes
to the same split), each WordNet synset is used at most once overall (synonyms share a gloss, so a synonym
in training would leak an eval answer) and each definition text at most once. Eval words therefore never
occur as a training headword and no eval definition occurs in training.

Outputs (``--out``, default ``src/lorakit/bundled/data``)::

    definitions_train.jsonl             prompt/completion rows (training)
    definitions_eval.jsonl              prompt/completion rows for held-out words (eval loss; the reference
                                        for token-F1 of greedy generations is the completion)
    definitions_heldout_general.jsonl   {"text"} rows from the Jargon File (forgetting)
    definitions.LICENSE                 both licences, attribution, and how the files were made
    definitions_build.json              counts, sources and checksums of this build

Regenerate (from the repository root, Debian with ``apt-get update`` done once)::

    .venv/bin/python scripts/build_text_task.py --download /tmp/lorakit-debs

or with packages (``.deb`` files) or unpacked folders already on disk::

    .venv/bin/python scripts/build_text_task.py --wordnet wordnet-base_3.0-37_all.deb \\
        --jargon dict-jargon_4.4.7-3.1_all.deb

The build is a pure function of the two inputs and the arguments: the same inputs give byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASK = "definitions"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "lorakit" / "bundled" / "data"

#: The Debian packages this task is built from: ``name -> (version, sha256 of the .deb)``.
PACKAGES: dict[str, tuple[str, str]] = {
    "wordnet-base": ("1:3.0-37", "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"),
    "dict-jargon": ("4.4.7-3.1", "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1"),
}
POS_NAMES = {"noun": "noun", "verb": "verb", "adj": "adjective"}
WORD_RE = re.compile(r"^[a-z]{3,16}$")


# --- reading the packages -------------------------------------------------------------------------------------
def deb_members(deb: Path, names: set[str]) -> dict[str, bytes]:
    """The files of a ``.deb``'s ``data.tar.*`` whose base names are in ``names`` (no dpkg needed)."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb}: not a Debian package (ar archive)")
    pos, data = 8, None
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith("data.tar"):
            data = raw[pos + 60:pos + 60 + size]
            break
        pos += 60 + size + (size % 2)  # members are 2-byte aligned
    if data is None:
        raise ValueError(f"{deb}: no data.tar member")
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # xz/gz/bz2 detected by tarfile
        for m in tar.getmembers():
            base = m.name.rsplit("/", 1)[-1]
            if m.isfile() and base in names:
                f = tar.extractfile(m)
                assert f is not None
                out[base] = f.read()
    return out


def read_source(src: str | Path, names: set[str]) -> dict[str, bytes]:
    """``names`` from a ``.deb`` file or from a folder (searched recursively, e.g. an unpacked package)."""
    src = Path(src)
    if src.is_file():
        found = deb_members(src, names)
    else:
        found = {}
        for p in sorted(src.rglob("*")):
            if p.is_file() and p.name in names and p.name not in found:
                found[p.name] = p.read_bytes()
    missing = sorted(names - set(found))
    if missing:
        raise FileNotFoundError(f"{src}: missing {', '.join(missing)}")
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download(package: str, dest: Path) -> Path:
    """``apt-get download PACKAGE=VERSION`` into ``dest`` (reused when present); the checksum is verified."""
    version, digest = PACKAGES[package]
    dest.mkdir(parents=True, exist_ok=True)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        r = subprocess.run(["apt-get", "download", f"{package}={version}"], check=False, cwd=dest,
                           capture_output=True, text=True)
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if r.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download {package}={version} failed (run 'apt-get update' first?): "
                               f"{r.stderr.strip()}")
    if sha256(debs[-1]) != digest:
        raise RuntimeError(f"{debs[-1]}: SHA-256 {sha256(debs[-1])} is not the pinned {digest}")
    return debs[-1]


# --- WordNet ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    word: str
    pos: str  # noun, verb, adj
    synset: str  # "pos:offset"
    definition: str


def split_gloss(gloss: str) -> str:
    """The definition part of a WordNet gloss: the text before its first quoted example, without ``;``."""
    return re.sub(r"\s+", " ", gloss.split('"', 1)[0]).strip().rstrip(";").strip()


def parse_wordnet(files: dict[str, bytes], *, min_words: int = 3, max_words: int = 24) -> list[Item]:
    """Every candidate item: a lowercase single word with a SemCor-attested sense, and its first sense's gloss.

    ``index.POS`` lists a lemma's synsets most frequent first; ``tagsense_cnt`` (the number of its senses
    tagged in SemCor) > 0 keeps words that occur in running text. Definitions outside
    ``[min_words, max_words]`` words are skipped (short sequences).
    """
    items: list[Item] = []
    for pos in POS_NAMES:
        glosses: dict[str, str] = {}
        for line in files[f"data.{pos}"].decode("utf-8").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header lines start with two spaces
            glosses[line.split(" ", 1)[0]] = line.split("|", 1)[1]
        for line in files[f"index.{pos}"].decode("utf-8").splitlines():
            if line.startswith("  ") or not line.strip():
                continue
            f = line.split()
            lemma, p_cnt = f[0], int(f[3])
            # lemma pos synset_cnt p_cnt [ptr_symbol x p_cnt] sense_cnt tagsense_cnt synset_offset...
            tagsense_cnt = int(f[5 + p_cnt])
            offsets = f[6 + p_cnt:]
            if not WORD_RE.match(lemma) or tagsense_cnt < 1 or not offsets:
                continue
            definition = split_gloss(glosses[offsets[0]])
            if not min_words <= len(definition.split()) <= max_words:
                continue
            items.append(Item(lemma, pos, f"{pos}:{offsets[0]}", definition))
    return items


def definition_row(item: Item) -> dict[str, str]:
    return {"prompt": f"Word: {item.word} ({POS_NAMES[item.pos]})\nDefinition:", "completion": f" {item.definition}",
            "word": item.word, "pos": POS_NAMES[item.pos]}


def split_items(items: list[Item], *, n_train: int, n_eval: int, seed: int,
                n_choice: int = 0) -> tuple[list[Item], list[Item], list[Item]]:
    """Train, held-out and choice items, split by word; each synset and each definition used at most once overall
    (the held-out and train items are the same whatever ``n_choice``: the choice items come after both)."""
    by_word: dict[str, list[Item]] = {}
    for it in sorted(items, key=lambda i: (i.word, i.pos)):
        by_word.setdefault(it.word, []).append(it)
    words = sorted(by_word)
    random.Random(seed).shuffle(words)
    seen_synsets: set[str] = set()
    seen_defs: set[str] = set()
    train: list[Item] = []
    held: list[Item] = []
    choice: list[Item] = []
    for w in words:
        kept = []
        for it in by_word[w]:
            if it.synset in seen_synsets or it.definition.lower() in seen_defs:
                continue
            seen_synsets.add(it.synset)
            seen_defs.add(it.definition.lower())
            kept.append(it)
        if not kept:
            continue
        if len(held) < n_eval:
            held.extend(kept[:n_eval - len(held)])
        elif len(train) < n_train:
            train.extend(kept[:n_train - len(train)])
        elif len(choice) < n_choice:
            choice.extend(kept[:n_choice - len(choice)])
        else:
            break
    return train, held, choice


#: Glosses offered per choice item: the right one and this many others' of the same part of speech.
DISTRACTORS = 3


def choice_rows(items: list[Item], seed: int) -> list[dict[str, Any]]:
    """Four-way multiple choice over held-out words: each row's own gloss among :data:`DISTRACTORS` glosses of
    other choice words with the same part of speech, in a seeded order (``answer`` is the right one's index)."""
    rng = random.Random(seed + 1)
    by_pos: dict[str, list[Item]] = {}
    for it in items:
        by_pos.setdefault(it.pos, []).append(it)
    rows = []
    if len(items) <= DISTRACTORS:
        raise ValueError(f"a choice set needs more than {DISTRACTORS} items, got {len(items)}")
    for it in items:
        others = [o for o in by_pos[it.pos] if o.word != it.word]
        if len(others) >= DISTRACTORS:
            picked = rng.sample(others, DISTRACTORS)
        else:  # too few of this part of speech (small builds): the rest from the others
            rest = [o for o in items if o.word != it.word and o.pos != it.pos]
            picked = others + rng.sample(rest, DISTRACTORS - len(others))
        options = [f" {x.definition}" for x in [it, *picked]]
        order = list(range(len(options)))
        rng.shuffle(order)
        rows.append({**definition_row(it), "choices": [options[i] for i in order], "answer": order.index(0)})
    return rows


# --- the Jargon File --------------------------------------------------------------------------------------------
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dict_number(s: str) -> int:
    """A dictd index number (base 64, most significant digit first)."""
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def parse_jargon(index: str, body: bytes) -> list[tuple[str, str]]:
    """``(headword, prose)`` for each lexicon entry of a dictd Jargon File.

    Prose is the entry's paragraphs indented by exactly four spaces (indented examples, code and ASCII art
    are left out), joined into running text, with the ``{cross reference}`` braces removed.
    """
    entries = []
    for line in index.splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00-database"):
            continue
        start, size = dict_number(parts[1]), dict_number(parts[2])
        lines = body[start:start + size].decode("utf-8").splitlines()
        paragraphs: list[str] = []
        current: list[str] = []
        ok = True
        for ln in lines[2:]:  # headword, pronunciation / part of speech
            if not ln.strip():
                if current:
                    paragraphs.append(" ".join(current))
                current = []
            elif ln.startswith("    ") and not ln.startswith("     "):
                current.append(ln.strip())
            else:
                ok = False  # an indented example or figure: not running prose
        if current:
            paragraphs.append(" ".join(current))
        if ok and paragraphs:
            text = re.sub(r"\s+", " ", " ".join(paragraphs).replace("{", "").replace("}", ""))
            # a line break inside a {reference} leaves a space before closing / after opening punctuation
            text = re.sub(r"([(“‘])\s+", r"\1", re.sub(r"\s+([).,;:”’])", r"\1", text))
            entries.append((parts[0], text.strip()))
    return entries


def cut_text(text: str, max_chars: int) -> str:
    """``text`` cut at the last sentence end before ``max_chars`` (whole text when shorter)."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    ends = [m.end() for m in re.finditer(r"[.!?][”\"’)]?(?=\s)", head)]
    return head[:ends[-1]] if ends else head.rsplit(" ", 1)[0]


def general_rows(entries: list[tuple[str, str]], *, n: int, seed: int, min_chars: int = 400,
                 max_chars: int = 700) -> list[dict[str, str]]:
    """``n`` ``{"text"}`` rows: long prose entries in a seeded order, each cut to ``max_chars`` at a sentence end."""
    long = sorted((h, t) for h, t in entries if len(t) >= min_chars)
    random.Random(seed + 1).shuffle(long)
    return [{"text": cut_text(t, max_chars)} for _, t in long[:n]]


# --- the build --------------------------------------------------------------------------------------------------
WORDNET_FILES = {f"{k}.{pos}" for k in ("index", "data") for pos in POS_NAMES}
JARGON_FILES = {"jargon.index", "jargon.dict.dz"}


def _jargon_files(src: str | Path) -> tuple[str, bytes]:
    src = Path(src)
    try:
        found = read_source(src, JARGON_FILES)
        body = gzip.decompress(found["jargon.dict.dz"])  # dictzip is gzip with an extra header field
    except FileNotFoundError:
        found = read_source(src, {"jargon.index", "jargon.dict"})
        body = found["jargon.dict"]
    return found["jargon.index"].decode("utf-8"), body


def build(wordnet: str | Path, jargon: str | Path, out: str | Path, *, seed: int = 0, n_train: int = 3000,
          n_eval: int = 150, n_general: int = 60, n_choice: int = 0,
          sources: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the task's files into ``out``; returns the build summary (also written as ``definitions_build.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = parse_wordnet(read_source(wordnet, WORDNET_FILES))
    train, held, choice = split_items(items, n_train=n_train, n_eval=n_eval, seed=seed, n_choice=n_choice)
    if len(held) < n_eval or len(train) < n_train or len(choice) < n_choice:
        raise ValueError(f"only {len(train)} train / {len(held)} eval / {len(choice)} choice items (asked "
                         f"{n_train} / {n_eval} / {n_choice})")
    index, body = _jargon_files(jargon)
    general = general_rows(parse_jargon(index, body), n=n_general, seed=seed)
    if len(general) < n_general:
        raise ValueError(f"only {len(general)} general-text rows (asked {n_general})")
    files = {f"{TASK}_train.jsonl": [definition_row(i) for i in train],
             f"{TASK}_eval.jsonl": [definition_row(i) for i in held],
             f"{TASK}_heldout_general.jsonl": general}
    if n_choice:
        files[f"{TASK}_choice.jsonl"] = choice_rows(choice, seed)
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (out / f"{TASK}.LICENSE").write_text(LICENSE_TEXT, encoding="utf-8")
    summary = {"task": TASK, "seed": seed, "candidates": len(items),
               "rows": {name: len(rows) for name, rows in files.items()},
               "bytes": {name: (out / name).stat().st_size for name in files},
               "sources": sources or {}, "script": "scripts/build_text_task.py"}
    (out / f"{TASK}_build.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


LICENSE_TEXT = """\
The files definitions_train.jsonl, definitions_eval.jsonl and definitions_heldout_general.jsonl were made by
scripts/build_text_task.py from two works. Rows were selected and reformatted; the text itself is unchanged
except for whitespace, the removal of WordNet's example sentences from glosses, and the removal of the
Jargon File's {cross-reference} braces.

1. definitions_train.jsonl, definitions_eval.jsonl: glosses from WordNet 3.0
   (Debian package wordnet-base 1:3.0-37, https://wordnet.princeton.edu/).
   Citation: Princeton University "About WordNet." WordNet. Princeton University. 2010.
   George A. Miller (1995). WordNet: A Lexical Database for English. Communications of the ACM 38(11): 39-41.

   WordNet Release 3.0

   This software and database is being provided to you, the LICENSEE, by
   Princeton University under the following license.  By obtaining, using
   and/or copying this software and database, you agree that you have
   read, understood, and will comply with these terms and conditions.:

   Permission to use, copy, modify and distribute this software and
   database and its documentation for any purpose and without fee or
   royalty is hereby granted, provided that you agree to comply with
   the following copyright notice and statements, including the disclaimer,
   and that the same appear on ALL copies of the software, database and
   documentation, including modifications that you make for internal
   use or for distribution.

   WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.

   THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON
   UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
   IMPLIED.  BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON
   UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT-
   ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE
   OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT
   INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR
   OTHER RIGHTS.

   The name of Princeton University or Princeton may not be used in
   advertising or publicity pertaining to distribution of the software
   and/or database.  Title to copyright in this software, database and
   any associated documentation shall at all times remain with
   Princeton University and LICENSEE agrees to preserve same.

2. definitions_heldout_general.jsonl: prose from the Jargon File, version 4.4.7, 29 Dec 2003
   (Debian package dict-jargon 4.4.7-3.1; original data http://catb.org/~esr/jargon/jargsrc.tar.gz).

   This document (the Jargon File) is in the public domain, to be freely used, shared, and
   modified. There are (by intention) no legal restraints on what you can do with it, but there
   are traditions about its proper use to which many hackers are quite strongly attached.
   Please extend the courtesy of proper citation when you quote the File, ideally with a
   version number, as it will change and grow over time. (Examples of appropriate citation
   form: "Jargon File 4.4.7" or "The on-line hacker Jargon File, version 4.4.7, 29 Dec 2003".)
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wordnet", help="wordnet-base .deb, or a folder holding index.noun, data.noun, ...")
    ap.add_argument("--jargon", help="dict-jargon .deb, or a folder holding jargon.index and jargon.dict(.dz)")
    ap.add_argument("--download", metavar="DIR", help="apt-get download the pinned packages into DIR (reused)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--eval", type=int, default=150)
    ap.add_argument("--general", type=int, default=60)
    ap.add_argument("--choice", type=int, default=600, help="held-out words of the 4-way gloss choice set")
    a = ap.parse_args(argv)
    wordnet, jargon = a.wordnet, a.jargon
    if a.download:
        wordnet = wordnet or download("wordnet-base", Path(a.download))
        jargon = jargon or download("dict-jargon", Path(a.download))
    if not wordnet or not jargon:
        ap.error("give --wordnet and --jargon, or --download DIR")
    sources = {}
    for pkg, src in (("wordnet-base", Path(wordnet)), ("dict-jargon", Path(jargon))):
        sources[pkg] = {"version": PACKAGES[pkg][0], "file": src.name,
                        "sha256": sha256(src) if src.is_file() else None}
    summary = build(wordnet, jargon, a.out, seed=a.seed, n_train=a.train, n_eval=a.eval, n_general=a.general,
                    n_choice=a.choice, sources=sources)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
