import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from trainkit import (
    ROOT,
    azgpt,
    inject_nan,
    losses,
    make_data,
    tiny_config,
    tiny_overrides,
    train_cli,
)

from azgpt.errors import UserError
from azgpt.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("traindata"))


def weights(run):
    return load_file(str(run / "last" / "model.safetensors"))


def test_train_writes_checkpoints_metrics_and_plot(data, tmp_path):
    tok, d = data
    res = train(tiny_config(tok, d, tmp_path / "run"))
    run = tmp_path / "run"
    assert res.ok and res.step == 12
    assert os.readlink(run / "last") == "step-000012"
    for f in (
        "model.safetensors",
        "config.json",
        "meta.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ):
        assert (run / "last" / f).is_file()
    meta = json.loads((run / "last" / "meta.json").read_text())
    assert meta["step"] == 12 and meta["tokens_seen"] == 12 * 4 * 32
    assert meta["config"]["model"]["n_layer"] == 2
    assert (run / "best").exists() and (run / "loss.png").stat().st_size > 1000
    ls = losses(run)
    assert sorted(ls) == list(range(1, 13)) and ls[12] < ls[1]
    evals = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"eval"' in line
    ]
    assert [e["step"] for e in evals] == [4, 8, 12]
    assert all(e["val_bpb"] > 0 and e["val_ppl"] > 1 for e in evals)


def test_exact_resume_gives_identical_losses_and_weights(data, tmp_path):
    tok, d = data
    train(tiny_config(tok, d, tmp_path / "straight"))
    part = tmp_path / "resumed"
    assert train(tiny_config(tok, d, part, **{"train.stop_at": 8})).step == 8
    assert train(tiny_config(tok, d, part), resume=True).step == 12
    a, b = losses(tmp_path / "straight"), losses(part)
    assert a == b  # bitwise-equal floats
    wa, wb = weights(tmp_path / "straight"), weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_process_cpu_run_matches_one_process(data, tmp_path):
    tok, d = data
    one = tmp_path / "one"
    two = tmp_path / "two"
    r1 = azgpt(
        "train",
        "--config",
        str(ROOT / "configs/tiny.toml"),
        *tiny_overrides(tok, d, one, **{"train.batch_size": 4, "train.max_iters": 6}),
    )
    assert r1.returncode == 0, r1.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r2 = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "azgpt",
            "train",
            "--config",
            str(ROOT / "configs/tiny.toml"),
            *tiny_overrides(tok, d, two, **{"train.batch_size": 2, "train.max_iters": 6}),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "2 process(es)" in r2.stdout
    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == sorted(l2)
    for s in l1:
        assert l1[s] == pytest.approx(l2[s], rel=1e-4, abs=1e-5)
    w1, w2 = weights(one), weights(two)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


def test_refuses_to_overwrite_a_run_without_resume(data, tmp_path):
    tok, d = data
    train(tiny_config(tok, d, tmp_path / "r", **{"train.max_iters": 4}))
    with pytest.raises(UserError, match="--resume"):
        train(tiny_config(tok, d, tmp_path / "r", **{"train.max_iters": 4}))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    tok, d = data
    inject_nan(monkeypatch, lambda n: n >= 6)
    run = tmp_path / "nan"
    res = train(tiny_config(tok, d, run))
    assert not res.ok and res.step == 6
    assert os.readlink(run / "last") == "step-000004"
    w = weights(run)
    assert all(torch.isfinite(v).all() for v in w.values())
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "nonfinite_loss", "step": 6} in events
    assert "at step 6" in capsys.readouterr().err


def test_nan_skip_policy_skips_the_update(data, tmp_path, monkeypatch):
    tok, d = data
    inject_nan(monkeypatch, lambda n: n == 3)
    run = tmp_path / "skip"
    res = train(tiny_config(tok, d, run, **{"train.nan_policy": "skip"}))
    assert res.ok and res.step == 12
    assert all(torch.isfinite(v).all() for v in weights(run).values())
    assert '"skipped_step", "step": 3' in (run / "metrics.jsonl").read_text()


