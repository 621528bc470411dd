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
    check, the 4 GB preset, decoding, the optimizer benchmark) at tiny shapes, so that the
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
    assert "configs/gpt100m_4gb.toml peak memory" in out and "decoding" in out
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
