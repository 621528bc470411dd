"""`azgpt eval --chat FILE`: how well a checkpoint chats, on conversations it was not trained on.

- `assistant_loss`: mean cross-entropy (nats) of the assistant tokens and of the end of each
  assistant turn, given everything before them, exactly the tokens fine-tuning scores;
- `assistant_bpb`: the same loss in bits per UTF-8 byte of assistant text (the end-of-turn
  token has no bytes: its loss counts, its length does not), comparable across tokenizers;
- `stop_rate`: the share of conversations whose greedy reply to the last user turn (at most
  256 tokens, and no further than the end of the context) ends with the end-of-turn token,
  i.e. the model learned to stop.

The same command scores a base and a fine-tuned checkpoint, so before and after are one
command each. Conversations are read and truncated as `azgpt finetune` reads them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_REPLY = 256


def assistant_loss(model, convs, tok, device, batch_size: int = 8) -> tuple[float, int, int]:
    """(summed nats, scored tokens, bytes of assistant text) over `convs`, packed into rows
    with segment ids so each conversation is scored alone."""
    from .chatpack import pack
    from .tokenizer import EOT, token_byte_lengths

    lens = token_byte_lengths(tok)
    rows = pack(convs, model.config.block_size, tok.token_to_id(EOT))
    nll, n, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(rows["x"]), batch_size):
            x, y, seg = (
                torch.from_numpy(rows[k][i : i + batch_size]).to(device) for k in "x y seg".split()
            )
            logits = model(x, segments=seg)
            nll += float(
                F.cross_entropy(
                    logits.float().reshape(-1, logits.size(-1)),
                    y.reshape(-1),
                    ignore_index=-1,
                    reduction="sum",
                )
            )
            kept = rows["y"][i : i + batch_size]
            kept = kept[kept >= 0]
            n += int(kept.size)
            nbytes += int(lens[kept].sum())
    return nll, n, nbytes


def greedy_stops(model, tok, messages: list[dict], device, max_reply: int = MAX_REPLY) -> bool:
    """Whether the greedy reply to `messages` (ending with a user turn) ends with the
    end-of-turn token within `max_reply` tokens; another special token (a role) is a failure."""
    from .chat_template import encode_chat, end_of_turn_id
    from .generate import SamplingParams, generate_tokens
    from .tokenizer import SPECIAL_TOKENS

    eot = end_of_turn_id(tok)
    specials = {tok.token_to_id(s) for s in SPECIAL_TOKENS} - {None}
    ctx = model.config.block_size
    ids = encode_chat(tok, messages)[-(ctx - 1) :]
    # A reply ends within the context: past it the model no longer sees the question.
    n = max(1, min(max_reply, ctx - len(ids)))
    idx = torch.tensor([ids], device=device)
    greedy = SamplingParams(max_tokens=n, temperature=0.0)
    for t in generate_tokens(model, idx, n, greedy, eos_id=eot):
        t = int(t)
        if t in specials:
            return t == eot
    return False


def eval_chat(model, tok, paths, device, max_reply: int = MAX_REPLY) -> dict:
    from .chatdata import load_chats
    from .evaluate import bits_per_byte

    convs, report = load_chats(paths, tok, model.config.block_size + 1)
    nll, n, nbytes = assistant_loss(model, convs, tok, device)
    stops = 0
    with torch.no_grad():
        for c in convs:
            last = max(i for i, m in enumerate(c.messages) if m["role"] == "assistant")
            stops += greedy_stops(model, tok, c.messages[:last], device, max_reply)
    return {
        "assistant_loss": round(nll / max(n, 1), 6),
        "assistant_bpb": round(bits_per_byte(nll, nbytes), 6) if nbytes else float("nan"),
        "stop_rate": round(stops / len(convs), 6),
        "conversations": len(convs),
        "assistant_tokens": n,
        "chat_skipped": {k: v["count"] for k, v in report.as_dict()["skipped"].items()},
    }
