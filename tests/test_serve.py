"""azgpt serve: the batching engine called directly, then the HTTP API of a real uvicorn process
on 127.0.0.1 spoken to by real clients (requests as in the course's day 35, the `ollama` and
`openai` packages)."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from trainkit import make_data, one_thread, tiny_config  # noqa: F401  (one_thread: autouse)

pytest.importorskip("fastapi")  # `make test` installs azgpt[serve]
requests = pytest.importorskip("requests")

from azgpt.checkpoint import checkpoint_tokenizer, load_model  # noqa: E402
from azgpt.model import GPT  # noqa: E402
from azgpt.serve.engine import (  # noqa: E402
    Chunk,
    Engine,
    Finished,
    QueueFull,
    SamplingParams,
    TextStream,
)
from azgpt.train import train  # noqa: E402

NAME = "az-llm-100m"  # the name the course's Ollama model has; the server answers any name
PROMPT = "Azərbaycanın paytaxtı"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("serve")
    tok, data = make_data(base)
    over = {"train.max_iters": 20, "train.eval_interval": 20, "train.lr": 1e-2}
    train(tiny_config(tok, data, base / "run", **over))
    return base / "run" / "last"


@pytest.fixture(scope="module")
def loaded(ckpt):
    model, meta = load_model(ckpt)
    tok, _, _ = checkpoint_tokenizer(ckpt, meta)
    return model, tok


def run_alone(model, tok, ids, params) -> tuple[str, Finished]:
    with Engine(model, tok, max_batch=1) as eng:
        return eng.complete(ids, params)


# ----------------------------------------------------------------------------- engine


def test_text_stream_never_splits_a_character_and_cuts_stop_strings():
    t = TextStream()
    assert t.push(b"Az\xc9") == ("Az", False)  # first byte of "ə" held back
    assert t.push(b"\x99r") == ("ər", False)
    emoji = "😀".encode()
    assert t.push(emoji[:1]) == ("", False)
    assert t.push(emoji[1:3]) == ("", False)
    assert t.push(emoji[3:]) == ("😀", False)
    assert t.push(b"\xff") == ("\ufffd", False)  # an invalid byte is not held forever
    assert t.push(b"\xc5") == ("", False)
    assert t.flush() == "\ufffd"  # a character cut off at the end

    s = TextStream(("Bakı",))
    assert s.push("Şəhər B".encode()) == ("Şəhər ", False)  # "B" may start "Bakı"
    assert s.push(b"ax") == ("Bax", False)  # it did not
    assert s.push(b" Ba") == (" ", False)
    assert s.push("kı gözəldir".encode()) == ("", True)  # reached: nothing of it is shown


def test_batched_sequences_get_the_same_tokens_as_alone(loaded):
    model, tok = loaded
    eng = Engine(model, tok, max_batch=4)
    cases = [
        (PROMPT, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)),
        ("Bakı", SamplingParams(max_tokens=70, temperature=0.9, seed=3, ignore_eos=True)),
        ("", SamplingParams(max_tokens=20, temperature=1.2, top_k=0, top_p=1.0, seed=11)),
        ("Xəzər dənizi " * 12, SamplingParams(max_tokens=40, top_k=5, seed=7, ignore_eos=True)),
    ]
    results: list[list] = [[] for _ in cases]
    for (prompt, params), out in zip(cases, results):
        eng.submit(eng.prompt_ids(prompt), params, out.append)  # all wait: one batch
    with eng:
        deadline = time.monotonic() + 120
        while not all(out and isinstance(out[-1], Finished) for out in results):
            assert time.monotonic() < deadline, "generation did not finish"
            time.sleep(0.01)
    assert eng.stats["max_rows"] == 4  # decoded together ...
    assert eng.stats["steps"] < sum(p.max_tokens for _, p in cases)  # ... in shared steps
    assert eng.stats["shifts"] > 0  # contexts of 32 tokens filled up and slid
    for (prompt, params), out in zip(cases, results):
        text = "".join(e.text for e in out if isinstance(e, Chunk))
        fin = out[-1]
        alone_text, alone = run_alone(model, tok, eng.prompt_ids(prompt), params)
        assert fin.context == alone.context
        assert text == alone_text
        assert fin.reason == alone.reason
    assert [r[-1].completion_tokens for r in results][:2] == [50, 70]


def test_cached_batched_decoding_matches_an_uncached_reference(loaded):
    """Greedy tokens through the KV caches (with a context shift) equal plain forward passes."""
    model, tok = loaded
    block = model.config.block_size
    with Engine(model, tok, max_batch=2) as eng:
        ids = eng.prompt_ids(PROMPT)
        params = SamplingParams(max_tokens=3 * block, temperature=0, ignore_eos=True)
        # a second sequence in the batch, finishing earlier, so rows move while decoding
        other = []
        eng.submit(eng.prompt_ids("Gəncə"), SamplingParams(max_tokens=10, seed=1), other.append)
        _, fin = eng.complete(ids, params)
    assert eng.stats["max_rows"] == 2 and isinstance(other[-1], Finished)
    seq, start = list(ids), 0
    with torch.no_grad():
        for _ in range(params.max_tokens):
            if len(seq) - 1 - start >= block:  # the engine re-prefills the last half
                start = len(seq) - block // 2
            logits = model(torch.tensor([seq[start:]]))[0, -1]
            logits[sorted(eng.specials)] = float("-inf")
            seq.append(int(logits.argmax()))
    assert fin.context == seq


def test_prompt_longer_than_the_context_is_cut_from_the_left(loaded):
    model, tok = loaded
    block = model.config.block_size
    with Engine(model, tok) as eng:
        ids = eng.prompt_ids("Azərbaycan Respublikası Cənubi Qafqazda yerləşir. " * 10)
        assert len(ids) > block
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        text, fin = eng.complete(ids, params)
        text_cut, fin_cut = eng.complete(ids[-block:], params)
    assert fin.prompt_truncated == len(ids) - block and fin.prompt_tokens == block
    assert fin_cut.prompt_truncated == 0
    assert (text, fin.context) == (text_cut, fin_cut.context)


def drain(q: queue.Queue, timeout: float = 120) -> list:
    events = []
    while not events or not isinstance(events[-1], Finished):
        events.append(q.get(timeout=timeout))
    return events


def test_a_cancelled_request_frees_its_slot_at_once(loaded):
    model, tok = loaded
    with Engine(model, tok, max_batch=1) as eng:
        long_q, next_q = queue.Queue(), queue.Queue()
        huge = SamplingParams(max_tokens=100_000, ignore_eos=True)
        long = eng.submit(eng.prompt_ids(PROMPT), huge, long_q.put)
        assert isinstance(long_q.get(timeout=60), Chunk)  # running, in the only slot
        eng.submit(eng.prompt_ids("Bakı"), SamplingParams(max_tokens=5, seed=1), next_q.put)
        assert eng.status() == {"active": 1, "queued": 1, "max_batch": 1, "max_queue": 64}
        long.cancel()
        cancelled = drain(long_q)[-1]
        events = drain(next_q)  # the waiting request gets the slot and finishes
    assert cancelled.reason == "cancelled" and cancelled.completion_tokens < 100_000
    assert events[-1].reason in ("stop", "length")
    assert eng.status()["active"] == 0


def test_serve_builds_the_model_and_steps_on_one_thread(ckpt, monkeypatch):
    """`azgpt serve` loads the model, casts it and allocates the cache on the thread that then
    runs every decoding step (a second thread running torch's CPU kernels slowed each step
    ~25% on 2 cores): the engine's runner is that thread, and every step runs there."""
    import uvicorn

    import azgpt.generate as G
    from azgpt.serve.app import serve

    where = {}
    real_cast = G.cast_model
    monkeypatch.setattr(
        G, "cast_model", lambda *a, **k: where.setdefault("cast", threading.get_ident())
        and real_cast(*a, **k),
    )  # fmt: skip

    def run(self, sockets):  # instead of serving: one request through the app's engine
        engine = self.config.app.state.server.engine
        steps = engine.decoder.step
        seen = set()
        engine.decoder.step = lambda: seen.add(threading.get_ident()) or steps()
        with engine:
            _, fin = engine.complete(engine.prompt_ids("Bakı"), SamplingParams(max_tokens=4))
        where.update(steps=seen, reason=fin.reason, runner=engine.runner)
        for s in sockets:
            s.close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    serve(str(ckpt), port=0, device="cpu")
    assert where["reason"] in ("stop", "length") and where["runner"] is not None
    assert where["steps"] == {where["cast"]} and where["cast"] != threading.get_ident()


