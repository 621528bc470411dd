"""The decoding step compiled whole, for generation on a CPU or a CUDA GPU.

Decoding one sequence reads every weight once per token, so its floor is the time the weights
take to stream from memory (about 15 ms for the 110M shape at ~30 GB/s). Run eagerly, the step
is also ~700 small tensor ops, each a Python call and a kernel launch: 3-5 ms more per token,
which kept azgpt's fp32 decoding at 0.72-0.83x llama.cpp's on the same GGUF weights.

`compile_step(model)` traces the model's own forward for one new token per row with
torch.compile into one graph: fullgraph, dynamic in the number of cached positions (one
compile serves every length), inductor's C++ wrapper calling its own kernels without Python, and
no guards on the model's modules (its weights never change while it generates). The products
are the PackedLinears' own (`azgpt.cpu_linear.packed_linear`, called from the graph as an
operator: azgpt's CPU kernel, or oneDNN's); inductor fuses norms, residuals, rotary and
attention into loops around them, each intermediate stored once
(`realize_opcount_threshold`). With `max_batch` > 1 (`azgpt serve`) a second graph serves 2
rows and more, its attention masking each row's unfilled positions.

On a CUDA GPU (`--compile on`; not yet measured there) eager decoding launches the step's ~700
small ops one by one from Python; compiled, inductor fuses the norms, residuals, rotary and
attention into Triton kernels around the matmuls (no C++ wrapper or CPU-specific settings
there).

The step attends over each row's cached positions and its new token as two parts of one
softmax (nothing is copied), and returns the logits with the new keys and values of every
layer, which `DecodeGraph.__call__` stores with one copy. The logits are the eager model's
within float rounding (tests/test_decode_graph.py). A model whose compile fails keeps the
eager step, with a warning.
"""

from __future__ import annotations

import logging
import time
import types

import torch
import torch.fx.experimental._config

__all__ = ["DecodeGraph", "compile_step"]

log = logging.getLogger("azgpt.decode_graph")

# The compiled step runs from this many cached positions on: dynamic sizes of 0 and 1 would
# each be specialised and compiled again (a one-token prompt's first step runs eagerly).
MIN_PAST = 2


class StepCache:
    """The cache as one compiled step sees it: rows (B, n_layer, 2, kv_heads, max_len, hs) of
    which row b holds `lens[b]` positions (at most `upto`), and the new tokens at `pos`."""

    def __init__(self, kv: torch.Tensor, pos: torch.Tensor, upto: int, lens: torch.Tensor):
        self.kv, self.pos, self.upto = kv, pos, upto
        # Cached positions a row does not hold (shorter rows of a batch) get no weight.
        self.hole = (torch.arange(upto, device=kv.device) >= lens[:, None])[:, None, None]
        self.new: list[torch.Tensor] = []

    def begin(self, T: int, device, limit: int | None = None) -> torch.Tensor:
        return self.pos  # (B, 1); the caller checked the context

    def advance(self, n) -> None:
        pass  # DecodeGraph stores the new keys/values and advances the real cache

    def attend(self, layer: int, q, k, v, gqa: dict) -> torch.Tensor:
        """softmax over [cached scores, the new key's score] times [cached values, new value],
        in float32, for q (B, nh, 1, hs) and k, v (B, kv_heads, 1, hs)."""
        self.new.append(torch.stack([k[:, :, 0], v[:, :, 0]], 1).to(self.kv.dtype))
        B, nh, _, hs = q.shape
        hk = k.shape[1]
        g = nh // hk  # query heads per key/value head (grouped-query attention)
        pk = self.kv[:, layer, 0, :, : self.upto].float()  # (B, hk, upto, hs)
        pv = self.kv[:, layer, 1, :, : self.upto].float()
        qg = q.float().view(B, hk, g, hs) * hs**-0.5
        kn, vn = k.float().view(B, hk, 1, hs), v.float().view(B, hk, 1, hs)
        # Scores and the weighted sum over the cached part as matmuls: written as products
        # summed, inductor stored each (B, hk, g, upto, hs) product before summing it (at 500
        # cached positions +3.7 ms per int8 token against +2.1).
        s_past = torch.matmul(qg, pk.transpose(-1, -2))  # (B, hk, g, upto)
        s_past = s_past.masked_fill(self.hole, float("-inf"))
        s_new = (qg * kn).sum(-1, keepdim=True)  # (B, hk, g, 1)
        m = torch.maximum(s_past.amax(-1, keepdim=True), s_new)
        e_past, e_new = (s_past - m).exp(), (s_new - m).exp()
        num = torch.matmul(e_past, pv) + e_new * vn  # (B, hk, g, hs)
        y = num / (e_past.sum(-1, keepdim=True) + e_new)
        return y.view(B, nh, 1, hs).to(q.dtype)


