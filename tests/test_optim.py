import pytest
import torch

from azgpt.model import GPT, GPTConfig
from azgpt.optim import lr_at, param_groups

S = dict(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)


def test_lr_schedule_key_steps():
    assert lr_at(0, **S) == pytest.approx(1e-4)  # first warmup step: lr/warmup
    assert lr_at(9, **S) == pytest.approx(1e-3)  # end of warmup
    assert lr_at(10, **S) == pytest.approx(1e-3)  # start of cosine
    assert lr_at(60, **S) == pytest.approx((1e-3 + 1e-4) / 2)  # half-way: mean of peak and floor
    assert lr_at(110, **S) == pytest.approx(1e-4)
    assert lr_at(10_000, **S) == pytest.approx(1e-4)
    vals = [lr_at(s, **S) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay


def test_lr_without_warmup():
    assert lr_at(0, lr=1.0, min_lr=0.0, warmup_iters=0, max_iters=100) == pytest.approx(1.0)


def test_weight_decay_only_on_matrices():
    m = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16))
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids))  # the tied embedding appears once
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == m.num_params()
    assert any(p is m.transformer.wte.weight for p in decay["params"])
    opt = torch.optim.AdamW([decay, no_decay], lr=1e-3)
    assert len(opt.param_groups) == 2


def test_warmup_longer_than_the_run_is_cut_to_the_run():
    s = dict(lr=1.0, min_lr=0.1, warmup_iters=30, max_iters=5)
    assert [lr_at(i, **s) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_at(5, **s) == pytest.approx(0.1)
