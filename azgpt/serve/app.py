"""The HTTP layer of `azgpt serve`: a small FastAPI app over the batching engine.

Routers: Ollama's API (`ollama.py`), OpenAI's (`openai.py`); here `/health`, `/tokenize`, the
playground page at `/`, the API key (`/health` and the page stay open) and errors as one JSON
sentence. The Host, Origin and Content-Type checks, connection deadlines and the connection
cap live in `guard.py`; request bodies and their checks in `schemas.py`.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import UserError
from ..generate import DEFAULTS
from . import ollama, openai
from .common import Server, read_body, server
from .engine import Engine
from .guard import ConnectionGuard, Gate
from .schemas import ApiError, Limits, TokenizeBody, check_prompt, error_body, parse

__all__ = ["ApiError", "Limits", "create_app", "listen", "serve"]


def create_app(
    engine: Engine,
    *,
    name: str = "azgpt",
    ckpt: str | Path | None = None,
    api_key: str | None = None,
    limits: Limits | None = None,
    host: str = "127.0.0.1",
    origins: Sequence[str] = (),
) -> FastAPI:
    """The FastAPI app over `engine` (started and stopped with the app's lifespan)."""
    limits = limits or Limits()
    page = (resources.files("azgpt.serve") / "static" / "index.html").read_text(encoding="utf-8")

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
    weights = Path(ckpt) / "model.safetensors" if ckpt else None
    app.state.server = Server(engine=engine, name=name, limits=limits, weights=weights)

    def error(request: Request, status: int, message: str, param=None, headers=None):
        body = error_body(request.url.path, status, message, param)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return error(request, e.status, e.message, e.param, headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            msg = f"there is no route {request.url.path}; see docs/serving.md for the routes."
        elif e.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}."
        else:
            msg = str(e.detail)
        return error(request, e.status_code, msg)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception):
        return error(request, 500, f"internal error ({type(e).__name__}); see the server log.")

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

    @app.get("/health")  # open without the key: liveness probes carry no secrets
    async def health():
        return {
            "status": "ok",
            "model": name,
            "context": engine.block_size,
            "parameters": engine.model.num_params(),
            "kernels": engine.kernels(),
            "defaults": {
                "temperature": DEFAULTS.temperature,
                "top_k": DEFAULTS.top_k,
                "top_p": DEFAULTS.top_p,
                "max_tokens": min(limits.default_tokens, limits.max_tokens),
            },
            "max_messages": limits.max_messages,
            "max_prompt_chars": limits.max_prompt_chars,
            **engine.status(),
        }

    @app.post("/tokenize", dependencies=[Depends(auth)])
    async def tokenize(request: Request):
        b = parse(TokenizeBody, await read_body(request))
        check_prompt(len(b.text), limits, "text")
        eng = server(request).engine
        ids = eng.tokenizer.encode(b.text, add_special_tokens=False).ids
        pieces = [eng.token_bytes[i].decode("utf-8", "backslashreplace") for i in ids]
        return {"model": b.model or name, "ids": ids, "pieces": pieces, "count": len(ids)}

    app.include_router(ollama.router, dependencies=[Depends(auth)])
    app.include_router(openai.router, dependencies=[Depends(auth)])
    if origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=[o.rstrip("/") for o in origins],
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(Gate, bound=host, origins=origins)  # outermost: runs first
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
    dtype: str = "auto",
    compile: str = "auto",
    ctx: int | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    prefill_chunk: int | None = None,
    stall_ms: float = 75.0,
    limits: Limits | None = None,
    origins: Sequence[str] = (),
    max_connections: int = 256,
    header_timeout: float = 10.0,
    body_timeout: float = 30.0,
) -> None:
    """Load the checkpoint once and answer requests until interrupted."""
    import uvicorn

    from ..checkpoint import checkpoint_tokenizer, load_model, pick_device
    from ..generate import cast_model

    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty; pass a non-empty key or leave the option out.")
    for o in origins:
        if o != "*" and not o.startswith(("http://", "https://")):
            raise UserError(f"--origins {o!r} is not an origin; use e.g. http://localhost:3000.")
    sock = listen(host, port)

    def build():
        dev = pick_device(device)
        model, meta = load_model(ckpt, dev)
        model = cast_model(model, dtype, dev, max_batch, compile=compile)
        tok, _, _ = checkpoint_tokenizer(ckpt, meta, tokenizer)
        engine = Engine(
            model, tok, max_batch=max_batch, max_queue=max_queue, ctx=ctx,
            prefill_chunk=prefill_chunk, stall_ms=stall_ms,
        )  # fmt: skip
        return dev, model, engine

    # One thread loads the model and then runs every step (Engine.runner explains why).
    runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="azgpt-engine")
    try:
        dev, model, engine = runner.submit(build).result()
        engine.runner = runner
        app = create_app(
            engine, name=name, ckpt=ckpt, api_key=api_key, limits=limits, host=host,
            origins=origins,
        )  # fmt: skip
    except BaseException:
        sock.close()
        runner.shutdown(wait=False)
        raise
    real_port = sock.getsockname()[1]
    print(
        f"azgpt serve: {name} ({model.num_params() / 1e6:.1f}M parameters, context "
        f"{engine.block_size}, {dev}, {dtype}; decoding step {engine.kernels()['decode_step']})"
        f" at http://{host}:{real_port}/  (playground /, Ollama /api, OpenAI /v1)",
        flush=True,
    )
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(
            f"azgpt serve: warning: {host} is reachable from other machines and no --api-key is set.",
            flush=True,
        )
    guard = ConnectionGuard(max_connections, header_timeout, body_timeout)
    config = uvicorn.Config(
        app,
        log_level="info",
        timeout_graceful_shutdown=5,
        http=guard.protocol(),
        ws="none",
        timeout_keep_alive=5,
    )
    uvicorn.Server(config).run(sockets=[sock])
