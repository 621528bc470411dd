"""azgpt.decode_graph: a lone stream's decoding step compiled whole on a CPU.

Each test checks that the compiled step ran (its call count, the compiler's graph count) and
then that it computes what the eager model computes, within float rounding."""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from trainkit import make_data, one_thread  # noqa: F401  (autouse)

import azgpt.cpu_linear as CL
import azgpt.decode_graph as DG
import azgpt.generate as G
from azgpt.config import ModelConfig
from azgpt.errors import UserError
from azgpt.generate import Decoder, Row, SamplingParams, cast_model, stream_text
from azgpt.model import GPT, KVCache
from azgpt.serve.engine import Engine
from azgpt.tokenizer import load_tokenizer

pytestmark = pytest.mark.skipif(not CL.available(), reason="this torch build has no oneDNN")

ARCHS = {
    "gpt2": {},
    "llama": {"arch": "llama", "n_kv_head": 1, "qk_norm": True, "bias": False,
              "tie_embeddings": False},
}  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    with tempfile.TemporaryDirectory() as d:
        return load_tokenizer(make_data(Path(d))[0])


def small(vocab: int, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab, block_size=64, n_layer=2, n_head=2, n_embd=48)
    return GPT(ModelConfig(**(cfg | kw))).eval()


@pytest.fixture(scope="module", params=[*ARCHS, "gpt2-int8"])
def compiled(request, tok):
    """(eager model, the same model packed with its step compiled, graphs the compile made).
    gpt2-int8 (`--dtype int8`): both hold the int8-rounded weights; the eager one runs them
    outside any graph."""
    torch.set_num_threads(1)
    int8 = request.param.endswith("-int8")
    ref = small(tok.get_vocab_size(), **ARCHS[request.param.removesuffix("-int8")])
    model = copy.deepcopy(ref)
    if int8:
        assert CL.pack_linears(ref, int8=True) == "int8"
    model.linear_backend = CL.pack_linears(model, int8=int8)
    assert model.linear_backend == ("int8" if int8 else "kernel")
    weights = [m.weight for m in model.modules() if isinstance(m, CL.PackedLinear)]
    assert weights and all(w.dtype == (torch.int8 if int8 else torch.float32) for w in weights)
    before = counters["stats"]["unique_graphs"]
    model.decode_graph = DG.compile_step(model, max_batch=2)
    assert model.decode_graph is not None and model.decode_graph.batch
    return ref, model, counters["stats"]["unique_graphs"] - before


def step_against_eager(ref, model, graph, lens, rows, length, steps, lone):
    """Prompts of `lens` tokens prefilled by `model` into the first rows of a cache of `rows`
    rows and `length` positions (allocated outside inference mode, as the Decoder's cache
    is), and by `ref` into caches of their own; then `steps` greedy steps through `graph`,
    the first `lone` for row 0 alone, the rest for every prompt's row, each row's logits
    within 1e-4 of `ref`'s. Returns (that cache, ref's caches)."""
    prompts = [torch.randint(0, ref.config.vocab_size, (1, n)) for n in lens]
    wants = [KVCache(ref.config, 1, 64) for _ in lens]
    got = KVCache(ref.config, rows, length)
    with torch.inference_mode():
        a = [ref(x, cache=w, last_only=True)[:, -1] for x, w in zip(prompts, wants)]
        for r, x in enumerate(prompts):
            model(x, cache=got.view(r, 1, length), last_only=True)
        for step in range(steps):
            n = 1 if step < lone else len(lens)
            toks = [int(x.argmax()) for x in a[:n]]
            b = graph(got, toks)
            for r in range(n):
                a[r] = ref(torch.tensor([[toks[r]]]), cache=wants[r], last_only=True)[:, -1]
                assert (a[r] - b[r]).abs().max().item() < 1e-4
    return got, wants


