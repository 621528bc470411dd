"""Helpers for the model/training tests: a tiny tokenizer, token files and configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from azgpt.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


def make_data(base: Path, vocab: int = 512) -> tuple[Path, Path]:
    """Train a small tokenizer on the embedded sample and prepare token files; returns (tok, data)."""
    from azgpt.prepare import run_prepare
    from azgpt.tokenizer import save_tokenizer, train_tokenizer

    tok_dir, data_dir = base / "tok", base / "data"
    if not (data_dir / "manifest.json").exists():
        texts = [p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt"))]
        save_tokenizer(train_tokenizer(texts, vocab_size=vocab), tok_dir)
        run_prepare([str(SAMPLE)], str(tok_dir), str(data_dir), val_fraction=0.1, workers=1)
    return tok_dir, data_dir


def tiny_overrides(tok: Path, data: Path, out: Path, **extra) -> list[str]:
    base = {
        "model.vocab_size": 512,
        "model.block_size": 32,
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "data.dir": str(data),
        "data.tokenizer": str(tok),
        "train.out_dir": str(out),
        "train.batch_size": 4,
        "train.max_iters": 12,
        "train.warmup_iters": 3,
        "train.lr": 3e-3,
        "train.min_lr": 3e-4,
        "train.eval_interval": 4,
        "train.eval_iters": 2,
        "train.log_interval": 1,
        "train.sample_tokens": 0,
        "train.device": "cpu",
        "train.keep_last": 10,
    }
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]


def tiny_config(tok: Path, data: Path, out: Path, **extra):
    return load_config(None, tiny_overrides(tok, data, out, **extra))


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "event" not in row:
            out[row["step"]] = row["loss"]
    return out


def azgpt(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "azgpt", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def train_cli(tok: Path, data: Path, out: Path, *flags: str, **over) -> subprocess.CompletedProcess:
    """`azgpt train` on configs/tiny.toml with the tiny overrides, in a subprocess."""
    return azgpt(
        "train",
        "--config",
        str(ROOT / "configs/tiny.toml"),
        *flags,
        *tiny_overrides(tok, data, out, **over),
    )


def inject_nan(monkeypatch, bad_call) -> None:
    """Make the training loss NaN on the forward passes for which bad_call(n) is true."""
    from azgpt import model as model_mod

    orig = model_mod.GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kw):
        out = orig(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if bad_call(calls["n"]):
                out = out * float("nan")
        return out

    monkeypatch.setattr(model_mod.GPT, "forward", forward)


def break_compile(monkeypatch) -> None:
    """torch.compile returns a function that fails when called, as without a working Triton."""
    import torch

    def broken_compile(model, **kw):
        def run(*a, **k):
            raise RuntimeError("Cannot find a working triton installation")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on one intra-op thread (import this fixture into a test module): two threads
    on a busy 2-core machine made a 32-token forward of the tiny model 100x slower (130 ms
    against 1.3 ms with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
