"""Checkpoints written off the training thread: training goes on while a checkpoint is written,
each write stays atomic, and a run killed during a background write resumes exactly from the
previous checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from trainkit import ROOT, losses, make_data, tiny_config, tiny_overrides

from azgpt.checkpoint import CheckpointWriter, is_complete
from azgpt.errors import UserError
from azgpt.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("asyncdata"))


def steps_logged(run) -> int:
    try:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    except (OSError, json.JSONDecodeError):
        return 0
    return max((r["step"] for r in rows if "event" not in r), default=0)


def test_a_run_killed_during_a_background_write_resumes_from_the_previous_checkpoint(
    data, tmp_path
):
    tok, d = data
    over = {"train.max_iters": 16, "train.eval_interval": 4, "train.log_interval": 1}
    straight, out = tmp_path / "straight", tmp_path / "killed"
    train(tiny_config(tok, d, straight, **over))

    # Each write sleeps 2 s halfway (after the model file): long enough to see steps 9+ trained
    # while step 8 is still being written.
    p = subprocess.Popen(
        [sys.executable, "-m", "azgpt", "train", "--config", str(ROOT / "configs/tiny.toml"),
         *tiny_overrides(tok, d, out, **over)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # The same threads as this process: matmuls split by thread count round differently.
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "AZGPT_FAULT_SLOW_SAVE": "2"},
    )  # fmt: skip
    deadline = time.time() + 120
    try:
        while not (list(out.glob(".tmp-step-000008-*")) and steps_logged(out) > 8):
            assert p.poll() is None, p.stderr.read()[-2000:]
            assert time.time() < deadline, "never saw training go on during a checkpoint write"
            time.sleep(0.02)
        # Training went on past step 8 while step 8's checkpoint was still a temporary folder.
        assert os.readlink(out / "last") == "step-000004"
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    assert is_complete(out / "step-000004") and not (out / "step-000008").exists()

    res = train(tiny_config(tok, d, out, **over), resume=True)
    assert res.ok and res.step == 16
    assert not list(out.glob(".tmp-step-*"))
    la, lb = losses(straight), losses(out)
    assert la == lb  # bitwise: the resumed run redoes steps 5-16 exactly
    for name in ("model.safetensors", "optimizer.safetensors"):
        wa, wb = load_file(str(straight / "last" / name)), load_file(str(out / "last" / name))
        assert sorted(wa) == sorted(wb)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_background_checkpoints_are_the_state_at_their_step(data, tmp_path, monkeypatch):
    """The host copies are taken at the checkpoint's step: a run checkpointing every 2 steps
    and one stopping at step 2 hold the same weights and optimizer state for step 2, though
    training changed them while the first run's write was in flight (each write pauses 0.5 s
    between the model and the optimizer file)."""
    tok, d = data
    monkeypatch.setenv("AZGPT_FAULT_SLOW_SAVE", "0.5")
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_config(tok, d, a, **{"train.eval_interval": 2, "train.keep_last": 10}))
    train(tiny_config(tok, d, b, **{"train.stop_at": 2}))
    for name in ("model.safetensors", "optimizer.safetensors"):
        wa = load_file(str(a / "step-000002" / name))
        wb = load_file(str(b / "step-000002" / name))
        assert sorted(wa) == sorted(wb)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_a_failed_background_write_is_raised_on_the_training_thread(tmp_path):
    w = CheckpointWriter()
    # save_checkpoint into a folder that does not exist: its error comes back at wait()
    w.submit(tmp_path / "missing", 1, None, ({}, {}), {}, {})
    with pytest.raises(UserError, match="cannot write checkpoint"):
        w.wait()
    w.wait()  # reported once


def test_host_copies_do_not_share_memory_with_the_training_state():
    """What a background write reads must not change under it: the next optimizer step updates
    weights and moments in place, and `.cpu()` of a CPU tensor is the tensor itself."""
    from azgpt.checkpoint import model_state, optimizer_state
    from azgpt.model import GPT, GPTConfig

    m = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    m(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).backward()
    opt.step()
    weights, (tensors, _) = model_state(m), optimizer_state(m, opt)
    before = {k: v.clone() for k, v in {**weights, **tensors}.items()}
    m(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).backward()
    opt.step()  # in place, as the training thread does while a write is in flight
    assert all(torch.equal(before[k], v) for k, v in {**weights, **tensors}.items())
