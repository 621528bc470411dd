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
from azgpt.config import ModelConfig
from azgpt.generate import Decoder, Row, SamplingParams, cast_model, stream_text
from azgpt.model import GPT, KVCache
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


@pytest.fixture(scope="module", params=list(ARCHS))
def compiled(request, tok):
    """(plain model, the same model packed with its step compiled, graphs the compile made)."""
    torch.set_num_threads(1)
    ref = small(tok.get_vocab_size(), **ARCHS[request.param])
    model = copy.deepcopy(ref)
    assert CL.pack_linears(model, gemv=True) == "onednn+gemv"
    before = counters["stats"]["unique_graphs"]
    model.decode_graph = DG.compile_step(model)
    assert model.decode_graph is not None
    return ref, model, counters["stats"]["unique_graphs"] - before


def test_the_compiled_step_computes_the_eager_models_logits(compiled):
    """Step by step from a prefilled prompt, in a cache of another size than the compile's:
    the compiled step's logits are the plain model's within rounding, the cache rows it writes
    hold the same keys and values, and one graph serves every length (nothing recompiles)."""
    ref, model, made = compiled
    assert made == 1
    graphs = counters["stats"]["unique_graphs"]
    graph = model.decode_graph
    calls = graph.calls
    prompt = torch.randint(0, ref.config.vocab_size, (1, 5))
    want = KVCache(ref.config, 1, 64)
    got = KVCache(ref.config, 3, 40)  # three rows: the step decodes row 1 (allocated, as the
    with torch.inference_mode():  # Decoder allocates its cache, outside inference mode)
        a = ref(prompt, cache=want, last_only=True)[:, -1]
        model(prompt, cache=got.view(1, 1, 40), last_only=True)
        for _ in range(30):
            t = int(a.argmax())
            a = ref(torch.tensor([[t]]), cache=want, last_only=True)[:, -1]
            b = graph(got, 1, t)
            assert (a - b).abs().max().item() < 1e-4
    assert graph.calls - calls == 30 and int(got.lengths[1]) == 35 == int(want.lengths[0])
    assert (got.kv[1, ..., :35, :] - want.kv[0, ..., :35, :]).abs().max().item() < 1e-4
    assert not got.kv[0].any() and not got.kv[2].any()  # other rows untouched
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_lone_stream_decodes_with_the_compiled_step_and_a_batch_eagerly(compiled, tok):
    """Through the Decoder `azgpt sample`/`chat`/`serve` run: every step where one sequence
    decodes is the compiled step, a step of two rows is not; a seeded sample gives the same
    text as the plain model."""
    ref, model, _ = compiled
    graph = model.decode_graph
    ids = [tok.token_to_id("<|endoftext|>"), *tok.encode("Bakı şəhəri").ids]
    p = SamplingParams(max_tokens=20, temperature=0.8, seed=5, ignore_eos=True)
    calls = graph.calls
    text = "".join(stream_text(model, tok, ids, p))
    assert graph.calls - calls == 19  # the first token comes from the prompt's prefill
    assert text == "".join(stream_text(ref, tok, ids, p))

    dec = Decoder(model, tok, max_batch=2, ctx=64)
    for n in (6, 30):  # one stops early: the other then decodes alone
        dec.add(Row(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), print))
    calls = graph.calls
    while dec.rows:
        dec.step()
    alone = sum(1 for decoded, _ in dec.trace if decoded == 1)
    assert any(decoded == 2 for decoded, _ in dec.trace) and alone >= 20
    assert graph.calls - calls == alone


def test_cast_model_compiles_the_step_where_the_one_row_kernel_is_used(tok, monkeypatch):
    made = []
    monkeypatch.setattr(DG, "compile_step", lambda m: made.append(m) or "graph")
    model = small(tok.get_vocab_size())
    total = sum(p.numel() * 4 for n, p in model.named_parameters() if "wpe" not in n)
    monkeypatch.setattr(CL, "GEMV_MIN_BYTES", 1 << 40)
    plain = cast_model(copy.deepcopy(model), "float32", torch.device("cpu"))
    assert plain.linear_backend == "onednn" and plain.decode_graph is None and not made
    monkeypatch.setattr(CL, "GEMV_MIN_BYTES", total // 4)
    monkeypatch.setattr(CL, "_compile_all", lambda mods: True)
    big = cast_model(copy.deepcopy(model), "float32", torch.device("cpu"))
    assert big.linear_backend == "onednn+gemv" and big.decode_graph == "graph"
    assert made == [big]
    assert cast_model(copy.deepcopy(model), "int8", torch.device("cpu")).decode_graph is None


def test_a_step_that_cannot_compile_leaves_eager_decoding(tok, monkeypatch, caplog):
    def broken(*a):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(DG, "_step", broken)
    model = small(tok.get_vocab_size())
    CL.pack_linears(model, gemv=False)
    with caplog.at_level(logging.WARNING, logger="azgpt.decode_graph"):
        assert DG.compile_step(model) is None
    assert "could not compile the decoding step" in caplog.text
    assert caplog.text.count("\n") == 1  # one line, however long the compiler's message
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    with torch.inference_mode():
        assert model(ids, cache=KVCache(model.config, 1, 8), last_only=True).isfinite().all()