def test_a_full_queue_refuses_at_once(loaded):
    model, tok = loaded
    eng = Engine(model, tok, max_batch=1, max_queue=2)  # not started: everything waits
    got = []
    for _ in range(2):
        eng.submit(eng.prompt_ids("a"), SamplingParams(max_tokens=2), got.append)
    with pytest.raises(QueueFull):
        eng.submit(eng.prompt_ids("a"), SamplingParams(max_tokens=2), got.append)
    eng.close()
    assert [e.reason for e in got] == ["cancelled", "cancelled"]


def test_chat_prompts_use_the_one_chat_template(loaded):
    from azgpt.chat_template import encode_chat

    model, tok = loaded
    eng = Engine(model, tok)
    msgs = [("system", "Qısa cavab ver."), ("user", "Salam")]
    ids = eng.chat_ids(msgs)
    assert ids == encode_chat(tok, [{"role": r, "content": c} for r, c in msgs])
    aid = tok.token_to_id("<|assistant|>")
    assert ids[0] == eng.eot and ids[-1] == aid
    with pytest.raises(ValueError):
        eng.chat_ids([("tool", "x")])


def test_ids_past_the_tokenizer_are_never_sampled(loaded):
    model, tok = loaded
    cfg = model.config.to_dict() | {"vocab_size": tok.get_vocab_size() + 64}
    from azgpt.config import ModelConfig

    padded = GPT(ModelConfig(**cfg)).eval()
    with torch.no_grad():
        padded.transformer.wte.weight[tok.get_vocab_size() :] *= 500  # padding ids would win
        x = torch.tensor([[0, 5, 9]])
        assert int(padded(x)[0, -1].argmax()) >= tok.get_vocab_size()  # without the mask
    with Engine(padded, tok) as eng:
        _, fin = eng.complete(eng.prompt_ids(PROMPT), SamplingParams(max_tokens=20, seed=2))
    assert max(fin.context) < tok.get_vocab_size()


