"""GPU checks (`pytest -m gpu` on a CUDA machine); deselected by default and skipped without CUDA."""

import pytest
import torch
from trainkit import losses, make_data, tiny_config

from azgpt.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_bf16_compiled_training_on_cuda_tracks_the_plain_path(tmp_path):
    tok, d = make_data(tmp_path)
    over = {"train.device": "cuda", "train.mixed_precision": "bf16", "train.max_iters": 40}
    fast = train(tiny_config(tok, d, tmp_path / "fast", **over, **{"train.compile": "default"}))
    plain = train(tiny_config(tok, d, tmp_path / "plain", **over, **{"train.compile": "off"}))
    assert fast.ok and plain.ok
    a, b = losses(tmp_path / "fast"), losses(tmp_path / "plain")
    assert abs(a[40] - b[40]) < 0.05  # bf16 tolerance


def test_fp16_with_loss_scaling_trains(tmp_path):
    tok, d = make_data(tmp_path)
    res = train(
        tiny_config(
            tok, d, tmp_path / "r", **{"train.device": "cuda", "train.mixed_precision": "fp16"}
        )
    )
    assert res.ok and res.last_loss < 6.5
