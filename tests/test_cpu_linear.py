"""azgpt.cpu_linear: generation's Linears in oneDNN's layout, and the compiled one-row kernel.

Each test checks the path it means ran (the modules were replaced, the kernels were called),
then that the numbers are the unpacked model's within float rounding."""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn
from trainkit import one_thread  # noqa: F401  (autouse)

import azgpt.cpu_linear as CL
from azgpt.config import ModelConfig
from azgpt.generate import SamplingParams, cast_model, stream_text
from azgpt.model import GPT, KVCache

pytestmark = pytest.mark.skipif(not CL.available(), reason="this torch build has no oneDNN")

ARCHS = [{}, {"arch": "llama", "n_kv_head": 1, "bias": False, "tie_embeddings": False}]


def small(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=48)
    return GPT(ModelConfig(**(cfg | kw))).eval()


def decode_logits(model: GPT, prompt: torch.Tensor, steps: int = 6) -> list[torch.Tensor]:
    """Prefill `prompt` (rows, T) then feed the greedy token `steps` times; every step's last
    logits."""
    cache = KVCache(model.config, prompt.shape[0], 64)
    out = []
    with torch.inference_mode():
        x = prompt
        for _ in range(steps):
            logits = model(x, cache=cache, last_only=True)[:, -1]
            out.append(logits.clone())
            x = logits.argmax(-1, keepdim=True)
    return out


def linears(model) -> tuple[int, list[CL.PackedLinear]]:
    plain = sum(type(m) is nn.Linear for m in model.modules())
    return plain, [m for m in model.modules() if isinstance(m, CL.PackedLinear)]


@pytest.mark.parametrize("kw", ARCHS, ids=["gpt2", "llama"])
def test_packed_linears_compute_the_same_logits(kw):
    ref = small(**kw)
    n_linear = sum(type(m) is nn.Linear for m in ref.modules())
    model = cast_model(copy.deepcopy(ref), "float32", torch.device("cpu"))
    assert model.linear_backend == "onednn"  # tiny: below GEMV_MIN_BYTES, no compile
    plain, packed = linears(model)
    assert plain == 0 and len(packed) == n_linear
    assert model.num_params() == ref.num_params()  # /health and the startup line report it
    prompt = torch.randint(0, 300, (3, 9))
    for a, b in zip(decode_logits(ref, prompt), decode_logits(model, prompt)):
        assert (a - b).abs().max().item() < 1e-4
    assert all(m.calls["onednn"] > 0 for m in packed)
    # A row decoded in a batch of three or alone gives the same logits within rounding.
    alone = decode_logits(model, prompt[1:2])
    batched = decode_logits(model, prompt)
    for a, b in zip(alone, batched):
        assert (a[0] - b[1]).abs().max().item() < 1e-4


def test_generation_with_packed_linears_matches_the_plain_model():
    """`azgpt sample`'s path (stream_text) with a seeded sampler: the same text whether the
    model's Linears are packed or not (logits differ in the last bits only)."""
    from trainkit import make_data

    from azgpt.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as d:
        tok = load_tokenizer(make_data(Path(d))[0])
    ref = small(vocab_size=tok.get_vocab_size())
    model = cast_model(copy.deepcopy(ref), "float32", torch.device("cpu"))
    ids = [tok.token_to_id("<|endoftext|>"), *tok.encode("Bakı şəhəri").ids]
    p = SamplingParams(max_tokens=24, temperature=0.8, seed=11, ignore_eos=True)
    assert "".join(stream_text(model, tok, ids, p)) == "".join(stream_text(ref, tok, ids, p))


@pytest.mark.parametrize("kw", ARCHS, ids=["gpt2", "llama"])
def test_one_row_kernel_is_compiled_once_per_shape_and_computes_the_same(kw, monkeypatch):
    """With the compiled one-row kernel (forced here; automatic for weights over
    GEMV_MIN_BYTES), a lone stream's decoding steps run it, a batch runs oneDNN, each weight
    shape is compiled once, at load, and the logits are the plain model's within rounding."""
    compiled = []
    real = CL._compiled_gemv
    monkeypatch.setattr(CL, "_compiled_gemv", lambda *key: compiled.append(key) or real(*key))
    ref = small(**kw)
    model = copy.deepcopy(ref)
    assert CL.pack_linears(model, gemv=True) == "onednn+gemv"
    _, packed = linears(model)
    shapes = {(m.in_features, m.out_features, torch.float32, False) for m in packed}
    assert sorted(compiled, key=str) == sorted(shapes, key=str)  # once per shape, at load
    kernels = {(m.in_features, m.out_features): m.gemv for m in packed}
    assert all(m.gemv is kernels[m.in_features, m.out_features] for m in packed)
    prompt = torch.randint(0, 300, (1, 7))
    for a, b in zip(decode_logits(ref, prompt), decode_logits(model, prompt)):
        assert (a - b).abs().max().item() < 1e-4
    # 6 steps: a 7-token prefill (oneDNN) and 5 one-row steps; the head sees one row (the
    # last position) in the prefill too.
    head = model.lm_head
    assert head.calls == {"gemv": 6, "onednn": 0}
    assert all(m.calls == {"gemv": 5, "onednn": 1} for m in packed if m is not head)
    batch = torch.randint(0, 300, (2, 4))
    for a, b in zip(decode_logits(ref, batch), decode_logits(model, batch)):
        assert (a - b).abs().max().item() < 1e-4
    assert head.calls == {"gemv": 6, "onednn": 6}
    assert all(m.calls == {"gemv": 5, "onednn": 7} for m in packed if m is not head)
    assert len(compiled) == len(shapes)  # decoding compiled nothing more


