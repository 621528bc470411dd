"""Batched generation for `azgpt serve`, usable without HTTP.

One background thread owns the model and runs `azgpt.generate.Decoder` (the generation path
`azgpt sample` uses too): requests wait in a bounded queue and take free rows of the decoder's
KV cache; each iteration decodes one token of every running request in one forward pass and
prefills one chunk of waiting prompts (sized so an iteration takes about `stall_ms`), so a long
prompt delays running streams by one chunk. Each row is sampled with its own settings and its own seeded generator. Finished and
cancelled requests leave at once.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future

from ..chat_template import encode_chat, end_of_turn_id
from ..generate import (
    STALL_MS,
    Chunk,
    Decoder,
    Event,
    Finished,
    Row,
    SamplingParams,
    TextStream,
    fit_prompt,
    prompt_ids,
    sample,
)
from ..model import GPT

__all__ = [
    "Chunk",
    "Engine",
    "Finished",
    "QueueFull",
    "Request",
    "SamplingParams",
    "TextStream",
    "sample",
]

log = logging.getLogger("azgpt.serve")


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests already."""


class Request(Row):
    """A submitted generation; `cancel()` frees its row at the next step."""

    def __init__(self, engine: Engine, ids, params, sink, truncated):
        super().__init__(ids, params, sink, truncated=truncated, device=engine.device)
        self.engine = engine

    @property
    def ids(self) -> list[int]:
        return self.seq[: self.n_prompt]

    def cancel(self) -> None:
        self.engine._cancel(self)


class Engine:
    """Batched decoding over one model. `submit` is thread-safe; one thread runs the model."""

    def __init__(
        self,
        model: GPT,
        tokenizer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        ctx: int | None = None,
        prefill_chunk: int | None = None,
        stall_ms: float = STALL_MS,
    ):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.decoder = Decoder(
            model, tokenizer, max_batch=max_batch, ctx=ctx, prefill_chunk=prefill_chunk,
            stall_ms=stall_ms,
        )  # fmt: skip
        d = self.decoder
        self.model, self.config, self.device = d.model, d.config, d.device
        self.tokenizer = tokenizer
        self.block_size = d.ctx  # the context requests are decoded with
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.token_bytes = d.token_bytes
        self.n_text_ids = d.n_valid
        self.eot = d.eot
        # Replies end at the chat template's end of turn (one of the special tokens).
        self.specials = d.specials
        if end_of_turn_id(tokenizer) not in d.specials:
            raise ValueError("the tokenizer's end-of-turn token is not a special token")
        self.stats = d.stats
        self.waiting: deque[Request] = deque()
        # Fault-injection point for tests (read when the engine is built, not at import):
        # seconds to sleep per iteration, so a test can act while a stream is running.
        self._slow_step = float(os.environ.get("AZGPT_FAULT_SLOW_STEP") or 0)
        self._cv = threading.Condition()
        self._thread: threading.Thread | Future | None = None
        # The thread that built the model and the cache may run the loop too (`start(runner)`):
        # torch's CPU kernels split their work over an OpenMP team per calling thread, and a
        # second thread running them (the one that loaded the model) slowed every step of
        # the other by ~25% on a 2-core machine (bench/serve.py).
        self.runner: Executor | None = None
        self._closing = False

    # ------------------------------------------------------------------ prompts

    def prompt_ids(self, text: str) -> list[int]:
        """A completion prompt: `<|endoftext|>` (a document starts, as in training) + text."""
        return prompt_ids(self.tokenizer, text)

    def chat_ids(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """A conversation's ids by azgpt's one chat template (`azgpt.chat_template`)."""
        return encode_chat(self.tokenizer, [{"role": r, "content": c} for r, c in messages])

    def fit(self, ids: Sequence[int]) -> tuple[list[int], int]:
        """Cut a prompt from the left to the context; returns (ids, how many were cut)."""
        return fit_prompt(ids, self.block_size)

    # ------------------------------------------------------------------ public API

    def submit(
        self,
        ids: Sequence[int],
        params: SamplingParams,
        sink: Callable[[Event], None],
    ) -> Request:
        """Queue a generation; `sink` gets Chunk events then one Finished (called from the
        engine thread: it must be quick and thread-safe). Raises QueueFull."""
        if not ids:
            raise ValueError("the prompt holds no tokens")
        bad = [i for i in ids if not 0 <= i < self.n_text_ids]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the vocabulary of {self.n_text_ids} ids"
            )
        ids, cut = self.fit([int(i) for i in ids])
        req = Request(self, ids, params, sink, cut)
        with self._cv:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(req)
            self._cv.notify()
        return req

    def stream(self, ids: Sequence[int], params: SamplingParams) -> Iterator[Event]:
        """Submit and yield the events here (blocking); leaving the loop early cancels."""
        q: queue.Queue = queue.Queue()
        req = self.submit(ids, params, q.put)
        try:
            while True:
                ev = q.get()
                yield ev
                if isinstance(ev, Finished):
                    return
        finally:
            req.cancel()

    def complete(self, ids: Sequence[int], params: SamplingParams) -> tuple[str, Finished]:
        parts = []
        for ev in self.stream(ids, params):
            if isinstance(ev, Chunk):
                parts.append(ev.text)
        return "".join(parts), ev

    def kernels(self) -> dict:
        """What runs the model: its Linears' kernels (`cast_model`) and whether decoding steps
        are compiled (`azgpt.decode_graph`; "eager" again if a compiled step failed)."""
        return {
            "linear": getattr(self.model, "linear_backend", "torch"),
            "decode_step": "eager" if self.decoder.graph is None else "compiled",
        }

    def status(self) -> dict:
        return {
            "active": len(self.decoder.rows),
            "queued": len(self.waiting),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
        }

    def start(self) -> Engine:
        if self._thread is None:
            self._closing = False
            if self.runner is not None:
                self._thread = self.runner.submit(self._loop)
            else:
                self._thread = threading.Thread(target=self._loop, name="azgpt-engine", daemon=True)
                self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread; every unfinished request ends with reason "cancelled"."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if isinstance(self._thread, Future):
            self._thread.result()
        elif self._thread is not None:
            self._thread.join()
        self._thread = None
        with self._cv:
            pending = list(self.waiting) + list(self.decoder.rows)
            self.waiting.clear()
        for r in pending:
            r.cancelled = True
            self.decoder._finish(r, "cancelled")
        self.decoder.rows = []
        self.decoder.n_decoding = 0
        self.decoder.cache.reset()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the engine thread

    def _cancel(self, req: Request) -> None:
        with self._cv:
            if req.done:
                return
            req.cancelled = True
            if req in self.waiting:
                self.waiting.remove(req)
                self.decoder._finish(req, "cancelled")
            self._cv.notify()

    def _loop(self) -> None:
        dec = self.decoder
        while True:
            with self._cv:
                while not self._closing and not self.waiting and not dec.rows:
                    self._cv.wait()
                if self._closing:
                    return
                while self.waiting and dec.free:
                    dec.add(self.waiting.popleft())
            try:
                dec.step()
                if self._slow_step:
                    time.sleep(self._slow_step)
            except Exception as e:  # a bug or out of memory: fail these requests, keep serving
                log.exception("generation failed")
                with self._cv:
                    dec.fail_all(f"generation failed: {type(e).__name__}: {e}")
