"""azgpt.tokenizer: the byte-level BPE, its special tokens, its byte table, the tiktoken twin
and the fertility statistics."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from conftest import TOKENIZER_VOCAB
from tokenizers import Tokenizer

from azgpt.errors import UserError
from azgpt.text import AZ_ALPHABET, AZ_LOWER, AZ_UPPER
from azgpt.tokenizer import (
    DEFAULT_PRETOKENIZER,
    EOT,
    PRETOKENIZERS,
    SPECIAL_TOKENS,
    build_tokenizer,
    decode,
    encode,
    eot_id,
    fertility,
    load_tokenizer,
    save_tokenizer,
    sha256_file,
    tiktoken_encoding,
    token_byte_lengths,
    token_bytes,
    train_tokenizer,
)

ROUND_TRIP = {
    "empty": "",
    "all-64-letters": AZ_ALPHABET,
    "lower": AZ_LOWER,
    "upper": AZ_UPPER,
    "letters-spaced": " ".join(AZ_ALPHABET),
    "digits": "0123456789 1234567890 3.14 1,000,000 2024-01-31 -42 +7 (012) 345-67-89",
    "punctuation": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ “”‘’«»„—–…№°€₼",
    "emoji": "🎓 ❤️ 👨\u200d👩\u200d👧 🇦🇿 👍🏽 😀😀😀",
    "cyrillic": "Баку — столица. Азәрбајҹан Республикасы, Ҝәнҹә, Һәсән.",
    "arabic": "مرحبا بالعالم، آذربایجان",
    "cjk": "日本語のテキスト、中文文本，한국어 텍스트",
    "spaces": "a" + " " * 50 + "b",
    "newlines": "\n\n\n\nSalam\n\n\n\n\n\ndünya\n",
    "tabs": "\t\t\tSalam\t\t dünya \t",
    "mixed-ws": "  \n \t \r\n  \u00a0 \u3000 x \n\n  ",
    "only-ws": " \n\t \n",
    "apostrophe": "Bakı'da, Azərbaycan’ın, o'ğlu, rock'n'roll",
    "sentence": "Ötən ay Şəki və Çinar kəndində “İlin ən gözəl müəllimi” — Ürfan Əliyev seçildi 🎓",
    "special-text": "Salam <|endoftext|> dünya <|pad|>",
    "control": "a\x00b\x01c\x7fd",
}


@pytest.mark.parametrize("text", list(ROUND_TRIP.values()), ids=list(ROUND_TRIP))
def test_round_trip(tok, text):
    assert decode(tok, encode(tok, text)) == text


@pytest.mark.parametrize("letter", list(AZ_ALPHABET))
def test_round_trip_each_letter(tok, letter):
    for text in (letter, " " + letter, letter * 3, f"«{letter}»"):
        assert decode(tok, encode(tok, text)) == text


def test_alphabet_is_64_letters():
    assert len(AZ_ALPHABET) == 64
    assert AZ_ALPHABET == AZ_LOWER + AZ_UPPER


def test_round_trip_sample_corpus(tok, sample_docs):
    for doc in sample_docs:
        assert decode(tok, encode(tok, doc)) == doc


def test_nfd_input_decodes_to_nfc(tok):
    text = "Şəki Çölü İsmayıllı Göygöl Ağdam"
    nfd = unicodedata.normalize("NFD", text)
    assert encode(tok, nfd) == encode(tok, text)
    assert decode(tok, encode(tok, nfd)) == text


def test_vocab_size_and_special_tokens(tok):
    assert tok.get_vocab_size() == TOKENIZER_VOCAB
    vocab = tok.get_vocab()
    assert EOT == "<|endoftext|>"
    for s in SPECIAL_TOKENS:
        assert s in vocab, s
    for s in ("<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"):
        assert s in SPECIAL_TOKENS
    assert sum(s.startswith("<|reserved_") for s in SPECIAL_TOKENS) >= 3
    ids = [tok.token_to_id(s) for s in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert eot_id(tok) == tok.token_to_id(EOT)
    # Special ids decode to their text.
    assert decode(tok, [eot_id(tok)]) == EOT


def test_no_lowercasing(tok):
    pairs = [("İSTANBUL", "istanbul"), ("I", "İ"), ("ı", "i"), ("ISTANBUL", "İSTANBUL"), ("Ə", "ə")]
    for a, b in pairs:
        assert encode(tok, a) != encode(tok, b), (a, b)
        assert decode(tok, encode(tok, a)) == a
        assert decode(tok, encode(tok, b)) == b


def test_every_byte_is_a_token(tok):
    # Byte-level BPE: any string, whatever its script, encodes without an unknown token.
    tb = token_bytes(tok)
    singles = {b for b in tb if len(b) == 1}
    assert singles == {bytes([i]) for i in range(256)}


def test_saved_file_loads_with_tokenizers(tok, tokenizer_file, sample_docs):
    raw = Tokenizer.from_file(str(tokenizer_file))
    plain = [v for k, v in ROUND_TRIP.items() if k != "special-text"]
    for doc in sample_docs[:50] + plain:
        assert raw.encode(doc, add_special_tokens=False).ids == encode(tok, doc)


def test_special_token_text_inside_a_document_is_plain_text(tok):
    # A plain tokenizers load maps the string to the special id; azgpt never does: only azgpt
    # inserts <|endoftext|> ids, so a document cannot fake a document boundary.
    ids = encode(tok, ROUND_TRIP["special-text"])
    assert tok.token_to_id(EOT) not in ids and tok.token_to_id("<|pad|>") not in ids
    assert decode(tok, ids) == ROUND_TRIP["special-text"]


def test_saved_file_loads_with_transformers(tok, tokenizer_file, sample_docs):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    assert len(fast) == tok.get_vocab_size()
    plain = [v for k, v in ROUND_TRIP.items() if k != "special-text"]
    for doc in sample_docs[:50] + plain:
        ids = fast(doc, add_special_tokens=False)["input_ids"]
        assert ids == encode(tok, doc)
        assert fast.decode(ids, clean_up_tokenization_spaces=False) == decode(tok, ids)
    assert fast.convert_tokens_to_ids(EOT) == eot_id(tok)


def test_tokenizer_info_written(tokenizer_dir, tokenizer_file):
    info = json.loads((tokenizer_dir / "tokenizer_info.json").read_text(encoding="utf-8"))
    assert info["vocab_size"] == TOKENIZER_VOCAB
    assert info["sha256"] == sha256_file(tokenizer_file)
    assert info["pretokenizer"] == DEFAULT_PRETOKENIZER == "gpt4"


def test_load_tokenizer_accepts_dir_or_file(tokenizer_dir, tokenizer_file):
    a = load_tokenizer(tokenizer_dir)
    b = load_tokenizer(tokenizer_file)
    assert a.get_vocab() == b.get_vocab()


def test_training_is_deterministic(sample_docs, tmp_path):
    a = save_tokenizer(train_tokenizer(sample_docs, vocab_size=500), tmp_path / "a")
    b = save_tokenizer(train_tokenizer(sample_docs, vocab_size=500), tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()


# ----------------------------------------------------------------------------- tiktoken twin


def test_tiktoken_identical_ids_on_sample(tok, tokenizer_file, sample_docs):
    pytest.importorskip("tiktoken")
    enc = tiktoken_encoding(tok, tokenizer_file)
    assert enc is not None
    for doc in sample_docs:
        assert enc.encode_ordinary(doc) == encode(tok, doc)
    for name, text in ROUND_TRIP.items():
        if name == "special-text":
            continue  # see test_data.py::test_prepare_literal_special_token_text
        assert enc.encode_ordinary(text) == encode(tok, text), name
        assert enc.decode(enc.encode_ordinary(text)) == text


@pytest.mark.parametrize("pretokenizer", sorted(PRETOKENIZERS))
def test_each_pretokenizer_round_trips_and_matches_tiktoken(pretokenizer, sample_docs, tmp_path):
    tok = train_tokenizer(sample_docs, vocab_size=400, pretokenizer=pretokenizer)
    path = save_tokenizer(tok, tmp_path)
    tok = load_tokenizer(path)
    texts = sample_docs[:40] + [
        ROUND_TRIP["sentence"],
        ROUND_TRIP["mixed-ws"],
        ROUND_TRIP["digits"],
    ]
    for t in texts:
        assert decode(tok, encode(tok, t)) == t
    pytest.importorskip("tiktoken")
    enc = tiktoken_encoding(tok, path)
    assert enc is not None
    for t in texts:
        assert enc.encode_ordinary(t) == encode(tok, t)


def test_tiktoken_encoding_none_for_foreign_pretokenizer(tmp_path, sample_docs):
    pytest.importorskip("tiktoken")
    from tokenizers import pre_tokenizers

    tok = train_tokenizer(sample_docs[:20], vocab_size=300)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    path = save_tokenizer(tok, tmp_path)
    assert tiktoken_encoding(load_tokenizer(path), path) is None


# ----------------------------------------------------------------------------- token bytes


def test_token_bytes_concatenate_to_utf8(tok, sample_docs):
    tb = token_bytes(tok)
    assert len(tb) == tok.get_vocab_size()
    for text in sample_docs + list(ROUND_TRIP.values()):
        ids = encode(tok, text)
        assert b"".join(tb[i] for i in ids) == text.encode("utf-8")


def test_token_bytes_are_unique_for_ordinary_tokens(tok):
    tb = token_bytes(tok)
    special = {tok.token_to_id(s) for s in SPECIAL_TOKENS}
    ordinary = [b for i, b in enumerate(tb) if i not in special]
    assert all(ordinary)
    assert len(set(ordinary)) == len(ordinary)
    for s in SPECIAL_TOKENS:
        assert tb[tok.token_to_id(s)] == s.encode("utf-8")


def test_token_byte_lengths(tok, sample_docs):
    lens = token_byte_lengths(tok)
    assert lens.shape == (tok.get_vocab_size(),)
    for s in SPECIAL_TOKENS:
        assert lens[tok.token_to_id(s)] == 0
    doc = sample_docs[0]
    assert int(lens[encode(tok, doc)].sum()) == len(doc.encode("utf-8"))


# ----------------------------------------------------------------------------- fertility


def test_fertility_counts(tok, sample_docs):
    st = fertility(tok, sample_docs)
    assert st["words"] == sum(len(d.split()) for d in sample_docs)
    assert st["tokens"] == sum(len(encode(tok, d)) for d in sample_docs)
    assert st["bytes"] == sum(len(d.encode("utf-8")) for d in sample_docs)
    assert st["tokens_per_word"] == round(st["tokens"] / st["words"], 4)
    assert st["bytes_per_token"] == round(st["bytes"] / st["tokens"], 4)
    # A 1000-id vocabulary on Azerbaijani: more than one token per word, fewer than six; a
    # token is more than one byte on average.
    assert 1.0 < st["tokens_per_word"] < 6.0
    assert 1.5 < st["bytes_per_token"] < 8.0
    assert 0.0 < st["share_words_3plus_tokens"] < 1.0


def test_fertility_simple_text(tok):
    st = fertility(tok, ["və və və"])
    assert st["words"] == 3
    assert st["share_words_3plus_tokens"] == 0.0  # a frequent word is one or two tokens


def test_fertility_without_words_is_user_error(tok):
    with pytest.raises(UserError, match="no words"):
        fertility(tok, ["", "   \n\t"])


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("vocab", [10, 263, 65537, 70000])
def test_train_vocab_size_out_of_range(vocab, sample_docs):
    with pytest.raises(UserError, match="--vocab-size"):
        train_tokenizer(sample_docs[:5], vocab_size=vocab)


def test_unknown_pretokenizer():
    with pytest.raises(UserError, match="--pretokenizer"):
        build_tokenizer("bert")


def test_load_missing_tokenizer(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


@pytest.mark.parametrize("content", ["{garbage", "", "[1, 2, 3]", '{"model": 5}'])
def test_load_corrupt_tokenizer(tmp_path, content):
    p = tmp_path / "tokenizer.json"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match="corrupt") as e:
        load_tokenizer(tmp_path)
    assert str(p) in str(e.value)
    assert "\n" not in str(e.value)


def test_load_tokenizer_without_eot(tmp_path, sample_docs):
    from tokenizers import trainers

    tok = build_tokenizer()
    tok.train_from_iterator(
        sample_docs[:20], trainers.BpeTrainer(vocab_size=300, show_progress=False)
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match=r"<\|endoftext\|>"):
        load_tokenizer(tmp_path)


# The regex of Llama-3's tokenizer.json, which llama.cpp implements natively as `llama-bpe`.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def test_default_is_llama3_regex_with_whole_word_tokens(tokenizer_file):
    spec = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"] == LLAMA3_REGEX == PRETOKENIZERS["gpt4"]
    assert split["behavior"] == "Isolated" and not split["invert"]
    assert byte_level["type"] == "ByteLevel" and not byte_level["add_prefix_space"]
    assert not byte_level["use_regex"]
    assert spec["model"]["ignore_merges"] is True


def test_tokenizer_json_is_plain_json(tokenizer_file):
    spec = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
    assert spec["model"]["type"] == "BPE"
    assert spec["normalizer"]["type"] == "NFC"
    assert [t["content"] for t in spec["added_tokens"]] == SPECIAL_TOKENS
