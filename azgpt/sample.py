"""`azgpt sample`: stream text from a checkpoint (safetensors + JSON only)."""

from __future__ import annotations

import math
import sys

import torch

from .checkpoint import checkpoint_tokenizer, load_model, pick_device
from .errors import UserError
from .tokenizer import EOT

# The sampling settings used wherever the user sets none: `azgpt sample`, the sample printed at
# each evaluation, and the server's defaults.
SAMPLING = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "max_new_tokens": 100}


def check_sampling(*, temperature=None, top_k=None, top_p=None, seed=None, prefix="--") -> None:
    """Refuse sampling settings that have no meaning, naming the option (`prefix` + name)."""
    name = {"top_k": "top-k", "top_p": "top-p"} if prefix == "--" else {}
    if temperature is not None and not (math.isfinite(temperature) and 0 <= temperature <= 100):
        raise UserError(f"{prefix}temperature must be a number in [0, 100], got {temperature}.")
    if top_k is not None and top_k < 0:
        raise UserError(
            f"{prefix}{name.get('top_k', 'top_k')} must be >= 0 (0 turns it off), got {top_k}."
        )
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise UserError(f"{prefix}{name.get('top_p', 'top_p')} must be in (0, 1], got {top_p}.")
    if seed is not None and not 0 <= seed < 2**63:
        raise UserError(f"{prefix}seed must be in [0, 2**63), got {seed}.")


def run_sample(
    ckpt,
    prompt,
    *,
    max_new_tokens=SAMPLING["max_new_tokens"],
    temperature=SAMPLING["temperature"],
    top_k=SAMPLING["top_k"],
    top_p=SAMPLING["top_p"],
    seed=0,
    num_samples=1,
    tokenizer=None,
    device="auto",
    out=None,
) -> list[str]:
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("--prompt is not valid UTF-8 text; pass the prompt as UTF-8.") from None
    out = out or sys.stdout
    dev = pick_device(device)
    model, meta = load_model(ckpt, dev)
    model.eval()
    tok, _, _ = checkpoint_tokenizer(ckpt, meta, tokenizer)
    eot = tok.token_to_id(EOT)
    ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    ids = ([eot] + ids)[-model.config.block_size :]
    texts = []
    for i in range(num_samples):
        g = torch.Generator(device=dev).manual_seed((seed + i) % 2**63)
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
