"""`azgpt sample`: stream text from a checkpoint (safetensors + JSON only)."""

from __future__ import annotations

import sys

import torch

from .checkpoint import checkpoint_tokenizer, load_model, pick_device
from .errors import UserError
from .tokenizer import EOT

# The sampling settings used wherever the user sets none: `azgpt sample`, the sample printed at
# each evaluation, and the server's defaults.
SAMPLING = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "max_new_tokens": 100}


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
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}.")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}.")
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