# ----------------------------------------------------------------------------- a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    ckpt: Path, log: Path, *args: str, env: dict | None = None, key: str | None = None
):
    """`azgpt serve` in a subprocess on 127.0.0.1 and a free port; killed at the end, always."""
    port = free_port()
    cmd = [sys.executable, "-m", "azgpt", "serve", "--ckpt", str(ckpt), "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd + list(args),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"azgpt serve exited: {log.read_text()}"
            try:
                if requests.get(base + "/health", headers=headers, timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"azgpt serve did not start: {log.read_text()}"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with running_server(ckpt, log, "--name", NAME, "--max-batch", "4") as base:
        yield base


def test_day35_requests_script(server):
    # As the course does it against Ollama (day 35), only the URL changed.
    url = f"{server}/api/generate"
    payload = {"model": NAME, "prompt": PROMPT, "stream": False}
    response = requests.post(url, json=payload, timeout=120)
    data = response.json()
    assert response.status_code == 200
    assert isinstance(data["response"], str)
    assert data["model"] == NAME and data["done"] is True
    assert data["done_reason"] in ("stop", "length")
    assert data["prompt_eval_count"] == len(data["context"]) - data["eval_count"]
    for k in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(data[k], int) and data[k] >= 0
    assert data["total_duration"] >= data["prompt_eval_duration"] + data["eval_duration"]


def ndjson(resp) -> list[dict]:
    lines = []
    for raw in resp.iter_lines():
        if raw:
            lines.append(json.loads(raw.decode("utf-8")))  # strict: every chunk valid UTF-8
    return lines


def sse(resp) -> tuple[list[dict], str]:
    events = []
    last = ""
    for raw in resp.iter_lines():
        if raw.startswith(b"data: "):
            last = raw.decode("utf-8")[6:]  # strict UTF-8
            if last != "[DONE]":
                events.append(json.loads(last))
    return events, last


def test_streamed_text_equals_non_streamed_text(server):
    # High temperature and no end token: many byte-level tokens, some inside characters.
    opts = {
        "seed": 42,
        "temperature": 1.5,
        "top_k": 0,
        "top_p": 1,
        "num_predict": 80,
        "ignore_eos": True,
    }
    body = {"model": "whatever", "prompt": PROMPT, "options": opts}
    whole = requests.post(
        f"{server}/api/generate", json={**body, "stream": False}, timeout=120
    ).json()
    with requests.post(f"{server}/api/generate", json=body, stream=True, timeout=120) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = ndjson(r)
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"] is True
    assert all(x["response"] for x in lines[:-1])
    assert "".join(x["response"] for x in lines) == whole["response"]
    assert lines[-1]["eval_count"] == whole["eval_count"] == 80
    assert lines[-1]["context"] == whole["context"]

    oa = {"model": "gpt-4o", "prompt": PROMPT, "seed": 9, "max_tokens": 60, "temperature": 1.3}
    whole = requests.post(f"{server}/v1/completions", json=oa, timeout=120).json()
    with requests.post(
        f"{server}/v1/completions", json={**oa, "stream": True}, stream=True, timeout=120
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events, last = sse(r)
    assert last == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]
    assert events[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_ollama_client(server):
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=server, timeout=120)
    opts = {"seed": 5, "num_predict": 30, "temperature": 0.9}
    whole = client.generate(model=NAME, prompt=PROMPT, options=opts)
    parts = list(client.generate(model=NAME, prompt=PROMPT, options=opts, stream=True))
    assert whole.done and parts[-1].done
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].eval_count == whole.eval_count and whole.eval_duration > 0

    msgs = [{"role": "system", "content": "Qısa cavab ver."}, {"role": "user", "content": "Salam!"}]
    chat = client.chat(model=NAME, messages=msgs, options=opts)
    stream = list(client.chat(model=NAME, messages=msgs, options=opts, stream=True))
    assert chat.message.role == "assistant"
    assert "".join(c.message.content for c in stream) == chat.message.content
    assert stream[-1].done and stream[-1].done_reason in ("stop", "length")

    assert [m.model for m in client.list().models] == [NAME]
    assert requests.get(f"{server}/api/version", timeout=10).json()["version"]


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="not-needed", timeout=120)
    kw = {"model": NAME, "max_tokens": 40, "seed": 3, "temperature": 1.0}
    whole = client.completions.create(prompt=PROMPT, **kw)
    stream = list(client.completions.create(prompt=PROMPT, stream=True, **kw))
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text
    assert whole.usage.completion_tokens <= 40 and whole.model == NAME

    msgs = [{"role": "user", "content": "Azərbaycan haqqında danış."}]
    chat = client.chat.completions.create(messages=msgs, **kw)
    chunks = list(
        client.chat.completions.create(
            messages=msgs, stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [chat.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert [m.id for m in client.models.list()] == [NAME]


def test_health_and_tokenize(server):
    h = requests.get(f"{server}/health", timeout=10).json()
    assert h["status"] == "ok" and h["model"] == NAME and h["context"] == 32
    # A tiny model: azgpt's CPU kernel for its Linears, eager steps.
    assert h["kernels"] == {"linear": h["kernels"]["linear"], "decode_step": "eager"}
    assert h["kernels"]["linear"] == "kernel"
    text = "Azərbaycanın paytaxtı Bakıdır, İçərişəhər 😀"
    t = requests.post(f"{server}/tokenize", json={"text": text}, timeout=10).json()
    assert t["count"] == len(t["ids"]) == len(t["pieces"]) > 5
    if "\\x" not in "".join(t["pieces"]):  # pieces cut inside a character show their bytes
        assert "".join(t["pieces"]) == text


def test_long_prompt_is_cut_and_the_response_says_so(server):
    prompt = "Azərbaycan Respublikası Cənubi Qafqazda yerləşir. " * 20
    body = {"prompt": prompt, "stream": False, "options": {"num_predict": 3}}
    r = requests.post(f"{server}/api/generate", json=body, timeout=60)
    data = r.json()
    assert data["prompt_eval_count"] == 32 and data["prompt_truncated"] > 0
    assert r.headers["X-Prompt-Truncated-Tokens"] == str(data["prompt_truncated"])
    r = requests.post(
        f"{server}/v1/completions", json={"prompt": prompt, "max_tokens": 3}, timeout=60
    )
    assert r.json()["prompt_truncated"] == data["prompt_truncated"]


BAD = [
    ("/api/generate", b'{"prompt": "a",', 400, "not valid JSON"),
    ("/api/generate", b"[1, 2]", 400, "JSON object"),
    ("/api/generate", {"prompt": 5}, 400, "'prompt'"),
    ("/api/generate", {"prompt": "a", "stream": "yes"}, 400, "'stream'"),
    (
        "/api/generate",
        {"prompt": "a", "options": {"temperature": -0.5}},
        400,
        "'options.temperature'",
    ),
    ("/api/generate", {"prompt": "a", "options": {"top_p": 0}}, 400, "'options.top_p'"),
    ("/api/generate", {"prompt": "a", "options": {"top_p": 1.5}}, 400, "'options.top_p'"),
    (
        "/api/generate",
        {"prompt": "a", "options": {"num_predict": 10**6}},
        400,
        "'options.num_predict'",
    ),
    ("/api/generate", {"prompt": "a", "options": {"warp": 1}}, 400, "'options.warp'"),
    (
        "/api/generate",
        {"prompt": "a", "options": {"repeat_penalty": 1.3}},
        400,
        "'options.repeat_penalty'",
    ),
    ("/api/generate", {"prompt": "a", "colour": "red"}, 400, "'colour'"),
    ("/api/generate", {"prompt": "a", "context": [0, 10**6]}, 400, "'context'"),
    ("/api/chat", {"messages": []}, 400, "'messages'"),
    ("/api/chat", {"messages": [{"role": "tool", "content": "x"}]}, 400, "'messages.0.role'"),
    (
        "/api/chat",
        {"messages": [{"role": "user"}], "tools": [{"type": "function"}]},
        400,
        "'tools'",
    ),
    ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, "'temperature'"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 400, "'top_p'"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "ten"}, 400, "'max_tokens'"),
    ("/v1/completions", {"prompt": "a", "n": 2}, 400, "'n'"),
    ("/v1/completions", {"prompt": "a", "stop": ["x"] * 9}, 400, "'stop'"),
    ("/v1/completions", {"prompt": "a", "frequency_penalty": 0.5}, 400, "'frequency_penalty'"),
    ("/v1/completions", {"prompt": "a" * 100_001}, 400, "'prompt'"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": 3}]},
        400,
        "'messages.0.content'",
    ),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "'messages'"),
    ("/v1/chat/completions", {"model": "x"}, 400, "'messages'"),
    ("/tokenize", {"txt": "a"}, 400, "'txt'; did you mean 'text'?"),
    ("/v1/completions", b"x" * 1_000_001, 413, "over 1000000 bytes"),
]


