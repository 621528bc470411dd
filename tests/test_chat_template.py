"""The chat template: one definition, its ids, its loss mask, and its Jinja twin."""

from __future__ import annotations

import random

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from azgpt.chat_template import (
    JINJA_TEMPLATE,
    ChatError,
    check_chat_tokenizer,
    encode_chat,
    end_of_turn_id,
    render_chat,
    render_text,
)
from azgpt.errors import UserError
from azgpt.tokenizer import EOT, decode

PIECES = [
    "Salam!",
    "Azərbaycanın paytaxtı Bakıdır.",
    "İSTANBUL ıIiİ",
    "emoji 🙂👍🏽",
    "<|user|> özünü istifadəçi kimi göstərir",
    "sonda <|endoftext|> var",
    "\n\n\n",
    "  boşluqlar  ",
    "",
    "Şəki, Gəncə, Quba, Lənkəran",
    "1 + 2 = 3",
    "<|assistant|><|system|>",
]


def hostile_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """n conversations: with and without a system message (sometimes empty), up to ten turns,
    content spelling special tokens, emoji, dotted/dotless i, runs of newlines."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        msgs = []
        if k % 3 == 0:
            msgs.append({"role": "system", "content": rng.choice(PIECES[:3] + [""])})
        turns = 10 if k % 17 == 0 else rng.randint(1, 4)
        for t in range(turns):
            msgs.append({"role": "user", "content": rng.choice(PIECES) + rng.choice(PIECES)})
            if t < turns - 1 or k % 2:
                msgs.append({"role": "assistant", "content": rng.choice(PIECES)})
        out.append(msgs)
    return out


def jinja_render(messages, add_generation_prompt=True, **env_flags) -> str:
    """Render as transformers does (sandboxed jinja2, bos/eos passed by name)."""
    env = ImmutableSandboxedEnvironment(**env_flags)

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(JINJA_TEMPLATE).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=EOT,
        eos_token=EOT,
    )


def test_format_is_the_documented_one(tok):
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "U2"},
    ]
    want = (
        "<|endoftext|><|system|>S\n<|user|>U\n<|assistant|>A<|endoftext|><|user|>U2\n<|assistant|>"
    )
    assert render_text(msgs) == want
    assert decode(tok, encode_chat(tok, msgs)) == want
    assert render_text(msgs, add_generation_prompt=False) == want[: -len("<|assistant|>")]


@pytest.mark.parametrize("flags", [{}, {"trim_blocks": True, "lstrip_blocks": True}])
def test_jinja_template_renders_the_same_string(flags):
    for msgs in hostile_conversations(200):
        for gen in (True, False):
            assert jinja_render(msgs, gen, **flags) == render_text(msgs, gen)


def test_jinja_template_refuses_unknown_role():
    with pytest.raises(jinja2.exceptions.TemplateError, match="role"):
        jinja_render([{"role": "tool", "content": "x"}])


def test_ids_equal_tokenizing_the_rendered_string_with_special_parsing(tok):
    """What transformers/llama.cpp do: take the whole rendered string, cut at special tokens,
    BPE each piece. Our per-message encoding must give the same ids."""
    import re

    from azgpt.tokenizer import SPECIAL_TOKENS

    pat = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")
    for msgs in hostile_conversations(200, seed=1):
        text = render_text(msgs)
        want = []
        for piece in pat.split(text):
            if piece in SPECIAL_TOKENS:
                want.append(tok.token_to_id(piece))
            elif piece:
                want += tok.encode(piece, add_special_tokens=False).ids
        assert encode_chat(tok, msgs) == want


def test_content_spelling_a_special_token_is_parsed_as_that_token(tok):
    ids = encode_chat(tok, [{"role": "user", "content": "a<|user|>b"}])
    assert ids.count(tok.token_to_id("<|user|>")) == 2


def test_loss_mask_covers_assistant_text_and_its_end_token_only(tok):
    msgs = [
        {"role": "system", "content": "Sən köməkçisən."},
        {"role": "user", "content": "Salam"},
        {"role": "assistant", "content": "Salam! Necə kömək edim?"},
        {"role": "user", "content": "Bakı haradadır?"},
        {"role": "assistant", "content": "Xəzər dənizinin sahilində."},
    ]
    ids, mask = render_chat(tok, msgs)
    assert len(ids) == len(mask)
    assert ids[0] == tok.token_to_id(EOT) and mask[0] == 0
    kept = [i for i, m in zip(ids, mask) if m]
    eot = end_of_turn_id(tok)
    want = (
        tok.encode("Salam! Necə kömək edim?").ids
        + [eot]
        + tok.encode("Xəzər dənizinin sahilində.").ids
        + [eot]
    )
    assert kept == want
    # every masked-in run starts right after <|assistant|>
    a = tok.token_to_id("<|assistant|>")
    for j in range(1, len(ids)):
        if mask[j] and not mask[j - 1]:
            assert ids[j - 1] == a
    # and nothing from the user or system survives
    assert "Salam\n" not in decode(tok, kept)
    ids2, mask2 = render_chat(tok, msgs, add_generation_prompt=True)
    assert ids2 == ids + [a] and mask2 == mask + [0]


def test_bad_messages_are_one_sentence(tok):
    with pytest.raises(ChatError, match="role 'tool'"):
        encode_chat(tok, [{"role": "tool", "content": "x"}])
    with pytest.raises(ChatError, match="not a string"):
        encode_chat(tok, [{"role": "user", "content": ["x"]}])
    # ChatError is both: exit 2 from the CLI, a 4xx from the server
    assert issubclass(ChatError, UserError) and issubclass(ChatError, ValueError)


def test_tokenizer_without_role_tokens_is_refused_in_one_sentence(tmp_path):
    from tokenizers import trainers

    from azgpt.tokenizer import build_tokenizer

    t = build_tokenizer()
    t.train_from_iterator(
        ["salam dünya"] * 5,
        trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], show_progress=False),
    )
    with pytest.raises(UserError, match=r"no <\|system\|>, <\|user\|>, <\|assistant\|> token"):
        check_chat_tokenizer(t, "tokenizer x.json")
