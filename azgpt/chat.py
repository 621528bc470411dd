"""`azgpt chat`: a terminal chatbot on a checkpoint, through azgpt's one chat template and the
generation path `azgpt sample` and `azgpt serve` use.

On a terminal: multi-turn, the reply streams as it is generated, `/reset` forgets the
conversation (keeping the system prompt), `/exit` (or end of input) leaves. When standard input
is not a terminal, every non-empty line is one user turn and each reply is printed on its own
line(s), so a conversation can be scripted: `printf 'Salam\\nBakı haradadır?\\n' | azgpt chat ...`.
"""

from __future__ import annotations

import sys

from .chat_template import check_chat_tokenizer, encode_chat
from .errors import UserError

PROMPT, REPLY = "siz> ", "model> "


def fit_history(tok, messages: list[dict], room: int) -> list[dict]:
    """Drop the oldest exchanges (never the system prompt, never the last user turn) until the
    prompt leaves `room` tokens of context free for the reply."""
    msgs = list(messages)
    head = 1 if msgs and msgs[0]["role"] == "system" else 0
    while len(encode_chat(tok, msgs)) > room and len(msgs) - head > 1:
        del msgs[head]
        while len(msgs) - head > 1 and msgs[head]["role"] != "user":
            del msgs[head]
    return msgs


def run_chat(
    ckpt,
    *,
    system: str | None = None,
    tokenizer=None,
    device: str = "auto",
    ctx=None,
    dtype: str = "auto",
    compile: str = "auto",
    params=None,
    inp=None,
    out=None,
) -> int:
    from .checkpoint import checkpoint_tokenizer, load_model, pick_device
    from .generate import Chunk, cast_model, check_ctx, generate_events

    inp, out = inp or sys.stdin, out or sys.stdout
    dev = pick_device(device)
    model, meta = load_model(ckpt, dev)
    model = cast_model(model, dtype, dev, compile=compile).eval()
    tok, _, _ = checkpoint_tokenizer(ckpt, meta, tokenizer)
    check_chat_tokenizer(tok, f"the tokenizer of {ckpt}")
    n_ctx = check_ctx(model.config, ctx)
    interactive = inp.isatty()
    start = [{"role": "system", "content": system}] if system is not None else []
    if system is not None and not isinstance(system, str):
        raise UserError("--system must be text.")
    messages = list(start)
    if interactive:
        out.write("azgpt chat: /reset starts over, /exit leaves.\n")
    while True:
        if interactive:
            out.write(PROMPT)
            out.flush()
        line = inp.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        if interactive and text.strip() == "/exit":
            break
        if interactive and text.strip() == "/reset":
            messages = list(start)
            out.write("(yeni söhbət)\n")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        room = max(1, n_ctx - params.max_tokens)
        messages = fit_history(tok, messages, room)
        ids = encode_chat(tok, messages)
        if interactive:
            out.write(REPLY)
        parts = []
        for ev in generate_events(model, tok, ids, params, ctx=n_ctx):
            if isinstance(ev, Chunk):
                parts.append(ev.text)
                if interactive:
                    out.write(ev.text)
                    out.flush()
            elif ev.reason == "error":
                raise UserError(f"generation failed ({ev.error}); try another --temperature.")
        reply = "".join(parts)
        out.write(("" if interactive else reply) + "\n")
        out.flush()
        messages.append({"role": "assistant", "content": reply})
    return 0
