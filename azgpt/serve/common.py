"""What the Ollama and OpenAI routers share: the server's state, the request body reader, the
sampling settings and prompts built from a body, and a request running in the engine."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request

from ..chat_template import encode_chat
from .engine import Chunk, Engine, Finished, QueueFull, SamplingParams
from .schemas import (
    NEUTRAL,
    ApiError,
    Limits,
    OllamaOptions,
    OpenAISampling,
    check_prompt,
    max_tokens,
    parse_json,
    sampling,
    stop_strings,
    unsupported,
)

TRUNCATED_HEADER = "X-Prompt-Truncated-Tokens"
DROPPED_HEADER = "X-Messages-Dropped"


@dataclass
class Server:
    """Everything a route needs, kept on `app.state.server`."""

    engine: Engine
    name: str
    limits: Limits
    weights: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    mailbox: Mailbox | None = None  # the engine's events to the event loop (`mailbox()`)


def server(request: Request) -> Server:
    return request.app.state.server


async def read_body(request: Request) -> dict:
    limits = server(request).limits
    declared = request.headers.get("content-length", "")
    too_big = ApiError(
        413, f"the request body is over {limits.max_body_bytes} bytes; send a smaller one."
    )
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > limits.max_body_bytes:
            raise too_big
    return parse_json(bytes(raw))


def check_ids(engine: Engine, ids: list[int], field: str) -> None:
    for i in ids:
        if not 0 <= i < engine.n_text_ids:
            raise ApiError(
                400,
                f"field '{field}' holds token id {i}, outside this model's vocabulary of "
                f"{engine.n_text_ids} ids.",
                field,
            )


def ollama_params(opts: OllamaOptions | None, limits: Limits) -> SamplingParams:
    o = opts or OllamaOptions()
    for k, neutral in NEUTRAL.items():
        v = getattr(o, k)
        if v is not None and v != neutral:
            raise ApiError(
                400,
                f"field 'options.{k}' is not supported by azgpt serve (only {neutral}); remove it.",
                f"options.{k}",
            )
    n = o.num_predict
    if n is not None and n in (-1, -2):
        n = limits.max_tokens  # Ollama's "no limit" / "fill the context": the server's cap
    elif n is not None and n < 1:
        raise ApiError(
            400,
            f"field 'options.num_predict' must be a positive count, -1 or -2 (got {n}).",
            "options.num_predict",
        )
    return sampling(
        "options.",
        max_tokens=max_tokens(n, limits, "options.num_predict"),
        temperature=o.temperature,
        top_k=o.top_k,
        top_p=o.top_p,
        seed=o.seed,
        stop=stop_strings(o.stop, limits, "options.stop"),
        ignore_eos=bool(o.ignore_eos),
    )


def openai_params(b: OpenAISampling, n: int | None, n_field: str, limits: Limits):
    unsupported(b, {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": {}})
    return sampling(
        max_tokens=max_tokens(n, limits, n_field),
        temperature=b.temperature,
        top_k=b.top_k,
        top_p=b.top_p,
        seed=b.seed,
        stop=stop_strings(b.stop, limits, "stop"),
        ignore_eos=bool(b.ignore_eos),
    )


def chat_prompt(engine: Engine, items, limits: Limits, field: str) -> tuple[list[int], int]:
    """The ids of a conversation (azgpt's one chat template) and how many of its oldest
    messages were dropped: beyond `max_messages` messages or `max_prompt_chars` characters the
    oldest go first (system messages stay), as a long prompt loses its start."""
    if not items:
        raise ApiError(400, f"field '{field}' is empty; send at least one message.", field)
    msgs = []
    for i, m in enumerate(items):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant"):
            raise ApiError(
                400,
                f"field '{field}.{i}.role' must be system, user or assistant (got {m.role!r}).",
                f"{field}.{i}.role",
            )
        content = m.content
        if isinstance(content, list):  # OpenAI's content parts: text only
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(
                        400,
                        f"field '{field}.{i}.content' may hold text parts only.",
                        f"{field}.{i}.content",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        msgs.append({"role": role, "content": content or ""})
    keep = [True] * len(msgs)
    chars = sum(len(m["content"]) for m in msgs)
    dropped = 0
    for i in range(len(msgs) - 1):  # never the last message: it is what is being answered
        if len(msgs) - dropped <= limits.max_messages and chars <= limits.max_prompt_chars:
            break
        if msgs[i]["role"] != "system":
            keep[i] = False
            dropped += 1
            chars -= len(msgs[i]["content"])
    check_prompt(chars, limits, field)
    kept = [m for m, k in zip(msgs, keep) if k]
    try:
        return encode_chat(engine.tokenizer, kept), dropped
    except ValueError as e:
        raise ApiError(400, f"field '{field}': {e}", field) from None


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def ndjson(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def human_params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def truncation(fin: Finished, dropped: int = 0) -> dict:
    out = {"prompt_truncated": fin.prompt_truncated} if fin.prompt_truncated else {}
    return out | ({"messages_dropped": dropped} if dropped else {})


def usage(fin: Finished) -> dict:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
    }


class Mailbox:
    """Events from the engine thread to one event loop's request queues, delivered in one
    wake-up of the loop however many arrive before it runs. The engine emits an event per
    running stream per step; waking the loop for each was a thread switch each, on the cores
    whose OpenMP threads the engine's step waits for."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Any]] = []
        self._scheduled = False

    def post(self, queue: asyncio.Queue, ev) -> None:
        with self._lock:
            self._items.append((queue, ev))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: the server is stopping
            pass

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, ev in items:
            queue.put_nowait(ev)


def mailbox(srv) -> Mailbox:
    """The server's mailbox for the running event loop."""
    loop = asyncio.get_running_loop()
    box = srv.mailbox
    if box is None or box.loop is not loop:
        box = srv.mailbox = Mailbox(loop)
    return box


class Live:
    """One request in the engine, its events delivered to this event loop. A client that
    disconnects cancels it (its row is free at the engine's next step)."""

    def __init__(self, request: Request, ids: list[int], params: SamplingParams, dropped=0):
        srv = server(request)
        engine, box = srv.engine, mailbox(srv)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.dropped = dropped

        def sink(ev):
            box.post(self.queue, ev)

        try:
            self.req = engine.submit(ids, params, sink)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy ({e}); retry in a moment.") from None
        self.truncated = self.req.prompt_truncated
        self.watcher = asyncio.create_task(self._watch(request))

    async def _watch(self, request: Request) -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                self.req.cancel()
                return

    async def events(self):
        try:
            while True:
                ev = await self.queue.get()
                yield ev
                if isinstance(ev, Finished):
                    return
        finally:
            self.watcher.cancel()
            self.req.cancel()

    async def collect(self) -> tuple[str, Finished]:
        parts = []
        async for ev in self.events():
            if isinstance(ev, Chunk):
                parts.append(ev.text)
            else:
                fin = ev
        if fin.reason == "error":
            raise ApiError(500, fin.error or "generation failed")
        return "".join(parts), fin

    def headers(self) -> dict[str, str]:
        h = {TRUNCATED_HEADER: str(self.truncated)} if self.truncated else {}
        return h | ({DROPPED_HEADER: str(self.dropped)} if self.dropped else {})

    def extra(self, fin: Finished) -> dict:
        return truncation(fin, self.dropped)
