"""Ollama's API: /api/version, /api/tags, /api/generate, /api/chat."""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import __version__
from .common import (
    Live,
    chat_prompt,
    check_ids,
    human_params,
    ndjson,
    now_iso,
    ollama_params,
    read_body,
    server,
)
from .engine import Chunk, Finished
from .schemas import OllamaChat, OllamaGenerate, check_prompt, parse, unsupported

router = APIRouter()


def _digest(srv) -> str:
    if "digest" not in srv.info:
        h = hashlib.sha256()
        if srv.weights and srv.weights.is_file():
            with open(srv.weights, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        srv.info["digest"] = h.hexdigest()
    return srv.info["digest"]


@router.get("/api/version")
async def version():
    return {"version": __version__}


@router.get("/api/tags")
async def tags(request: Request):
    srv = server(request)
    model = srv.engine.model
    family = getattr(model.config, "arch", "gpt2")
    st = srv.weights.stat() if srv.weights and srv.weights.is_file() else None
    return {
        "models": [
            {
                "name": srv.name,
                "model": srv.name,
                "modified_at": datetime.fromtimestamp(
                    st.st_mtime if st else time.time(), UTC
                ).isoformat(),
                "size": st.st_size if st else 0,
                "digest": await asyncio.to_thread(_digest, srv),
                "details": {
                    "parent_model": "",
                    "format": "safetensors",
                    "family": family,
                    "families": [family],
                    "parameter_size": human_params(model.num_params()),
                    "quantization_level": str(model.transformer.wte.weight.dtype)
                    .removeprefix("torch.")
                    .upper(),
                },
            }
        ]
    }


def _final(model: str, fin: Finished, live: Live) -> dict:
    return {
        "model": model,
        "created_at": now_iso(),
        "done": True,
        "done_reason": fin.reason,
        "total_duration": fin.total_ns,
        "load_duration": fin.load_ns,
        "prompt_eval_count": fin.prompt_tokens,
        "prompt_eval_duration": fin.prompt_ns,
        "eval_count": fin.completion_tokens,
        "eval_duration": fin.eval_ns,
        **live.extra(fin),
    }


async def _reply(live: Live, model: str, stream: bool, content, final_extra=lambda fin: {}):
    """One JSON object, or NDJSON lines ending with the final record. `content(text)` gives the
    route's text field (`response` or `message`), `final_extra(fin)` what only its final
    record holds."""

    def record(text: str, **rest) -> dict:
        return {"model": model, "created_at": now_iso(), **content(text), **rest}

    if not stream:
        text, fin = await live.collect()
        return JSONResponse(
            record(text, **_final(model, fin, live), **final_extra(fin)), headers=live.headers()
        )

    async def lines():
        async for ev in live.events():
            if isinstance(ev, Chunk):
                yield ndjson(record(ev.text, done=False))
            elif ev.reason == "error":
                yield ndjson({"error": ev.error})
            elif ev.reason != "cancelled":
                yield ndjson(record("", **_final(model, ev, live), **final_extra(ev)))

    return StreamingResponse(lines(), media_type="application/x-ndjson", headers=live.headers())


@router.post("/api/generate")
async def generate(request: Request):
    srv = server(request)
    b = parse(OllamaGenerate, await read_body(request))
    unsupported(
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
    params = ollama_params(b.options, srv.limits)
    model = b.model or srv.name
    check_prompt(len(b.prompt), srv.limits, "prompt")
    if not b.prompt and not b.context:  # Ollama's way to load a model: nothing to generate
        return {
            "model": model,
            "created_at": now_iso(),
            "response": "",
            "done": True,
            "done_reason": "load",
        }
    eng = srv.engine
    if b.context:
        check_ids(eng, b.context, "context")
        ids = b.context + eng.tokenizer.encode(b.prompt, add_special_tokens=False).ids
    else:
        ids = eng.prompt_ids(b.prompt)
    live = Live(request, ids, params)
    return await _reply(
        live, model, b.stream, lambda text: {"response": text}, lambda fin: {"context": fin.context}
    )


@router.post("/api/chat")
async def chat(request: Request):
    srv = server(request)
    b = parse(OllamaChat, await read_body(request))
    unsupported(
        b, {"tools": [], "format": "", "think": False, "logprobs": False, "top_logprobs": 0}
    )
    for i, m in enumerate(b.messages):
        unsupported(
            m, {"images": [], "tool_calls": [], "thinking": "", "tool_name": ""}, f"messages.{i}."
        )
    params = ollama_params(b.options, srv.limits)
    ids, dropped = chat_prompt(srv.engine, b.messages, srv.limits, "messages")
    live = Live(request, ids, params, dropped)
    return await _reply(
        live,
        b.model or srv.name,
        b.stream,
        lambda text: {"message": {"role": "assistant", "content": text}},
    )
