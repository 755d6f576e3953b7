"""`lorakit serve`: an OpenAI-compatible server on 127.0.0.1, driven by the real `openai` client.

A tiny Llama (random weights) with three adapters of different methods (randomised, so each one changes the
output), served by uvicorn in a background thread. Checked: greedy outputs equal `lorakit generate` and
:func:`tests.conftest.hf_greedy` (``model.generate``) for every adapter and the base; streaming gives the same text;
concurrent clients over several adapters get the single-request answers while the engine really mixed adapters
in a batch; bad input is refused with OpenAI-shaped JSON errors and the server keeps serving; adapters load and
unload at run time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.testing import DEMO_DATA, build_tiny_llama, build_tokenizer, record_texts

from .conftest import hf_greedy

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from lorakit.serve import Engine, bind, create_app

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTERS = {"alpha": ("lora", {"r": 4}), "beta": ("dora", {"r": 4}), "gamma": ("vera", {"r": 8})}
PROMPTS = ["Question: What number comes after 7?\nAnswer:", "Question: What number comes after 24?\nAnswer:",
           "Answer:", "Question: What comes after 6 and 7?"]
BASE = "tiny-base"
TOKENS = 6


@dataclass
class Served:
    url: str
    engine: Engine
    base_dir: Path
    adapter_dirs: dict[str, Path]
    reference: Any  # the same base model with the same adapters, loaded apart from the server
    tokenizer: Any

    def client(self) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=60)

    def raw(self, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        """A plain HTTP request (for bodies the openai client would never send)."""
        return _raw(self.url, method, path, body, headers)


def _raw(url: str, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url + path, data=body, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = resp.read()
            return resp.status, json.loads(data) if resp.headers.get_content_type() == "application/json" else data
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable adapter tensor off its (often zero) init, so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("serve")
    tok = build_tokenizer(record_texts(DEMO_DATA))
    model = build_tiny_llama(len(tok), seed=0, hidden=32)
    base_dir = root / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    dirs = {}
    for i, (name, (method, options)) in enumerate(ADAPTERS.items()):
        lorakit.attach(model, method, name=name, targets="all-linear", **options)
        _randomise(model, seed=10 + i)
        dirs[name] = lorakit.save(model, root / name, name=name, extra={"base_model": str(base_dir)})
        lorakit.remove(model, name)

    reference = build_tiny_llama(len(tok), seed=0, hidden=32).eval()
    for name, d in dirs.items():
        lorakit.load(reference, d, name=name)

    engine = Engine.from_pretrained(str(base_dir), {n: str(d) for n, d in dirs.items()}, device="cpu",
                                    base_name=BASE, batch_window_ms=10, max_batch=32)
    with _serving(create_app(engine)) as url:
        yield Served(url, engine, base_dir, dirs, reference, tok)
    assert not engine.running


@contextlib.contextmanager
def _serving(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn in a background thread on a free loopback port; yields its URL."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        host, port = sock.getsockname()[:2]
        assert host == "127.0.0.1"
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _reference(s: Served, model: str, prompts: list[str], tokens: int = TOKENS) -> list[str]:
    lorakit.set_active(s.reference, [] if model == BASE else [model])
    return hf_greedy(s.reference, s.tokenizer, prompts, tokens)


def _complete(client: Any, model: str, prompt: str, tokens: int = TOKENS, **kw: Any) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0, **kw) \
        .choices[0].text


# --- answers -------------------------------------------------------------------------------------------------
def test_models_lists_the_base_and_every_adapter(served: Served) -> None:
    models = served.client().models.list()
    assert [m.id for m in models.data] == [BASE, *ADAPTERS]
    assert served.client().models.retrieve("beta").id == "beta"
    status, health = served.raw("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["models"] == 4


def test_greedy_output_of_each_adapter_equals_generate(served: Served, capsys) -> None:
    client = served.client()
    outputs = {}
    for model in [BASE, *ADAPTERS]:
        got = [_complete(client, model, p) for p in PROMPTS[:2]]
        assert got == _reference(served, model, PROMPTS[:2]), model
        outputs[model] = got
    assert len({o[0] for o in outputs.values()}) == 4, outputs  # every adapter changes the answer

    # `lorakit generate`: the command line, on the same adapter directory, prints the same completion
    capsys.readouterr()
    assert main(["generate", "--adapter", str(served.adapter_dirs["beta"]), "--prompt", PROMPTS[0],
                 "--max-new-tokens", str(TOKENS), "--device", "cpu"]) == 0
    assert capsys.readouterr().out == outputs["beta"][0] + "\n"
    assert main(["generate", "--adapter", str(served.adapter_dirs["gamma"]), "--prompt", "What comes after 7?",
                 "--chat", "--max-new-tokens", str(TOKENS), "--device", "cpu"]) == 0
    chat = client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "What comes after 7?"}],
                                          max_tokens=TOKENS, temperature=0)
    assert capsys.readouterr().out == chat.choices[0].message.content + "\n"
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= TOKENS


def test_streaming_gives_the_same_text(served: Served) -> None:
    client = served.client()
    for model in ("alpha", BASE):
        whole = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=TOKENS, temperature=0)
        chunks = list(client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=TOKENS, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole.choices[0].text
        assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # really incremental
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What comes after 24?"}]
    whole = client.chat.completions.create(model="beta", messages=messages, max_tokens=TOKENS, temperature=0)
    chunks = list(client.chat.completions.create(model="beta", messages=messages, max_tokens=TOKENS, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert whole.choices[0].message.content


def test_stop_strings_and_seeded_sampling(served: Served) -> None:
    client = served.client()
    full = _complete(client, "alpha", PROMPTS[0], tokens=8)
    stop = full.split()[2]
    cut = full[:full.find(stop)]
    res = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=8, temperature=0, stop=[stop])
    assert (res.choices[0].text, res.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut

    def sample(seed: int) -> str:
        return client.completions.create(model="gamma", prompt=PROMPTS[2], max_tokens=8, temperature=1.0,
                                         top_p=0.9, seed=seed).choices[0].text

    assert sample(3) == sample(3)  # a seeded request draws the same tokens
    assert len({sample(s) for s in range(4)}) > 1


def test_concurrent_clients_get_the_single_request_answers_in_mixed_batches(served: Served) -> None:
    models = [*ADAPTERS, BASE]
    client = served.client()
    expected = {(m, p): _complete(client, m, p, tokens=4) for m in models for p in PROMPTS}
    before = served.engine.stats.mixed_batches
    results: list[tuple[tuple[str, str], str]] = []
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        c = served.client()
        try:
            for k in range(20):
                key = (models[(t + k) % len(models)], PROMPTS[(3 * t + k) % len(PROMPTS)])
                results.append((key, _complete(c, *key, tokens=4)))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors[:3]
    assert len(results) == 160
    wrong = [(key, text, expected[key]) for key, text in results if text != expected[key]]
    assert not wrong, wrong[:5]
    stats = served.engine.stats
    assert stats.mixed_batches > before, stats  # requests for different adapters really shared batches
    assert stats.largest_batch > 1 and stats.failed_batches == 0


# --- bad input -------------------------------------------------------------------------------------------------
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="Answer:", max_tokens=2)
    assert e.value.status_code == 404 and "'nope'" in e.value.body["message"]
    assert e.value.body["code"] == "model_not_found"

    status, body = served.raw("POST", "/v1/completions", b'{"model": "alpha", "prompt": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    status, body = served.raw("POST", "/v1/completions", b'["model", "alpha"]')
    assert status == 400 and "must be a JSON object" in body["error"]["message"]
    status, body = served.raw("POST", "/v1/completions", json.dumps({"model": "alpha"}).encode())
    assert status == 400 and body["error"]["message"].startswith("prompt:")
    status, body = served.raw("POST", "/v1/chat/completions", json.dumps({"model": "alpha", "messages": [
        {"role": "wizard", "content": "hi"}]}).encode())
    assert status == 400 and "messages.0.role" in body["error"]["message"]

    with pytest.raises(openai.BadRequestError) as e:  # the prompt alone is longer than the context (256)
        client.completions.create(model="alpha", prompt="Answer: 7 " * 200, max_tokens=2)
    assert "maximum context length is 256" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):  # prompt + max_tokens do not fit
        client.completions.create(model="alpha", prompt="Answer:", max_tokens=300)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alpha", prompt="Answer:", max_tokens=2, n=2)
    assert "only n=1" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], n=3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="alpha", prompt="Answer:", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alpha", prompt=[10**6], max_tokens=2)
    assert "token ids" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], stream=True)
    status, body = served.raw("GET", "/v1/nothing-here")
    assert status == 404 and "error" in body

    assert _complete(client, "alpha", PROMPTS[0]) == _reference(served, "alpha", PROMPTS[:1])[0]
    assert served.raw("GET", "/health")[0] == 200


def test_adapters_load_and_unload_at_run_time(served: Served, tmp_path: Path) -> None:
    client = served.client()

    def load(name: str, path: Path | str) -> tuple[int, dict[str, Any]]:
        return served.raw("POST", "/v1/adapters", json.dumps({"name": name, "path": str(path)}).encode())

    status, body = load("ghost", tmp_path / "missing")
    assert status == 400 and "no such adapter directory" in body["error"]["message"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in served.adapter_dirs["alpha"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "adapter.json").write_text('{"format": ')
    status, body = load("broken", broken)
    assert status == 400 and "corrupted metadata" in body["error"]["message"] and "'broken'" in body["error"]["message"]
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in served.adapter_dirs["alpha"].iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    data = (truncated / "adapter.safetensors").read_bytes()
    (truncated / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    status, body = load("truncated", truncated)
    assert status == 400 and "checksum mismatch" in body["error"]["message"]
    assert load("alpha", served.adapter_dirs["beta"])[0] == 409  # the name is taken
    assert load("bad/name", served.adapter_dirs["beta"])[0] == 400
    assert [m.id for m in client.models.list().data] == [BASE, *ADAPTERS]  # nothing half-loaded

    status, body = load("delta", served.adapter_dirs["beta"])
    assert status == 200 and body["id"] == "delta" and body["parent"] == BASE
    assert _complete(client, "delta", PROMPTS[0]) == _complete(client, "beta", PROMPTS[0])
    assert "delta" in [m.id for m in client.models.list().data]

    status, body = served.raw("DELETE", "/v1/adapters/delta")
    assert status == 200 and body == {"id": "delta", "object": "model", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        _complete(client, "delta", PROMPTS[0])
    assert served.raw("DELETE", "/v1/adapters/delta")[0] == 404

    # vLLM's endpoint names and bodies work too
    req = urllib.request.Request(served.url + "/v1/load_lora_adapter", method="POST",
                                 data=json.dumps({"lora_name": "eps", "lora_path": str(served.adapter_dirs["gamma"])})
                                 .encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200 and b"eps" in resp.read()
    assert _complete(client, "eps", PROMPTS[1]) == _complete(client, "gamma", PROMPTS[1])
    req = urllib.request.Request(served.url + "/v1/unload_lora_adapter", method="POST",
                                 data=b'{"lora_name": "eps"}', headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
    assert [m.id for m in client.models.list().data] == [BASE, *ADAPTERS]
    assert _complete(client, "alpha", PROMPTS[0]) == _reference(served, "alpha", PROMPTS[:1])[0]


# --- who may use the server, and what it may read ------------------------------------------------------------
KEY = "sk-test-7f3a"


def test_an_api_key_guards_every_endpoint_but_health(served: Served, tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    root.mkdir()
    (root / "alpha").symlink_to(served.adapter_dirs["alpha"])  # a link inside the root to a directory outside
    own = root / "beta"
    own.mkdir()
    for f in served.adapter_dirs["beta"].iterdir():
        (own / f.name).write_bytes(f.read_bytes())
    engine = Engine.from_pretrained(str(served.base_dir), {}, device="cpu", base_name=BASE, batch_window_ms=1)
    with _serving(create_app(engine, api_key=KEY, adapter_roots=[root])) as url:
        def client(key: str) -> Any:
            return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)

        for key in ("wrong", KEY + "x", KEY[:-1]):
            with pytest.raises(openai.AuthenticationError) as e:
                client(key).models.list()
            assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                _complete(client(key), BASE, PROMPTS[0])
            with pytest.raises(openai.AuthenticationError):
                client(key).chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}],
                                                    stream=True)
        load = json.dumps({"name": "x", "path": str(own)}).encode()
        vllm_load = json.dumps({"lora_name": "x", "lora_path": str(own)}).encode()
        requests = [("GET", "/v1/models", None), ("GET", f"/v1/models/{BASE}", None),
                    ("POST", "/v1/completions", b'{"model": "tiny-base", "prompt": "Answer:", "max_tokens": 1}'),
                    ("POST", "/v1/adapters", load), ("DELETE", "/v1/adapters/x", None),
                    ("POST", "/v1/load_lora_adapter", vllm_load), ("POST", "/v1/unload_lora_adapter", b"{}"),
                    ("GET", "/docs", None), ("GET", "/openapi.json", None), ("GET", "/v1/nothing-here", None)]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": KEY}, {"X-Api-Key": KEY}):
            for method, path, body in requests:
                status, answer = _raw(url, method, path, body, headers)
                assert status == 401, (method, path, headers)
                assert answer["error"]["code"] == "invalid_api_key" and KEY not in json.dumps(answer)
        assert _raw(url, "GET", "/health")[0] == 200  # probes need no key
        good = {"Authorization": f"Bearer {KEY}"}
        assert _raw(url, "GET", "/v1/models", None, good)[0] == 200
        assert _raw(url, "GET", "/v1/models", None, {"Authorization": f"bearer  {KEY} "})[0] == 200

        # with the key: runtime loads only inside the root, links resolved
        def load_(name: str, path: str) -> tuple[int, Any]:
            return _raw(url, "POST", "/v1/adapters", json.dumps({"name": name, "path": path}).encode(), good)

        status, body = load_("beta", str(own))
        assert status == 200, body
        assert _complete(client(KEY), "beta", PROMPTS[0]) == _reference(served, "beta", PROMPTS[:1])[0]
        assert load_("rel", "beta")[0] == 200  # a relative path is looked up under the root
        for outside in (str(served.adapter_dirs["gamma"]), str(root / "alpha"), str(root / ".." / "x"),
                        "../" + served.adapter_dirs["gamma"].name, "alpha", str(root / "beta" / ".." / "..")):
            status, body = load_("out", outside)
            assert status == 403 and body["error"]["code"] == "adapter_path_forbidden", outside
        status, body = _raw(url, "POST", "/v1/load_lora_adapter", json.dumps(
            {"lora_name": "out", "lora_path": str(served.adapter_dirs["gamma"])}).encode(), good)
        assert status == 403
        status, body = load_("ghost", "missing")  # inside the root but absent: the loader's own 400
        assert status == 400 and "no such adapter directory" in body["error"]["message"]
        assert [m.id for m in client(KEY).models.list().data] == [BASE, "beta", "rel"]


def test_serve_refuses_runtime_loading_beyond_loopback_without_roots(served: Served, tmp_path: Path, capsys) -> None:
    assert main(["serve", "--base", str(served.base_dir), "--host", "0.0.0.0", "--runtime-adapters"]) == 1
    err = capsys.readouterr().err
    assert "needs --adapter-root" in err and "Traceback" not in err
    assert main(["serve", "--base", str(served.base_dir), "--adapter-root", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "--adapter-root" in err and "no such directory" in err
    assert main(["serve", "--base", str(served.base_dir), "--api-key", " "]) == 1
    assert "empty" in capsys.readouterr().err


def test_a_failing_batch_fails_its_requests_only(served: Served, monkeypatch) -> None:
    def broken(rows: Any) -> None:
        raise RuntimeError("simulated device failure")

    client = served.client()
    monkeypatch.setattr(served.engine._decoder, "run", broken)
    with pytest.raises(openai.InternalServerError) as e:
        _complete(client, "alpha", PROMPTS[0])
    assert "simulated device failure" in e.value.body["message"]
    chunks = client.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=2, stream=True)
    with pytest.raises(openai.APIError, match="simulated device failure"):
        list(chunks)
    monkeypatch.undo()
    assert _complete(client, "alpha", PROMPTS[0]) == _reference(served, "alpha", PROMPTS[:1])[0]


def test_serve_command_refuses_bad_options(served: Served, capsys) -> None:
    assert main(["serve", "--base", str(served.base_dir), "--adapter", "no-equals-sign"]) == 1
    assert "--adapter 'no-equals-sign': expected NAME=DIR" in capsys.readouterr().err
    busy = served.url.rsplit(":", 1)[1]
    assert main(["serve", "--base", str(served.base_dir), "--port", busy]) == 1
    assert "address already in use" in capsys.readouterr().err.lower()


def test_serve_command_serves_until_interrupted(served: Served) -> None:
    """`lorakit serve` in its own process: it prints where it listens, answers like the in-process server, and
    Ctrl-C (SIGINT) shuts it down cleanly."""
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--base", str(served.base_dir), "--adapter",
                             f"alpha={served.adapter_dirs['alpha']}", "--port", "0", "--device", "cpu",
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "LORAKIT_API_KEY": KEY})
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "API key:" in line:  # the last start-up line, printed after the address
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert found.wait(90), "".join(lines)
        url = next(line for line in lines if " on http://" in line).split(" on ")[1].strip()
        assert url.startswith("http://127.0.0.1:")
        assert any("API key: required" in line for line in lines)  # read from LORAKIT_API_KEY
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60).models.list()
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
        assert _complete(client, "alpha", PROMPTS[0]) == _complete(served.client(), "alpha", PROMPTS[0])
        assert [m.id for m in client.models.list().data] == [str(served.base_dir), "alpha"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, "".join(lines)


# --- the decode loop alone -------------------------------------------------------------------------------------
@dataclass
class _Row:
    prompt_ids: list[int]
    params: Any
    adapter: str | None = None
    cancelled: bool = False
    text: str = ""
    finish: str | None = None

    def emit_text(self, text: str) -> None:
        self.text += text

    def emit_done(self, finish_reason: str, completion_tokens: int) -> None:
        self.finish = finish_reason


def test_decoder_batch_equals_single_runs_with_absolute_positions() -> None:
    """GPT-2 adds absolute position embeddings, so a left-padded row only matches its single run when positions
    count real tokens; rows with different budgets also leave the batch (and the cache) at different steps."""
    import contextlib

    from transformers import GPT2Config, GPT2LMHeadModel

    from lorakit.inference.decode import Decoder, SamplingParams

    tok = build_tokenizer(record_texts(DEMO_DATA))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=2, eos_token_id=3, pad_token_id=0)).eval()
    budgets = [2, 7, 4, 5]
    rows = [_Row(list(tok(p)["input_ids"]), SamplingParams(max_tokens=n)) for p, n in zip(PROMPTS, budgets)]
    Decoder(model, tok, lambda names: contextlib.nullcontext()).run(rows)
    for p, n, row in zip(PROMPTS, budgets, rows):
        assert row.text == hf_greedy(model, tok, [p], n)[0]
        assert row.finish in ("stop", "length")


def test_engine_without_mixed_batches_runs_one_batch_per_adapter(served: Served) -> None:
    """``--no-mixed``: the same answers, from batches that each hold one adapter."""
    import asyncio

    from lorakit.inference.decode import SamplingParams
    from lorakit.serve.engine import Request, Sink

    engine = Engine.from_pretrained(str(served.base_dir), {n: str(d) for n, d in served.adapter_dirs.items()},
                                    device="cpu", base_name=BASE, batch_window_ms=200, mixed=False)
    keys = [(m, p) for m in [*ADAPTERS, BASE] for p in PROMPTS[:2]]

    async def run() -> list[str]:
        sink = Sink()
        for i, (m, p) in enumerate(keys):
            engine.submit(Request(engine.encode(p), engine.resolve(m), SamplingParams(max_tokens=4), sink, i))
        texts = [""] * len(keys)
        done = 0
        while done < len(keys):
            ev = await sink.get()
            assert ev.error is None, ev.error
            texts[ev.index] += ev.text
            done += ev.finish_reason is not None
        return texts

    engine.start()
    try:
        texts = asyncio.run(run())
    finally:
        engine.stop()
    client = served.client()
    assert texts == [_complete(client, m, p, tokens=4) for m, p in keys]
    assert engine.stats.mixed_batches == 0 and engine.stats.batches == len(ADAPTERS) + 1
