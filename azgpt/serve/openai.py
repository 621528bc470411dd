"""OpenAI's API: /v1/models, /v1/completions, /v1/chat/completions (server-sent events when
streaming, `data: [DONE]` at the end)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .common import Live, chat_prompt, check_ids, openai_params, read_body, server, sse, usage
from .engine import Chunk, Finished
from .schemas import ApiError, OpenAIChat, OpenAICompletion, check_prompt, parse, unsupported

router = APIRouter()


def _card(name: str) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "azgpt"}


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [_card(server(request).name)]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str):
    return {**_card(server(request).name), "id": model_id}


def _sse_error(ev: Finished) -> str:
    return sse(
        {"error": {"message": ev.error, "type": "server_error", "param": None, "code": None}}
    )


def _stream(live: Live, head: dict, want_usage: bool, piece, final, first: list[str] = ()):
    """Server-sent events: `first`, one `piece(text)` per chunk, then `final(fin)` (and the
    usage record when asked for), `data: [DONE]`."""

    async def events():
        for line in first:
            yield line
        async for ev in live.events():
            if isinstance(ev, Chunk):
                yield sse(piece(ev.text))
            elif ev.reason == "error":
                yield _sse_error(ev)
                return
            elif ev.reason == "cancelled":
                return
            else:
                yield sse({**final(ev.reason), **live.extra(ev)})
                if want_usage:
                    yield sse({**head, "choices": [], "usage": usage(ev)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", **live.headers()},
    )


@router.post("/v1/completions")
async def completions(request: Request):
    srv = server(request)
    b = parse(OpenAICompletion, await read_body(request))
    unsupported(b, {"echo": False, "logprobs": None, "suffix": ""})
    params = openai_params(b, b.max_tokens, "max_tokens", srv.limits)
    eng = srv.engine
    if isinstance(b.prompt, str):
        check_prompt(len(b.prompt), srv.limits, "prompt")
        ids = eng.prompt_ids(b.prompt)
    elif all(isinstance(p, int) for p in b.prompt) and b.prompt:
        check_ids(eng, b.prompt, "prompt")
        ids = list(b.prompt)
    elif len(b.prompt) == 1:
        check_prompt(len(b.prompt[0]), srv.limits, "prompt")
        ids = eng.prompt_ids(b.prompt[0])
    else:
        raise ApiError(
            400,
            "field 'prompt' must be one string (or one list of token ids); send one prompt "
            "per request.",
            "prompt",
        )
    live = Live(request, ids, params)
    head = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": b.model or srv.name,
    }

    def choice(text: str, finish=None) -> dict:
        return {
            **head,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        }

    if not b.stream:
        text, fin = await live.collect()
        return JSONResponse(
            {**choice(text, fin.reason), "usage": usage(fin), **live.extra(fin)},
            headers=live.headers(),
        )
    want_usage = bool(b.stream_options and b.stream_options.include_usage)
    return _stream(live, head, want_usage, choice, lambda reason: choice("", reason))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    srv = server(request)
    b = parse(OpenAIChat, await read_body(request))
    unsupported(b, {"logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none"})
    if b.response_format and b.response_format.get("type") not in (None, "text"):
        raise ApiError(
            400,
            "field 'response_format' is not supported by azgpt serve beyond "
            '{"type": "text"}; remove it.',
            "response_format",
        )
    for i, m in enumerate(b.messages):
        unsupported(m, {"tool_calls": [], "refusal": ""}, f"messages.{i}.")
    if b.max_tokens is not None and b.max_completion_tokens is not None:
        raise ApiError(
            400, "send either 'max_tokens' or 'max_completion_tokens', not both.", "max_tokens"
        )
    n, n_field = (
        (b.max_completion_tokens, "max_completion_tokens")
        if b.max_completion_tokens is not None
        else (b.max_tokens, "max_tokens")
    )
    params = openai_params(b, n, n_field, srv.limits)
    ids, dropped = chat_prompt(srv.engine, b.messages, srv.limits, "messages")
    live = Live(request, ids, params, dropped)
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": b.model or srv.name,
    }
    if not b.stream:
        text, fin = await live.collect()
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": fin.reason}
        return JSONResponse(
            {
                **head,
                "object": "chat.completion",
                "choices": [choice],
                "usage": usage(fin),
                **live.extra(fin),
            },
            headers=live.headers(),
        )
    chunk = {**head, "object": "chat.completion.chunk"}

    def delta(d: dict, finish=None) -> dict:
        return {
            **chunk,
            "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}],
        }

    want_usage = bool(b.stream_options and b.stream_options.include_usage)
    return _stream(
        live,
        chunk,
        want_usage,
        lambda text: delta({"content": text}),
        lambda reason: delta({}, reason),
        [sse(delta({"role": "assistant", "content": ""}))],
    )
