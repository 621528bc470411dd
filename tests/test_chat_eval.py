"""`azgpt eval --chat`: assistant-token loss, bits per byte and the stop rate."""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from trainkit import azgpt

from azgpt.chatdata import load_chats
from azgpt.chateval import assistant_loss, eval_chat
from azgpt.checkpoint import checkpoint_tokenizer, load_model
from azgpt.tokenizer import EOT, token_byte_lengths

CHAT = __import__("chatkit").CHAT


def _model(ckpt):
    model, meta = load_model(ckpt)
    tok, _, _ = checkpoint_tokenizer(ckpt, meta)
    return model.eval(), tok


def test_assistant_loss_is_the_masked_loss_of_each_conversation_alone(chat_sft):
    model, tok = _model(chat_sft / "best")
    convs, _ = load_chats([CHAT / "multiturn.jsonl"], tok, model.config.block_size + 1)
    nll, n, nbytes = assistant_loss(model, convs, tok, "cpu", batch_size=3)
    lens = token_byte_lengths(tok)
    want_nll = want_n = want_bytes = 0
    with torch.no_grad():
        for c in convs:
            logits = model(torch.tensor([c.ids[:-1]]))[0]
            t = torch.tensor(c.ids[1:])
            keep = torch.tensor(c.mask[1:], dtype=torch.bool)
            want_nll += float(F.cross_entropy(logits[keep], t[keep], reduction="sum"))
            want_n += int(keep.sum())
            want_bytes += int(lens[t[keep].numpy()].sum())
    assert n == want_n and nbytes == want_bytes
    assert math.isclose(nll, want_nll, rel_tol=1e-5)
    # the end-of-turn tokens are scored but have no bytes
    assert want_n > sum(1 for c in convs for m in c.messages if m["role"] == "assistant")


class Always(torch.nn.Module):
    """A model whose every next token is `tok_id` (wraps a real one for config and shapes)."""

    def __init__(self, inner, tok_id):
        super().__init__()
        self.inner, self.tok_id, self.config = inner, tok_id, inner.config
        self.lm_head, self.transformer = inner.lm_head, inner.transformer

    def forward(self, idx, targets=None, **kw):
        out = self.inner(idx, **kw)
        out = torch.full_like(out, -10.0)
        out[..., self.tok_id] = 10.0
        return out


def test_stop_rate_counts_only_replies_that_end_with_the_end_of_turn(chat_base):
    model, tok = _model(chat_base)
    files = [CHAT / "greetings.jsonl"]
    assert eval_chat(Always(model, tok.token_to_id(EOT)), tok, files, "cpu")["stop_rate"] == 1.0
    role = tok.token_to_id("<|user|>")  # a role token ends the reply, but is no end of turn
    assert eval_chat(Always(model, role), tok, files, "cpu")["stop_rate"] == 0.0
    word = tok.encode(" salam").ids[0]  # never stops: runs to its limit
    assert eval_chat(Always(model, word), tok, files, "cpu", max_reply=20)["stop_rate"] == 0.0


def test_eval_chat_cli_before_and_after(chat_base, chat_sft):
    res = {}
    for name, ck in (("base", chat_base), ("sft", chat_sft / "best")):
        r = azgpt("eval", "--ckpt", str(ck), "--chat", str(CHAT / "system.jsonl"), "--json")
        assert r.returncode == 0, r.stderr
        res[name] = json.loads(r.stdout)
        assert {"assistant_loss", "assistant_bpb", "stop_rate", "conversations"} <= set(res[name])
        assert res[name]["conversations"] == 25
    assert res["sft"]["assistant_loss"] < res["base"]["assistant_loss"]
    assert res["sft"]["stop_rate"] >= res["base"]["stop_rate"]


def test_eval_chat_bad_file_is_one_sentence(chat_base, tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"prompt": 1, "completion": "a"}\n', encoding="utf-8")
    r = azgpt("eval", "--ckpt", str(chat_base), "--chat", str(bad), "--json")
    assert r.returncode == 2 and "non_string_content 1" in r.stderr and "Traceback" not in r.stderr