def test_the_compiled_step_computes_the_eager_models_logits(compiled):
    """Step by step from prefilled prompts, in a cache of another size than the compile's: a
    lone row, then three rows holding different lengths (the shorter rows' unfilled positions
    must get no weight). The compiled step's logits are the plain model's within rounding, the
    rows it writes hold the same keys and values, and nothing recompiles: two graphs in all,
    one row and 2 rows or more, each serving every length."""
    ref, model, made = compiled
    assert made == 2
    graphs = counters["stats"]["unique_graphs"]
    graph = model.decode_graph
    calls, rows = graph.calls, graph.rows
    got, wants = step_against_eager(ref, model, graph, [5, 2, 9], 4, 40, 25, 10)
    assert graph.calls - calls == 25 and graph.rows - rows == 10 + 15 * 3
    assert got.lengths.tolist() == [30, 17, 24, 0]
    for r, w in enumerate(wants):
        n = int(w.lengths[0])
        assert (got.kv[r, ..., :n, :] - w.kv[0, ..., :n, :]).abs().max().item() < 1e-4
    assert not got.kv[3].any()
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_decoder_runs_every_step_compiled_and_gives_the_eager_tokens(compiled, tok):
    """Through the Decoder `azgpt sample`/`chat`/`serve` run, with the rows the graph was
    compiled for: every decoding step is the compiled one, two rows while both streams run,
    then one; greedy tokens are the eager decoder's, and a seeded sample's text the plain
    model's."""
    ref, model, _ = compiled
    graph = model.decode_graph
    ids = [tok.token_to_id("<|endoftext|>"), *tok.encode("Bakı şəhəri").ids]

    def decode(graph_on: bool, params: list[SamplingParams]) -> tuple[list, list]:
        dec = Decoder(model, tok, max_batch=2, ctx=64)
        if not graph_on:
            dec.graph = None
        out: dict[int, list] = {i: [] for i in range(len(params))}
        for i, p in enumerate(params):
            dec.add(Row(ids, p, lambda ev, i=i: out[i].append(ev)))
        while dec.rows:
            dec.step()
        return [out[i] for i in out], dec.trace

    calls, rows = graph.calls, graph.rows
    greedy = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (6, 30)]
    got, trace = decode(True, greedy)  # one stops early: the other then decodes alone
    assert [ev[-1].context for ev in got] == [ev[-1].context for ev in decode(False, greedy)[0]]
    steps = [d for d, _ in trace if d]
    assert 2 in steps and 1 in steps
    assert graph.calls - calls == len(steps) and graph.rows - rows == sum(steps)

    # `azgpt serve` reports it (/health, and its startup line).
    assert Engine(model, tok, max_batch=2).kernels() == {
        "linear": model.linear_backend,
        "decode_step": "compiled",
    }

    seeded = SamplingParams(max_tokens=20, temperature=0.8, seed=5, ignore_eos=True)
    calls = graph.calls
    events = decode(True, [seeded])[0][0]
    assert graph.calls - calls == 19  # the first token comes from the prompt's prefill
    text = "".join(ev.text for ev in events if hasattr(ev, "text"))
    assert text == "".join(stream_text(ref, tok, ids, seeded))


def test_a_compiled_step_that_fails_while_decoding_leaves_eager_decoding(compiled, tok, caplog):
    """A graph that fails mid-generation (a recompile that cannot compile, say) costs no
    request: the step is taken eagerly, from then on, with a warning; the tokens are eager
    decoding's."""
    _, model, _ = compiled
    ids = [tok.token_to_id("<|endoftext|>"), *tok.encode("Gəncə").ids]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def run(graph) -> tuple[Decoder, list]:
        dec = Decoder(model, tok, max_batch=2, ctx=64)
        dec.graph = graph
        events: list = []
        dec.add(Row(ids, greedy, events.append))
        while dec.rows:
            dec.step()
        return dec, events

    def broken(*a):
        raise RuntimeError("the recompile failed")

    graph = copy.copy(model.decode_graph)
    graph.fn = broken
    with caplog.at_level(logging.WARNING, logger="azgpt.generate"):
        dec, events = run(graph)
    assert dec.graph is None and "the compiled decoding step failed" in caplog.text
    assert "the recompile failed" in caplog.text
    assert events[-1].reason == "length"
    assert events[-1].context == run(None)[1][-1].context


def test_cast_model_compiles_the_step_of_models_over_the_threshold(tok, monkeypatch):
    made = []
    monkeypatch.setattr(DG, "compile_step", lambda m, rows: made.append((m, rows)) or "graph")
    model = small(tok.get_vocab_size())
    total = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(G, "COMPILE_MIN_BYTES", total + 1)
    plain = cast_model(copy.deepcopy(model), "float32", torch.device("cpu"))
    assert plain.linear_backend == "kernel" and plain.decode_graph is None and not made
    monkeypatch.setattr(G, "COMPILE_MIN_BYTES", total)
    big = cast_model(copy.deepcopy(model), "float32", torch.device("cpu"))
    assert big.linear_backend == "kernel" and big.decode_graph == "graph"
    served = cast_model(copy.deepcopy(model), "float32", torch.device("cpu"), max_batch=8)
    assert made == [(big, 1), (served, 8)]  # `azgpt serve` compiles batches too
    int8 = cast_model(copy.deepcopy(model), "int8", torch.device("cpu"))
    assert int8.linear_backend == "int8" and int8.decode_graph == "graph"