def test_a_compile_that_fails_falls_back_to_onednn_alone(monkeypatch, caplog):
    def broken(*a):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(CL, "_compiled_gemv", broken)
    ref = small()
    model = copy.deepcopy(ref)
    with caplog.at_level(logging.WARNING, logger="azgpt.cpu_linear"):
        assert CL.pack_linears(model, gemv=True) == "onednn"
    assert "could not compile" in caplog.text and "no C++ compiler" in caplog.text
    _, packed = linears(model)
    assert packed and all(m.gemv is None and m.weight_rows is None for m in packed)
    prompt = torch.randint(0, 300, (1, 5))
    for a, b in zip(decode_logits(ref, prompt), decode_logits(model, prompt)):
        assert (a - b).abs().max().item() < 1e-4
    assert all(m.calls["gemv"] == 0 and m.calls["onednn"] == 6 for m in packed)


def test_weights_over_the_threshold_choose_the_compiled_kernel(monkeypatch):
    """The automatic choice: weights under GEMV_MIN_BYTES stay oneDNN only (no compile),
    weights over it get the one-row kernel."""
    calls = []
    monkeypatch.setattr(CL, "_compile_all", lambda mods: calls.append(len(mods)) or True)
    model = small()
    total = sum(m.weight.numel() * 4 for m in model.modules() if type(m) is nn.Linear)
    monkeypatch.setattr(CL, "GEMV_MIN_BYTES", total + 1)
    assert CL.pack_linears(copy.deepcopy(model)) == "onednn" and not calls
    monkeypatch.setattr(CL, "GEMV_MIN_BYTES", total)
    assert CL.pack_linears(copy.deepcopy(model)) == "onednn+gemv" and calls


def test_int8_rounding_keeps_each_weight_within_half_a_step():
    """`quantize_rows`: int8 in [-127, 127], each row's largest magnitude at 127, every weight
    within half its row's step of the original; a row of zeros stays zeros."""
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    w[2] *= 1000  # rows of very different ranges get their own scale
    w[4] = 0
    q, scale = CL.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (6,) and scale.dtype == torch.float32
    assert q.abs().max().item() == 127 and q[4].abs().max().item() == 0 and scale[4] == 1
    assert all(q[r].abs().max().item() == 127 for r in (0, 1, 2, 3, 5))
    err = (w - q.float() * scale[:, None]).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("kw", ARCHS, ids=["gpt2", "llama"])
def test_int8_one_row_kernel_reads_int8_rows_and_matches_the_batch_path(kw):
    """`--dtype int8`: the one-row kernel is compiled for int8 rows and used for a lone
    stream; its logits are oneDNN's (the same rounded weights, run as float32) within float
    rounding, batched rows get the same logits as alone, and everything stays within 2% of
    the float32 model."""
    ref = small(**kw)
    eager = copy.deepcopy(ref)
    assert CL.pack_linears(eager, gemv=False, int8=True) == "int8"
    model = copy.deepcopy(ref)
    assert CL.pack_linears(model, gemv=True, int8=True) == "int8+gemv"
    _, packed = linears(model)
    assert all(m.int8 and m.weight_rows.dtype == torch.int8 for m in packed)
    assert all(m.weight_rows.abs().max().item() == 127 for m in packed)
    prompt = torch.randint(0, 300, (1, 7))
    lone, base, full = (decode_logits(m, prompt) for m in (model, eager, ref))
    assert all(m.calls["gemv"] >= 5 for m in packed)
    for a, b, c in zip(lone, base, full):
        assert (a - b).abs().max().item() < 1e-5
        assert ((a - c).abs().max() / c.abs().max()).item() < 0.02
    batch = torch.cat([prompt, torch.randint(0, 300, (2, 7))])
    for a, b in zip(lone, decode_logits(model, batch)):
        assert (a[0] - b[0]).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="float32"):  # a bf16 model is cast first
        CL.pack_linears(small(**kw).to(torch.bfloat16), int8=True)
