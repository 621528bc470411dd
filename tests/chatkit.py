"""Helpers for the chat tests: a tiny base model trained on the embedded sample, and one
fine-tuned from it on data/chat (each built once per test session)."""

from __future__ import annotations

from pathlib import Path

from trainkit import ROOT, azgpt, make_data, train_cli

CHAT = ROOT / "data" / "chat"
BASE_OVERRIDES = {
    "model.block_size": 128,
    "model.n_embd": 48,
    "train.max_iters": 60,
    "train.eval_interval": 60,
    "train.lr": 1e-2,
    "train.min_lr": 1e-3,
}


def build_base(root: Path) -> Path:
    tok, data = make_data(root)
    r = train_cli(tok, data, root / "base", **BASE_OVERRIDES)
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "base" / "best"


def build_sft(root: Path, base: Path, *flags: str) -> Path:
    out = root / "sft"
    r = azgpt("finetune", "--ckpt", str(base), "--data", str(CHAT), "--out", str(out), *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    return out
