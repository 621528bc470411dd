"""GPU checks (`pytest -m gpu` on a CUDA machine; deselected by default and skipped without CUDA),
and the GPU script run on CPU at tiny shapes."""

import os
import subprocess
import sys

import pytest
import torch
from trainkit import ROOT, losses, make_data, tiny_config

from azgpt.train import train

gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def on_gpu(fn):
    for mark in gpu:
        fn = mark(fn)
    return fn


def test_the_gpu_script_runs_every_path_on_cpu(tmp_path):
    """bench/gpu.sh --cpu: the GPU script's every step (both recipes at a shape, the loss-curve
    check, the 4 GB preset, decoding eagerly and compiled, the optimizer benchmark) at tiny
    shapes, so that the
    script a GPU run depends on cannot rot between GPU runs."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    r = subprocess.run(
        ["bash", str(ROOT / "bench/gpu.sh"), "--cpu"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = r.stdout
    for recipe in ("gpt2 + AdamW", "llama + Muon"):
        assert f'"recipe": "{recipe}", "shape": "2 x 32"' in out
        assert f"{recipe}: loss check over 4 steps" in out
    assert "configs/gpt100m_4gb.toml peak memory" in out
    assert "eager step" in out and "compiled step" in out  # decoding, both ways
    assert "| muon matrices: azgpt (stacked by shape) |" in out
    assert out.rstrip().endswith("gpu.sh --cpu: every path ran")


@on_gpu
def test_bf16_compiled_training_on_cuda_tracks_the_plain_path(tmp_path):
    tok, d = make_data(tmp_path)
    over = {"train.device": "cuda", "train.mixed_precision": "bf16", "train.max_iters": 40}
    fast = train(tiny_config(tok, d, tmp_path / "fast", **over, **{"train.compile": "default"}))
    plain = train(tiny_config(tok, d, tmp_path / "plain", **over, **{"train.compile": "off"}))
    assert fast.ok and plain.ok
    a, b = losses(tmp_path / "fast"), losses(tmp_path / "plain")
    assert abs(a[40] - b[40]) < 0.05  # bf16 tolerance


@on_gpu
def test_fp16_with_loss_scaling_trains(tmp_path):
    tok, d = make_data(tmp_path)
    res = train(
        tiny_config(
            tok, d, tmp_path / "r", **{"train.device": "cuda", "train.mixed_precision": "fp16"}
        )
    )
    assert res.ok and res.last_loss < 6.5


@on_gpu
def test_the_compiled_decoding_step_on_cuda_gives_the_eager_tokens(tmp_path, monkeypatch):
    """On the GPU, `--compile on` compiles the decoding step (Triton kernels), every step of a
    Decoder of two rows runs it, its greedy tokens are the eager step's, and its logits for
    one row and for two rows are the eager model's (float32, within rounding)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # training turns it on
    try:
        _compiled_decoding_on_cuda(tmp_path, monkeypatch)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _compiled_decoding_on_cuda(tmp_path, monkeypatch):
    from azgpt.config import ModelConfig
    from azgpt.generate import Decoder, Row, SamplingParams, cast_model
    from azgpt.model import GPT, KVCache
    from azgpt.tokenizer import load_tokenizer

    tok = load_tokenizer(make_data(tmp_path)[0])
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), block_size=64, n_layer=2, n_head=2,
                      n_embd=64)  # fmt: skip
    cuda = torch.device("cuda")
    model = cast_model(GPT(cfg).to(cuda), "float32", cuda, max_batch=2, compile="on")
    graph = model.decode_graph
    assert graph is not None and graph.batch
    ids = [tok.token_to_id("<|endoftext|>"), *tok.encode("Bakı şəhəri").ids]
    greedy = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (6, 24)]

    def decode(compiled: bool) -> list:
        dec = Decoder(model, tok, max_batch=2, ctx=64)
        if not compiled:
            dec.graph = None
        out: dict = {0: [], 1: []}
        for i, p in enumerate(greedy):
            dec.add(Row(ids, p, out[i].append))
        while dec.rows:
            dec.step()
        return [out[i][-1].context for i in out]

    calls = graph.calls
    assert decode(True) == decode(False)
    assert graph.calls - calls == 23  # the first token of each comes from the prefill
    want = [KVCache(cfg, 1, 64, device=cuda) for _ in range(2)]
    got = KVCache(cfg, 2, 64, device=cuda)  # the rows the batch graph was compiled for
    prompts = [torch.tensor([ids], device=cuda), torch.tensor([ids[:3]], device=cuda)]
    with torch.inference_mode():
        for r, x in enumerate(prompts):  # the module's own forward: eager
            model(x, cache=want[r], last_only=True)
            model(x, cache=got.view(r, 1, 64), last_only=True)
        for n in (1, 2):
            b = graph(got, [ids[0]] * n)
            for r in range(n):
                a = model(torch.tensor([[ids[0]]], device=cuda), cache=want[r], last_only=True)
                assert (a[0, -1] - b[r]).abs().max().item() < 1e-3
