import os
import pickle
import subprocess
import sys

import pytest
import torch

from azgpt.checkpoint import (
    RunLock,
    load_model,
    model_state,
    optimizer_state,
    read_trainer_state,
    restore_optimizer_state,
    save_checkpoint,
)
from azgpt.errors import UserError
from azgpt.model import GPT, GPTConfig
from azgpt.optim import make_optimizer


def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16))


def save(tmp_path, m, step=1):
    opt = make_optimizer(m, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    x = torch.randint(0, 64, (2, 8))
    loss = m(x, x)
    loss.backward()
    opt.step()
    return save_checkpoint(
        tmp_path, step, m, optimizer_state(m, opt), {"step": step}, {"step": step, "tokens_seen": 0}
    ), opt


def test_save_load_is_bitwise_identical_with_tied_weights(tmp_path):
    m = model()
    ck, _ = save(tmp_path, m)
    m2, meta = load_model(ck)
    assert meta["step"] == 1
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert m2.lm_head.weight is m2.transformer.wte.weight
    assert not any("_orig_mod" in k for k in model_state(m))
    assert (tmp_path / "last").resolve() == ck.resolve()


def test_optimizer_state_round_trips(tmp_path):
    m = model()
    ck, opt = save(tmp_path, m)
    info, tensors = read_trainer_state(ck)
    m2 = model()
    opt2 = make_optimizer(m2, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    restore_optimizer_state(m2, opt2, tensors, info["optimizer"])
    a, b = opt.state_dict(), opt2.state_dict()
    for pid in a["state"]:
        for k, v in a["state"][pid].items():
            assert torch.equal(v, b["state"][pid][k])


def test_keep_last_prunes_but_keeps_best(tmp_path):
    m = model()
    opt = make_optimizer(m, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    save_checkpoint(
        tmp_path,
        1,
        m,
        optimizer_state(m, opt),
        {},
        {"step": 1, "tokens_seen": 0},
        is_best=True,
        keep_last=2,
    )
    for s in (2, 3, 4):
        save_checkpoint(
            tmp_path, s, m, optimizer_state(m, opt), {}, {"step": s, "tokens_seen": 0}, keep_last=2
        )
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))
    assert names == ["step-000001", "step-000003", "step-000004"]
    assert os.readlink(tmp_path / "best") == "step-000001"


def test_truncated_safetensors_is_refused(tmp_path):
    ck, _ = save(tmp_path, model())
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_model(ck)


def test_shape_mismatch_is_refused(tmp_path):
    from azgpt.checkpoint import load_weights

    ck, _ = save(tmp_path, model())
    other = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(UserError, match="another shape"):
        load_weights(other, ck / "model.safetensors")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_in_state_is_never_executed(tmp_path):
    ck, _ = save(tmp_path, model())
    marker = tmp_path / "pwned"
    (ck / "optimizer.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError):
        read_trainer_state(ck)
    (ck / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError):
        load_model(ck)
    assert not marker.exists()


def test_lock_refuses_second_holder_and_frees_on_kill(tmp_path):
    code = (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from pathlib import Path; from azgpt.checkpoint import RunLock\n"
        "RunLock(Path(%r)).acquire(); print('locked', flush=True); time.sleep(60)\n"
    ) % (str(os.getcwd()), str(tmp_path))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match="another trainer"):
        RunLock(tmp_path).acquire()
    p.kill()
    p.wait()
    lock = RunLock(tmp_path)
    lock.acquire()  # a killed holder leaves nothing stuck
    lock.release()