def _step(model, idx, pos, kv, upto: int, lens):
    cache = StepCache(kv, pos, upto, lens)
    logits = model(idx, cache=cache, last_only=True)[:, -1]
    return logits, torch.stack(cache.new, 1)  # (B, n_layer, 2, kv_heads, hs)


class DecodeGraph:
    """Decode one token of each of the first rows of a cache with the compiled step: one graph
    for a lone row and, once `compile_step(max_batch > 1)` made it, one for 2 rows and more;
    `calls` counts steps, `rows` the rows they decoded."""

    _made = 0

    def __init__(self, model):
        self.calls = self.rows = 0
        self.batch = False  # a graph for 2 rows and more was compiled
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if model.transformer.wte.weight.device.type == "cpu":
            options["cpp_wrapper"] = True
            options["realize_opcount_threshold"] = 2  # see the module's docstring

        def step(idx, pos, kv, upto, lens):
            return _step(model, idx, pos, kv, upto, lens)

        # torch.compile keeps compiled graphs per code object, and with the module guards
        # skipped another model of the same shapes could pass a graph's guards: each model
        # gets a code object of its own.
        DecodeGraph._made += 1
        code = step.__code__.replace(co_name=f"decode_step_{DecodeGraph._made}")
        step = types.FunctionType(code, step.__globals__, code.co_name, None, step.__closure__)
        self.fn = torch.compile(
            step,
            fullgraph=True,
            dynamic=True,
            options=options,
        )

    @staticmethod
    def fits(cache, n: int) -> bool:
        """The compiled step can decode the next tokens of cache rows 0..n-1."""
        lens = cache.lengths[:n]
        return MIN_PAST <= int(lens.max()) < cache.max_len and int(lens.min()) >= 1

    def __call__(self, cache, tokens: list[int]) -> torch.Tensor:
        """Logits (n, V) after tokens[b] at the next position of cache row b, for rows
        0..n-1 (n = len(tokens)); those rows advance by one."""
        n, dev = len(tokens), cache.kv.device
        lens = cache.lengths[:n].clone()
        upto = int(lens.max())
        idx = torch.tensor(tokens, device=dev)[:, None]
        pos = lens.to(dev)[:, None]
        kv = cache.kv[:n]
        torch._dynamo.mark_static(kv, [1, 2, 3, 5])  # layers, k/v, heads, head size
        logits, new = self.fn(idx, pos, kv, upto, pos[:, 0])
        cache.kv[torch.arange(n, device=dev), :, :, :, pos[:, 0]] = new
        cache.lengths[:n] += 1
        self.calls += 1
        self.rows += n
        return logits


def compile_step(model, max_batch: int = 1) -> DecodeGraph | None:
    """Compile `model`'s decoding step for one row and, when `max_batch` > 1 (`azgpt serve`),
    for 2 rows and more, running each on a small cache of `max_batch` rows (the Decoder's: a
    cache with another number of rows may compile again) at two lengths (one graph serves
    every length), under inference mode as decoding runs; None, with a warning, when this
    machine cannot compile it."""
    from .model import KVCache

    t0 = time.perf_counter()
    graph = DecodeGraph(model)
    # Allocated outside inference mode, as the Decoder's cache is (an inference tensor
    # would not pass the graph's guards).
    w = model.transformer.wte.weight
    cache = KVCache(model.config, max_batch, MIN_PAST + 3, dtype=w.dtype, device=w.device)
    try:
        # No duck shapes: sizes that happen to be equal here (rows and layers, cached
        # positions and heads) must not become one symbol that later sizes have to match.
        with (
            torch.inference_mode(),
            torch.fx.experimental._config.patch(use_duck_shape=False),
            torch._dynamo.config.patch(specialize_float=True),
        ):
            for rows in (1, min(3, max_batch)) if max_batch > 1 else (1,):
                cache.lengths[:] = 1
                cache.lengths[0] = MIN_PAST
                for _ in range(2):
                    graph(cache, [0] * rows)
    except Exception as e:  # no C++ compiler, an inductor bug: the eager step still works
        log.warning(
            "could not compile the decoding step (%s); decoding runs eagerly",
            " ".join(str(e).split())[:160],
        )
        return None
    graph.calls = graph.rows = 0
    graph.batch = max_batch > 1
    log.info("compiled the decoding step in %.1f s", time.perf_counter() - t0)
    return graph
