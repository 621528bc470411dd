"""azgpt.generate: the one sampler, its settings, the text stream, the context policy and the
decoder that `azgpt sample` and `azgpt serve` share."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from trainkit import make_data, one_thread  # noqa: F401  (one_thread: autouse)

from azgpt.config import ModelConfig
from azgpt.errors import UserError
from azgpt.generate import (
    DEFAULTS,
    GREEDY_BELOW,
    Chunk,
    Decoder,
    Finished,
    Row,
    SamplingError,
    SamplingParams,
    TextStream,
    generate_events,
    prompt_ids,
    sample,
    stream_text,
)
from azgpt.model import GPT, KVCache
from azgpt.tokenizer import load_tokenizer

PROMPT = "Azərbaycanın paytaxtı"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tok_dir, _ = make_data(tmp_path_factory.mktemp("gen"))
    return load_tokenizer(tok_dir)


def small(tok, **kw) -> GPT:
    cfg = dict(vocab_size=tok.get_vocab_size(), block_size=32, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    return GPT(ModelConfig(**(cfg | kw))).eval()


def run(dec: Decoder, rows: list[Row]) -> None:
    for r in rows:
        dec.add(r)
    while not all(r.done for r in rows):
        dec.step()


def row(ids, params, events=None) -> Row:
    return Row(ids, params, (events if events is not None else []).append)


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": 1e999}, "temperature"),
        ({"temperature": 101.0}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -1}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_sampling_settings_without_meaning_are_refused_naming_the_field(kw, field):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**kw)
    assert e.value.field == field and str(e.value).startswith(field)


def test_the_defaults_are_the_ones_everything_uses():
    from azgpt.sample import SAMPLING

    assert SAMPLING == {
        "temperature": DEFAULTS.temperature,
        "top_k": DEFAULTS.top_k,
        "top_p": DEFAULTS.top_p,
        "max_new_tokens": DEFAULTS.max_tokens,
    }


# ----------------------------------------------------------------------------- the sampler


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_extreme_settings_are_total():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 4
    argmax = logits.argmax(-1).tolist()
    tiny_t = SamplingParams(temperature=1e-50)  # below GREEDY_BELOW: greedy
    assert tiny_t.greedy and GREEDY_BELOW == 1e-5
    tiny_p = SamplingParams(temperature=1.0, top_p=1e-50, top_k=0)  # clamped: the best survives
    hot = SamplingParams(temperature=100.0, top_k=0, top_p=1.0)  # the bound: near uniform
    for seed in range(20):
        assert sample(logits, [tiny_t] * 3, gens(3, seed)) == argmax
        assert sample(logits, [tiny_p] * 3, gens(3, seed)) == argmax
    draws = {sample(logits[:1], [hot], gens(1, s))[0] for s in range(300)}
    assert len(draws) > 40 and all(0 <= t < 50 for t in draws)


def test_nan_and_inf_never_pick_an_id_and_fail_only_their_row():
    logits = torch.zeros(4, 10)
    logits[0, :] = float("nan")  # nothing finite: this row fails
    logits[1, :9] = float("nan")  # only id 9 is finite
    logits[2, 3] = float("inf")  # an overflowed logit is not a choice either
    logits[2, 5] = 1.0
    logits[3, 7] = 50.0
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=1.0)] * 4
    for seed in range(50):
        toks = sample(logits, params, gens(4, seed))
        assert toks[0] == -1 and toks[1] == 9 and toks[2] != 3 and toks[3] == 7
    greedy = [SamplingParams(temperature=0)] * 4
    assert sample(logits, greedy, gens(4)) == [-1, 9, 5, 7]


def test_ids_past_the_tokenizer_and_banned_ids_are_never_sampled():
    logits = torch.zeros(2, 20)
    logits[:, 15:] = 100.0  # padding ids that would win
    logits[:, 2] = 10.0  # a special token that would win next
    free = SamplingParams(temperature=5.0, top_k=0, top_p=1.0, ignore_eos=True)
    plain = SamplingParams(temperature=0)
    for seed in range(50):
        a, b = sample(logits, [free, plain], gens(2, seed), n_valid=15, banned=torch.tensor([2]))
        assert a < 15 and a != 2  # ignore_eos rows never pick the banned ids
        assert b == 2  # other rows may


def test_row_sampling_follows_each_rows_settings_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=3, top_p=None),
        SamplingParams(temperature=0.7, top_k=0, top_p=1e-6),  # only the most likely survives
        SamplingParams(temperature=1.5, top_k=40, top_p=0.5),
        SamplingParams(temperature=1.0, top_k=None, top_p=None),
        SamplingParams(temperature=1.0, top_k=3, top_p=None),
    ]
    top3 = logits.topk(3).indices
    seen = [set() for _ in params]
    for seed in range(0, 600, 6):
        batch = sample(logits, params, gens(6, seed))
        alone = [
            sample(logits[i : i + 1], [p], [g])[0]
            for i, (p, g) in enumerate(zip(params, gens(6, seed)))
        ]
        assert batch == alone  # a row's token does not depend on the other rows
        for i, t in enumerate(batch):
            seen[i].add(t)
    argmax = logits.argmax(-1).tolist()
    assert seen[0] == {argmax[0]} and seen[2] == {argmax[2]}
    assert seen[1] <= set(top3[1].tolist()) and len(seen[1]) > 1
    assert seen[5] <= set(top3[5].tolist())
    assert len(seen[4]) > len(seen[1])  # no filter: more than the top 3


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    g = torch.Generator().manual_seed(0)
    counts = [0, 0, 0]
    for _ in range(3000):
        counts[sample(logits, [p], [g])[0]] += 1
    assert [round(c / 3000, 1) for c in counts] == [0.5, 0.3, 0.2]


# ----------------------------------------------------------------------------- text


def test_text_stream_decodes_each_byte_once():
    """Incremental: a long output costs one decode of each new byte (the old loop decoded the
    whole output per token)."""
    text = "Azərbaycan 😀 " * 500
    data = text.encode()
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def decode(self, b, final=False):
            calls.append(len(b))
            return self.inner.decode(b, final)

    t = TextStream()
    t._dec = Counting(t._dec)
    out = "".join(t.push(data[i : i + 1])[0] for i in range(len(data))) + t.flush()
    assert out == text
    assert sum(calls) == len(data)


# ----------------------------------------------------------------------------- the decoder


def test_sample_and_serve_give_the_same_tokens_for_the_same_seed(tok, tmp_path):
    """`azgpt sample`'s loop, the engine (batched with other requests) and `stream_text`."""
    from azgpt.serve.engine import Engine

    model = small(tok)
    ids = prompt_ids(tok, PROMPT)
    params = SamplingParams(max_tokens=60, temperature=0.9, seed=5, ignore_eos=True)
    alone = "".join(stream_text(model, tok, ids, params))
    with Engine(model, tok, max_batch=4) as eng:
        others = [
            eng.submit(prompt_ids(tok, "Bakı " * (i + 1)), SamplingParams(seed=i), lambda e: None)
            for i in range(3)
        ]
        served, fin = eng.complete(ids, params)
        for r in others:
            r.cancel()
    assert served == alone and fin.completion_tokens == 60
    assert eng.stats["shifts"] > 0  # 60 tokens past a 32-token context: the policy ran


