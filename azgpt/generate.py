"""One generation path: sampling settings, the sampler, the text stream, the context policy and
the decoding loop that `azgpt sample`, in-training samples, `azgpt chat` and `azgpt serve` share.

For callers (`azgpt chat`, scripts):

    from azgpt.generate import SamplingParams, stream_text
    params = SamplingParams(temperature=0.7, seed=1)        # unset fields: the defaults below
    for piece in stream_text(model, tokenizer, ids, params):
        print(piece, end="", flush=True)                   # complete characters only

`ids` are prompt token ids (a chat prompt from `encode_chat`, or `prompt_ids(tok, text)`);
generation ends at any special token (`<|endoftext|>`, the role tokens), a stop string or
`params.max_tokens`. `generate_events` yields the same as `Chunk`/`Finished` events with
counts and timings. The same ids, settings and seed give the same tokens here as in
`azgpt serve` (one sampler, one random draw per token from a generator seeded with `seed`).

- `SamplingParams` holds the defaults every command refers to (the Modelfile and docs too).
  Settings are checked when built: a temperature that is not finite or is above
  `MAX_TEMPERATURE` is refused; one below `GREEDY_BELOW` decodes greedily; `top_p` is clamped
  from below to `MIN_TOP_P`; seeds lie in [0, 2**63).
- `sample` is total: NaN or infinite logits never pick an id, ids past the tokenizer are never
  sampled, and a row whose logits hold no finite value gets -1 (that row fails, not the batch).
- `TextStream` turns token bytes into text incrementally (a byte-level token can end inside
  `ə` or an emoji; nothing is ever decoded twice) and cuts stop strings.
- The context policy: a prompt longer than the context `ctx` keeps its last `ctx` tokens; when a
  sequence fills the context, its last `ctx // 2` tokens are prefilled again and decoding goes
  on (Ollama shifts its context the same way), so `max_tokens` is never cut short.
- `Decoder` runs many sequences in one KV cache: each iteration decodes one token of every
  running sequence in one forward pass, then prefills one chunk of prompt tokens (several
  short prompts batched, a long one in chunks), so a long prompt delays running streams by one
  chunk at most. The chunk is sized from measured speed so that an iteration takes about
  `stall_ms` (`prefill_chunk=None`, the default) or fixed; while nothing is decoding there is
  nobody to stall and chunks are as large as `MAX_PREFILL_CHUNK`.
"""

from __future__ import annotations

import codecs
import logging
import math
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .errors import UserError

log = logging.getLogger("azgpt.generate")

MAX_TEMPERATURE = 100.0  # beyond this every distribution is uniform to float precision
GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (1/T would overflow the logits)
MIN_TOP_P = 1e-6  # top_p is clamped to at least this; the most likely token always survives
SEED_LIMIT = 2**63  # seeds lie in [0, 2**63): what torch.Generator.manual_seed keeps exactly
MAX_CTX = 4096  # the default context is the smaller of the model's and this
IDLE_PREFILL_FACTOR = 8  # a fixed chunk's budget is this many chunks while nothing decodes
MIN_PREFILL_CHUNK = 16  # the adaptive chunk's bounds, in prompt tokens per iteration
MAX_PREFILL_CHUNK = 512
# The adaptive chunk aims an iteration (decoding + one chunk) at this; a token ending inside a
# character makes a running stream wait two iterations, and an iteration overshoots its aim by
# up to ~40% (bench/serve.py: 154 ms longest gap with 75, 293-326 ms with 100).
STALL_MS = 75.0


