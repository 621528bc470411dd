"""`azgpt chat`: scripted through a pipe, and interactive (/reset, /exit) on a fake terminal."""

from __future__ import annotations

import io

from trainkit import azgpt

from azgpt.chat import fit_history, run_chat
from azgpt.chat_template import encode_chat
from azgpt.checkpoint import checkpoint_tokenizer, load_model
from azgpt.generate import Chunk, SamplingParams, generate_events

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def expected_replies(ckpt, turns, system=None):
    """What the chat must print: greedy replies, each conditioned on the history so far."""
    model, meta = load_model(ckpt)
    model.eval()
    tok, _, _ = checkpoint_tokenizer(ckpt, meta)
    msgs = [{"role": "system", "content": system}] if system else []
    out = []
    for t in turns:
        msgs.append({"role": "user", "content": t})
        ids = encode_chat(tok, msgs)
        reply = "".join(
            e.text for e in generate_events(model, tok, ids, GREEDY) if isinstance(e, Chunk)
        )
        msgs.append({"role": "assistant", "content": reply})
        out.append(reply)
    return out


def test_piped_chat_prints_one_reply_per_line_with_history(chat_sft):
    ckpt = chat_sft / "best"
    turns = ["Salam!", "Bakı haradadır?", "Sağ ol."]
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "azgpt", "chat", "--ckpt", str(ckpt), "--temperature", "0",
         "--max-new-tokens", "12", "--system", "Qısa cavab ver."],
        input="Salam!\n\nBakı haradadır?\nSağ ol.\n", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    want = expected_replies(ckpt, turns, "Qısa cavab ver.")
    assert p.stdout == "".join(w + "\n" for w in want)


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_terminal_chat_resets_and_exits(chat_sft):
    ckpt = chat_sft / "best"
    out = io.StringIO()
    inp = FakeTTY("Salam!\n/reset\nSalam!\n/exit\nnever read\n")
    assert run_chat(ckpt, params=GREEDY, inp=inp, out=out) == 0
    text = out.getvalue()
    first = expected_replies(ckpt, ["Salam!"])[0]
    # after /reset the same question gets the same (history-free) reply
    assert text.count("model> " + first + "\n") == 2
    assert "(yeni söhbət)" in text and text.endswith("siz> ")


def test_history_drops_oldest_turns_but_keeps_the_system_prompt(tok):
    msgs = [{"role": "system", "content": "Qısa cavab ver."}]
    for k in range(20):
        msgs += [
            {"role": "user", "content": f"Sual {k}"},
            {"role": "assistant", "content": f"Cavab {k}"},
        ]
    msgs.append({"role": "user", "content": "Son sual"})
    kept = fit_history(tok, msgs, 60)
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1] and kept[1]["role"] == "user"
    assert len(encode_chat(tok, kept)) <= 60 < len(encode_chat(tok, msgs))


def test_chat_refuses_a_missing_checkpoint():
    r = azgpt("chat", "--ckpt", "/nonexistent/ckpt")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
