"""A lone stream's decoding step compiled whole, for generation on a CPU.

Decoding one sequence reads every weight once per token, so its floor is the time the weights
take to stream from memory (15 ms for the 110M shape at ~30 GB/s). Run eagerly, the step is also
~700 small tensor ops, each a Python call and a kernel launch: 3-5 ms more per token, which
kept azgpt's fp32 decoding at 0.72-0.83x llama.cpp's on the same GGUF weights.

`compile_step(model)` traces the model's own forward for one new token (one row, one position)
with torch.compile into one graph: fullgraph, dynamic in the number of cached positions (one
compile serves every length), inductor's C++ wrapper calling the kernels without Python, and
no guards on the model's modules (its weights never change while it generates). The one-row
products are the reductions of `azgpt.cpu_linear` (traced, not called: the module sees that it
is being compiled); inductor fuses norms, residuals, rotary and attention into loops around
them. Its fusion heuristic would also inline a norm into the product that reads it, computing
the norm again for every output row; `realize_opcount_threshold` makes it store the normed row
once instead (measured 18.2 against 13.4 ms per token, bench/generate.py's shape).

The step attends over the row's `past` cached positions and the new token as two parts of one
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

__all__ = ["DecodeGraph", "compile_step"]

log = logging.getLogger("azgpt.decode_graph")

# The compiled step runs from this many cached positions on: dynamic sizes of 0 and 1 would
# each be specialised and compiled again (a one-token prompt's first step runs eagerly).
MIN_PAST = 2


class StepCache:
    """The cache as one compiled step sees it: positions 0..past-1 of one cache row
    (n_layer, 2, kv_heads, max_len, hs), and the new token at position `pos`."""

    def __init__(self, kv: torch.Tensor, pos: torch.Tensor, past: int):
        self.kv, self.pos, self.past = kv, pos, past
        self.new: list[torch.Tensor] = []

    def begin(self, T: int, device, limit: int | None = None) -> torch.Tensor:
        return self.pos  # (1, 1); the caller checked the context

    def advance(self, n) -> None:
        pass  # DecodeGraph stores the new keys/values and advances the real cache

    def attend(self, layer: int, q, k, v, gqa: dict) -> torch.Tensor:
        """softmax over [cached scores, the new key's score] times [cached values, new value],
        in float32, for q (1, nh, 1, hs) and k, v (1, kv_heads, 1, hs)."""
        self.new.append(torch.stack([k[0], v[0]]).to(self.kv.dtype))  # (2, kv_heads, 1, hs)
        _, nh, _, hs = q.shape
        hk = k.shape[1]
        g = nh // hk  # query heads per key/value head (grouped-query attention)
        pk = self.kv[None, layer, 0, :, : self.past].float()  # (1, hk, past, hs)
        pv = self.kv[None, layer, 1, :, : self.past].float()
        qg = q.float().view(1, hk, g, hs) * hs**-0.5
        kn, vn = k.float().view(1, hk, 1, hs), v.float().view(1, hk, 1, hs)
        s_past = (qg[:, :, :, None, :] * pk[:, :, None]).sum(-1)  # (1, hk, g, past)
        s_new = (qg * kn).sum(-1, keepdim=True)  # (1, hk, g, 1)
        m = torch.maximum(s_past.amax(-1, keepdim=True), s_new)
        e_past, e_new = (s_past - m).exp(), (s_new - m).exp()
        num = (e_past[..., None] * pv[:, :, None]).sum(-2) + e_new * vn  # (1, hk, g, hs)
        y = num / (e_past.sum(-1, keepdim=True) + e_new)
        return y.view(1, nh, 1, hs).to(q.dtype)


def _step(model, idx: torch.Tensor, pos: torch.Tensor, kv: torch.Tensor, past: int):
    cache = StepCache(kv, pos, past)
    logits = model(idx, cache=cache, last_only=True)[:, -1]
    return logits, torch.stack(cache.new)  # (n_layer, 2, kv_heads, 1, hs)


class DecodeGraph:
    """Decode one token of one cache row with the compiled step; `calls` counts them."""

    _made = 0

    def __init__(self, model):
        self.calls = 0
        options = {
            "cpp_wrapper": True,
            "realize_opcount_threshold": 2,  # see the module's docstring
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        }
        def step(idx, pos, kv, past):
            return _step(model, idx, pos, kv, past)

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
    def fits(cache, row: int) -> bool:
        """The compiled step can decode this row's next token."""
        past = int(cache.lengths[row])
        return MIN_PAST <= past < cache.max_len

    def __call__(self, cache, row: int, token: int) -> torch.Tensor:
        """Logits (1, V) after `token` at the row's next position; the row's cache advances."""
        past = int(cache.lengths[row])
        idx = torch.tensor([[token]], device=cache.kv.device)
        pos = torch.tensor([[past]], device=cache.kv.device)
        logits, new = self.fn(idx, pos, cache.kv[row], past)
        cache.kv[row, :, :, :, past : past + 1] = new
        cache.lengths[row] += 1
        self.calls += 1
        return logits


def compile_step(model) -> DecodeGraph | None:
    """Compile `model`'s one-row decoding step and run it on a small cache (twice: the second
    length confirms one graph serves every length), under inference mode as decoding runs;
    None, with a warning, when this machine cannot compile it."""
    from .model import KVCache

    t0 = time.perf_counter()
    graph = DecodeGraph(model)
    try:
        # Allocated outside inference mode, as the Decoder's cache is (an inference tensor
        # would not pass the graph's guards).
        cache = KVCache(model.config, 1, MIN_PAST + 2, dtype=model.transformer.wte.weight.dtype)
        cache.lengths[0] = MIN_PAST
        with torch.inference_mode():
            for _ in range(2):
                graph(cache, 0, 0)
    except Exception as e:  # no C++ compiler, an inductor bug: the eager step still works
        log.warning(
            "could not compile the decoding step (%s); decoding runs eagerly",
            " ".join(str(e).split())[:160],
        )
        return None
    graph.calls = 0
    log.info("compiled the decoding step in %.1f s", time.perf_counter() - t0)
    return graph