@pytest.mark.parametrize(
    "path,body,status,names", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_requests_get_one_sentence_naming_the_field(server, path, body, status, names):
    if isinstance(body, bytes):
        r = requests.post(
            server + path, data=body, headers={"Content-Type": "application/json"}, timeout=30
        )
    else:
        r = requests.post(server + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    msg = err["message"] if path.startswith("/v1/") else err
    assert names in msg
    assert msg.endswith((".", "?")) and "\n" not in msg and "Traceback" not in r.text
    if path.startswith("/v1/") and "'" in names:
        assert err["param"] == names.strip("'")


def test_unknown_route_and_method_are_json(server):
    r = requests.get(f"{server}/api/nothing", timeout=10)
    assert r.status_code == 404 and "/api/nothing" in r.json()["error"]
    r = requests.get(f"{server}/api/generate", timeout=10)
    assert r.status_code == 405 and "GET" in r.json()["error"]


# ----------------------------------------------------------------------------- key, queue, disconnect

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def small_server(ckpt, tmp_path_factory):
    """One slot, one waiting place, an API key, and slowed decoding steps (50 ms)."""
    log = tmp_path_factory.mktemp("serve-log") / "serve-small.log"
    args = ("--api-key", KEY, "--max-batch", "1", "--max-queue", "1")
    env = {"AZGPT_FAULT_SLOW_STEP": "0.05"}
    with running_server(ckpt, log, *args, env=env, key=KEY) as base:
        yield base


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_api_key_is_required_on_every_api_route(small_server):
    routes = [
        ("GET", "/api/tags"),
        ("GET", "/api/version"),
        ("GET", "/v1/models"),
        ("POST", "/api/generate"),
        ("POST", "/api/chat"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/tokenize"),
    ]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = requests.request(
                method, small_server + path, json={"prompt": "a"}, headers=headers, timeout=10
            )
            assert r.status_code == 401, (path, headers)
            assert "Authorization: Bearer" in r.text
    assert requests.get(small_server + "/", timeout=10).status_code == 200  # the page itself
    assert requests.get(small_server + "/health", timeout=10).json()["status"] == "ok"  # probes
    ok = requests.post(small_server + "/tokenize", json={"text": "Bakı"}, headers=AUTH, timeout=10)
    assert ok.status_code == 200

    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{small_server}/v1", api_key="wrong").models.list()
    client = openai.OpenAI(base_url=f"{small_server}/v1", api_key=KEY, timeout=60)
    assert client.completions.create(model="m", prompt="Bakı", max_tokens=2).choices

    ollama = pytest.importorskip("ollama")
    oc = ollama.Client(host=small_server, headers=AUTH, timeout=60)
    assert oc.generate(model="m", prompt="Bakı", options={"num_predict": 2}).done


def wait_for(cond, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def health(base) -> dict:
    return requests.get(base + "/health", headers=AUTH, timeout=10).json()


def test_full_queue_answers_503_and_a_disconnect_frees_the_slot(small_server):
    long = {"prompt": PROMPT, "options": {"num_predict": 1000, "ignore_eos": True}}
    session = requests.Session()
    first = session.post(
        small_server + "/api/generate", json=long, headers=AUTH, stream=True, timeout=60
    )
    lines = first.iter_lines()
    assert json.loads(next(lines))["done"] is False  # streaming, in the only slot (1000 x 50 ms)

    result = {}

    def queued():
        body = {"prompt": "Bakı", "stream": False, "options": {"num_predict": 3, "seed": 1}}
        r = requests.post(small_server + "/api/generate", json=body, headers=AUTH, timeout=120)
        result["status"], result["body"] = r.status_code, r.json()

    waiter = threading.Thread(target=queued)
    waiter.start()
    wait_for(lambda: health(small_server)["queued"] == 1, "the second request to queue")

    full = requests.post(
        small_server + "/v1/completions", json={"prompt": "x"}, headers=AUTH, timeout=10
    )
    assert full.status_code == 503
    assert "busy" in full.json()["error"]["message"]

    first.close()  # the client goes away mid-stream
    session.close()
    waiter.join(timeout=40)  # the long one had ~50 s left: it must have been dropped
    assert not waiter.is_alive(), "the queued request never got the freed slot"
    assert result["status"] == 200 and result["body"]["done"] is True
    wait_for(lambda: health(small_server)["active"] == 0, "the slots to empty")


def test_cli_bad_input_is_one_sentence_and_exit_2(ckpt, tmp_path):
    from trainkit import azgpt

    r = azgpt("serve", "--ckpt", str(tmp_path / "nowhere"), "--port", "0")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        r = azgpt("serve", "--ckpt", str(ckpt), "--port", port)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
    r = azgpt("serve", "--ckpt", str(ckpt), "--port", "70000")
    assert r.returncode == 2 and "--port" in r.stderr
    r = azgpt("serve", "--ckpt", str(ckpt), "--api-key", " ")
    assert r.returncode == 2 and "--api-key" in r.stderr
    r = azgpt("serve", "--ckpt", str(ckpt), "--max-batch", "0")
    assert r.returncode == 2 and "--max-batch" in r.stderr


def test_a_stop_string_ends_the_text_right_before_it(loaded):
    model, tok = loaded
    with Engine(model, tok) as eng:
        ids = eng.prompt_ids(PROMPT)
        greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        text, _ = eng.complete(ids, greedy)
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        assert len(stop) == 3
        cut, fin = eng.complete(ids, SamplingParams(**{**greedy.__dict__, "stop": ("\x00", stop)}))
    assert cut == text[: text.index(stop)] and fin.reason == "stop"


def test_llama_arch_decodes_batched_like_plain_forward_passes(loaded):
    """Rotary positions, grouped-query heads: the engine's cache slots and shifts still give the
    greedy tokens of plain forward passes."""
    from azgpt.config import ModelConfig

    if "arch" not in ModelConfig.__dataclass_fields__:
        pytest.skip("this model has no llama flavour")
    _, tok = loaded
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="llama", vocab_size=tok.get_vocab_size(), block_size=32, n_layer=2, n_head=4,
        n_kv_head=2, n_embd=32, bias=False,
    )  # fmt: skip
    model = GPT(cfg).eval()
    params = SamplingParams(max_tokens=70, temperature=0, ignore_eos=True)
    with Engine(model, tok, max_batch=2) as eng:
        ids = eng.prompt_ids(PROMPT)
        other = []
        eng.submit(eng.prompt_ids("Şəki"), SamplingParams(max_tokens=9, seed=4), other.append)
        _, fin = eng.complete(ids, params)
    seq, start = list(ids), 0
    with torch.no_grad():
        for _ in range(params.max_tokens):
            if len(seq) - 1 - start >= cfg.block_size:
                start = len(seq) - cfg.block_size // 2
            logits = model(torch.tensor([seq[start:]]))[0, -1]
            logits[sorted(eng.specials)] = float("-inf")
            seq.append(int(logits.argmax()))
    assert fin.context == seq


def test_engine_events_reach_the_event_loop_in_one_wake_up_per_batch():
    """The engine thread's events for several streams, posted before the loop runs, wake the
    loop once and reach each stream's queue in order; the next batch wakes it again; posting
    after the loop closed (the server stopping) raises nothing."""
    import asyncio

    from azgpt.serve.common import Mailbox

    loop = asyncio.new_event_loop()
    wakes = []
    real = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *a: wakes.append(1) or real(*a)
    box = Mailbox(loop)
    queues = [asyncio.Queue(), asyncio.Queue()]

    def engine_step(step: int) -> None:
        for k in range(3):
            for i, q in enumerate(queues):
                box.post(q, (step, i, k))

    for step in range(2):
        t = threading.Thread(target=engine_step, args=(step,))
        t.start()
        t.join()
        assert len(wakes) == step + 1
        loop.run_until_complete(asyncio.sleep(0))
        for i, q in enumerate(queues):
            assert [q.get_nowait() for _ in range(q.qsize())] == [(step, i, k) for k in range(3)]
    loop.close()
    box.post(queues[0], "late")  # no RuntimeError escapes