def test_decoding_past_the_context_follows_the_one_policy(tok):
    """Cached, chunked, shifted decoding equals plain forward passes over the window that
    `window_start` keeps, for both architectures."""
    for kw in ({}, {"arch": "llama", "n_kv_head": 1, "bias": False}):
        model = small(tok, **kw)
        ids = prompt_ids(tok, "Xəzər dənizi " * 4)
        params = SamplingParams(max_tokens=70, temperature=0, ignore_eos=True)
        dec = Decoder(model, tok, max_batch=2, prefill_chunk=5)
        events = []
        run(dec, [row(ids, params, events)])
        fin = events[-1]
        seq, start = list(ids), 0
        with torch.no_grad():
            for _ in range(params.max_tokens):
                if len(seq) - start > 32:
                    start = len(seq) - 16
                logits = model(torch.tensor([seq[start:]]))[0, -1]
                logits[sorted(dec.specials)] = float("-inf")
                seq.append(int(logits.argmax()))
        assert fin.context == seq


def test_a_long_prompt_is_prefilled_in_chunks_between_decoding_steps(tok):
    model = small(tok, block_size=256)
    dec = Decoder(model, tok, max_batch=3, prefill_chunk=8)
    running = row(prompt_ids(tok, "Bakı"), SamplingParams(max_tokens=200, ignore_eos=True))
    dec.add(running)
    dec.step()  # its prompt (a few tokens) is prefilled
    while not dec.n_decoding:
        dec.step()
    long_ids = prompt_ids(tok, "Azərbaycan Respublikası Cənubi Qafqazda yerləşir. " * 8)
    assert len(long_ids) > 60
    events = []
    long = row(long_ids, SamplingParams(max_tokens=3, seed=1), events)
    short = [row(prompt_ids(tok, w), SamplingParams(max_tokens=3, seed=2)) for w in ("a",)]
    dec.trace.clear()
    for r in [long, *short]:
        dec.add(r)
    while not long.done:
        dec.step()
    prefill_steps = [t for t in dec.trace if t[1]]
    assert len(prefill_steps) >= len(long_ids) // 8  # chunked ...
    assert all(p <= 8 for _, p in dec.trace)  # ... never more than one chunk per iteration
    assert all(d >= 1 for d, _ in dec.trace)  # and the running stream decoded every iteration
    assert isinstance(events[-1], Finished) and events[-1].prompt_tokens == len(long_ids)
    # short prompts are prefilled together in one forward
    dec2 = Decoder(model, tok, max_batch=4, prefill_chunk=64)
    rows = [row(prompt_ids(tok, "Salam"), SamplingParams(max_tokens=2, seed=i)) for i in range(4)]
    run(dec2, rows)
    assert dec2.trace[0] == (0, 4 * len(rows[0].seq[: rows[0].n_prompt]))


