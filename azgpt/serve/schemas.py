"""What `azgpt serve` accepts: the server's limits, the JSON request bodies (strict pydantic
models that forbid unknown fields) and the checks every body passes before a route sees it.

Every bad request gets a 4xx with one sentence naming the field: Ollama's `{"error": "..."}`,
or OpenAI's `{"error": {"message", "type", "param"}}` under /v1.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..generate import MAX_TEMPERATURE, SEED_LIMIT, SamplingError, SamplingParams

MAX_DEPTH = 32  # JSON nesting; no body of these APIs needs more than 4


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1_000_000
    max_prompt_chars: int = 100_000  # a prompt (or all messages together), before tokenizing
    max_tokens: int = 1024  # tokens one request may ask for
    max_messages: int = 256  # older messages are dropped beyond this
    max_stop: int = 8  # stop strings per request, each at most 200 characters
    default_tokens: int = SamplingParams().max_tokens  # when a request does not say


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


# ----------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Temperature = Field(None, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)
TopP = Field(None, gt=0, le=1, allow_inf_nan=False)
Seed = Field(None, ge=0, lt=SEED_LIMIT)


class OllamaOptions(_Body):
    temperature: float | None = Temperature
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = TopP
    num_predict: int | None = None
    seed: int | None = Seed
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


class OpenAISampling(_Body):
    model: str = ""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Temperature
    top_p: float | None = TopP
    top_k: int | None = Field(None, ge=0)  # an extension (as vLLM's)
    n: int | None = Field(None, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Seed
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    ignore_eos: bool | None = None


class OpenAICompletion(OpenAISampling):
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


class OpenAIChat(OpenAISampling):
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


# ----------------------------------------------------------------------------- checks


_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json(raw: bytes) -> dict:
    """A request body as a JSON object: valid UTF-8, at most MAX_DEPTH levels deep, and no
    lone UTF-16 surrogates (`"\\ud800"` parses to a str that is not text)."""
    if not raw:
        raise ApiError(400, "the request body is empty; send a JSON object.")
    deep = ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels; flatten it.")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ApiError(
            400,
            f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}).",
        ) from None
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text; send JSON in UTF-8.") from None
    except RecursionError:
        raise deep from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    todo: list[tuple[Any, str, int]] = [(data, "", 1)]
    while todo:  # iterative: no recursion on hostile input
        node, where, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise deep
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            path = f"{where}.{k}" if where else str(k)
            for s in (k, v):
                if isinstance(s, str) and _SURROGATE.search(s):
                    raise ApiError(
                        400,
                        f"field '{path}' holds a lone UTF-16 surrogate, which is not text; "
                        "send valid Unicode.",
                        path,
                    )
            if isinstance(v, dict | list):
                todo.append((v, path, depth + 1))
    return data


def parse(model: type[BaseModel], data: dict):
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


def unsupported(body: BaseModel, fields: dict[str, Any], prefix: str = "") -> None:
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


def stop_strings(value, limits: Limits, field: str) -> tuple[str, ...]:
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


def max_tokens(n: int | None, limits: Limits, field: str) -> int:
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


def check_prompt(chars: int, limits: Limits, field: str) -> None:
    if chars > limits.max_prompt_chars:
        raise ApiError(
            400,
            f"field '{field}' holds {chars} characters, over this server's limit of "
            f"{limits.max_prompt_chars}; send a shorter prompt.",
            field,
        )


def sampling(prefix: str = "", **kw) -> SamplingParams:
    """SamplingParams from request fields; `prefix` places them (`options.` for Ollama)."""
    try:
        return SamplingParams(**{k: v for k, v in kw.items() if v is not None})
    except SamplingError as e:
        why = str(e).removeprefix(e.field + " ")
        raise ApiError(400, f"field '{prefix}{e.field}' {why}.", prefix + e.field) from None


def error_body(path: str, status: int, message: str, param=None) -> dict:
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        if status == 401:
            kind = "authentication_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return {"error": message}
