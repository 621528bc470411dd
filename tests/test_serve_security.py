"""azgpt serve, safe to expose: cross-site requests, DNS rebinding, slow and idle connections,
hostile JSON, extreme sampling values beside other streams, and a checkpoint whose context is
absurd. A real server process on 127.0.0.1 and raw sockets where a client must misbehave."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
requests = pytest.importorskip("requests")

from test_serve import NAME, PROMPT, ckpt, loaded, one_thread, running_server  # noqa: E402, F401
from trainkit import azgpt  # noqa: E402

from azgpt.config import ModelConfig  # noqa: E402
from azgpt.model import GPT  # noqa: E402
from azgpt.serve.engine import Chunk, Engine, Finished, SamplingParams  # noqa: E402

ALLOWED = "http://localhost:3000"


@pytest.fixture(scope="module")
def guarded(ckpt, tmp_path_factory):  # noqa: F811
    """A server with an allowed origin, 8 connections at most and 2-second deadlines."""
    log = tmp_path_factory.mktemp("serve-log") / "serve-guarded.log"
    args = ("--name", NAME, "--origins", ALLOWED, "--max-connections", "8",
            "--header-timeout", "2", "--body-timeout", "2")  # fmt: skip
    with running_server(ckpt, log, *args) as base:
        yield base


GEN = {"prompt": "Bakı", "stream": False, "options": {"num_predict": 2}}


def test_cross_site_requests_and_rebinding_are_refused(guarded):
    url = guarded + "/api/generate"
    port = guarded.rsplit(":", 1)[1]
    # A web page's "simple" cross-site POST: text/plain needs no preflight in a browser.
    r = requests.post(
        url,
        data=json.dumps(GEN),
        headers={"Origin": "http://evil.example", "Content-Type": "text/plain"},
        timeout=30,
    )
    assert r.status_code == 403 and "--origins http://evil.example" in r.json()["error"]
    r = requests.post(url, data=json.dumps(GEN), headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]
    r = requests.post(
        url, data=json.dumps(GEN), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 415
    # After DNS rebinding the page's name points here, and the browser sends that name.
    r = requests.get(guarded + "/api/tags", headers={"Host": f"rebind.example:{port}"}, timeout=30)
    assert r.status_code == 403 and "rebind.example" in r.json()["error"]
    r = requests.post(
        guarded + "/v1/completions",
        json={"prompt": "a", "max_tokens": 1},
        headers={"Origin": "null"},
        timeout=30,
    )
    assert r.status_code == 403 and r.json()["error"]["type"] == "invalid_request_error"
    # What is allowed: the server's own page, loopback names, and --origins (with CORS).
    for headers in (
        {"Origin": guarded},
        {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"},
        {},
    ):
        assert requests.post(url, json=GEN, headers=headers, timeout=60).status_code == 200
    r = requests.post(url, json=GEN, headers={"Origin": ALLOWED}, timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    pre = requests.options(
        url,
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
        timeout=30,
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ALLOWED


def _slow_socket(port: int, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head)
    return s


def _closed_by_server(s: socket.socket) -> bool:
    """Whether the server closes the connection (FIN or reset) before the socket's timeout."""
    try:
        while s.recv(4096):  # a final 503 may come first
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_slow_connections_do_not_lock_out_health_and_are_closed(guarded):
    """30 connections (cap 8) that trickle headers or a body: /health still answers at once,
    and every slow connection is closed by its deadline."""
    port = int(guarded.rsplit(":", 1)[1])
    partial_head = b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    partial_body = (
        b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 500\r\n\r\n{"prompt": '
    )
    slow = [_slow_socket(port, partial_head if i % 2 else partial_body) for i in range(30)]
    stop = threading.Event()

    def trickle():  # one byte per socket every 0.5 s: never a complete request
        while not stop.is_set():
            for s in slow:
                try:
                    s.sendall(b"a")
                except OSError:
                    pass
            time.sleep(0.5)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        for _ in range(5):
            h = requests.get(guarded + "/health", timeout=10)
            assert h.status_code == 200 and h.json()["status"] == "ok"
        idle = socket.create_connection(("127.0.0.1", port), timeout=30)  # sends nothing
        for s in [*slow, idle]:
            s.settimeout(20)  # the deadlines are 2 s: each is closed well within this
            assert _closed_by_server(s)
    finally:
        stop.set()
        t.join()
        for s in slow:
            s.close()
    assert requests.get(guarded + "/health", timeout=10).status_code == 200


HOSTILE = [
    (b'{"prompt": "a", "options": {"temperature": 1e999}}', "'options.temperature'"),
    (b'{"prompt": "a", "options": {"temperature": 101}}', "'options.temperature'"),
    (b'{"prompt": "a", "options": {"seed": 18446744073709551616}}', "'options.seed'"),
    (b'{"prompt": "a", "options": {"seed": -5}}', "'options.seed'"),
    (b'{"prompt": "a\\ud800b"}', "'prompt'"),
    (b'{"prompt": "a", "options": {"stop": ["\\udfff"]}}', "'options.stop.0'"),
    (b'{"prompt": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nests deeper"),
    (b'{"prompt": "a", "x": ' + b'{"a":' * 40 + b"1" + b"}" * 40 + b"}", "nests deeper"),
]


@pytest.mark.parametrize("body,names", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_hostile_json_is_one_sentence_400(guarded, body, names):
    r = requests.post(
        guarded + "/api/generate",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert names in r.json()["error"] and "Traceback" not in r.text


def test_extreme_but_valid_settings_answer(guarded):
    for opts in ({"temperature": 1e-50}, {"top_p": 1e-50}, {"temperature": 100, "top_k": 0}):
        body = {"prompt": PROMPT, "stream": False, "options": {"num_predict": 5, **opts}}
        r = requests.post(guarded + "/api/generate", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["done"] is True, r.text
    r = requests.post(
        guarded + "/v1/completions",
        json={"prompt": "a", "max_tokens": 2, "seed": 2**63 - 1, "temperature": 1e-300},
        timeout=60,
    )
    assert r.status_code == 200


def test_a_long_chat_drops_its_oldest_messages(guarded):
    turns = [{"role": "system", "content": "Qısa cavab ver."}]
    for i in range(300):
        turns.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"söz {i}"})
    body = {"messages": turns, "stream": False, "options": {"num_predict": 2}}
    r = requests.post(guarded + "/api/chat", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["messages_dropped"] == 301 - 256
    assert r.headers["X-Messages-Dropped"] == str(301 - 256)
    r = requests.post(guarded + "/v1/chat/completions", json={"messages": turns[:10]}, timeout=60)
    assert r.status_code == 200 and "messages_dropped" not in r.json()


def test_the_page_trims_its_chat_history_and_takes_the_servers_defaults(guarded):
    """The playground keeps its history within the server's limits and samples with the
    server's defaults, both read from /health (which reports SamplingParams')."""
    from azgpt.generate import DEFAULTS

    page = (Path(__file__).parents[1] / "azgpt/serve/static/index.html").read_text()
    assert "max_messages" in page and "history.shift()" in page and "h.defaults" in page
    d = requests.get(guarded + "/health", timeout=10).json()["defaults"]
    assert d == {
        "temperature": DEFAULTS.temperature,
        "top_k": DEFAULTS.top_k,
        "top_p": DEFAULTS.top_p,
        "max_tokens": DEFAULTS.max_tokens,
    }
    assert f'id="top_k" type="number" min="0" step="1" value="{DEFAULTS.top_k}"' in page


def test_extreme_sampling_on_a_padded_model_beside_other_streams(loaded):  # noqa: F811
    """Temperatures and top_p at their extremes on a model whose vocabulary is padded past its
    tokenizer (padding ids would win), while other streams decode in the same batch: every
    request ends normally and no padding id is ever sampled."""
    model, tok = loaded
    cfg = model.config.to_dict() | {"vocab_size": tok.get_vocab_size() + 64}
    padded = GPT(ModelConfig(**cfg)).eval()
    with torch.no_grad():
        padded.transformer.wte.weight[tok.get_vocab_size() :] *= 500
    settings = [
        SamplingParams(max_tokens=30, temperature=1e-50, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=1.0, top_p=1e-50, seed=2, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=100.0, top_k=0, top_p=1.0, seed=3),
        SamplingParams(max_tokens=30, seed=4, ignore_eos=True),
    ]
    out: list[list] = [[] for _ in settings]
    with Engine(padded, tok, max_batch=4) as eng:
        for p, o in zip(settings, out):
            eng.submit(eng.prompt_ids(PROMPT), p, o.append)
        deadline = time.monotonic() + 120
        while not all(o and isinstance(o[-1], Finished) for o in out):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert eng.stats["max_rows"] >= 2
    for o in out:
        fin = o[-1]
        assert fin.reason in ("stop", "length") and max(fin.context) < tok.get_vocab_size()
        assert all(isinstance(e, Chunk) for e in o[:-1])


def test_a_checkpoint_with_an_absurd_context(ckpt, tmp_path):  # noqa: F811
    """block_size 1,000,000 from a stranger: served with the default context (4096), and a
    --ctx whose KV cache would not fit is refused in one sentence before allocating."""
    from azgpt.checkpoint import save_model_files

    cfg = ModelConfig(
        arch="llama", vocab_size=512, block_size=1_000_000, n_layer=4, n_head=4, n_embd=256,
        bias=False,
    )  # fmt: skip
    folder = tmp_path / "absurd"
    folder.mkdir()
    save_model_files(GPT(cfg), folder)
    shutil.copy(ckpt / "tokenizer.json", folder / "tokenizer.json")
    r = azgpt("serve", "--ckpt", str(folder), "--port", "0", "--ctx", "1000000",
              "--max-batch", "64")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--ctx" in r.stderr and "GB" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    log = tmp_path / "absurd.log"
    with running_server(folder, log, "--max-batch", "2") as base:
        h = requests.get(base + "/health", timeout=10).json()
        assert h["context"] == 4096
        r = requests.post(base + "/api/generate", json={**GEN, "prompt": PROMPT}, timeout=60)
        assert r.status_code == 200
