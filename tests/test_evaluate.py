import math

import pytest
import torch
from torch.nn import functional as F
from trainkit import make_data

from azgpt.evaluate import eval_texts, score_sequences, windows
from azgpt.model import GPT, GPTConfig
from azgpt.tokenizer import EOT, encode, load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t, _ = make_data(tmp_path_factory.mktemp("evaldata"))
    return load_tokenizer(t)


def model(block=16, vocab=512):
    torch.manual_seed(1)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.mark.parametrize(
    "n,block,stride", [(5, 16, 8), (40, 16, 8), (40, 16, 1), (17, 16, 16), (100, 16, 5)]
)
def test_windows_score_every_target_exactly_once(n, block, stride):
    seen = []
    for b, e, first in windows(n + 1, block, stride):
        assert e - b <= block
        tg = list(range(b + 1, e + 1))
        new = [t for t in tg if t >= first]
        if b > 0:  # every later-scored target has at least block - stride tokens of context
            assert all(t - b >= min(block - stride, block) or t - b >= 1 for t in new)
        seen += new
    assert seen == list(range(1, n + 1))


def test_bpb_equals_hand_computation(tok, tmp_path):
    m = model()
    doc = "Bakı Xəzər dənizinin sahilindədir."
    f = tmp_path / "doc.txt"
    f.write_text(doc + "\n", encoding="utf-8")
    res = eval_texts(m, tok, [str(f)], batch_size=2)
    ids = [tok.token_to_id(EOT)] + encode(tok, doc)
    with torch.no_grad():
        logits = m(torch.tensor([ids[:-1]]))
    lp = F.log_softmax(logits[0], dim=-1)
    nll = -sum(lp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    assert res["tokens"] == len(ids) - 1
    assert res["bytes"] == len(doc.encode("utf-8"))
    assert res["bpb"] == pytest.approx(nll / (math.log(2) * len(doc.encode("utf-8"))), rel=1e-5)
    assert res["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]), rel=1e-4)


def test_sliding_windows_equal_one_pass_for_a_short_document(tok):
    m = model(block=64)
    ids = [tok.token_to_id(EOT)] + encode(
        tok, "Azərbaycanın paytaxtı Bakı şəhəridir. Kür ən uzun çaydır."
    )
    assert len(ids) < 64
    one = score_sequences(m, [ids], stride=64, batch_size=1, device="cpu")
    for stride in (1, 7, 32):
        slid = score_sequences(m, [ids], stride=stride, batch_size=3, device="cpu")
        assert slid[1] == one[1] and slid[0] == pytest.approx(one[0], rel=1e-6)


def test_long_document_scores_every_token_once_and_batching_does_not_matter(tok):
    m = model(block=16)
    ids = [tok.token_to_id(EOT)] + encode(tok, " ".join(["Bakı gözəl şəhərdir."] * 12))
    a = score_sequences(m, [ids], stride=8, batch_size=1, device="cpu")
    b = score_sequences(m, [ids, ids], stride=8, batch_size=5, device="cpu")
    assert a[1] == len(ids) - 1
    assert b[1] == 2 * a[1] and b[0] == pytest.approx(2 * a[0], rel=1e-5)


def test_probes_cover_every_group():
    from azgpt.probe_items import PROBES

    groups = {g for g, *_ in PROBES}
    assert groups == {
        "capital",
        "currency",
        "rivers",
        "sequence",
        "vowel_harmony",
        "plural",
        "dotless_i",
        "az_vs_tr",
    }
    assert all(0 <= ans < len(c) for _, _, c, ans in PROBES)


def test_eval_tokens_scores_every_token_after_the_first(tok, tmp_path):
    import numpy as np

    from azgpt.evaluate import eval_tokens
    from azgpt.tokenizer import token_byte_lengths

    m = model(block=16)
    ids = [tok.token_to_id(EOT)] + encode(tok, " ".join(["Kür çayı Xəzərə tökülür."] * 8))
    f = tmp_path / "t.npy"
    np.save(f, np.array(ids, dtype=np.uint16))
    res = eval_tokens(m, tok, str(f), batch_size=3)
    nll = 0.0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, 16):  # consecutive windows of 16 targets
            w = ids[i : i + 17]
            logits = m(torch.tensor([w[:-1]]))
            nll += F.cross_entropy(logits[0], torch.tensor(w[1:]), reduction="sum").item()
    nbytes = int(token_byte_lengths(tok)[ids[1:]].sum())
    assert res["tokens"] == len(ids) - 1 and res["bytes"] == nbytes and res["documents"] == 1
    assert res["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert res["bpb"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-5)
