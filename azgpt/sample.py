"""`azgpt sample`: stream text from a checkpoint (safetensors + JSON only)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .checkpoint import load_model
from .errors import UserError
from .tokenizer import EOT, load_tokenizer


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu or cuda.") from None


def checkpoint_tokenizer(meta: dict, override: str | None, ckpt: Path):
    """(tokenizer, its sha256): --tokenizer if given, else the one recorded in meta.json, which
    must not have changed since training."""
    from .tokenizer import sha256_file, tokenizer_path

    path = override or meta.get("tokenizer_path")
    if not path:
        raise UserError(f"{ckpt}/meta.json names no tokenizer; pass --tokenizer DIR.")
    tok = load_tokenizer(path)
    sha = sha256_file(tokenizer_path(path))
    want = meta.get("tokenizer_sha256")
    if want and override is None and sha != want:
        raise UserError(
            f"tokenizer {path} changed since {ckpt} was trained; pass the right one with --tokenizer."
        )
    return tok, sha


def run_sample(
    ckpt,
    prompt,
    *,
    max_new_tokens=100,
    temperature=0.8,
    top_k=50,
    top_p=0.95,
    seed=0,
    num_samples=1,
    tokenizer=None,
    device="auto",
    out=None,
) -> list[str]:
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}.")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}.")
    out = out or sys.stdout
    dev = pick_device(device)
    model, meta = load_model(ckpt, dev)
    model.eval()
    tok, _ = checkpoint_tokenizer(meta, tokenizer, Path(ckpt))
    eot = tok.token_to_id(EOT)
    ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    ids = ([eot] + ids)[-model.config.block_size :]
    texts = []
    for i in range(num_samples):
        g = torch.Generator(device=dev).manual_seed(seed + i)
        x = torch.tensor([ids], device=dev)
        new: list[int] = []
        shown = ""
        if num_samples > 1:
            out.write(f"--- sample {i + 1} ---\n")
        out.write(prompt)
        for t in model.generate(x, max_new_tokens, temperature, top_k, top_p, eot, g):
            t = int(t)
            if t == eot:
                break
            new.append(t)
            text = tok.decode(new)
            # Stream only complete characters (a token can end inside a UTF-8 sequence).
            if not text.endswith("\ufffd"):
                out.write(text[len(shown) :])
                out.flush()
                shown = text
        final = tok.decode(new)
        out.write(final[len(shown) :] + "\n")
        out.flush()
        texts.append(prompt + final)
    return texts
