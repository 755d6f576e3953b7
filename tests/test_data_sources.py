"""The data people bring: JSON, CSV, parquet, datasets directories and objects; alpaca and ShareGPT records;
column renames; clear errors naming the file, the row and what each format needs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pytest
import torch

from lorakit.cli import main
from lorakit.train.config import DataConfig
from lorakit.train.data import IGNORE, DataError, dataset_from, load_datasets, read_source
from lorakit.train.sources import alpaca_prompt
from lorakit.train.trainer import Trainer

from .fixtures_train import make_config

pytestmark = pytest.mark.usefixtures("one_thread")

ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": " 5"},
          {"instruction": "Say hello.", "input": "", "output": " hello"}]
SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                               {"from": "gpt", "value": "Hello."}]}]


@pytest.fixture(scope="module")
def tok(tiny_run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_run["base"])


def _cfg(train: Path | str, **kw) -> DataConfig:
    return DataConfig(train=str(train), eval_fraction=0, max_length=64, **kw)


def _write(rows: list[dict], path: Path) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:  # a datasets directory
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", ["a.jsonl", "a.json", "a.csv", "a.parquet", "saved"])
def test_every_source_gives_the_same_records(name: str, tmp_path: Path) -> None:
    path = _write(ALPACA, tmp_path / name)
    records, source = read_source(path, _cfg(path))
    assert [obj for _, obj in records] == ALPACA and source == str(path)


def test_alpaca_becomes_prompt_completion(tmp_path: Path, tok) -> None:
    ds = dataset_from(ALPACA, _cfg("x"), tok, task="causal-lm")
    assert ds.format == "prompt_completion"
    prompt = tok(alpaca_prompt("Add the numbers.", "2 and 3"))["input_ids"]
    ex = ds.examples[0]
    assert ex.input_ids[:len(prompt)] == prompt and all(y == IGNORE for y in ex.labels[:len(prompt)])
    assert [y for y in ex.labels if y != IGNORE] == tok(" 5", add_special_tokens=False)["input_ids"] + \
        [tok.eos_token_id]
    assert "### Input" not in alpaca_prompt("Say hello.", "")  # an empty input adds no section


def test_sharegpt_becomes_chat(tok) -> None:
    ds = dataset_from(SHAREGPT, _cfg("x"), tok, task="causal-lm")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}]
    same = dataset_from([{"messages": messages}], _cfg("x"), tok, task="causal-lm")  # what it must equal
    assert ds.format == "chat"
    assert ds.examples[0].input_ids == same.examples[0].input_ids
    assert ds.examples[0].labels == same.examples[0].labels and any(y != IGNORE for y in ds.examples[0].labels)


def test_csv_values_stay_strings(tmp_path: Path, tok) -> None:
    path = _write([{"prompt": "Is it zero?", "completion": " 0"}, {"prompt": "One?", "completion": " 1"}],
                  tmp_path / "a.csv")
    records, _ = read_source(path, _cfg(path))
    assert records[0][1]["completion"] == " 0"  # the string as written, not the integer 0
    assert records[0][0] == 2  # the CSV line it came from (after the header)
    assert dataset_from(path, _cfg(path), tok, task="causal-lm").format == "prompt_completion"


def test_column_renames(tmp_path: Path, tok) -> None:
    rows = [{"question": "2+2?", "answer": " 4"}]
    path = _write(rows, tmp_path / "q.jsonl")
    ds = dataset_from(path, _cfg(path, columns={"prompt": "question", "completion": "answer"}), tok,
                      task="causal-lm")
    assert ds.format == "prompt_completion" and len(ds) == 1
    with pytest.raises(DataError, match=r"q.jsonl:1: data.columns names column\(s\) \['answr'\]"):
        dataset_from(path, _cfg(path, columns={"completion": "answr"}), tok, task="causal-lm")


def test_unknown_columns_say_what_each_format_needs(tmp_path: Path, tok) -> None:
    path = _write([{"question": "2+2?", "answer": " 4"}], tmp_path / "q.csv")
    with pytest.raises(DataError) as e:
        dataset_from(path, _cfg(path), tok, task="causal-lm")
    msg = str(e.value)
    assert "q.csv:2" in msg and "['answer', 'question']" in msg and "alpaca: instruction, output" in msg
    assert "sharegpt: conversations" in msg and "data.columns" in msg


@pytest.mark.parametrize(("content", "message"), [
    ("a,b\n1,2,3\n", "q.csv:2: more cells"), ("a,b\n1\n", "q.csv:2: fewer cells"), ("a,b\n", "only a header"),
])
def test_bad_csv_names_the_line(content: str, message: str, tmp_path: Path, tok) -> None:
    path = tmp_path / "q.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        dataset_from(path, _cfg(path), tok, task="causal-lm")


def test_bad_sharegpt_and_alpaca_records(tok) -> None:
    with pytest.raises(DataError, match=r"list:1: conversations\[0\]: unknown speaker 'robot'"):
        dataset_from([{"conversations": [{"from": "robot", "value": "x"}]}], _cfg("x"), tok, task="causal-lm")
    with pytest.raises(DataError, match="'output' must be a string"):
        dataset_from([{"instruction": "a", "output": 3}], _cfg("x"), tok, task="causal-lm")
    with pytest.raises(DataError, match="not one written by datasets"):
        read_source(Path(__file__).parent, _cfg("x"))


def test_trainer_takes_a_datasets_dataset(tiny_run, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in Path(tiny_run["train"]).read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"instruction": r["prompt"], "input": "", "output": r["completion"]}
                                     for r in rows])
    cfg = make_config(tiny_run, tmp_path / "run", training={"max_steps": 2}, data={"eval": None})
    trainer = Trainer(None, cfg, train_data=ds, eval_data=ds.select(range(4)))
    result = trainer.fit()
    assert result.step == 2 and trainer.train_data.format == "prompt_completion" and len(trainer.eval_data) == 4
    assert result.eval_end["eval_loss"] < result.eval_start["eval_loss"] + 1.0
    assert torch.isfinite(torch.tensor(result.eval_end["eval_loss"]))


def test_cli_trains_on_a_csv_alpaca_file(tiny_run, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in Path(tiny_run["train"]).read_text().splitlines()]
    path = _write([{"instruction": r["prompt"], "input": "", "output": r["completion"]} for r in rows],
                  tmp_path / "train.csv")
    cfg = make_config(tiny_run, tmp_path / "run", training={"max_steps": 2},
                      data={"train": str(path), "eval": None, "eval_fraction": 0.1})
    assert main(["train", str(cfg)]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter.json").is_file()


def test_load_datasets_reads_eval_of_another_kind(tmp_path: Path, tok) -> None:
    train = _write(ALPACA * 3, tmp_path / "t.parquet")
    evalf = _write(ALPACA, tmp_path / "e.json")
    tr, ev = load_datasets(DataConfig(train=str(train), eval=str(evalf), max_length=64), tok, task="causal-lm",
                           seed=0)
    assert len(tr) == 6 and len(ev) == 2 and tr.format == ev.format == "prompt_completion"


# --- packing without leaks -------------------------------------------------------------------------------------
def test_packed_loss_and_gradients_equal_the_examples_run_alone(tok) -> None:
    """Positions restart and attention stays inside each example: the packed batch's summed token loss and its
    gradients equal those of the same examples run one at a time (fp32)."""
    import lorakit
    from lorakit.fast import speed
    from lorakit.testing import build_tiny_llama
    from lorakit.train.batching import collate
    from lorakit.train.data import pack, tokenize

    texts = ["the cat sat on the mat", "a dog", "hello world and more words here", "one two three"]
    ds = tokenize([(i, {"text": t}) for i, t in enumerate(texts)], tok, max_length=64)
    packed = pack(ds, 24)
    assert len(packed) < len(ds) and any(len(set(b.segments)) > 1 for b in packed.examples)
    model = build_tiny_llama(len(tok), hidden=32)
    lorakit.attach(model, "lora", r=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.train()

    def summed(batch, fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        with lorakit.core.lowrank.fused(fused):
            loss = speed.causal_lm_loss(model, batch["input_ids"], batch["labels"],
                                        attention_mask=batch["attention_mask"],
                                        position_ids=batch.get("position_ids")) * n
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    for fused in (False, True):
        alone = [summed(collate([e], int(tok.pad_token_id)), fused) for e in ds.examples]
        loss_alone = sum(a[0] for a in alone)
        grads_alone = {k: sum(a[1][k] for a in alone) for k in alone[0][1]}
        loss_packed, grads_packed = summed(collate(packed.examples, int(tok.pad_token_id)), fused)
        torch.testing.assert_close(loss_packed, loss_alone, rtol=1e-5, atol=1e-5)
        for k in grads_alone:
            torch.testing.assert_close(grads_packed[k], grads_alone[k], rtol=1e-5, atol=1e-6)


def test_cli_trains_packed(tiny_run, tmp_path: Path) -> None:
    cfg = make_config(tiny_run, tmp_path / "run", training={"max_steps": 2}, data={"packing": True, "max_length": 96})
    assert main(["train", str(cfg)]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter.json").is_file()


# --- batching by length and by token budget ---------------------------------------------------------------------
def test_length_grouping_and_token_budget_cover_every_example_once() -> None:
    from lorakit.train.batching import BatchOrder

    rng = torch.Generator().manual_seed(0)
    lengths = (torch.rand(500, generator=rng) ** 3 * 500 + 5).long().tolist()  # mostly short, a few long
    plain = BatchOrder(500, 8, seed=1)
    grouped = BatchOrder(500, 8, seed=1, lengths=lengths, group_by_length=True)
    budget = BatchOrder(500, 64, seed=1, lengths=lengths, group_by_length=True, max_tokens=2048)

    def padded(order: BatchOrder, epoch: int) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in order._plan(epoch))

    for order in (plain, grouped, budget):
        for epoch in (0, 1):
            start = sum(len(order._plan(e)) for e in range(epoch))
            seen = [i for k in range(len(order._plan(epoch))) for i in order.indices(start + k)]
            assert sorted(seen) == list(range(500))  # each example exactly once per epoch
    assert padded(grouped, 0) < 0.7 * padded(plain, 0)  # far less padding
    assert all(len(b) * max(lengths[i] for i in b) <= 2048 or len(b) == 1 for b in budget._plan(0))
    assert max(len(b) for b in budget._plan(0)) > 8  # short examples share bigger batches
    again = BatchOrder(500, 64, seed=1, lengths=lengths, group_by_length=True, max_tokens=2048)
    assert [again.indices(k) for k in (0, 5, 200)] == [budget.indices(k) for k in (0, 5, 200)]  # pure in k


@pytest.mark.parametrize("cached", [False, True])
def test_grouped_budgeted_run_resumes_bit_exact(cached: bool, tiny_run, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lorakit.train.config import load_config

    from .test_train_cli import _InterruptAt

    data = {"group_by_length": True, "max_tokens": 300}
    if cached:  # the resumed run reuses the token store the interrupted one built
        data["cache_dir"] = str(tmp_path / "cache")
    sections = {"training": {"max_steps": 6, "batch_size": 16}, "output": {"save_every": 2}, "data": data}
    straight = make_config(tiny_run, tmp_path / "straight", **sections)
    assert main(["train", str(straight)]) == 0
    broken = make_config(tiny_run, tmp_path / "broken", **sections)
    assert Trainer(None, load_config(broken), callbacks=[_InterruptAt(3)]).fit().interrupted
    assert main(["train", str(broken), "--resume"]) == 0
    a = load_file(tmp_path / "straight" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "broken" / "adapter" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- data larger than memory: streamed once into a memory-mapped token store -------------------------------------
def test_cached_store_holds_the_same_examples_and_is_reused(tiny_run, tmp_path: Path, tok, monkeypatch) -> None:
    from lorakit.train import data as data_module
    from lorakit.train.streaming import load_data
    from lorakit.train.token_store import TokenStore

    for packing in (False, True):
        cfg = DataConfig(train=str(tiny_run["train"]), eval=str(tiny_run["eval"]), max_length=48, packing=packing,
                         cache_dir=str(tmp_path / f"cache{packing}"))
        said: list[str] = []
        train, evald = load_data(cfg, tok, task="causal-lm", seed=0, log=said.append)
        mem_train, mem_eval = load_datasets(cfg.model_copy(update={"cache_dir": None}), tok, task="causal-lm", seed=0)
        assert isinstance(train.examples, TokenStore) and len(train) == len(mem_train)
        assert list(train.examples) == mem_train.examples and list(evald.examples) == mem_eval.examples
        assert train.n_tokens == mem_train.n_tokens and train.format == mem_train.format
        assert any("tokenizing" in s for s in said)

        def no_tokenizing(*a, **k):
            raise AssertionError("tokenized again")

        monkeypatch.setattr(data_module, "encode_record", no_tokenizing)
        said.clear()
        again, _ = load_data(cfg, tok, task="causal-lm", seed=0, log=said.append)  # the cache, not the file
        assert list(again.examples) == mem_train.examples and any("using the tokenized cache" in s for s in said)
        monkeypatch.undo()


def test_cached_held_out_split_partitions_the_file(tiny_run, tmp_path: Path, tok) -> None:
    from lorakit.train.streaming import load_data

    cfg = DataConfig(train=str(tiny_run["train"]), eval_fraction=0.25, max_length=48, cache_dir=str(tmp_path / "c"))
    train, evald = load_data(cfg, tok, task="causal-lm", seed=3)
    everything, _ = load_datasets(DataConfig(train=str(tiny_run["train"]), eval_fraction=0, max_length=48), tok,
                                  task="causal-lm", seed=3)
    got = sorted(tuple(e.input_ids) for e in [*train.examples, *evald.examples])
    assert got == sorted(tuple(e.input_ids) for e in everything.examples) and 0 < len(evald) < len(train)


def test_training_from_the_cache_equals_training_in_memory(tiny_run, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    mem = make_config(tiny_run, tmp_path / "mem", training={"max_steps": 3})
    cached = make_config(tiny_run, tmp_path / "cached", training={"max_steps": 3},
                         data={"cache_dir": str(tmp_path / "cache"), "group_by_length": True})
    mem_grouped = make_config(tiny_run, tmp_path / "memg", training={"max_steps": 3}, data={"group_by_length": True})
    for cfg in (mem, cached, mem_grouped):
        assert main(["train", str(cfg)]) == 0
    a = load_file(tmp_path / "memg" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "cached" / "adapter" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same examples, same order, same bits


def test_a_large_file_streams_with_flat_memory(tiny_run, tmp_path: Path) -> None:
    """Peak RSS while building a store from a ~25 MB JSONL stays small; the in-memory path on the same file
    grows by several times more (the contrast shows the measurement can fail)."""
    import subprocess
    import sys

    big = tmp_path / "big.jsonl"
    line = json.dumps({"text": "the cat sat on the mat and the dog ran to the door " * 4}) + "\n"
    with open(big, "w") as f:
        f.write(line * (25_000_000 // len(line)))
    code = (
        "import sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from transformers import AutoTokenizer\n"
        "from lorakit.evaluation.generation import reset_peak_rss, rss_bytes, window_peak_rss\n"
        "from lorakit.train.config import DataConfig\n"
        "from lorakit.train.streaming import load_data\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[2])\n"
        "before = rss_bytes()\n"
        "assert reset_peak_rss()\n"
        "cfg = DataConfig(train=sys.argv[3], eval_fraction=0, max_length=64,"
        " cache_dir=None if sys.argv[4] == 'memory' else sys.argv[4])\n"
        "train, _ = load_data(cfg, tok, task='causal-lm', seed=0)\n"
        "print(len(train), (window_peak_rss() - before) // 1024)\n")
    src = str(Path(__file__).resolve().parents[1] / "src")
    grown = {}
    for mode in ("memory", str(tmp_path / "cache")):
        out = subprocess.run([sys.executable, "-c", code, src, str(tiny_run["base"]), str(big), mode],
                             capture_output=True, text=True, timeout=600, check=True).stdout.split()
        grown[mode == "memory"] = (int(out[0]), int(out[1]) / 1024)  # (examples, MiB)
    (n_store, store_mb), (n_mem, mem_mb) = grown[False], grown[True]
    assert n_store == n_mem > 100_000
    print(f"peak RSS growth building {n_store} examples: store {store_mb:.0f} MiB, in memory {mem_mb:.0f} MiB")
    assert store_mb < 100 and mem_mb > 3 * store_mb, (store_mb, mem_mb)
