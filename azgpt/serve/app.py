"""The HTTP layer of `azgpt serve`: FastAPI routes over the batching engine.

Ollama's API (`/api/generate`, `/api/chat`, `/api/tags`, `/api/version`), OpenAI's
(`/v1/completions`, `/v1/chat/completions`, `/v1/models`), `/health`, `/tokenize` and the
playground page at `/`. One loaded model answers whatever model name a request carries.

Request bodies are read by hand (size-capped) and validated by strict pydantic models that
forbid unknown fields, so every bad request gets a 4xx with one sentence naming the field
(Ollama's `{"error": "..."}`, or OpenAI's `{"error": {"message", "type", "param"}}` under /v1).
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import hmac
import json
import socket
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import UserError
from .engine import Chunk, Engine, Finished, QueueFull, SamplingParams

TRUNCATED_HEADER = "X-Prompt-Truncated-Tokens"


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1_000_000
    max_prompt_chars: int = 100_000  # a prompt (or all messages together), before tokenizing
    max_tokens: int = 1024  # tokens one request may ask for
    max_messages: int = 256
    max_stop: int = 8  # stop strings per request, each at most 200 characters
    default_tokens: int = 128  # when a request does not say


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


# ----------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class OllamaOptions(_Body):
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    num_predict: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool | None = None  # azgpt's extension, as vLLM's: fixed-length runs
    # llama.cpp runtime settings that Ollama clients send; they cannot change the text here.
    num_ctx: int | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    num_thread: int | None = None
    num_keep: int | None = None
    numa: bool | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    vocab_only: bool | None = None
    logits_all: bool | None = None
    embedding_only: bool | None = None
    repeat_last_n: int | None = None
    penalize_newline: bool | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    # Sampling options azgpt does not implement: accepted only at their neutral values.
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None


NEUTRAL = {
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "tfs_z": 1.0,
    "mirostat": 0,
}


class OllamaGenerate(_Body):
    model: str = ""
    prompt: str = ""
    context: list[int] | None = None
    stream: bool = True
    options: OllamaOptions | None = None
    raw: bool | None = None  # a base model has no template: every prompt is raw
    keep_alive: float | int | str | None = None  # the model stays loaded
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    format: Any = None
    images: list[Any] | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None


class OllamaMessage(_Body):
    role: str
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None
    thinking: str | None = None
    tool_name: str | None = None


class OllamaChat(_Body):
    model: str = ""
    messages: list[OllamaMessage] = Field(default_factory=list)
    stream: bool = True
    options: OllamaOptions | None = None
    keep_alive: float | int | str | None = None
    tools: list[Any] | None = None
    format: Any = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class StreamOptions(_Body):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class _OpenAISampling(_Body):
    model: str = ""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # an extension (as vLLM's)
    n: int | None = Field(None, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    ignore_eos: bool | None = None


class OpenAICompletion(_OpenAISampling):
    prompt: str | list[str] | list[int] = ""
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: str | None = None


class OpenAIMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[Any] | None = None


class OpenAIChat(_OpenAISampling):
    messages: list[OpenAIMessage] = Field(default_factory=list)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None


class TokenizeBody(_Body):
    text: str
    model: str = ""


# ----------------------------------------------------------------------------- helpers


def _parse(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # An unknown field first: next to a missing one it is most likely a misspelling of it.
        err = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
        # Union members add their type name to the location (`stop.str`): keep field names.
        loc = [
            str(p)
            for p in err["loc"]
            if str(p) not in ("str", "int", "float", "bool") and "[" not in str(p)
        ]
        field = ".".join(loc) or "body"
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(loc[-1], _field_names(), n=1)
            hint = f"did you mean '{near[0]}'?" if near else "remove it."
            raise ApiError(400, f"unknown field '{field}'; {hint}", field) from None
        if err["type"] == "missing":
            raise ApiError(400, f"field '{field}' is required.", field) from None
        got = json.dumps(err.get("input"), ensure_ascii=False)
        got = got if len(got) <= 40 else got[:37] + "..."
        msg = err["msg"].removeprefix("Value error, ")
        raise ApiError(
            400, f"field '{field}' is invalid: {msg[0].lower()}{msg[1:]} (got {got}).", field
        ) from None


def _field_names() -> list[str]:
    names: set[str] = set()
    todo = list(_Body.__subclasses__())
    while todo:
        cls = todo.pop()
        names.update(cls.model_fields)
        todo.extend(cls.__subclasses__())
    return sorted(names)


def _unsupported(body: BaseModel, fields: dict[str, Any], prefix: str = "") -> None:
    """Fields azgpt accepts only at their neutral value (e.g. n=1, echo=false, no images)."""
    for name, neutral in fields.items():
        v = getattr(body, name)
        if v is None or v == neutral or v in ("", [], {}, False):
            continue
        raise ApiError(
            400,
            f"field '{prefix}{name}' is not supported by azgpt serve (a base GPT without "
            f"that feature); remove it.",
            prefix + name,
        )


def _stop(value, limits: Limits, field: str) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > limits.max_stop:
        raise ApiError(
            400, f"field '{field}' holds {len(stops)} strings; at most {limits.max_stop}.", field
        )
    for s in stops:
        if not s or len(s) > 200:
            raise ApiError(
                400, f"field '{field}' holds an empty or over-200-character string.", field
            )
    return tuple(stops)


def _max_tokens(n: int | None, limits: Limits, field: str) -> int:
    if n is None:
        return min(limits.default_tokens, limits.max_tokens)
    if n > limits.max_tokens:
        raise ApiError(
            400,
            f"field '{field}' asks for {n} tokens, over this server's limit of "
            f"{limits.max_tokens} (azgpt serve --max-tokens); ask for fewer.",
            field,
        )
    return n


def _check_prompt(chars: int, limits: Limits, field: str) -> None:
    if chars > limits.max_prompt_chars:
        raise ApiError(
            400,
            f"field '{field}' holds {chars} characters, over this server's limit of "
            f"{limits.max_prompt_chars}; send a shorter prompt.",
            field,
        )


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _ndjson(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _human_params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


class _Live:
    """One request in the engine, its events delivered to this event loop. A client that
    disconnects cancels it (its slot is free at the engine's next step)."""

    def __init__(self, engine: Engine, request: Request, ids: list[int], params: SamplingParams):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

        def sink(ev):
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, ev)
            except RuntimeError:  # the loop is closed: the server is stopping
                pass

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
        return {TRUNCATED_HEADER: str(self.truncated)} if self.truncated else {}