class SamplingError(ValueError):
    """A sampling setting out of range; `field` names it (`temperature`, `top_p`, ...)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. These defaults are the ones `azgpt sample`, `azgpt serve`, training
    samples and the exported Modelfile use when a user sets nothing."""

    max_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = 50  # 0 or None: off
    top_p: float | None = 0.95  # 1 or None: off
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()
    # Never end at a special token (their logits are masked): fixed-length runs for benchmarks.
    ignore_eos: bool = False

    def __post_init__(self):
        def bad(name, msg):
            raise SamplingError(name, f"{name} {msg}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            bad("max_tokens", f"must be a whole number, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        t = self.temperature
        if not (isinstance(t, int | float) and math.isfinite(t) and 0 <= t <= MAX_TEMPERATURE):
            bad("temperature", f"must be a number in [0, {MAX_TEMPERATURE:g}], got {t}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 0):
            bad("top_k", f"must be >= 0 (0 turns it off), got {self.top_k}")
        p = self.top_p
        if p is not None and not (isinstance(p, int | float) and math.isfinite(p) and 0 < p <= 1):
            bad("top_p", f"must be in (0, 1], got {p}")
        if self.seed is not None and not (
            isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT
        ):
            bad("seed", f"must be in [0, 2**63) (a whole number), got {self.seed}")
        if any(not s for s in self.stop):
            bad("stop", "strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


DEFAULTS = SamplingParams()


def new_generator(seed: int | None, device="cpu") -> torch.Generator:
    """The random stream of one sequence: one float64 uniform per sampled token."""
    return torch.Generator(device=device).manual_seed(
        secrets.randbits(63) if seed is None else seed
    )


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    *,
    n_valid: int | None = None,
    banned: torch.Tensor | None = None,
) -> list[int]:
    """One token id per row of `logits` (n, V), each row with its own settings and generator;
    -1 for a row with no finite logit among the allowed ids.

    Temperature, then top-k, then the smallest set whose probability reaches top-p; the token
    is picked by inverse CDF with one uniform number from the row's generator, in float64.
    Rows that share a (top_k, uses top-p) shape are sampled with one topk/sort/softmax call
    whose arithmetic is row by row, so a row gets the same token whatever else is batched.
    Ids at or past `n_valid` (a vocabulary padded past its tokenizer) and, for `ignore_eos`
    rows, the ids in `banned` are never picked. For 8 rows with 32,000 ids, grouped sampling
    took 8.5 ms against 52 ms row by row (multinomial).
    """
    n, vocab = logits.shape
    x = logits.detach().to(torch.float64, copy=True)
    x = torch.where(torch.isfinite(x), x, float("-inf"))  # NaN and +-inf never picked
    if n_valid is not None and n_valid < vocab:
        x[:, n_valid:] = float("-inf")
    if banned is not None and banned.numel():
        rows = [i for i, p in enumerate(params) if p.ignore_eos]
        if rows:
            x[torch.tensor(rows)[:, None], banned.to(x.device)[None, :]] = float("-inf")
    best, arg = x.max(dim=-1)
    ok = torch.isfinite(best).tolist()
    out = [a if good else -1 for a, good in zip(arg.tolist(), ok)]  # greedy rows keep these
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, p in enumerate(params):
        if ok[i] and not p.greedy:
            k = p.top_k if p.top_k and 0 < p.top_k < vocab else 0
            groups.setdefault((k, p.top_p is not None and p.top_p < 1), []).append(i)
    for (k, nucleus), rows in groups.items():
        sel = torch.tensor(rows, device=x.device)
        temps = torch.tensor([params[i].temperature for i in rows], dtype=x.dtype, device=x.device)
        y = x.index_select(0, sel) / temps[:, None]
        if k:
            y, idx = torch.topk(y, k, dim=-1)  # sorted, descending
        elif nucleus:
            y, idx = torch.sort(y, dim=-1, descending=True)
        else:
            idx = None
        probs = torch.softmax(y, dim=-1)
        if nucleus:
            top_p = torch.tensor(
                [max(params[i].top_p, MIN_TOP_P) for i in rows], dtype=x.dtype, device=x.device
            )
            probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p[:, None], 0.0)
        cdf = probs.cumsum(dim=-1)
        u = torch.stack(
            [
                torch.rand((), generator=generators[i], dtype=torch.float64, device=x.device)
                for i in rows
            ]
        )
        # right=True: the first index whose cumulative mass exceeds u * total, which has a
        # positive probability (masked and -inf ids add nothing to the sum).
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
        pick = pick.clamp_max(cdf.size(-1) - 1)
        toks = pick if idx is None else idx.gather(1, pick)
        for i, t in zip(rows, toks[:, 0].tolist()):
            out[i] = t
    return out


class TextStream:
    """Token bytes in, complete text out (UTF-8 held back mid-character, stop strings cut).

    Incremental: each push decodes only the new bytes (the old `azgpt sample` decoded its whole
    output again per token, quadratic in the length)."""

    def __init__(self, stop: Sequence[str] = ()):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stop = tuple(stop)

    def push(self, data: bytes) -> tuple[str, bool]:
        """(text that can be shown now, whether a stop string was reached)."""
        text = self._held + self._dec.decode(data)
        self._held = ""
        if not self.stop:
            return text, False
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return text[: min(hits)], True
        # Keep back the longest tail that could still grow into a stop string.
        for k in range(min(len(text), max(map(len, self.stop)) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                self._held = text[-k:]
                return text[:-k], False
        return text, False

    def flush(self) -> str:
        text = self._held + self._dec.decode(b"", final=True)
        self._held = ""
        return text


# ----------------------------------------------------------------------------- context policy


def default_ctx(cfg) -> int:
    return min(cfg.block_size, MAX_CTX)


def check_ctx(cfg, ctx: int | None, option: str = "--ctx") -> int:
    """The context to decode with: `ctx`, or the default; at most the model's own."""
    if ctx is None:
        return default_ctx(cfg)
    if not 2 <= ctx <= cfg.block_size:
        raise UserError(
            f"{option} must be between 2 and the model's context of {cfg.block_size} tokens, "
            f"got {ctx}."
        )
    return ctx


def fit_prompt(ids: Sequence[int], ctx: int) -> tuple[list[int], int]:
    """Cut a prompt from the left to the context; returns (ids, how many were cut)."""
    cut = max(0, len(ids) - ctx)
    return list(ids[cut:]), cut


def window_start(n_tokens: int, start: int, ctx: int) -> int:
    """Where the window over a sequence of `n_tokens` begins, given where it began: when the
    window would hold more than `ctx` tokens, it restarts at the last `ctx // 2`."""
    return n_tokens - ctx // 2 if n_tokens - start > ctx else start


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def check_kv_memory(cfg, rows: int, ctx: int, dtype, device, *, rows_option="--max-batch"):
    """Refuse, before allocating, a KV cache that would not fit in memory."""
    from .model import KVCache

    need = KVCache.nbytes(cfg, rows, ctx, dtype)
    have = available_memory(torch.device(device))
    if need > 0.8 * have:
        raise UserError(
            f"a KV cache of {rows} x {ctx} positions needs {need / 1e9:.1f} GB, more than the "
            f"{have / 1e9:.1f} GB of {torch.device(device).type} memory free; pass a smaller "
            f"--ctx (or {rows_option})."
        )
    return need


COMPILE_CHOICES = ("auto", "on", "off")  # --compile
# --compile auto compiles the CPU's decoding step for models whose Linear weights take this
# many bytes or more: there the ~700 small ops of an eager step cost more than a few seconds
# of compile (cached on disk by torch) once.
COMPILE_MIN_BYTES = 64 << 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """`--dtype`: auto (bfloat16 on a CUDA GPU that has it, else float32), a torch dtype's
    name, or int8 (CPU: every Linear's weights rounded to int8 per output row, float32
    activations; `azgpt.cpu_linear`)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name == "int8":
        if device.type != "cpu":
            raise UserError("--dtype int8 runs on the CPU only; use --device cpu or bfloat16.")
        return "int8"
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not known; use auto, {', '.join(DTYPES)} or int8.")
    return DTYPES[name]


def cast_model(
    model, name: str, device: torch.device, max_batch: int = 1, *, compile: str = "auto"
):
    """The model in `--dtype`, for generation only (the same module, cast). On a CPU its
    Linears run azgpt's own product (`azgpt.cpu_kernel`, float32 or, with int8, weights
    rounded to int8 per output row), or oneDNN's for bfloat16 and where the kernel cannot be
    built (`azgpt.cpu_linear`). `model.linear_backend` says which.

    `compile` (`--compile`): "auto" compiles the whole decoding step (`azgpt.decode_graph`;
    for batches as well when `max_batch`, the rows of the Decoder that will run it, is over
    1) on a CPU for models whose Linear weights take `COMPILE_MIN_BYTES` or more; "on" for
    every model, on a CUDA GPU too; "off" never. `model.decode_graph`: the graph, None where
    there is none."""
    from .cpu_kernel import load as load_kernel
    from .cpu_linear import pack_linears

    if compile not in COMPILE_CHOICES:
        raise UserError(f"--compile {compile!r} is not known; use auto, on or off.")
    dtype = pick_dtype(name, device)
    model.decode_graph = None
    int8 = dtype == "int8"
    model = model.to(torch.float32 if int8 else dtype).eval()
    on_cpu = device.type == "cpu"
    size = sum(
        m.weight.numel() * m.weight.element_size()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )
    if int8 and load_kernel() is None:
        raise UserError(
            "--dtype int8 needs azgpt's CPU kernel, which is built with a C compiler on first "
            "use and could not be built here (see the warning above); install gcc "
            "(apt-get install gcc) or use --dtype float32."
        )
    try:
        model.linear_backend = pack_linears(model, int8=int8) if on_cpu else "torch"
    except ValueError as e:  # weights int8 cannot round
        raise UserError(f"--dtype {name}: {e}.") from None
    if (compile == "on" and device.type in ("cpu", "cuda")) or (
        compile == "auto" and on_cpu and size >= COMPILE_MIN_BYTES
    ):
        from .decode_graph import compile_step

        print(
            f"azgpt: compiling the decoding step for this {device.type.upper()} (about a "
            "minute the first time, seconds later: torch keeps it on disk; --compile off "
            "skips it)",
            file=sys.stderr,
            flush=True,
        )
        model.decode_graph = compile_step(model, max_batch)
    return model


# ----------------------------------------------------------------------------- events


@dataclass
class Chunk:
    """Text that is ready: complete characters, never part of a stop string."""

    text: str


@dataclass
class Finished:
    """The last event of every sequence."""

    reason: str  # "stop" (special token or stop string), "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    prompt_truncated: int  # prompt tokens cut from the left to fit the context
    load_ns: int  # waiting for a free slot (the model itself is loaded once)
    prompt_ns: int  # prefill of the prompt
    eval_ns: int  # decoding after the prefill
    total_ns: int
    context: list[int] = field(default_factory=list)  # prompt ids as fed + generated ids
    error: str | None = None


Event = Chunk | Finished


class Row:
    """One sequence being generated: its ids, settings, random stream and text stream."""

    def __init__(
        self,
        ids: Sequence[int],
        params: SamplingParams,
        sink: Callable[[Event], None],
        *,
        truncated: int = 0,
        device="cpu",
    ):
        self.seq = [int(i) for i in ids]  # the prompt as fed, then each generated id
        self.n_prompt = len(self.seq)
        self.start = 0  # the window's first index into seq (the context policy moves it)
        self.fed = 0  # tokens of seq[start:] in this sequence's KV cache row
        self.params = params
        self.sink = sink
        self.prompt_truncated = truncated
        self.generator = new_generator(params.seed, device)
        self.text = TextStream(params.stop)
        self.cancelled = False
        self.done = False
        self.t_submit = time.perf_counter_ns()
        self.t_start = self.t_prompt = 0

    @property
    def out(self) -> list[int]:
        return self.seq[self.n_prompt :]

    @property
    def todo(self) -> int:
        """Tokens still to feed before the next token can be sampled."""
        return len(self.seq) - self.start - self.fed


class Decoder:
    """Many sequences in one KV cache, advanced by `step()`; not thread-safe (the engine runs it
    on one thread, `generate_events` in the caller's).

    Rows 0..n_decoding-1 of the cache hold sequences being decoded, the rows after them
    sequences whose prompt is still being prefilled; sequences move between the two blocks by
    swapping cache rows, so each forward pass works on a contiguous block of rows."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = 8,
        ctx: int | None = None,
        prefill_chunk: int | None = None,
        stall_ms: float = STALL_MS,
    ):
        from .model import KVCache
        from .tokenizer import EOT, SPECIAL_TOKENS, token_bytes

        if max_batch < 1 or (prefill_chunk is not None and prefill_chunk < 1) or stall_ms <= 0:
            raise ValueError("max_batch and prefill_chunk must be >= 1, stall_ms > 0")
        self.stall_ms = stall_ms
        # Measured speed (exponential averages): ms of one decoding forward, ms per prompt
        # token prefilled; they size the adaptive chunk.
        self.decode_ms: float | None = None
        self.prefill_ms_per_token: float | None = None
        # A prefill forward costs a fixed part (every weight is read once, as in a decoding
        # step) plus a part per token: fitted to the last prefills' (tokens, ms).
        self.prefill_fixed_ms = 0.0
        self._prefill_samples: deque[tuple[int, float]] = deque(maxlen=32)
        self.model = model.eval()
        self.graph = getattr(model, "decode_graph", None)  # see cast_model
        self.config = model.config
        self.ctx = check_ctx(model.config, ctx)
        self.device = model.transformer.wte.weight.device
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.tokenizer = tokenizer
        self.token_bytes = token_bytes(tokenizer)
        # A model vocabulary larger than the tokenizer's (padded) holds ids that decode to
        # nothing: they are never sampled.
        self.n_valid = min(len(self.token_bytes), model.config.vocab_size)
        self.specials = {
            i for s in SPECIAL_TOKENS if (i := tokenizer.token_to_id(s)) is not None
        } & set(range(self.n_valid))
        self.banned = torch.tensor(sorted(self.specials), dtype=torch.long)
        self.eot = tokenizer.token_to_id(EOT)
        dtype = model.transformer.wte.weight.dtype
        check_kv_memory(model.config, max_batch, self.ctx, dtype, self.device)
        # Allocated outside inference mode: rows are reset and swapped outside it too.
        self.cache = KVCache(self.config, max_batch, self.ctx, device=self.device, dtype=dtype)
        self.rows: list[Row] = []
        self.n_decoding = 0
        self.stats = {"steps": 0, "tokens": 0, "prefills": 0, "shifts": 0, "max_rows": 0}
        # (decoding rows, prefill tokens) of every iteration: tests check the interleaving.
        self.trace: list[tuple[int, int]] = []

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    def add(self, s: Row) -> None:
        if not self.free:
            raise ValueError("no free row")
        if not s.seq:
            raise ValueError("the prompt holds no tokens")
        s.t_start = time.perf_counter_ns()
        self.rows.append(s)
        self.cache.reset(len(self.rows) - 1)

    def step(self) -> None:
        """One iteration: drop cancelled rows, one decoding forward over every decoding row,
        then one prefill forward of at most `prefill_budget()` prompt tokens."""
        for s in [s for s in self.rows if s.cancelled]:
            self._finish(s, "cancelled")
        self._remove_done()
        with torch.inference_mode():
            decoded = self._decode() if self.n_decoding else 0
            prefilled = self._prefill() if len(self.rows) > self.n_decoding else 0
        self.trace.append((decoded, prefilled))
        del self.trace[:-1000]

    def fail_all(self, error: str) -> None:
        for s in list(self.rows):
            self._finish(s, "error", error)
        self.rows = []
        self.n_decoding = 0
        self.cache.reset()

    # ------------------------------------------------------------------ internals

    def _swap(self, a: int, b: int) -> None:
        if a != b:
            self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
            self.cache.swap_rows(a, b)

    def _decode(self) -> int:
        for i in reversed(range(self.n_decoding)):  # the context policy, before feeding
            s = self.rows[i]
            start = window_start(len(s.seq), s.start, self.ctx)
            if start != s.start:
                s.start, s.fed = start, 0
                self.cache.reset(i)
                self._swap(i, self.n_decoding - 1)  # into the prefill block
                self.n_decoding -= 1
                self.stats["shifts"] += 1
        d = self.n_decoding
        if not d:
            return 0
        rows = self.rows[:d]
        t0 = time.perf_counter()
        graph, logits = self.graph, None
        if graph is not None and (d == 1 or graph.batch) and graph.fits(self.cache, d):
            try:
                logits = graph(self.cache, [s.seq[-1] for s in rows])  # one compiled step
            except Exception as e:  # a recompile that fails, an inductor bug: go on eagerly
                log.warning(
                    "the compiled decoding step failed (%s); decoding runs eagerly from now on",
                    " ".join(str(e).split())[:160],
                )
                self.graph = None  # the cache is untouched: the step is taken again below
        if logits is None:
            x = torch.tensor([[s.seq[-1]] for s in rows], device=self.device)  # (d, 1)
            view = self.cache.view(0, d, max(s.fed for s in rows) + 1)
            logits = self.model(x, cache=view, last_only=True)[:, -1]
        for s in rows:
            s.fed += 1
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], d)
        self._accept_all(rows, self._sample(logits, rows))  # sampling syncs with the device
        ms = (time.perf_counter() - t0) * 1e3
        self.decode_ms = ms if self.decode_ms is None else 0.7 * self.decode_ms + 0.3 * ms
        return d

    def _prefill(self) -> int:
        """Feed prompt tokens of the first prefilling rows in one forward: each row its next
        min(todo, budget) tokens, rows of different lengths padded to the longest (a row
        advances by its own count; the padding's cache slots are overwritten before anything
        attends to them), as many rows as fit the chunk budget with their padding. Short
        prompts arriving together go in one forward, a long prompt alone in chunks."""
        d = self.n_decoding
        budget = self.prefill_budget()
        t0 = time.perf_counter()
        take = [min(budget, self.rows[d].todo)]
        T = take[0]
        for s in self.rows[d + 1 :]:
            n = min(budget, s.todo)
            t = max(T, n)
            fits = all(r.fed + t <= self.ctx for r in self.rows[d : d + len(take) + 1])
            if (len(take) + 1) * t > budget or not fits:
                break
            take.append(n)
            T = t
        k = len(take)
        rows = self.rows[d : d + k]
        x = torch.tensor(
            [
                s.seq[s.start + s.fed : s.start + s.fed + n] + [0] * (T - n)
                for s, n in zip(rows, take)
            ],
            device=self.device,
        )
        view = self.cache.view(d, k, max(s.fed for s in rows) + T)
        n_new = None if all(n == T for n in take) else torch.tensor(take)
        logits = self.model(x, cache=view, last_only=True, n_new=n_new)[:, -1]
        ready = []
        for j, (s, n) in enumerate(zip(rows, take)):
            s.fed += n
            if not s.todo:
                ready.append(j)
        if ready:
            now = time.perf_counter_ns()
            ready_rows = [rows[j] for j in ready]
            toks = self._sample(logits[ready], ready_rows)
            for s in ready_rows:  # into the decoding block
                self._swap(self.rows.index(s), self.n_decoding)
                self.n_decoding += 1
                if not s.t_prompt:
                    s.t_prompt = now
                    self.stats["prefills"] += 1
            self._accept_all(ready_rows, toks)
        self._fit_prefill(k * T, (time.perf_counter() - t0) * 1e3)
        return k * T

    def _fit_prefill(self, tokens: int, ms: float) -> None:
        """Least squares of ms = fixed + per_token * tokens over the recent prefills (a plain
        average per token while their sizes do not differ enough to fit a line)."""
        pts = self._prefill_samples
        pts.append((tokens, ms))
        n = len(pts)
        mx = sum(t for t, _ in pts) / n
        my = sum(m for _, m in pts) / n
        var = sum((t - mx) ** 2 for t, _ in pts)
        slope = sum((t - mx) * (m - my) for t, m in pts) / var if var > 0 and n >= 3 else 0.0
        if slope > 0 and my - slope * mx >= 0:
            self.prefill_ms_per_token, self.prefill_fixed_ms = slope, my - slope * mx
        else:
            self.prefill_ms_per_token, self.prefill_fixed_ms = my / max(mx, 1e-9), 0.0

    def prefill_budget(self) -> int:
        """Prompt tokens to prefill in this iteration. With no stream decoding there is nobody
        to stall: the largest chunk (fewer forward passes, a sooner first token). Otherwise the
        fixed `prefill_chunk`, or the chunk that measured speed says fits an iteration of
        `stall_ms` beside the decoding forward."""
        fixed = self.prefill_chunk
        if not self.n_decoding:
            return fixed * IDLE_PREFILL_FACTOR if fixed else MAX_PREFILL_CHUNK
        if fixed:
            return fixed
        if self.prefill_ms_per_token is None or self.decode_ms is None:
            return 64
        room = self.stall_ms - self.decode_ms - self.prefill_fixed_ms
        n = int(room / max(self.prefill_ms_per_token, 1e-6))
        return max(MIN_PREFILL_CHUNK, min(MAX_PREFILL_CHUNK, n))

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        return sample(
            logits,
            [s.params for s in rows],
            [s.generator for s in rows],
            n_valid=self.n_valid,
            banned=self.banned,
        )

    def _accept_all(self, rows: list[Row], toks: list[int]) -> None:
        for s, tok in zip(rows, toks):
            self._accept(s, tok)
        self._remove_done()

    def _accept(self, s: Row, tok: int) -> None:
        if s.done:
            return
        self.stats["tokens"] += 1
        if tok < 0:
            self._finish(s, "error", "the model gave no finite probability for any token")
            return
        if tok in self.specials and not s.params.ignore_eos:
            self._emit(s, s.text.flush())
            self._finish(s, "stop")
            return
        s.seq.append(tok)
        text, stopped = s.text.push(self.token_bytes[tok])
        self._emit(s, text)
        if stopped:
            self._finish(s, "stop")
        elif len(s.seq) - s.n_prompt >= s.params.max_tokens:
            self._emit(s, s.text.flush())
            self._finish(s, "length")

    def _emit(self, s: Row, text: str) -> None:
        if text:
            self._send(s, Chunk(text))

    def _send(self, s: Row, ev: Event) -> None:
        try:
            s.sink(ev)
        except Exception:  # a client's sink must never stop the batch
            log.exception("a sequence's sink failed")
            s.cancelled = True

    def _finish(self, s: Row, reason: str, error: str | None = None) -> None:
        if s.done:
            return
        s.done = True
        now = time.perf_counter_ns()
        start = s.t_start or now
        prompt_done = s.t_prompt or start
        self._send(
            s,
            Finished(
                reason=reason,
                prompt_tokens=s.n_prompt,
                completion_tokens=len(s.seq) - s.n_prompt,
                prompt_truncated=s.prompt_truncated,
                load_ns=start - s.t_submit,
                prompt_ns=prompt_done - start,
                eval_ns=now - prompt_done,
                total_ns=now - s.t_submit,
                context=list(s.seq),
                error=error,
            ),
        )

    def _remove_done(self) -> None:
        for s in [s for s in self.rows if s.done]:
            i = self.rows.index(s)
            if i < self.n_decoding:
                self._swap(i, self.n_decoding - 1)
                i = self.n_decoding - 1
                self.n_decoding -= 1
            last = len(self.rows) - 1
            self.cache.reset(i)
            self._swap(i, last)
            self.rows.pop()