def test_cuda_oom_names_the_knobs(data, tmp_path, monkeypatch):
    from azgpt import model as model_mod

    def boom(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(model_mod.GPT, "forward", boom)
    tok, d = data
    with pytest.raises(UserError, match="batch_size.*grad_accum.*block_size"):
        train(tiny_config(tok, d, tmp_path / "oom"))


def _err(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("azgpt: error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_bad_training_inputs_give_one_clear_sentence(data, tmp_path):
    tok, d = data
    cfg = str(ROOT / "configs/tiny.toml")

    def run(out, **over):
        return azgpt("train", "--config", cfg, *tiny_overrides(tok, d, tmp_path / out, **over))

    assert "manifest.json" in _err(run("a", **{"data.dir": str(tmp_path / "nodata")}))
    # wrong dtype
    bad = tmp_path / "bad_dtype"
    shutil.copytree(d, bad)
    np.save(bad / "train.npy", np.load(d / "train.npy").astype(np.int32))
    assert "uint16" in _err(run("b", **{"data.dir": str(bad)}))
    # ids at or above the vocab size
    assert "vocab size" in _err(run("c", **{"model.vocab_size": 100}))
    # context longer than the validation data
    assert "block_size" in _err(run("d", **{"model.block_size": 100000}))
    # another tokenizer
    other = tmp_path / "other_tok"
    shutil.copytree(tok, other)
    (other / "tokenizer.json").write_text(
        (tok / "tokenizer.json").read_text().replace('"<|pad|>"', '"<|pad2|>"', 1)
    )
    assert "sha256" in _err(run("e", **{"data.tokenizer": str(other)}))
    # unknown key, wrong type
    assert "train.bogus" in _err(azgpt("train", "--config", cfg, "--train.bogus=1"))
    assert "integer" in _err(azgpt("train", "--config", cfg, "--train.batch_size=abc"))
    assert "does not exist" in _err(azgpt("train", "--config", str(tmp_path / "none.toml")))


def test_resume_with_another_model_shape_is_refused(data, tmp_path):
    tok, d = data
    train(tiny_config(tok, d, tmp_path / "r", **{"train.max_iters": 4}))
    r = train_cli(tok, d, tmp_path / "r", "--resume", **{"model.n_embd": 64})
    assert "another shape" in _err(r)


def test_corrupt_checkpoint_on_resume_and_sample(data, tmp_path):
    tok, d = data
    train(tiny_config(tok, d, tmp_path / "r", **{"train.max_iters": 4}))
    f = tmp_path / "r" / "last" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    assert "corrupt" in _err(
        azgpt("sample", "--ckpt", str(tmp_path / "r" / "last"), "--prompt", "Bakı")
    )
    r = train_cli(tok, d, tmp_path / "r", "--resume", **{"train.max_iters": 8})
    assert "corrupt" in _err(r)


def test_sample_streams_text(data, tmp_path):
    tok, d = data
    train(tiny_config(tok, d, tmp_path / "r", **{"train.max_iters": 4}))
    args = ["sample", "--ckpt", str(tmp_path / "r" / "last"), "--prompt", "Azərbaycanın paytaxtı"]
    args += ["--max-new-tokens", "8", "--num-samples", "2", "--seed", "3"]
    r, r2 = azgpt(*args), azgpt(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Azərbaycanın paytaxtı") == 2 and "--- sample 2 ---" in r.stdout
    assert r2.stdout == r.stdout  # seeded


def test_tensorboard_logging(data, tmp_path):
    pytest.importorskip("tensorboard")  # the dev extra (`make test`) installs it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tok, d = data
    run = tmp_path / "tb"
    assert train(tiny_config(tok, d, run, **{"train.tensorboard": True, "train.max_iters": 8})).ok
    tags = set()
    for f in (run / "tensorboard").rglob("events*"):
        ea = EventAccumulator(str(f))
        ea.Reload()
        tags |= set(ea.Tags()["scalars"])
    assert {"train_loss", "lr", "val_loss", "val_bpb"} <= tags


def test_tensorboard_missing_is_a_clear_error(data, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if "tensorboard" in n.lower() else real(n, *a),
    )
    tok, d = data
    with pytest.raises(UserError, match=r"azgpt\[tensorboard\]"):
        train(tiny_config(tok, d, tmp_path / "tb", **{"train.tensorboard": True}))
