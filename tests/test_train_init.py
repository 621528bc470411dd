"""Starting a run from another run's weights (`train.init_from`) and training on a batch source
other than the token files (`train(cfg, batches=...)`)."""

import json
import math

import pytest
import torch
from trainkit import make_data, tiny_config, train_cli

from azgpt.data import Batch, TokenBatches, TokenData
from azgpt.errors import UserError
from azgpt.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("initdata"))


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """A base run trained well below ln(vocab)."""
    tok, d = data
    out = tmp_path_factory.mktemp("base") / "run"
    over = {"train.max_iters": 200, "train.eval_interval": 200, "train.lr": 1e-2}
    res = train(tiny_config(tok, d, out, **over))
    assert res.val_loss < math.log(512) - 0.7, res.val_loss
    return out, res.val_loss


def first_eval(run):
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("event") == "eval":
            return row["val_loss"]
    raise AssertionError("no evaluation in metrics.jsonl")


def test_init_from_starts_at_the_base_loss_with_a_fresh_optimizer(data, base, tmp_path):
    tok, d = data
    ckpt, base_val = base[0] / "last", base[1]
    # One step at a negligible learning rate: the first evaluation scores the base's weights.
    over = {"train.max_iters": 1, "train.eval_interval": 1, "train.lr": 1e-7, "train.min_lr": 0.0}
    fresh = tmp_path / "fresh"
    train(tiny_config(tok, d, fresh, **over))
    warm = tmp_path / "warm"
    res = train(tiny_config(tok, d, warm, **over, **{"train.init_from": str(ckpt)}))
    assert res.ok and res.step == 1  # step 0, not the base's 40
    assert first_eval(warm) == pytest.approx(base_val, abs=0.02)
    assert first_eval(fresh) == pytest.approx(math.log(512), abs=0.3)  # random weights
    meta = json.loads((warm / "last" / "meta.json").read_text())
    assert meta["step"] == 1 and meta["init_from"] == str(ckpt.resolve())
    # A fresh optimizer: AdamW's step counter is 1, not the base's 200.
    from safetensors.torch import load_file

    opt = load_file(str(warm / "last" / "optimizer.safetensors"))
    steps = [v for k, v in opt.items() if k.endswith(".step")]
    assert steps and all(float(s) == 1.0 for s in steps)


def test_init_from_another_tokenizer_or_a_missing_folder_is_one_sentence(data, base, tmp_path):
    tok, d = data
    tok2, d2 = make_data(tmp_path / "other", vocab=400)
    r = train_cli(tok2, d2, tmp_path / "x", **{"train.init_from": str(base[0] / "last")})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "another tokenizer" in r.stderr and "train.init_from" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    r = train_cli(tok, d, tmp_path / "y", **{"train.init_from": str(tmp_path / "nope")})
    assert r.returncode == 2 and "not a complete checkpoint" in r.stderr, r.stderr[-2000:]


class PaddedSource(TokenBatches):
    """The token files through the BatchSource interface with extras: each training batch asks
    the forward for a keyword argument, and the validation set gains padding (targets -1): half
    of each batch's rows, and one batch of padding only."""

    def train_batch(self, step, micro, batch_size, rank=0, world=1, device=None):
        x, y, _ = super().train_batch(step, micro, batch_size, rank, world, device)
        return Batch(x, y, {"probe": (step, micro)})

    def val_batches(self, n_batches, batch_size, rank=0, world=1, device=None):
        for b in super().val_batches(n_batches - 1, batch_size, rank, world, device):
            pad = torch.full_like(b.y, -1)
            yield Batch(torch.cat([b.x, b.x]), torch.cat([b.y, pad]))
        yield Batch(b.x, torch.full_like(b.y, -1))


def test_a_batch_source_feeds_forward_kwargs_and_padding_is_left_out(data, tmp_path, monkeypatch):
    from azgpt import model as model_mod

    tok, d = data
    seen = []
    orig = model_mod.GPT.forward

    def forward(self, idx, targets=None, probe=None, **kw):
        if probe is not None:
            seen.append(probe)
        return orig(self, idx, targets, **kw)

    monkeypatch.setattr(model_mod.GPT, "forward", forward)
    over = {"train.max_iters": 4, "train.eval_interval": 4, "train.eval_iters": 3}
    plain = train(tiny_config(tok, d, tmp_path / "plain", **over | {"train.eval_iters": 2}))
    td = TokenData(d, 32, 512)
    src = PaddedSource(td, seed=1337)
    padded = train(tiny_config(tok, d, tmp_path / "padded", **over), batches=src)
    assert seen == [(s, 0) for s in range(4)]
    # 2 real batches scored either way: the padding changes nothing (a padding-only batch
    # would add a NaN mean if it were not masked).
    assert padded.val_loss == pytest.approx(plain.val_loss, rel=1e-6)
    a = json.loads((tmp_path / "plain" / "last" / "meta.json").read_text())["val_bpb"]
    b = json.loads((tmp_path / "padded" / "last" / "meta.json").read_text())["val_bpb"]
    assert a == pytest.approx(b, rel=1e-6)


def test_a_batch_source_from_another_tokenizer_is_refused(data, tmp_path):
    tok, d = data
    tok2, _ = make_data(tmp_path / "other", vocab=400)
    src = TokenBatches(TokenData(d, 32, 512), seed=1)
    with pytest.raises(UserError, match="sha256 differs"):
        train(tiny_config(tok2, d, tmp_path / "r"), batches=src)