# ----------------------------------------------------------------------------- simple use


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A completion prompt: `<|endoftext|>` (a document starts, as in training) + text."""
    from .tokenizer import EOT

    return [tokenizer.token_to_id(EOT), *tokenizer.encode(text, add_special_tokens=False).ids]


def generate_events(
    model, tokenizer, ids: Sequence[int], params: SamplingParams = DEFAULTS, *, ctx=None
) -> Iterator[Event]:
    """Generate after `ids` in this thread: Chunk events, then one Finished."""
    dec = Decoder(model, tokenizer, max_batch=1, ctx=ctx)
    fed, cut = fit_prompt(ids, dec.ctx)
    events: list[Event] = []
    s = Row(fed, params, events.append, truncated=cut, device=dec.device)
    dec.add(s)
    while not s.done:
        dec.step()
        yield from events
        events.clear()
    yield from events


def stream_text(
    model, tokenizer, ids: Sequence[int], params: SamplingParams = DEFAULTS, *, ctx=None
) -> Iterator[str]:
    """The generated text after `ids`, piece by piece (complete characters)."""
    for ev in generate_events(model, tokenizer, ids, params, ctx=ctx):
        if isinstance(ev, Chunk):
            yield ev.text
        elif ev.reason == "error":
            raise RuntimeError(ev.error)


def generate_tokens(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """`GPT.generate`: rows of ids without a tokenizer, one (B, 1) tensor per step, with the
    same sampler and context policy (one generator shared by the rows, drawn in row order)."""
    from .model import KVCache

    ctx = model.config.block_size
    B = idx.size(0)
    start = max(0, idx.size(1) - ctx)
    cache = None
    for _ in range(max_new_tokens):
        new_start = window_start(idx.size(1), start, ctx)
        if not use_cache:
            start = new_start
            logits = model(idx[:, start:], last_only=True)
        elif cache is None or new_start != start:
            start = new_start
            dtype = model.transformer.wte.weight.dtype
            cache = KVCache(model.config, B, ctx, device=idx.device, dtype=dtype)
            logits = model(idx[:, start:], cache=cache, last_only=True)
        else:
            logits = model(idx[:, -1:], cache=cache)
        toks = sample(logits[:, -1], [params] * B, [generator] * B)
        if min(toks) < 0:
            raise ValueError("the model gave no finite probability for any token")
        nxt = torch.tensor(toks, device=idx.device)[:, None]
        idx = torch.cat([idx, nxt], dim=1)
        yield nxt
        if eos_id is not None and bool((nxt == eos_id).all()):
            return
