"""Faults: kills, full disks, concurrent trainers, interrupted prepare, untrusted files, bad input."""

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from trainkit import ROOT, SAMPLE, azgpt, make_data, tiny_config, tiny_overrides

from azgpt.checkpoint import is_complete, latest_checkpoint
from azgpt.errors import UserError
from azgpt.train import train

CFG = str(ROOT / "configs" / "tiny.toml")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("faultdata"))


def weights(ck: Path):
    return load_file(str(ck / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def start_trainer(tok, d, out, env=None, **over):
    args = [
        sys.executable,
        "-m",
        "azgpt",
        "train",
        "--config",
        CFG,
        "--resume",
        *tiny_overrides(tok, d, out, **over),
    ]
    return subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def kill9(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def assert_no_half_checkpoint_is_latest(out: Path):
    ck = latest_checkpoint(out)
    if (out / "last").is_symlink() and ck is not None:
        assert is_complete((out / "last").resolve())
    for p in out.glob("step-*"):
        assert is_complete(p), f"{p} is visible under a final name but incomplete"


def test_kill_during_checkpoint_write_then_resume_is_exact(data, tmp_path):
    tok, d = data
    over = {"train.max_iters": 12, "train.eval_interval": 2}
    train(tiny_config(tok, d, tmp_path / "straight", **over))
    out = tmp_path / "killed"
    p = start_trainer(tok, d, out, env={"AZGPT_FAULT_SLOW_SAVE": "3"}, **over)
    deadline = time.time() + 120
    while not list(out.glob(".tmp-step-*/model.safetensors")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(out.glob(".tmp-step-*")), "the trainer never started writing a checkpoint"
    kill9(p)  # in the middle of writing the checkpoint
    assert_no_half_checkpoint_is_latest(out)
    r = azgpt("train", "--config", CFG, "--resume", *tiny_overrides(tok, d, out, **over))
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(out.glob(".tmp-step-*"))
    assert same_weights(tmp_path / "straight" / "last", out / "last")


@pytest.mark.slow
def test_twenty_random_kills_lose_nothing(data, tmp_path):
    tok, d = data
    over = {
        "train.max_iters": 6000,
        "train.eval_interval": 40,
        "train.eval_iters": 1,
        "train.log_interval": 10,
    }
    train(tiny_config(tok, d, tmp_path / "straight", **over))
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    while kills < 20:
        env = {"AZGPT_FAULT_SLOW_SAVE": "0.3"} if kills % 2 else {}
        p = start_trainer(tok, d, out, env=env, **over)
        time.sleep(rng.uniform(1.5, 4.5))  # start-up, training steps or a checkpoint write
        if p.poll() is not None:
            break  # finished before the kill
        kill9(p)
        kills += 1
        assert_no_half_checkpoint_is_latest(out)
    r = azgpt("train", "--config", CFG, "--resume", *tiny_overrides(tok, d, out, **over))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "last" / "meta.json").read_text())["step"] == 6000
    assert same_weights(tmp_path / "straight" / "last", out / "last")
    assert kills == 20


def test_disk_full_while_checkpointing(data, tmp_path, monkeypatch):
    import errno

    from azgpt import checkpoint as ck_mod

    tok, d = data
    over = {"train.max_iters": 8, "train.eval_interval": 4}
    train(tiny_config(tok, d, tmp_path / "straight", **over))
    real = ck_mod.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # second checkpoint's model file (each checkpoint saves two files)
            Path(path).write_bytes(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck_mod, "save_file", full_disk)
    out = tmp_path / "full"
    with pytest.raises(UserError, match="disk filled up.*previous checkpoint is intact.*--resume"):
        train(tiny_config(tok, d, out, **over))
    assert os.readlink(out / "last") == "step-000004" and is_complete(out / "step-000004")
    assert not list(out.glob(".tmp-step-*"))
    monkeypatch.setattr(ck_mod, "save_file", real)
    assert train(tiny_config(tok, d, out, **over), resume=True).ok
    assert same_weights(tmp_path / "straight" / "last", out / "last")


def test_second_trainer_on_the_same_folder_refuses(data, tmp_path):
    tok, d = data
    out = tmp_path / "shared"
    p = start_trainer(tok, d, out, env={"AZGPT_FAULT_SLOW_SAVE": "20"}, **{"train.max_iters": 8})
    try:
        deadline = time.time() + 120
        while not list(out.glob(".tmp-step-*")) and time.time() < deadline:
            time.sleep(0.1)
        r = azgpt(
            "train",
            "--config",
            CFG,
            "--resume",
            *tiny_overrides(tok, d, out, **{"train.max_iters": 8}),
        )
        assert r.returncode == 2 and "another trainer" in r.stderr and "Traceback" not in r.stderr
    finally:
        kill9(p)
    # the killed holder leaves no stuck lock: a new trainer gets it
    r = azgpt(
        "train", "--config", CFG, "--resume", *tiny_overrides(tok, d, out, **{"train.max_iters": 8})
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_prepare_killed_half_way_then_rerun_gives_the_same_files(data, tmp_path):
    tok, _ = data
    big = tmp_path / "big.txt"
    docs = (SAMPLE / "history.txt").read_text(encoding="utf-8").strip().split("\n\n")
    with open(big, "w", encoding="utf-8") as f:
        for i in range(300):
            for doc in docs:
                f.write(f"{doc} ({i})\n\n")
    ref = tmp_path / "ref"
    r = azgpt("prepare", str(big), "--tokenizer", str(tok), "--out", str(ref), "--workers", "2")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    for delay in (0.5, 1.5, 2.5):
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "azgpt",
                "prepare",
                str(big),
                "--tokenizer",
                str(tok),
                "--out",
                str(out),
                "--workers",
                "2",
            ],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        kill9(p)
        if (
            out / "train.npy"
        ).exists():  # only a complete, manifest-backed file may carry the final name
            m = json.loads((out / "manifest.json").read_text())
            assert len(np.load(out / "train.npy", mmap_mode="r")) == m["train"]["tokens"]
    r = azgpt("prepare", str(big), "--tokenizer", str(tok), "--out", str(out), "--workers", "2")
    assert r.returncode == 0, r.stderr
    for f in ("train.npy", "val.npy"):
        assert (out / f).read_bytes() == (ref / f).read_bytes()
    assert not list(out.glob(".*.tmp"))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_is_refused_by_resume_and_sample(data, tmp_path):
    tok, d = data
    out = tmp_path / "run"
    train(tiny_config(tok, d, out, **{"train.max_iters": 4}))
    marker = tmp_path / "PWNED"
    ck = out / "last"
    (ck / "optimizer.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    r = azgpt(
        "train", "--config", CFG, "--resume", *tiny_overrides(tok, d, out, **{"train.max_iters": 8})
    )
    assert r.returncode == 2 and "corrupt" in r.stderr and "Traceback" not in r.stderr
    (ck / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    r = azgpt("sample", "--ckpt", str(ck), "--prompt", "Bakı")
    assert r.returncode == 2 and "corrupt" in r.stderr and "Traceback" not in r.stderr
    torch.save({"x": _Payload(marker)}, ck / "state.pt")  # a classic pickle checkpoint beside them
    r = azgpt("eval", "--ckpt", str(ck), "--probes")
    assert r.returncode == 2
    assert not marker.exists()


# ----------------------------------------------------------------------------- table-driven bad input


@pytest.fixture(scope="module")
def env(tmp_path_factory, data):
    base = tmp_path_factory.mktemp("bad")
    tok, d = data
    run = base / "run"
    train(tiny_config(tok, d, run, **{"train.max_iters": 4}))
    (base / "empty.txt").write_text("")
    (base / "bin.txt").write_bytes(b"\x00\x01\x02\xff" * 100)
    (base / "nofield.jsonl").write_text('{"body": "Bakı"}\n{"body": "Gəncə"}\n')
    (base / "corrupt_tok").mkdir()
    (base / "corrupt_tok" / "tokenizer.json").write_text("{not json")
    (base / "english.txt").write_text(
        "This is an English sentence about the weather in London.\n\nHello world, how are you today?\n"
    )
    (base / "cfg_bad.toml").write_text("[train\nlr = 1")
    (base / "cfg_type.toml").write_text('[train]\nbatch_size = "twelve"\n')
    trunc = base / "trunc_ck"
    shutil.copytree(run / "last", trunc)
    (trunc / "model.safetensors").write_bytes(
        (run / "last" / "model.safetensors").read_bytes()[:64]
    )
    badjson = base / "badjson_ck"
    shutil.copytree(run / "last", badjson)
    (badjson / "config.json").write_text("{oops")
    wrong = base / "wrong_dtype"
    shutil.copytree(d, wrong)
    np.save(wrong / "val.npy", np.zeros(1000, dtype=np.float32))
    (base / "afile").write_text("x")
    return {"base": base, "tok": tok, "data": d, "run": run, "ck": run / "last"}


def _cases(e):
    b, tok, d, ck = e["base"], e["tok"], e["data"], e["ck"]
    o = str(b / "out_new")
    t = lambda **kw: ["train", "--config", CFG, *tiny_overrides(tok, d, b / "out_train", **kw)]  # noqa: E731
    return [
        (["clean", str(b / "missing.txt"), "--out", o], "missing.txt"),
        (["clean", str(b / "empty.txt"), "--out", o], "empty.txt"),
        (["clean", str(b / "bin.txt"), "--out", o], "bin.txt"),
        (["clean", str(b / "nofield.jsonl"), "--out", o], "--text-field"),
        (["clean", str(b / "english.txt"), "--out", o], "--min-az-share"),
        (["clean", str(SAMPLE), "--out", o, "--min-az-share", "2"], "--min-az-share"),
        (["clean", str(SAMPLE), "--out", str(b / "afile" / "x.txt")], "afile"),
        (["clean", str(SAMPLE), "--out", o, "--workers", "0"], "--workers"),
        (["tokenizer", "train", str(SAMPLE), "--out", o, "--vocab-size", "70000"], "--vocab-size"),
        (["tokenizer", "train", str(SAMPLE), "--out", o, "--vocab-size", "-5"], "--vocab-size"),
        (["tokenizer", "train", str(b / "empty.txt"), "--out", o], "empty.txt"),
        (
            ["tokenizer", "train", str(SAMPLE), "--out", o, "--pretokenizer", "nope"],
            "--pretokenizer",
        ),
        (
            ["tokenizer", "stats", str(SAMPLE), "--tokenizer", str(b / "corrupt_tok")],
            "tokenizer.json",
        ),
        (["prepare", str(SAMPLE), "--tokenizer", str(b / "no_tok"), "--out", o], "tokenizer.json"),
        (
            ["prepare", str(SAMPLE), "--tokenizer", str(b / "corrupt_tok"), "--out", o],
            "tokenizer.json",
        ),
        (
            ["prepare", str(SAMPLE), "--tokenizer", str(tok), "--out", o, "--val-fraction", "0"],
            "--val-fraction",
        ),
        (
            ["prepare", str(SAMPLE), "--tokenizer", str(tok), "--out", o, "--val-fraction", "1"],
            "--val-fraction",
        ),
        (
            ["prepare", str(SAMPLE), "--tokenizer", str(tok), "--out", str(b / "afile" / "sub")],
            "afile",
        ),
        (["prepare", str(b / "bin.txt"), "--tokenizer", str(tok), "--out", o], "bin.txt"),
        (t(**{"train.bogus": 1}), "train.bogus"),
        (t(**{"model.bogus": 1}), "model.bogus"),
        (t(**{"train.batch_size": "abc"}), "train.batch_size"),
        (t(**{"train.batch_size": 0}), "train.batch_size"),
        (t(**{"train.batch_size": -3}), "train.batch_size"),
        (t(**{"model.block_size": 10**9}), "model.block_size"),
        (t(**{"model.n_head": 3}), "model.n_head"),
        (t(**{"train.lr": -1}), "train.lr"),
        (t(**{"train.mixed_precision": "fp8"}), "train.mixed_precision"),
        (t(**{"data.dir": str(e["base"] / "wrong_dtype")}), "val.npy"),
        (t(**{"model.vocab_size": 64}), "vocab"),
        (["train", "--config", str(b / "cfg_bad.toml")], "cfg_bad.toml"),
        (["train", "--config", str(b / "cfg_type.toml")], "train.batch_size"),
        (["train", "--config", str(b / "nope.toml")], "nope.toml"),
        (["sample", "--ckpt", str(b / "nock"), "--prompt", "x"], "nock"),
        (["sample", "--ckpt", str(b / "trunc_ck"), "--prompt", "x"], "model.safetensors"),
        (["sample", "--ckpt", str(b / "badjson_ck"), "--prompt", "x"], "config.json"),
        (["sample", "--ckpt", str(ck), "--max-new-tokens", "0"], "--max-new-tokens"),
        (["sample", "--ckpt", str(ck), "--top-p", "0"], "--top-p"),
        (["sample", "--ckpt", str(ck), "--temperature", "-1"], "--temperature"),
        (["eval", "--ckpt", str(b / "trunc_ck"), "--probes"], "model.safetensors"),
        (["eval", "--ckpt", str(ck), "--text", str(b / "missing.txt")], "missing.txt"),
        (
            ["eval", "--ckpt", str(ck), "--tokens", str(e["base"] / "wrong_dtype" / "val.npy")],
            "val.npy",
        ),
        (
            ["eval", "--ckpt", str(ck), "--text", str(SAMPLE / "history.txt"), "--stride", "0"],
            "--stride",
        ),
        (["eval", "--ckpt", str(ck)], "--text"),
        (["export", "--ckpt", str(b / "trunc_ck"), "--out", o], "model.safetensors"),
        (["export", "--ckpt", str(ck), "--out", str(b / "corrupt_tok")], "--force"),
        (["export", "--ckpt", str(ck), "--out", str(b / "run"), "--force"], "--out"),
        (["report", str(b / "norun")], "metrics.jsonl"),
        (["nosuchcommand"], "nosuchcommand"),
    ]


def _snapshot(base: Path) -> dict:
    """Every file (locks included) with its size and time, and every folder."""
    return {
        str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) if not p.is_dir() else "dir"
        for p in base.rglob("*")
    }


def test_every_subcommand_rejects_bad_input_cleanly(env):
    failures = []
    for args, needle in _cases(env):
        before = _snapshot(env["base"])
        r = azgpt(*args)
        after = _snapshot(env["base"])
        err = r.stderr.strip().splitlines()
        errline = [x for x in err if x.startswith("azgpt: error:")]
        problems = []
        if r.returncode == 0:
            problems.append("exit 0")
        if "Traceback" in r.stderr:
            problems.append("traceback")
        if len(errline) != 1:
            problems.append(f"{len(errline)} error lines")
        elif needle not in errline[0]:
            problems.append(f"message does not name {needle!r}: {errline[0]}")
        if before != after:
            changed = set(before.items()) ^ set(after.items())
            problems.append(f"files created or changed: {sorted({c[0] for c in changed})[:3]}")
        if problems:
            failures.append((args[:2], problems))
    assert not failures, "\n".join(map(str, failures))
