"""Fine-tuning: packed rows compute what each conversation computes alone; the batch source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from trainkit import losses

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
    b = ChatBatches(cs, cs[:3], 40, 0, seed=7, grad_accum=1, tokenizer_sha256="x", dir=Path("d"))
    n = b.n_train
    seen = [b.train_rows(s, 0, 2) for s in range((n + 1) // 2)]
    first_epoch = np.concatenate(seen)[:n]
    assert sorted(first_epoch.tolist()) == list(range(n))  # every row once per epoch
    x1, y1, kw1 = b.train_batch(3, 0, 2)
    x2, y2, kw2 = b.train_batch(3, 0, 2)
    assert torch.equal(x1, x2) and torch.equal(kw1["segments"], kw2["segments"])
    # two processes split the same global batch
    xa, _, _ = b.train_batch(3, 0, 1, rank=0, world=2)
    xb, _, _ = b.train_batch(3, 0, 1, rank=1, world=2)
    assert torch.equal(torch.cat([xa, xb]), x1)
    # validation: every held-out row once over the processes, padding rows ignored
    for world in (1, 2):
        k = b.val_iters(1, world)
        got = [v for r in range(world) for v in b.val_batches(k, 1, r, world)]
        assert len(got) == k * world
        kept = sum(int((v.y >= 0).sum()) for v in got)
        assert kept == int((b.rows["val"]["y"] >= 0).sum())


# ----------------------------------------------------------------------------- the command


def test_finetune_runs_the_shared_loop_from_the_base_weights(chat_base, chat_sft):
    import json

    from azgpt.checkpoint import load_model

    meta = json.loads((chat_sft / "last" / "meta.json").read_text())
    assert meta["init_from"] == str(chat_base.resolve()) or meta["init_from"] == str(chat_base)
    assert meta["config"]["train"]["weight_decay"] == 0.0
    base_lr = json.loads((chat_base / "meta.json").read_text())["config"]["train"]["lr"]
    assert meta["config"]["train"]["lr"] == pytest.approx(0.8 * base_lr)
    rows = [json.loads(x) for x in (chat_sft / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("event") == "eval"]
    assert len(evals) >= 4 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    # the first training loss is the base's on chat data, not a fresh model's ln(vocab)
    first = next(r["loss"] for r in rows if "event" not in r)
    assert first < np.log(512) - 0.5
    rep = json.loads((chat_sft / "chat_data.json").read_text())
    assert rep["conversations"] >= 300 and rep["val_conversations"] >= 25
    model, _ = load_model(chat_sft / "best")  # a checkpoint like any other
    assert model.config.block_size == 128


def test_finetune_resume_continues_exactly(chat_base, tmp_path):

    from azgpt.cli import main  # in-process: three runs without three interpreter starts

    data = str(Path(__file__).resolve().parent.parent / "data" / "chat" / "greetings.jsonl")
    args = ["finetune", "--ckpt", str(chat_base), "--data", data, "--train.batch_size=2"]
    common = ["--train.max_iters=8", "--train.eval_interval=4"]
    assert main([*args, *common, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, *common, "--out", str(tmp_path / "b"), "--train.stop_at=4"]) == 0
    assert main([*args, *common, "--out", str(tmp_path / "b"), "--resume"]) == 0

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert set(a) == set(b) and all(a[s] == pytest.approx(b[s], rel=1e-5) for s in a)


def test_finetune_refuses_bad_input_in_one_sentence(chat_base, tmp_path):
    from trainkit import azgpt

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "salam"}]}\n', encoding="utf-8")
    out = tmp_path / "out"
    r = azgpt("finetune", "--ckpt", str(chat_base), "--data", str(bad), "--out", str(out))
    assert (
        r.returncode == 2
        and "no usable conversation" in r.stderr
        and "no_assistant_turn 1" in r.stderr
    )
    assert "Traceback" not in r.stderr and not out.exists()
    r = azgpt(
        "finetune",
        "--ckpt",
        str(chat_base),
        "--data",
        str(bad),
        "--sft.epochs=0",
        "--out",
        str(out),
    )
    assert r.returncode == 2 and "sft.epochs must be positive" in r.stderr and not out.exists()
    r = azgpt(
        "finetune", "--ckpt", str(chat_base), "--data", str(bad), "--sft.nope=1", "--out", str(out)
    )
    assert r.returncode == 2 and "unknown config key sft.nope" in r.stderr and not out.exists()


def test_a_tokenizer_without_role_tokens_is_refused_in_one_sentence(chat_base, tmp_path):
    """A checkpoint whose tokenizer lacks <|assistant|> and friends: one sentence, exit 2."""
    import shutil

    from tokenizers import trainers
    from trainkit import azgpt

    from azgpt.tokenizer import EOT, build_tokenizer

    ck = tmp_path / "old"
    shutil.copytree(chat_base.resolve(), ck)
    t = build_tokenizer()
    t.train_from_iterator(
        ["salam dünya"] * 5,
        trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], show_progress=False),
    )
    t.save(str(ck / "tokenizer.json"))
    meta = ck / "meta.json"
    import json

    from azgpt.fsutil import sha256_file

    m = json.loads(meta.read_text())
    m["tokenizer_sha256"] = sha256_file(ck / "tokenizer.json")
    meta.write_text(json.dumps(m))
    out = tmp_path / "out"
    r = azgpt(
        "finetune",
        "--ckpt",
        str(ck),
        "--data",
        "data/chat",
        "--out",
        str(out),
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert r.returncode == 2, r.stderr
    assert (
        "has no <|system|>, <|user|>, <|assistant|> token" in r.stderr
        and "Traceback" not in r.stderr
    )
    assert not out.exists()


def test_configs_sft_toml_writes_out_the_defaults():
    import dataclasses
    import tomllib

    from azgpt.finetune import SFTConfig

    root = Path(__file__).resolve().parent.parent
    raw = tomllib.loads((root / "configs" / "sft.toml").read_text(encoding="utf-8"))
    assert raw["sft"] == dataclasses.asdict(SFTConfig())
