"""`azgpt sample`: stream text from a checkpoint (safetensors + JSON only), through the one
generation path (`azgpt.generate`) that `azgpt serve` uses: the same prompt, settings and seed
give the same tokens in both."""

from __future__ import annotations

import sys

from .checkpoint import checkpoint_tokenizer, load_model, pick_device
from .errors import UserError
from .generate import DEFAULTS, Chunk, SamplingError, SamplingParams, cast_model, generate_events
from .generate import prompt_ids as _prompt_ids

# The defaults of `azgpt.generate.SamplingParams`, by the names the Modelfile, the transformers
# export and the training samples use.
SAMPLING = {
    "temperature": DEFAULTS.temperature,
    "top_k": DEFAULTS.top_k,
    "top_p": DEFAULTS.top_p,
    "max_new_tokens": DEFAULTS.max_tokens,
}

_OPTION = {"top_k": "top-k", "top_p": "top-p", "max_tokens": "max-new-tokens"}


def sampling_params(prefix: str = "--", **kw) -> SamplingParams:
    """SamplingParams from command-line values; a bad one is one sentence naming the option."""
    try:
        return SamplingParams(**kw)
    except SamplingError as e:
        name = _OPTION.get(e.field, e.field) if prefix == "--" else e.field
        msg = str(e).removeprefix(e.field + " ")
        raise UserError(f"{prefix}{name} {msg}.") from None


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
    ctx=None,
    dtype="auto",
    compile="auto",
    out=None,
) -> list[str]:
    params = sampling_params(
        max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
    )
    if not 0 <= seed + num_samples - 1 < 2**63:
        raise UserError(f"--seed plus --num-samples must stay below 2**63, got {seed}.")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("--prompt is not valid UTF-8 text; pass the prompt as UTF-8.") from None
    out = out or sys.stdout
    dev = pick_device(device)
    model, meta = load_model(ckpt, dev)
    model = cast_model(model, dtype, dev, compile=compile).eval()
    tok, _, _ = checkpoint_tokenizer(ckpt, meta, tokenizer)
    ids = _prompt_ids(tok, prompt)
    texts = []
    for i in range(num_samples):
        p = SamplingParams(**{**params.__dict__, "seed": seed + i})
        if num_samples > 1:
            out.write(f"--- sample {i + 1} ---\n")
        out.write(prompt)
        parts = []
        for ev in generate_events(model, tok, ids, p, ctx=ctx):
            if isinstance(ev, Chunk):
                parts.append(ev.text)
                out.write(ev.text)
                out.flush()
            elif ev.reason == "error":
                raise UserError(f"generation failed: {ev.error}.")
        out.write("\n")
        out.flush()
        texts.append(prompt + "".join(parts))
    return texts