def test_prompts_of_different_lengths_are_prefilled_together_as_they_are_alone(tok):
    """Short prompts of different lengths arriving together share one padded forward (each row
    advances by its own length; its first token comes from its own last position), and every
    row then generates exactly what it generates alone, for both architectures."""
    for kw in ({}, {"arch": "llama", "n_kv_head": 1, "bias": False}):
        model = small(tok, block_size=64, **kw)
        texts = ["Bakı", "Gəncə qədim şəhərdir", "Salam", "Xəzər dənizinin sahili uzundur."]
        ids = [prompt_ids(tok, t) for t in texts]
        assert len({len(i) for i in ids}) > 2  # really of different lengths
        params = [SamplingParams(max_tokens=12, temperature=0.9, seed=i, ignore_eos=True)
                  for i in range(len(ids))]  # fmt: skip
        dec = Decoder(model, tok, max_batch=4, prefill_chunk=64)
        events = [[] for _ in ids]
        run(dec, [row(i, p, e) for i, p, e in zip(ids, params, events)])
        longest = max(len(i) for i in ids)
        assert dec.trace[0] == (0, len(ids) * longest)  # one forward, padded to the longest
        for i, p, e in zip(ids, params, events):
            alone = "".join(stream_text(model, tok, i, p))
            assert "".join(x.text for x in e if isinstance(x, Chunk)) == alone
            assert e[-1].prompt_tokens == len(i) and e[-1].completion_tokens == 12


