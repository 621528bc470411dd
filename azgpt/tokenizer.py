"""Byte-level BPE tokenizer for Azerbaijani: train, load, encode, decode, special tokens, and the
byte length of every token (for bits per byte).

Normalisation is NFC only (never lowercasing: `I`/`İ` and `ı`/`i` are distinct letters).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .errors import UserError
from .fsutil import atomic_path, sha256_file

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [
    EOT,
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|reserved_0|>",
    "<|reserved_1|>",
    "<|reserved_2|>",
]

# Pre-tokenizer candidates (regexes that cut text into pieces before BPE). Measured on FLORES-200
# azj_Latn dev with 32k vocabularies trained on the shared corpus; see docs/results.md and
# `python bench/pipeline.py`.
#  - "gpt4" (the default): cl100k-style regex (leading punctuation attaches to words, digits of
#    1-3). It is exactly Llama-3's regex, which llama.cpp implements natively as its `llama-bpe`
#    pre-tokenizer, so a GGUF export tokenizes id for id like azgpt (tests/test_gguf.py). It
#    ties with "az" on fertility (FLORES dev 1.6124 vs 1.6125 tokens per word).
#  - "az": letters with at most one leading non-letter (space, quote, bracket), apostrophes
#    inside words kept, digits in groups of up to three, no English contraction rules.
#    llama.cpp has no such pre-tokenizer: `azgpt export --format gguf` refuses it.
#  - "gpt2": GPT-2's regex (English contractions, a leading space only, unbounded digit runs).
PRETOKENIZERS = {
    "az": r"[^\r\n\p{L}\p{N}]?\p{L}+(?:['’]\p{L}+)*|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    "gpt4": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
DEFAULT_PRETOKENIZER = "gpt4"


def build_tokenizer(pretokenizer: str = DEFAULT_PRETOKENIZER) -> Tokenizer:
    if pretokenizer not in PRETOKENIZERS:
        raise UserError(
            f"--pretokenizer must be one of {', '.join(PRETOKENIZERS)}, got {pretokenizer!r}."
        )
    # ignore_merges: a piece that is itself in the vocabulary is that one token, without
    # replaying the merges (which can end in two tokens when a later merge built the piece).
    # llama.cpp's llama-bpe and tiktoken both work this way, and so does Llama-3's tokenizer.json.
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZERS[pretokenizer]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 32000,
    pretokenizer: str = DEFAULT_PRETOKENIZER,
    min_frequency: int = 2,
) -> Tokenizer:
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(
            f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens), got {vocab_size}."
        )
    if vocab_size > 65536:
        raise UserError(
            f"--vocab-size {vocab_size} does not fit the uint16 token files; use at most 65536 (32000 is the default)."
        )
    tok = build_tokenizer(pretokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, extra: dict | None = None) -> Path:
    out = Path(out_dir)
    path = out / "tokenizer.json"
    with atomic_path(path) as tmp:
        tok.save(str(tmp))
    info = {"vocab_size": tok.get_vocab_size(), "sha256": sha256_file(path), **(extra or {})}
    with atomic_path(out / "tokenizer_info.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def tokenizer_path(dir_or_file: str | Path) -> Path:
    p = Path(dir_or_file)
    return p / "tokenizer.json" if p.is_dir() or not p.suffix else p


MAX_TOKENIZER_BYTES = 64 << 20  # a 32k BPE tokenizer.json is ~2 MB; 256k vocabularies ~30 MB


def check_tokenizer_json(path: Path) -> None:
    """Refuse a tokenizer.json azgpt did not write before handing it to the Rust library: a BPE
    model over bytes, NFC (or no) normalizer, and one of azgpt's own pre-tokenizer regexes. A
    file from a stranger can carry a backtracking regex that makes encoding thousands of times
    slower or panics inside Rust; models other than BPE have no byte-level decoding."""
    fix = "retrain it with `azgpt tokenizer train`"
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise UserError(
            f"tokenizer file {path} is larger than {MAX_TOKENIZER_BYTES >> 20} MB; {fix}."
        )
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UserError(f"tokenizer file {path} is not valid JSON; {fix}.") from None
    if not isinstance(spec, dict):
        raise UserError(f"tokenizer file {path} is not a tokenizer; {fix}.")
    model = spec.get("model") or {}
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise UserError(
            f"tokenizer file {path} holds a {kind or 'non-BPE'} model, not a byte-level BPE; {fix}."
        )
    norm = spec.get("normalizer")
    if norm is not None and not (isinstance(norm, dict) and norm.get("type") == "NFC"):
        raise UserError(f"tokenizer file {path} uses a normalizer azgpt does not write; {fix}.")
    pre = spec.get("pre_tokenizer")
    steps = (
        pre.get("pretokenizers", [])
        if isinstance(pre, dict) and pre.get("type") == "Sequence"
        else [pre]
    )
    for step in steps:
        if not isinstance(step, dict):
            raise UserError(f"tokenizer file {path} has no byte-level pre-tokenizer; {fix}.")
        if step.get("type") == "ByteLevel":
            continue
        pattern = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        if pattern not in PRETOKENIZERS.values():
            raise UserError(
                f"tokenizer file {path} uses a pre-tokenizer azgpt does not know "
                f"({step.get('type')}); {fix} (untrusted regexes can stall or crash encoding)."
            )


def load_tokenizer(dir_or_file: str | Path) -> Tokenizer:
    """Load DIR/tokenizer.json (or the file itself); a missing or corrupt file is a UserError."""
    path = tokenizer_path(dir_or_file)
    if not path.is_file():
        raise UserError(
            f"tokenizer file {path} does not exist; train one with `azgpt tokenizer train` or fix --tokenizer."
        )
    check_tokenizer_json(path)
    try:
        tok = Tokenizer.from_file(str(path))
    except (
        BaseException
    ) as e:  # a plain Exception for malformed JSON; a Rust panic is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(
            f"tokenizer file {path} is corrupt ({first}); retrain it with `azgpt tokenizer train`."
        ) from None
    if tok.token_to_id(EOT) is None:
        raise UserError(
            f"tokenizer file {path} has no {EOT} token; retrain it with `azgpt tokenizer train`."
        )
    # Text that looks like a special token ("<|endoftext|>" inside a document) is text: only
    # azgpt itself inserts special ids, so a document can never fake a document boundary.
    tok.encode_special_tokens = True
    return tok


def eot_id(tok: Tokenizer) -> int:
    return tok.token_to_id(EOT)


# Longest piece handed to the encoder at once. HF tokenizers holds ~175 bytes per input byte
# while encoding (offsets, words, alignments): a 30 MB one-line document took 5.2 GB. Pieces of
# 256 K characters keep that under ~200 MB whatever the document's length.
PIECE_CHARS = 1 << 18


def pieces(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """Cut `text` into pieces of at most ~max_chars at places where every azgpt pre-tokenizer
    cuts anyway, so encoding the pieces one by one gives exactly the ids of the whole.

    Preferred cut: right after a newline followed by a non-space character (no pre-tokenizer
    regex joins a newline to a following non-space). Else: before a single space that follows a
    non-space character and precedes a letter (the space then starts the next word's piece in
    all three regexes). A stretch with neither (hundreds of KB without a space) is cut hard."""
    if len(text) <= max_chars:
        return [text]
    out, start, n = [], 0, len(text)
    while n - start > max_chars:
        end = start + max_chars
        lo = start + max_chars // 2
        cut = -1
        i = text.rfind("\n", lo, end)
        while i != -1:
            if i + 1 < n and not text[i + 1].isspace():
                cut = i + 1
                break
            i = text.rfind("\n", lo, i)
        if cut == -1:
            i = text.rfind(" ", lo, end)
            while i != -1:
                if i + 1 < n and text[i + 1].isalpha() and not text[i - 1].isspace():
                    cut = i
                    break
                i = text.rfind(" ", lo, i)
        if cut == -1:
            cut = end
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Ids of `text` (no special tokens added), in bounded memory for any length."""
    if len(text) <= PIECE_CHARS:
        return tok.encode(text, add_special_tokens=False).ids
    ids: list[int] = []
    for p in pieces(text):
        ids += tok.encode(p, add_special_tokens=False).ids
    return ids


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)