def _truncation(fin: Finished) -> dict:
    return {"prompt_truncated": fin.prompt_truncated} if fin.prompt_truncated else {}


async def _ollama_reply(live, model: str, stream: bool, content, final_extra=lambda fin: {}):
    """Ollama's answer to /api/generate and /api/chat: one JSON object, or NDJSON lines ending
    with the final record. `content(text)` gives the route's text field (`response` or
    `message`), `final_extra(fin)` what only its final record holds."""

    def record(text: str, **rest) -> dict:
        return {"model": model, "created_at": _now_iso(), **content(text), **rest}

    if not stream:
        text, fin = await live.collect()
        return JSONResponse(
            record(text, **_ollama_final(model, fin), **final_extra(fin)), headers=live.headers()
        )

    async def lines():
        async for ev in live.events():
            if isinstance(ev, Chunk):
                yield _ndjson(record(ev.text, done=False))
            elif ev.reason == "error":
                yield _ndjson({"error": ev.error})
            elif ev.reason != "cancelled":
                yield _ndjson(record("", **_ollama_final(model, ev), **final_extra(ev)))

    return StreamingResponse(lines(), media_type="application/x-ndjson", headers=live.headers())


def _ollama_final(model: str, fin: Finished) -> dict:
    return {
        "model": model,
        "created_at": _now_iso(),
        "done": True,
        "done_reason": fin.reason,
        "total_duration": fin.total_ns,
        "load_duration": fin.load_ns,
        "prompt_eval_count": fin.prompt_tokens,
        "prompt_eval_duration": fin.prompt_ns,
        "eval_count": fin.completion_tokens,
        "eval_duration": fin.eval_ns,
        **_truncation(fin),
    }


def _usage(fin: Finished) -> dict:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
    }


# ----------------------------------------------------------------------------- the app