def test_the_adaptive_chunk_fits_the_stall_budget_beside_decoding(tok):
    """`prefill_chunk=None`: each iteration prefills as many prompt tokens as the measured
    speed says fit `stall_ms` beside the decoding forward (within MIN/MAX_PREFILL_CHUNK); with
    nothing decoding, the largest chunk."""
    from azgpt.generate import MAX_PREFILL_CHUNK, MIN_PREFILL_CHUNK

    model = small(tok, block_size=256)
    dec = Decoder(model, tok, max_batch=3, stall_ms=200)
    assert dec.prefill_budget() == MAX_PREFILL_CHUNK  # nothing decodes: nobody to stall
    dec.n_decoding = 1
    assert dec.prefill_budget() == 64  # nothing measured yet
    dec.decode_ms, dec.prefill_ms_per_token = 50.0, 1.0
    assert dec.prefill_budget() == 150  # (200 - 50) / 1
    dec.decode_ms = 500.0
    assert dec.prefill_budget() == MIN_PREFILL_CHUNK  # a slow machine still makes progress
    dec.decode_ms, dec.prefill_ms_per_token = 1.0, 1e-4
    assert dec.prefill_budget() == MAX_PREFILL_CHUNK
    # The fit: prefills of 10 and 50 tokens taking 30 and 70 ms are 20 ms + 1 ms per token,
    # so beside a 40 ms decoding step a 100 ms iteration has room for 40 tokens.
    dec.stall_ms, dec.decode_ms = 100.0, 40.0
    for tokens, ms in ((10, 30.0), (50, 70.0), (10, 30.0), (50, 70.0)):
        dec._fit_prefill(tokens, ms)
    assert dec.prefill_ms_per_token == pytest.approx(1.0)
    assert dec.prefill_fixed_ms == pytest.approx(20.0)
    dec.n_decoding = 1
    assert dec.prefill_budget() == 40
    dec.n_decoding, dec.stall_ms = 0, 200.0
    dec.n_decoding = 0
    # Measured for real: a stall budget far below one token's prefill keeps every chunk at
    # the minimum while a stream decodes; a generous one lets a chunk take the whole prompt.
    long_ids = prompt_ids(tok, "Azərbaycan Respublikası Cənubi Qafqazda yerləşir. " * 5)
    for stall, want in ((1e-3, MIN_PREFILL_CHUNK), (1e6, len(long_ids))):
        dec = Decoder(model, tok, max_batch=2, stall_ms=stall)
        running = row(prompt_ids(tok, "Bakı"), SamplingParams(max_tokens=400, ignore_eos=True))
        dec.add(running)
        while not dec.n_decoding:
            dec.step()
        long = row(long_ids, SamplingParams(max_tokens=2, seed=1))
        dec.add(long)
        dec.trace.clear()
        while not long.done:
            dec.step()
        chunks = [p for _, p in dec.trace if p]
        assert max(chunks) == want and all(d == 1 for d, p in dec.trace if p)


def test_one_rows_failure_fails_that_row_only(tok):
    """A row whose logits turn to NaN ends with an error; the rows beside it go on and get the
    tokens they get alone."""
    poison = 7

    class Poisoned(GPT):
        def forward(self, idx, *a, **kw):
            out = super().forward(idx, *a, **kw)
            if kw.get("cache") is not None:
                out = out.clone()
                out[idx[:, -1] == poison] = float("nan")
            return out

    base = small(tok)
    model = Poisoned(base.config).eval()
    model.load_state_dict(base.state_dict())
    good_ids = prompt_ids(tok, PROMPT)
    params = SamplingParams(max_tokens=20, temperature=0.9, seed=3, ignore_eos=True)
    bad_ev, good_ev = [], []
    dec = Decoder(model, tok, max_batch=2)
    run(dec, [row([*good_ids, poison], params, bad_ev), row(good_ids, params, good_ev)])
    assert bad_ev[-1].reason == "error" and "finite" in bad_ev[-1].error
    alone = "".join(stream_text(base, tok, good_ids, params))
    assert good_ev[-1].reason == "length"
    assert "".join(e.text for e in good_ev if isinstance(e, Chunk)) == alone


def test_batched_logits_match_alone_within_the_measured_tolerance(tok):
    """CPU matmuls block differently for different batch sizes, so decoding is not bitwise
    batch-invariant: measured, a row's logits batched differ from alone by at most ~1.3e-6
    (110M shape, fp32). This test holds that bound with margin (docs/serving.md says so)."""
    for kw in ({}, {"arch": "llama", "n_kv_head": 1, "bias": False}):
        model = small(tok, n_embd=64, **kw)
        seqs = [torch.randint(0, 500, (1, 3 + 4 * i)) for i in range(4)]
        batch = KVCache(model.config, 4)
        with torch.inference_mode():
            for r, s in enumerate(seqs):
                alone = KVCache(model.config, 1)
                model(s, cache=alone)
                batch.copy_row(alone, 0, r)
            nxt = torch.randint(0, 500, (4, 1))
            got = model(nxt, cache=batch)[:, -1]
            for r, s in enumerate(seqs):
                alone = KVCache(model.config, 1)
                model(s, cache=alone)
                want = model(nxt[r : r + 1], cache=alone)[0, -1]
                assert (got[r] - want).abs().max().item() < 1e-5