def _byte_decoder() -> dict[str, int]:
    # The ByteLevel alphabet: printable bytes stand for themselves, the rest are shifted to 256+.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tok: Tokenizer) -> list[bytes]:
    """The exact bytes each id stands for (special tokens: their UTF-8 text)."""
    dec = _byte_decoder()
    out: list[bytes] = [b""] * tok.get_vocab_size()
    specials = set(SPECIAL_TOKENS)
    for s, i in tok.get_vocab().items():
        if s in specials:
            out[i] = s.encode("utf-8")
        else:
            out[i] = bytes(dec[c] for c in s)
    return out


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """Bytes of UTF-8 text per token id; special tokens count 0 (they are not text)."""
    lens = np.array([len(b) for b in token_bytes(tok)], dtype=np.int64)
    for s in SPECIAL_TOKENS:
        i = tok.token_to_id(s)
        if i is not None:
            lens[i] = 0
    return lens


def tiktoken_encoding(tok: Tokenizer, path: str | Path):
    """The same BPE as a tiktoken Encoding (ranks = our ids, merges in the same order), or None
    when tiktoken is missing or the tokenizer's pre-tokenizer is not one of ours.

    tiktoken merges by the rank of the merged token; our ids are assigned in merge order, so the
    two agree. `prepare` still checks identical ids on a sample before trusting it.
    """
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        pattern = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    except (KeyError, IndexError, TypeError, json.JSONDecodeError):
        return None
    tb = token_bytes(tok)
    specials = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS if tok.token_to_id(s) is not None}
    special_ids = set(specials.values())
    ranks = {b: i for i, b in enumerate(tb) if i not in special_ids}
    if len(ranks) != len(tb) - len(special_ids):
        return None
    try:
        return tiktoken.Encoding(
            name="azgpt", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
        )
    except Exception:
        return None


def nfc(text: str) -> str:
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def fertility(tok: Tokenizer, texts: Iterable[str]) -> dict:
    """Tokens per word, bytes per token and the share of words split into 3+ pieces."""
    n_words = n_tokens = n_bytes = split3 = 0
    cache: dict[str, int] = {}
    for text in texts:
        n_tokens += len(encode(tok, text))
        n_bytes += len(text.encode("utf-8"))
        for w in text.split():
            n_words += 1
            k = cache.get(w)
            if k is None:
                # A word as it appears mid-sentence: after a space.
                if len(cache) >= 200_000:  # bounded: a huge corpus has millions of word forms
                    cache.clear()
                k = cache[w] = len(encode(tok, " " + w))
            split3 += k >= 3
    if n_words == 0:
        raise UserError("the text given to `tokenizer stats` holds no words; give files with text.")
    return {
        "words": n_words,
        "tokens": n_tokens,
        "bytes": n_bytes,
        "tokens_per_word": round(n_tokens / n_words, 4),
        "bytes_per_token": round(n_bytes / n_tokens, 4),
        "share_words_3plus_tokens": round(split3 / n_words, 4),
    }