def test_compile_option_chooses_where_the_step_is_compiled(tok, monkeypatch):
    """`--compile`: auto compiles a large model's step on a CPU, but not on a CUDA GPU (the
    decision alone here; the compile itself runs in tests/test_gpu.py) nor a small model; on
    compiles it for a small model and on a GPU (nothing packed for the CPU there); off
    compiles nothing, however large the model."""
    made = []
    monkeypatch.setattr(DG, "compile_step", lambda m, rows: made.append(rows) or "graph")
    model = small(tok.get_vocab_size())
    total = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def cast(device, compile, rows=1):
        return cast_model(copy.deepcopy(model), "float32", device, rows, compile=compile)

    monkeypatch.setattr(G, "COMPILE_MIN_BYTES", total + 1)  # a small model
    assert cast(cpu, "auto").decode_graph is None and not made
    on = cast(cpu, "on", 2)
    assert on.linear_backend == "kernel" and on.decode_graph == "graph" and made == [2]
    monkeypatch.setattr(G, "COMPILE_MIN_BYTES", total)  # a large one
    off = cast(cpu, "off")
    assert off.linear_backend == "kernel" and off.decode_graph is None and made == [2]
    assert cast(cuda, "auto", 8).decode_graph is None and made == [2]
    gpu = cast(cuda, "on", 8)
    assert gpu.decode_graph == "graph" and made == [2, 8]
    assert gpu.linear_backend == "torch"
    assert not any(isinstance(m, CL.PackedLinear) for m in gpu.modules())
    assert cast(cuda, "off", 8).decode_graph is None and made == [2, 8]
    with pytest.raises(UserError, match="--compile"):
        cast(cpu, "always")


def test_the_step_of_a_model_with_torchs_own_linears_compiles_and_computes_the_same(tok):
    """The graph a GPU compiles (nothing packed for the CPU, every product torch's own
    Linear), traced here and lowered for the CPU (the GPU's Triton lowering runs in
    tests/test_gpu.py): its logits for a lone row and for two rows are the
    eager model's within rounding."""
    torch.set_num_threads(1)
    ref = small(tok.get_vocab_size())
    graph = DG.compile_step(ref, max_batch=2)
    assert graph is not None and graph.batch
    step_against_eager(ref, ref, graph, [4, 7], 2, 32, 6, 3)
    assert graph.calls == 6 and graph.rows == 3 + 3 * 2


def test_a_step_that_cannot_compile_leaves_eager_decoding(tok, monkeypatch, caplog):
    def broken(*a):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(DG, "_step", broken)
    model = small(tok.get_vocab_size())
    CL.pack_linears(model)
    with caplog.at_level(logging.WARNING, logger="azgpt.decode_graph"):
        assert DG.compile_step(model) is None
    assert "could not compile the decoding step" in caplog.text
    assert caplog.text.count("\n") == 1  # one line, however long the compiler's message
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    with torch.inference_mode():
        assert model(ids, cache=KVCache(model.config, 1, 8), last_only=True).isfinite().all()


def test_compile_option_reaches_sample_chat_and_serve(monkeypatch):
    """`azgpt sample|chat|serve --compile X` hands X to the command (and from there to
    cast_model, whose choice the test above checks)."""
    import azgpt.chat
    import azgpt.sample
    import azgpt.serve.app
    from azgpt.cli import main

    got = {}

    def record(name):
        return lambda *a, **kw: got.setdefault(name, kw["compile"]) and 0

    monkeypatch.setattr(azgpt.sample, "run_sample", record("sample"))
    monkeypatch.setattr(azgpt.chat, "run_chat", record("chat"))
    monkeypatch.setattr(azgpt.serve.app, "serve", record("serve"))
    assert main(["sample", "--ckpt", "ck", "--compile", "off"]) == 0
    assert main(["chat", "--ckpt", "ck", "--compile", "on"]) == 0
    assert main(["serve", "--ckpt", "ck"]) == 0
    assert got == {"sample": "off", "chat": "on", "serve": "auto"}