def test_generate_events_cut_a_long_prompt_from_the_left(tok):
    model = small(tok)
    ids = prompt_ids(tok, "Azərbaycan Respublikası Cənubi Qafqazda yerləşir. " * 5)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    fin = list(generate_events(model, tok, ids, params))[-1]
    fin_cut = list(generate_events(model, tok, ids[-32:], params))[-1]
    assert fin.prompt_truncated == len(ids) - 32 and fin_cut.prompt_truncated == 0
    assert fin.context == fin_cut.context


def test_kv_cache_memory_is_checked_before_allocating(tok):
    """A stranger's config with an absurd context: the default context is bounded (4096), and
    a --ctx whose cache would not fit is refused in one sentence before anything is allocated."""
    model = GPT(ModelConfig(**{**small(tok).config.to_dict(), "block_size": 1_000_000}))
    dec = Decoder(model.eval(), tok, max_batch=2)
    assert dec.ctx == 4096 and dec.cache.k[0].shape[2] == 4096
    big = ModelConfig(**{**model.config.to_dict(), "n_embd": 4096, "n_head": 32, "n_layer": 32})
    need = KVCache.nbytes(big, 8, 1_000_000)
    assert need > 1e12  # 2 x 32 layers x 8 rows x 4096 x 1e6 x 4 bytes
    with pytest.raises(UserError, match="--ctx"):
        from azgpt.generate import check_kv_memory

        check_kv_memory(big, 8, 1_000_000, torch.float32, "cpu")
    with pytest.raises(UserError, match="--ctx must be between 2"):
        Decoder(small(tok), tok, ctx=64)


def test_run_sample_uses_the_same_path(tok, tmp_path):
    """`azgpt sample`'s text is stream_text's for the same seed (checkpoint round trip)."""
    from azgpt.checkpoint import load_model
    from azgpt.sample import run_sample

    pytest.importorskip("safetensors")
    from trainkit import tiny_config

    from azgpt.train import train

    tok_dir, data = make_data(tmp_path)
    train(tiny_config(tok_dir, data, tmp_path / "run", **{"train.max_iters": 4}))
    ck = tmp_path / "run" / "last"
    text = run_sample(
        str(ck), "Bakı", max_new_tokens=30, seed=9, temperature=1.0, out=io.StringIO()
    )[0]
    model, _ = load_model(ck)
    t2 = load_tokenizer(tok_dir)
    params = SamplingParams(max_tokens=30, seed=9, temperature=1.0)
    assert text == "Bakı" + "".join(stream_text(model, t2, prompt_ids(t2, "Bakı"), params))


def test_int8_dtype_quantizes_every_linear_and_decodes(tok):
    """`--dtype int8`: the path meant ran (every Linear replaced by one holding int8-rounded
    weights), its logits stay near fp32's, and the shared decoder runs it."""
    from azgpt.cpu_linear import PackedLinear
    from azgpt.generate import cast_model

    for kw in ({}, {"arch": "llama", "n_kv_head": 1, "bias": False}):
        model = small(tok, n_embd=64, **kw)
        n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
        ref = copy.deepcopy(model)
        q = cast_model(model, "int8", torch.device("cpu"))
        assert q.linear_backend == "int8"
        assert not any(type(m) is torch.nn.Linear for m in q.modules())
        int8 = [m for m in q.modules() if isinstance(m, PackedLinear) and m.kind == "int8"]
        assert len(int8) == n_linear and all(m.weight.dtype == torch.int8 for m in int8)
        x = torch.randint(0, 500, (1, 20))
        with torch.inference_mode():
            a, b = ref(x), q(x)
        assert 0 < ((a - b).abs().max() / a.abs().max()).item() < 0.02
        params = SamplingParams(max_tokens=20, temperature=0.8, seed=1, ignore_eos=True)
        fin = list(generate_events(q, tok, prompt_ids(tok, PROMPT), params))[-1]
        assert fin.reason == "length" and fin.completion_tokens == 20
    with pytest.raises(UserError, match="--dtype"):
        cast_model(small(tok), "int4", torch.device("cpu"))