def create_app(
    engine: Engine,
    *,
    name: str = "azgpt",
    ckpt: str | Path | None = None,
    api_key: str | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """The FastAPI app over `engine` (started and stopped with the app's lifespan)."""
    limits = limits or Limits()
    page = (resources.files("azgpt.serve") / "static" / "index.html").read_text(encoding="utf-8")
    weights = Path(ckpt) / "model.safetensors" if ckpt else None
    n_params = engine.model.num_params()
    family = getattr(engine.config, "arch", "gpt2")  # "gpt2" or "llama"
    info: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(
        title="azgpt serve",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    def openai_style(request: Request) -> bool:
        return request.url.path.startswith("/v1/")

    def error_response(request: Request, status: int, message: str, param=None, headers=None):
        if openai_style(request):
            kind = "invalid_request_error" if status < 500 else "server_error"
            if status == 401:
                kind = "authentication_error"
            body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
        else:
            body = {"error": message}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return error_response(request, e.status, e.message, e.param, headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            msg = f"there is no route {request.url.path}; see the README for the routes azgpt serve has."
        elif e.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}."
        else:
            msg = str(e.detail)
        return error_response(request, e.status_code, msg)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception):
        return error_response(
            request, 500, f"internal error ({type(e).__name__}); see the server log."
        )

    async def auth(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(
                401,
                "this server needs an API key: send the header 'Authorization: Bearer KEY' "
                "with the key given to azgpt serve --api-key.",
            )

    async def body(request: Request) -> dict:
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
        if not raw:
            raise ApiError(400, "the request body is empty; send a JSON object.")
        try:
            data = json.loads(bytes(raw))
        except json.JSONDecodeError as e:
            raise ApiError(
                400,
                f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}).",
            ) from None
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not UTF-8 text; send JSON in UTF-8.") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object.")
        return data

    def check_ids(ids: list[int], field: str) -> None:
        for i in ids:
            if not 0 <= i < engine.n_text_ids:
                raise ApiError(
                    400,
                    f"field '{field}' holds token id {i}, outside this model's vocabulary of "
                    f"{engine.n_text_ids} ids.",
                    field,
                )

    def ollama_params(opts: OllamaOptions | None) -> SamplingParams:
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
        return SamplingParams(
            max_tokens=_max_tokens(n, limits, "options.num_predict"),
            temperature=0.8 if o.temperature is None else o.temperature,
            top_k=40 if o.top_k is None else o.top_k,
            top_p=0.9 if o.top_p is None else o.top_p,
            seed=o.seed,
            stop=_stop(o.stop, limits, "options.stop"),
            ignore_eos=bool(o.ignore_eos),
        )

    def openai_params(b: _OpenAISampling, max_tokens: int | None, max_field: str) -> SamplingParams:
        _unsupported(b, {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": {}})
        return SamplingParams(
            max_tokens=_max_tokens(max_tokens, limits, max_field),
            temperature=1.0 if b.temperature is None else b.temperature,
            top_k=b.top_k,
            top_p=b.top_p,
            seed=b.seed,
            stop=_stop(b.stop, limits, "stop"),
            ignore_eos=bool(b.ignore_eos),
        )

    def messages(items, field: str) -> list[tuple[str, str]]:
        if not items:
            raise ApiError(400, f"field '{field}' is empty; send at least one message.", field)
        if len(items) > limits.max_messages:
            raise ApiError(
                400,
                f"field '{field}' holds {len(items)} messages, over this server's limit of "
                f"{limits.max_messages}; send fewer.",
                field,
            )
        out = []
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
            out.append((role, content or ""))
        _check_prompt(sum(len(c) for _, c in out), limits, field)
        return out

    api = APIRouter(dependencies=[Depends(auth)])

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(
            page,
            headers={
                # Everything the page needs is inline or this server: it works offline.
                "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; img-src 'self' data:",
            },
        )

    @api.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": name,
            "context": engine.block_size,
            "parameters": n_params,
            **engine.status(),
        }

    @api.post("/tokenize")
    async def tokenize(request: Request):
        b = _parse(TokenizeBody, await body(request))
        _check_prompt(len(b.text), limits, "text")
        ids = engine.tokenizer.encode(b.text, add_special_tokens=False).ids
        pieces = [engine.token_bytes[i].decode("utf-8", "backslashreplace") for i in ids]
        return {"model": b.model or name, "ids": ids, "pieces": pieces, "count": len(ids)}

    # ------------------------------------------------------------------ Ollama

    def digest() -> str:
        if "digest" not in info:
            h = hashlib.sha256()
            if weights and weights.is_file():
                with open(weights, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            info["digest"] = h.hexdigest()
        return info["digest"]

    @api.get("/api/version")
    async def ollama_version():
        return {"version": __version__}

    @api.get("/api/tags")
    async def ollama_tags():
        st = weights.stat() if weights and weights.is_file() else None
        return {
            "models": [
                {
                    "name": name,
                    "model": name,
                    "modified_at": datetime.fromtimestamp(
                        st.st_mtime if st else time.time(), UTC
                    ).isoformat(),
                    "size": st.st_size if st else 0,
                    "digest": await asyncio.to_thread(digest),
                    "details": {
                        "parent_model": "",
                        "format": "safetensors",
                        "family": family,
                        "families": [family],
                        "parameter_size": _human_params(n_params),
                        "quantization_level": str(engine.model.lm_head.weight.dtype)
                        .removeprefix("torch.")
                        .upper(),
                    },
                }
            ]
        }

    @api.post("/api/generate")
    async def ollama_generate(request: Request):
        b = _parse(OllamaGenerate, await body(request))
        _unsupported(
            b,
            {
                "suffix": "",
                "system": "",
                "template": "",
                "format": "",
                "images": [],
                "think": False,
                "logprobs": False,
                "top_logprobs": 0,
                "width": None,
                "height": None,
                "steps": None,
            },
        )
        params = ollama_params(b.options)
        model = b.model or name
        _check_prompt(len(b.prompt), limits, "prompt")
        if not b.prompt and not b.context:  # Ollama's way to load a model: nothing to generate
            return {
                "model": model,
                "created_at": _now_iso(),
                "response": "",
                "done": True,
                "done_reason": "load",
            }
        if b.context:
            check_ids(b.context, "context")
            ids = b.context + engine.tokenizer.encode(b.prompt, add_special_tokens=False).ids
        else:
            ids = engine.prompt_ids(b.prompt)
        live = _Live(engine, request, ids, params)
        return await _ollama_reply(
            live,
            model,
            b.stream,
            lambda text: {"response": text},
            lambda fin: {"context": fin.context},
        )

    @api.post("/api/chat")
    async def ollama_chat(request: Request):
        b = _parse(OllamaChat, await body(request))
        _unsupported(
            b, {"tools": [], "format": "", "think": False, "logprobs": False, "top_logprobs": 0}
        )
        for i, m in enumerate(b.messages):
            _unsupported(
                m,
                {"images": [], "tool_calls": [], "thinking": "", "tool_name": ""},
                f"messages.{i}.",
            )
        params = ollama_params(b.options)
        model = b.model or name
        ids = engine.chat_ids(messages(b.messages, "messages"))
        live = _Live(engine, request, ids, params)
        return await _ollama_reply(
            live, model, b.stream, lambda text: {"message": {"role": "assistant", "content": text}}
        )

    # ------------------------------------------------------------------ OpenAI

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "azgpt"}

    @api.get("/v1/models")
    async def openai_models():
        return {"object": "list", "data": [model_card()]}

    @api.get("/v1/models/{model_id:path}")
    async def openai_model(model_id: str):
        return {**model_card(), "id": model_id}

    def sse_error(ev: Finished) -> str:
        return _sse(
            {"error": {"message": ev.error, "type": "server_error", "param": None, "code": None}}
        )

    @api.post("/v1/completions")
    async def openai_completions(request: Request):
        b = _parse(OpenAICompletion, await body(request))
        _unsupported(b, {"echo": False, "logprobs": None, "suffix": ""})
        params = openai_params(b, b.max_tokens, "max_tokens")
        model = b.model or name
        if isinstance(b.prompt, str):
            _check_prompt(len(b.prompt), limits, "prompt")
            ids = engine.prompt_ids(b.prompt)
        elif all(isinstance(p, int) for p in b.prompt) and b.prompt:
            check_ids(b.prompt, "prompt")
            ids = list(b.prompt)
        elif len(b.prompt) == 1:
            _check_prompt(len(b.prompt[0]), limits, "prompt")
            ids = engine.prompt_ids(b.prompt[0])
        else:
            raise ApiError(
                400,
                "field 'prompt' must be one string (or one list of token ids); send one prompt per request.",
                "prompt",
            )
        live = _Live(engine, request, ids, params)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": model}
        if not b.stream:
            text, fin = await live.collect()
            return JSONResponse(
                {
                    **head,
                    "choices": [
                        {"text": text, "index": 0, "logprobs": None, "finish_reason": fin.reason}
                    ],
                    "usage": _usage(fin),
                    **_truncation(fin),
                },
                headers=live.headers(),
            )
        usage = bool(b.stream_options and b.stream_options.include_usage)

        async def events():
            async for ev in live.events():
                if isinstance(ev, Chunk):
                    yield _sse(
                        {
                            **head,
                            "choices": [
                                {
                                    "text": ev.text,
                                    "index": 0,
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                        }
                    )
                elif ev.reason == "error":
                    yield sse_error(ev)
                    return
                elif ev.reason == "cancelled":
                    return
                else:
                    yield _sse(
                        {
                            **head,
                            "choices": [
                                {
                                    "text": "",
                                    "index": 0,
                                    "logprobs": None,
                                    "finish_reason": ev.reason,
                                }
                            ],
                            **_truncation(ev),
                        }
                    )
                    if usage:
                        yield _sse({**head, "choices": [], "usage": _usage(ev)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", **live.headers()},
        )

    @api.post("/v1/chat/completions")
    async def openai_chat(request: Request):
        b = _parse(OpenAIChat, await body(request))
        _unsupported(b, {"logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none"})
        if b.response_format and b.response_format.get("type") not in (None, "text"):
            raise ApiError(
                400,
                'field \'response_format\' is not supported by azgpt serve beyond {"type": "text"}; remove it.',
                "response_format",
            )
        for i, m in enumerate(b.messages):
            _unsupported(m, {"tool_calls": [], "refusal": ""}, f"messages.{i}.")
        if b.max_tokens is not None and b.max_completion_tokens is not None:
            raise ApiError(
                400, "send either 'max_tokens' or 'max_completion_tokens', not both.", "max_tokens"
            )
        mt, field = (
            (b.max_completion_tokens, "max_completion_tokens")
            if b.max_completion_tokens is not None
            else (b.max_tokens, "max_tokens")
        )
        params = openai_params(b, mt, field)
        model = b.model or name
        ids = engine.chat_ids(messages(b.messages, "messages"))
        live = _Live(engine, request, ids, params)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "created": created, "model": model}
        if not b.stream:
            text, fin = await live.collect()
            return JSONResponse(
                {
                    **head,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "logprobs": None,
                            "finish_reason": fin.reason,
                        }
                    ],
                    "usage": _usage(fin),
                    **_truncation(fin),
                },
                headers=live.headers(),
            )
        usage = bool(b.stream_options and b.stream_options.include_usage)
        chunk = {**head, "object": "chat.completion.chunk"}

        def delta(d: dict, finish=None) -> dict:
            return {
                **chunk,
                "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}],
            }

        async def events():
            yield _sse(delta({"role": "assistant", "content": ""}))
            async for ev in live.events():
                if isinstance(ev, Chunk):
                    yield _sse(delta({"content": ev.text}))
                elif ev.reason == "error":
                    yield sse_error(ev)
                    return
                elif ev.reason == "cancelled":
                    return
                else:
                    yield _sse({**delta({}, ev.reason), **_truncation(ev)})
                    if usage:
                        yield _sse({**chunk, "choices": [], "usage": _usage(ev)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", **live.headers()},
        )

    app.include_router(api)
    return app


# ----------------------------------------------------------------------------- azgpt serve


def listen(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a busy port fails at once with one sentence."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UserError(
            f"--host {host!r} is not an address of this machine; use e.g. 127.0.0.1."
        ) from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host."
        ) from None
    return sock


def serve(
    ckpt: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    name: str = "azgpt",
    tokenizer: str | None = None,
    device: str = "auto",
    max_batch: int = 8,
    max_queue: int = 64,
    limits: Limits | None = None,
) -> None:
    """Load the checkpoint once and answer requests until interrupted."""
    import uvicorn

    from ..checkpoint import checkpoint_tokenizer, load_model, pick_device

    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty; pass a non-empty key or leave the option out.")
    sock = listen(host, port)
    try:
        dev = pick_device(device)
        model, meta = load_model(ckpt, dev)
        tok, _, _ = checkpoint_tokenizer(ckpt, meta, tokenizer)
        engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue)
        app = create_app(engine, name=name, ckpt=ckpt, api_key=api_key, limits=limits)
    except BaseException:
        sock.close()
        raise
    real_port = sock.getsockname()[1]
    print(
        f"azgpt serve: {name} ({_human_params(model.num_params())} parameters, context "
        f"{model.config.block_size}, {dev}) at http://{host}:{real_port}/  "
        f"(playground /, Ollama /api, OpenAI /v1)",
        flush=True,
    )
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(
            f"azgpt serve: warning: {host} is reachable from other machines and no --api-key is set.",
            flush=True,
        )
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
