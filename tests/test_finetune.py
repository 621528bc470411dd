"""Fine-tuning: packed rows compute what each conversation computes alone; the batch source."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from azgpt.chatdata import Conversation
from azgpt.chatpack import ChatBatches, pack
from azgpt.config import ModelConfig
from azgpt.model import GPT

MSGS = [
    [{"role": "user", "content": "Salam!"}, {"role": "assistant", "content": "Salam, necəsən?"}],
    [
        {"role": "system", "content": "Qısa cavab ver."},
        {"role": "user", "content": "Bakı haradadır?"},
        {"role": "assistant", "content": "Xəzərin sahilində."},
        {"role": "user", "content": "Bəs Gəncə?"},
        {"role": "assistant", "content": "Azərbaycanın qərbində."},
    ],
    [{"role": "user", "content": "2 + 3 neçədir?"}, {"role": "assistant", "content": "5."}],
]


def convs(tok) -> list[Conversation]:
    from azgpt.chat_template import render_chat

    return [Conversation(m, *render_chat(tok, m), f"t:{i}") for i, m in enumerate(MSGS)]


def model(arch: str, vocab: int, block: int) -> GPT:
    torch.manual_seed(0)
    extra = {"arch": "llama", "n_kv_head": 1, "qk_norm": True} if arch == "llama" else {}
    cfg = ModelConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32, **extra)
    return GPT(cfg).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_conversation_computes_the_same_alone_and_packed(tok, arch):
    cs = convs(tok)
    block = sum(len(c.ids) - 1 for c in cs) + 5  # all three in one row, plus padding
    m = model(arch, tok.get_vocab_size(), block)
    rows = pack(cs, block, tok.token_to_id("<|endoftext|>"))
    assert rows["x"].shape == (1, block)
    x, y, seg = (torch.from_numpy(rows[k]) for k in ("x", "y", "seg"))
    with torch.no_grad():
        packed = m(x, segments=seg)[0]
        at = 0
        for c in sorted(cs, key=lambda c: -len(c.ids)):  # best-fit decreasing order
            n = len(c.ids) - 1
            alone = m(torch.tensor([c.ids[:-1]]))[0]
            torch.testing.assert_close(packed[at : at + n], alone, atol=1e-5, rtol=1e-5)
            # and its loss: the same sum over its assistant targets
            t = torch.tensor(c.ids[1:])
            t[~torch.tensor(c.mask[1:], dtype=torch.bool)] = -1
            la = F.cross_entropy(alone, t, ignore_index=-1, reduction="sum")
            lp = F.cross_entropy(
                packed[at : at + n], y[0, at : at + n], ignore_index=-1, reduction="sum"
            )
            torch.testing.assert_close(la, lp)
            at += n
        # without segments the later conversations would see the earlier ones
        plain = m(x)[0]
        assert not torch.allclose(plain[at - 2], packed[at - 2], atol=1e-3)


def test_pack_masks_everything_but_assistant_targets(tok):
    cs = convs(tok)
    rows = pack(cs, 64, 0)
    kept = int((rows["y"] >= 0).sum())
    assert kept == sum(sum(c.mask[1:]) for c in cs)
    for c in cs:  # no conversation is split over rows
        assert any(
            all(np.isin(np.asarray(c.ids[1:])[np.asarray(c.mask[1:], bool)], r)) for r in rows["y"]
        )


def test_pack_is_best_fit_and_refuses_an_oversized_conversation(tok):
    cs = convs(tok)
    big = max(len(c.ids) for c in cs) - 1
    rows = pack(cs, big, 0)
    assert len(rows["x"]) <= len(cs)
    with pytest.raises(ValueError, match="more than a row"):
        pack(cs, big - 1, 0)


def test_batches_are_a_pure_function_of_the_step_and_cover_each_epoch(tok):
    cs = convs(tok) * 4  # 12 conversations
    b = ChatBatches(cs, cs[:2], 40, 0, {"tokenizer": {"sha256": "x"}})
    n = b.n_train
    seen = [b.train_rows(7, s, 0, 2) for s in range((n + 1) // 2)]
    first_epoch = np.concatenate(seen)[:n]
    assert sorted(first_epoch.tolist()) == list(range(n))  # every row once per epoch
    x1, y1, kw1 = b.get_batch(7, 3, 0, 2)
    x2, y2, kw2 = b.get_batch(7, 3, 0, 2)
    assert torch.equal(x1, x2) and torch.equal(kw1["segments"], kw2["segments"])
    # two processes split the same global batch
    xa, _, _ = b.get_batch(7, 3, 0, 1, rank=0, world=2)
    xb, _, _ = b.get_batch(7, 3, 0, 1, rank=1, world=2)
    assert torch.equal(torch.cat([xa, xb]), x1)
    val = list(b.eval_batches(7, 1, 1))
    assert sum(len(v[0]) for v in val) == len(b.rows["val"]["x"])
