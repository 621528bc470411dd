"""azgpt export --format gguf, checked by llama.cpp itself (through llama-cpp-python).

A small model is trained once on the embedded sample corpus; its GGUF files are loaded by
llama.cpp, which must tokenize id for id like azgpt, give azgpt's logits (f32), the same
greedy continuation, and bits per byte close to f32 for each quantization. model.arch=llama
checkpoints (llama.cpp's `llama`, or `qwen3` with QK-norm) are checked the same way: one tied
with grouped-query attention, one untied with QK-norm.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from trainkit import SAMPLE, make_data, tiny_config

from azgpt.checkpoint import load_model
from azgpt.errors import UserError
from azgpt.export_gguf import (
    check_llama_cpp_tokenizer,
    export_gguf,
    llama_cpp_incompatibility,
)
from azgpt.text import AZ_LOWER, AZ_UPPER
from azgpt.tokenizer import EOT, SPECIAL_TOKENS, decode, encode, load_tokenizer, train_tokenizer
from azgpt.train import train

gguf = pytest.importorskip("gguf")  # the gguf extra; `make test` installs it

VOCAB = 1024
BLOCK = 128


def need_llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python (`pip install azgpt[gguf]`)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The default tokenizer and token files of the sample corpus."""
    return make_data(tmp_path_factory.mktemp("gguf"), vocab=VOCAB)


@pytest.fixture(scope="module")
def run(data):
    """A 2-layer model of width 256 (K-quant blocks are 256 wide), context 128, trained for 24
    steps on the sample corpus, with the default tokenizer."""
    tok, d = data
    base = d.parent
    over = {
        "model.vocab_size": VOCAB,
        "model.block_size": BLOCK,
        "model.n_embd": 256,
        "model.n_head": 4,
        "train.max_iters": 24,
        "train.eval_interval": 24,
        "train.batch_size": 4,
    }
    train(tiny_config(tok, d, base / "run", **over))
    return base / "run" / "last", tok


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """One GGUF per quantization that this installation can write."""
    out = tmp_path_factory.mktemp("gguf-files")
    quants = ["f32", "f16", "q8_0", "q4_0"]
    try:
        import llama_cpp  # noqa: F401

        quants.append("q4_k_m")
    except ImportError:
        pass
    files = {}
    for q in quants:
        files[q], _ = export_gguf(
            str(run[0]), str(out / f"m-{q}.gguf"), quant=q, modelfile=str(out / f"Modelfile-{q}")
        )
    return files


@pytest.fixture(scope="module")
def model(run):
    m, _ = load_model(run[0])
    return m.eval()


@pytest.fixture(scope="module")
def tok(data):
    return load_tokenizer(data[0])


def _llama(path, **kw):
    llama_cpp = need_llama_cpp()
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=BLOCK,
        n_batch=BLOCK,
        n_ubatch=BLOCK,
        n_threads=1,  # the machine running the tests is shared; 2 threads spin-wait
        logits_all=True,
        verbose=False,
        **kw,
    )


@pytest.fixture(scope="module")
def vocab_only(exported):
    return _llama(exported["f32"], vocab_only=True)


# ----------------------------------------------------------------------------- tokenization

ADVERSARIAL = {
    "letters-lower": " ".join(AZ_LOWER),
    "letters-upper": " ".join(AZ_UPPER),
    "letters-glued": AZ_LOWER + AZ_UPPER + AZ_LOWER,
    "dotted-dotless": "İ i I ı İI Iİ ıi iı İSTANBUL İstanbul ISTANBUL ıstanbul istanbul IĞDIR Iğdır",
    "case-words": "ƏLİYEV Əliyev əliyev ŞƏKİ Şəki ÇÖL Çöl ĞÜ Ğü ÖZÜ Özü",
    "digits": "0 1 12 123 1234 12345 123456 1234567890123456789 3.14159 1,000,000 -42 +7",
    "numbers-in-words": "2024-cü ildə 15%-ə 1990-cı 3x4 A4 COVID-19 mp3 ½ x² Ⅻ ٣ ① ١٢٣",
    "emoji": "🎓 ❤️ 👨\u200d👩\u200d👧 🇦🇿 👍🏽 😀😀😀 🤔! a🙂b",
    "cyrillic": "Баку — столица. Азәрбајҹан Республикасы, Ҝәнҹә, Һәсән. ЁЖЗ ёжз",
    "other-scripts": "مرحبا آذربایجان עברית Ελληνικά 日本語の中文 한국어 हिन्दी ไทย ქართული Հայերեն",
    "spaces": "a" + " " * 40 + "b  c   d",
    "newlines": "\n\n\nSalam\n\n\n\n\ndünya\n \n  \n\t\n",
    "crlf": "Salam\r\ndünya\r\n\r\n  \r\n x\r",
    "tabs-and-odd-spaces": "\t\tSalam\t dünya \u00a0 x\u3000y\u2009z\u2028w \u200b",
    "only-whitespace": "   \n\t  \n ",
    "special-text": "Salam <|endoftext|> dünya <|pad|><|user|>x<|assistant|> <|reserved_0|>",
    "special-glued": "a<|endoftext|>b<|endoftext|><|endoftext|>",
    "contractions": "It's I'LL we'Ve they'D you'RE don't O'Neil Bakı'da Azərbaycan’ın rock'n'roll",
    "punctuation": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ “”‘’«»„—–…№°€₼ ...!!! ?!",
    "control": "a\x01b\x07c\x7fd\x1b[0m",
    "mixed-line": "«Ötən ay» — Şəki, Çinar (İlin ən gözəl müəllimi) 12.03.2024 saat 09:30-da 🎓\n",
}


def test_ids_match_on_the_sample_corpus(vocab_only, tok):
    docs = [p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt"))]
    pieces = docs + [line for d in docs for line in d.splitlines()]
    for text in pieces:
        got = vocab_only.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert got == encode(tok, text), text[:80]


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_ids_match_on_adversarial_text(vocab_only, tok, name):
    text = ADVERSARIAL[name]
    ids = encode(tok, text)
    assert vocab_only.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids
    assert vocab_only.detokenize(ids).decode("utf-8") == decode(tok, ids) == text


def test_each_letter_alone_and_in_context(vocab_only, tok):
    for ch in AZ_LOWER + AZ_UPPER:
        for text in (ch, " " + ch, ch * 3, f"«{ch}»", f"'{ch}", f"{ch}1", f"\n{ch}"):
            ids = vocab_only.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            assert ids == encode(tok, text), repr(text)


def test_bos_is_endoftext_and_added_automatically(vocab_only, tok):
    eot = tok.token_to_id(EOT)
    assert vocab_only.token_bos() == vocab_only.token_eos() == eot
    text = "Azərbaycanın paytaxtı"
    assert vocab_only.tokenize(text.encode(), add_bos=True) == [eot] + encode(tok, text)
    # Asked to parse special tokens, llama.cpp maps their text to the control ids.
    assert vocab_only.tokenize(b"<|endoftext|>", add_bos=False, special=True) == [eot]


# ----------------------------------------------------------------------------- the model


def _prompts(tok) -> list[list[int]]:
    texts = [
        "Azərbaycanın paytaxtı",
        "Bakı Xəzər dənizinin sahilində yerləşir və",
        "İlham, Ağdam, Gəncə — «Şəki» 2024!",
        "Salam",
    ]
    eot = tok.token_to_id(EOT)
    docs = (SAMPLE / "geography.txt").read_text(encoding="utf-8")
    return [[eot] + encode(tok, t) for t in texts] + [([eot] + encode(tok, docs))[:BLOCK]]


def _azgpt_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out[0] if isinstance(out, tuple) else out)[0].double().numpy()


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def test_f32_logits_match_azgpt(exported, model, tok):
    llm = _llama(exported["f32"])
    for ids in _prompts(tok):
        ours = _azgpt_logits(model, ids)
        theirs = _llama_logits(llm, ids)
        # Within 1e-3 of the largest logit, at every position.
        rel = np.abs(theirs - ours).max(axis=1) / np.abs(ours).max(axis=1)
        assert rel.max() < 1e-3, rel.max()


def _greedy_both(model, llm, ids: list[int], n: int) -> tuple[list[int], list[int]]:
    """n greedy tokens after `ids` from azgpt and from llama.cpp."""
    with torch.no_grad():
        ours = [int(t) for t in model.generate(torch.tensor([ids]), n, temperature=0)]
    llm.reset()
    llm.eval(ids)
    theirs = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(nxt)
        llm.eval([nxt])
    return ours, theirs


def test_f32_greedy_continuation_is_identical(exported, model, tok):
    ids = [tok.token_to_id(EOT)] + encode(tok, "Azərbaycanın paytaxtı")
    ours, theirs = _greedy_both(model, _llama(exported["f32"]), ids, 64)
    assert len(ours) == 64 and theirs == ours


def _bits_per_byte(llm, tok, docs) -> float:
    eot = tok.token_to_id(EOT)
    nats, nbytes = 0.0, 0
    for doc in docs:
        ids = ([eot] + encode(tok, doc))[:BLOCK]
        logits = _llama_logits(llm, ids)
        logp = logits - logits.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        nats -= sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1))
        nbytes += len(decode(tok, ids[1:]).encode("utf-8"))
    return nats / (math.log(2) * nbytes)


def _bpb_and_sizes(files: dict, tok) -> tuple[dict, dict]:
    """llama.cpp's bits per byte on six sample documents, and the size, of each GGUF file."""
    text = (SAMPLE / "dialogue.txt").read_text(encoding="utf-8")
    docs = [d for d in text.split("\n\n") if d.strip()][:6]
    bpb = {q: _bits_per_byte(_llama(p), tok, docs) for q, p in files.items()}
    return bpb, {q: p.stat().st_size for q, p in files.items()}


def test_quantized_files_stay_close_to_f32(exported, tok):
    need_llama_cpp()
    bpb, size = _bpb_and_sizes(exported, tok)
    # A barely trained 2.7M-parameter model (24 steps, bpb 3.28) has flat logits, so every
    # type lands close: measured relative changes f16 6e-7, q8_0 3e-6, q4_0 2e-5, q4_k_m 7e-5.
    # A wrong layout or scale moves bpb by far more. bench/gguf.py measures a trained model.
    assert bpb["f16"] == pytest.approx(bpb["f32"], rel=1e-4)
    assert bpb["q8_0"] == pytest.approx(bpb["f32"], rel=1e-3)
    assert bpb["q4_0"] == pytest.approx(bpb["f32"], rel=1e-2)
    assert size["f16"] < 0.6 * size["f32"] and size["q8_0"] < 0.6 * size["f16"]
    assert size["q4_0"] < size["q8_0"]
    if "q4_k_m" in exported:
        assert bpb["q4_k_m"] == pytest.approx(bpb["f32"], rel=1e-2)
        assert size["q4_k_m"] < size["q8_0"]


def test_q4_k_m_holds_k_quants(exported):
    need_llama_cpp()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(exported["q4_k_m"]).tensors}
    assert {"Q4_K", "Q6_K"} <= set(types.values())
    assert types["position_embd.weight"] == "F32" and types["blk.0.attn_norm.bias"] == "F32"


# ----------------------------------------------------------------------------- file contents


def test_metadata_vocabulary_and_tensor_types(exported, run, tok):
    r = gguf.GGUFReader(exported["q8_0"])
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "gpt2"
    assert f["gpt2.context_length"] == BLOCK and f["gpt2.block_count"] == 2
    assert f["gpt2.embedding_length"] == 256 and f["gpt2.attention.head_count"] == 4
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama-bpe"
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == VOCAB and tokens == [
        s for s, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    ]
    types = f["tokenizer.ggml.token_type"]
    control = {tok.token_to_id(s) for s in SPECIAL_TOKENS}
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == control
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(types) if i not in control)
    spec = json.loads(Path(run[1], "tokenizer.json").read_text(encoding="utf-8"))
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
    eot = tok.token_to_id(EOT)
    assert f["tokenizer.ggml.bos_token_id"] == f["tokenizer.ggml.eos_token_id"] == eot
    assert f["tokenizer.ggml.padding_token_id"] == tok.token_to_id("<|pad|>")
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.ggml.add_eos_token"] is False
    meta = json.loads((run[0] / "meta.json").read_text())
    assert f["azgpt.tokenizer_sha256"] == meta["tokenizer_sha256"]
    assert f["azgpt.training_tokens"] == meta["tokens_seen"] > 0
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    t = {x.name: x.tensor_type.name for x in r.tensors}
    assert "output.weight" not in t  # tied: llama.cpp reuses token_embd
    assert t["token_embd.weight"] == t["blk.1.ffn_down.weight"] == "Q8_0"
    assert t["position_embd.weight"] == t["output_norm.bias"] == "F32"
    assert len(t) == 2 + 12 * 2 + 2


def test_padded_vocabulary_is_marked_unused(tmp_path, run):
    # A model whose vocabulary is larger than its tokenizer's: the extra ids are unused tokens.
    from azgpt.checkpoint import save_model_files
    from azgpt.model import GPT

    m, _ = load_model(run[0])
    cfg = m.config
    cfg2 = type(cfg)(**{**cfg.to_dict(), "vocab_size": VOCAB + 64, "bias": False})
    ck = tmp_path / "ck"
    ck.mkdir()
    save_model_files(GPT(cfg2), ck)
    shutil.copy(Path(run[1]) / "tokenizer.json", ck / "tokenizer.json")
    path, _ = export_gguf(str(ck), str(tmp_path / "p.gguf"), quant="f32")
    f = {k: v.contents() for k, v in gguf.GGUFReader(path).fields.items()}
    types = f["tokenizer.ggml.token_type"]
    assert len(types) == VOCAB + 64
    assert set(types[VOCAB:]) == {gguf.TokenType.UNUSED}
    assert f["azgpt.training_tokens"] == 0  # no meta.json: nothing recorded


def test_bias_free_model_gives_the_same_logits(tmp_path, run, tok):
    # llama.cpp's gpt2 needs biases; a bias=false model is written with zeros.
    from azgpt.checkpoint import save_model_files
    from azgpt.model import GPT

    m, _ = load_model(run[0])
    torch.manual_seed(0)
    g = GPT(type(m.config)(**{**m.config.to_dict(), "bias": False})).eval()
    ck = tmp_path / "ck"
    ck.mkdir()
    save_model_files(g, ck)
    shutil.copy(Path(run[1]) / "tokenizer.json", ck / "tokenizer.json")
    path, _ = export_gguf(str(ck), str(tmp_path / "nb.gguf"), quant="f32")
    llm = _llama(path)
    ids = _prompts(tok)[1]
    ours = _azgpt_logits(g, ids)
    theirs = _llama_logits(llm, ids)
    assert (np.abs(theirs - ours).max(axis=1) / np.abs(ours).max(axis=1)).max() < 1e-3


def test_modelfile(exported, run):
    mf = exported["q8_0"].parent / "Modelfile-q8_0"
    text = mf.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    documented = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE"}
    assert {ln.split()[0] for ln in lines} <= documented
    assert "FROM ./m-q8_0.gguf" in lines
    assert (mf.parent / "m-q8_0.gguf").is_file()
    assert 'TEMPLATE """{{ .Prompt }}"""' in lines
    params = {tuple(ln.split(None, 2)[1:]) for ln in lines if ln.startswith("PARAMETER")}
    assert params == {
        ("temperature", "0.8"),
        ("top_k", "50"),
        ("top_p", "0.95"),
        ("num_ctx", str(BLOCK)),
        ("stop", '"<|endoftext|>"'),
    }


def test_default_modelfile_beside_the_gguf_and_elsewhere(run, tmp_path):
    p, mf = export_gguf(str(run[0]), str(tmp_path / "a" / "m.gguf"), quant="q8_0")
    assert mf == tmp_path / "a" / "Modelfile" and "FROM ./m.gguf" in mf.read_text()
    p, mf = export_gguf(
        str(run[0]), str(tmp_path / "b" / "m.gguf"), modelfile=str(tmp_path / "c" / "Modelfile")
    )
    assert "FROM ../b/m.gguf" in mf.read_text()


def test_cli_writes_the_files(run, tmp_path, capsys):
    from azgpt.cli import main

    args = _gguf_args(run[0], tmp_path / "m.gguf", "--quant", "q4_0")
    assert main([str(a) for a in args]) == 0
    assert (tmp_path / "m.gguf").is_file() and (tmp_path / "Modelfile").is_file()
    assert "q4_0" in capsys.readouterr().out
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_qkv.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q8_0"  # the tied output head keeps 8 bits


# ----------------------------------------------------------------------------- llama-arch models

# model.arch = "llama": without QK-norm llama.cpp's `llama` (which ropes adjacent pairs, so the
# export reorders query and key rows), with QK-norm its `qwen3` (which ropes halves, as azgpt).
LLAMA_CASES = {
    "gqa-tied": ("llama", {"model.n_kv_head": 2}),
    "qknorm-untied": (
        "qwen3",
        {"model.qk_norm": True, "model.tie_embeddings": False, "model.rope_theta": 50000.0},
    ),
}
LLAMA_QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")


@pytest.fixture(scope="module", params=list(LLAMA_CASES))
def llama_case(request, data, tmp_path_factory):
    """One llama-arch case: llama.cpp's architecture name, a checkpoint trained for 24 steps (as
    `run`, SwiGLU width 512 so K-quant blocks fit) with its GGUF files, and a checkpoint of random
    weights shaped to make a wrong export show (see `_shaped`) with its f32 GGUF file."""
    need_llama_cpp()
    tok, d = data
    base = tmp_path_factory.mktemp(f"llama-{request.param}")
    gguf_arch, extra = LLAMA_CASES[request.param]
    over = {
        "model.arch": "llama",
        "model.bias": False,
        "model.vocab_size": VOCAB,
        "model.block_size": BLOCK,
        "model.n_embd": 256,
        "model.n_head": 4,
        "model.mlp_hidden": 512,
        "train.max_iters": 24,
        "train.eval_interval": 24,
        "train.batch_size": 4,
        **extra,
    }
    train(tiny_config(tok, d, base / "run", **over))
    trained = base / "run" / "last"
    files = {
        q: export_gguf(str(trained), str(base / f"t-{q}.gguf"), quant=q, modelfile=str(base / q))[0]
        for q in LLAMA_QUANTS
    }
    m, _ = load_model(trained)
    shaped = _save_checkpoint(_shaped(m.config), base / "shaped", tok)
    shaped_f32, _ = export_gguf(str(shaped), str(base / "s-f32.gguf"), quant="f32")
    return {
        "arch": gguf_arch,
        "trained": trained,
        "files": files,
        "shaped": shaped,
        "shaped_f32": shaped_f32,
    }


def _shaped(cfg):
    """A model of config `cfg` with random weights: norm gains spread around 1 (so a norm put in
    the wrong place shows) and the query, key and output projections 4x larger than at
    initialisation, so attention is sharp (a rotary layout error moves the logits far) and greedy
    decoding wanders over many tokens rather than repeating one."""
    from azgpt.model import GPT

    torch.manual_seed(0)
    m = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(("attn.c_q.weight", "attn.c_k.weight", "c_proj.weight")):
                p.mul_(4)
    return m


def _save_checkpoint(model, ck: Path, tok_dir) -> Path:
    from azgpt.checkpoint import save_model_files

    ck.mkdir()
    save_model_files(model, ck)
    shutil.copy(Path(tok_dir) / "tokenizer.json", ck / "tokenizer.json")
    return ck


def _llama_f32_cache(path):
    """llama.cpp with an f32 KV cache: the file's own function, without the f16 rounding of
    cached keys and values that llama.cpp applies by default."""
    llama_cpp = need_llama_cpp()
    return _llama(path, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def _rel_err(theirs: np.ndarray, ours: np.ndarray) -> float:
    """The largest difference at any position, relative to that position's largest logit."""
    return float((np.abs(theirs - ours).max(axis=1) / np.abs(ours).max(axis=1)).max())


def test_llama_file_holds_llama_cpp_architecture(llama_case):
    c = llama_case
    m, _ = load_model(c["trained"])
    cfg = m.config
    r = gguf.GGUFReader(c["files"]["f32"])
    f = {k: v.contents() for k, v in r.fields.items()}
    a = c["arch"]
    hs = cfg.n_embd // cfg.n_head
    assert f["general.architecture"] == a
    assert f[f"{a}.context_length"] == BLOCK and f[f"{a}.block_count"] == cfg.n_layer
    assert f[f"{a}.embedding_length"] == cfg.n_embd
    assert f[f"{a}.feed_forward_length"] == 512
    assert f[f"{a}.attention.head_count"] == cfg.n_head
    assert f[f"{a}.attention.head_count_kv"] == cfg.kv_heads
    assert f[f"{a}.attention.key_length"] == f[f"{a}.attention.value_length"] == hs
    assert f[f"{a}.rope.dimension_count"] == hs
    assert f[f"{a}.rope.freq_base"] == cfg.rope_theta
    assert f[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["tokenizer.ggml.pre"] == "llama-bpe" and f["tokenizer.ggml.add_bos_token"] is True
    shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}  # ggml order: (in, out)
    per_block = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down"}  # fmt: skip
    if cfg.qk_norm:
        per_block |= {"attn_q_norm", "attn_k_norm"}
    want = {f"blk.{i}.{t}.weight" for i in range(cfg.n_layer) for t in per_block}
    want |= {"token_embd.weight", "output_norm.weight"}
    if not cfg.tie_embeddings:
        want.add("output.weight")  # tied: none, llama.cpp reuses token_embd
    assert set(shapes) == want
    assert shapes["blk.0.attn_k.weight"] == [cfg.n_embd, cfg.kv_heads * hs]
    assert shapes["blk.0.ffn_down.weight"] == [512, cfg.n_embd]
    if cfg.qk_norm:
        assert shapes["blk.1.attn_q_norm.weight"] == [hs]


def test_llama_f32_logits_match_azgpt(llama_case, tok):
    # The longest prompt is 128 tokens: rotary angles at far positions differ by a lot if a
    # query/key layout were wrong. Shaped random weights make attention sharp; the trained
    # checkpoint is what `azgpt train` writes. llama.cpp runs with an f32 KV cache: its default
    # f16 cache alone moves these logits by up to ~9e-4 of the largest one.
    prompts = _prompts(tok)
    assert max(len(p) for p in prompts) == BLOCK
    for ck, path in ((llama_case["shaped"], llama_case["shaped_f32"]),
                     (llama_case["trained"], llama_case["files"]["f32"])):  # fmt: skip
        model, _ = load_model(ck)
        model.eval()
        llm = _llama_f32_cache(path)
        for ids in prompts:
            # measured: at most 1e-5 of the largest logit (f32 arithmetic in another order)
            assert _rel_err(_llama_logits(llm, ids), _azgpt_logits(model, ids)) < 1e-4


def test_llama_a_rope_layout_error_would_show(llama_case, tok, tmp_path, monkeypatch):
    # The same export with the other architecture's rotary layout: llama.cpp's logits then
    # disagree with azgpt's far beyond the tolerance above, so that check can fail.
    import azgpt.export_gguf as mod

    right = mod._llama_tensors
    swap = {"llama": "qwen3", "qwen3": "llama"}
    monkeypatch.setattr(mod, "_llama_tensors", lambda sd, c, arch: right(sd, c, swap[arch]))
    path, _ = export_gguf(str(llama_case["shaped"]), str(tmp_path / "w.gguf"), quant="f32")
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == llama_case["arch"]
    model, _ = load_model(llama_case["shaped"])
    ids = _prompts(tok)[-1]
    theirs = _llama_logits(_llama_f32_cache(path), ids)
    assert _rel_err(theirs, _azgpt_logits(model.eval(), ids)) > 0.05  # measured: 1.3 to 1.7


def test_llama_f32_greedy_continuation_is_identical(llama_case, tok):
    model, _ = load_model(llama_case["shaped"])
    model.eval()
    llm = _llama_f32_cache(llama_case["shaped_f32"])
    ids = [tok.token_to_id(EOT)] + encode(tok, "Azərbaycanın paytaxtı")
    ours, theirs = _greedy_both(model, llm, ids, 32)
    assert len(ours) == 32 and theirs == ours
    assert len(set(ours)) >= 8  # a varied continuation, not one token repeated


def test_llama_quantized_files_stay_close_to_f32(llama_case, tok):
    files = llama_case["files"]
    model, _ = load_model(llama_case["trained"])
    model.eval()
    ids = _prompts(tok)[-1]
    ours = _azgpt_logits(model, ids)
    rel = {q: _rel_err(_llama_logits(_llama(files[q]), ids), ours) for q in ("f16", "q8_0")}
    # measured: f16 <= 8e-4, q8_0 <= 2.1e-2 of the largest logit (a wrong layout: ~1)
    assert rel["f16"] < 5e-3 and rel["q8_0"] < 0.1, rel
    bpb, size = _bpb_and_sizes(files, tok)
    assert bpb["f16"] == pytest.approx(bpb["f32"], rel=1e-4)
    assert bpb["q8_0"] == pytest.approx(bpb["f32"], rel=1e-3)
    assert bpb["q4_0"] == pytest.approx(bpb["f32"], rel=1e-2)
    assert bpb["q4_k_m"] == pytest.approx(bpb["f32"], rel=1e-2)
    assert size["f16"] < 0.6 * size["f32"] and size["q8_0"] < 0.6 * size["f16"]
    assert size["q4_0"] < size["q8_0"] and size["q4_k_m"] < size["q8_0"]


def test_llama_quantized_tensor_types(llama_case):
    files = llama_case["files"]
    untied = llama_case["arch"] == "qwen3"
    head = "output.weight" if untied else "token_embd.weight"
    q40 = {t.name: t.tensor_type.name for t in gguf.GGUFReader(files["q4_0"]).tensors}
    assert q40["blk.0.attn_q.weight"] == q40["blk.1.ffn_down.weight"] == "Q4_0"
    assert q40[head] == "Q8_0"  # the output head keeps 8 bits
    if untied:
        assert q40["token_embd.weight"] == "Q4_0"
        assert q40["blk.0.attn_q_norm.weight"] == "F32"
    assert q40["output_norm.weight"] == q40["blk.0.attn_norm.weight"] == "F32"
    km = {t.name: t.tensor_type.name for t in gguf.GGUFReader(files["q4_k_m"]).tensors}
    assert {"Q4_K", "Q6_K"} <= set(km.values())
    assert km[head] == "Q6_K" and km["output_norm.weight"] == "F32"


# ----------------------------------------------------------------------------- the tokenizer check


def _bpe_json(vocab: dict, merges: list) -> str:
    """A tokenizer.json with the default pipeline around a hand-made BPE model."""
    base = json.loads(train_tokenizer(["ab"] * 4, vocab_size=300).to_str())
    base["model"].update({"vocab": vocab, "merges": merges})
    base["added_tokens"] = []
    return json.dumps(base)


def test_check_accepts_the_default_tokenizer(run):
    assert llama_cpp_incompatibility(Path(run[1]) / "tokenizer.json") is None


@pytest.mark.parametrize("pretok", ["az", "gpt2"])
def test_check_refuses_other_pretokenizers(tmp_path, pretok):
    from azgpt.tokenizer import save_tokenizer

    docs = [(SAMPLE / "history.txt").read_text(encoding="utf-8")]
    path = save_tokenizer(train_tokenizer(docs, vocab_size=300, pretokenizer=pretok), tmp_path)
    with pytest.raises(UserError) as e:
        check_llama_cpp_tokenizer(path)
    msg = str(e.value)
    assert f"'{pretok}' pre-tokenizer" in msg and "--pretokenizer gpt4" in msg
    assert "\n" not in msg and msg.endswith("token files.")


def test_check_needs_whole_word_tokens_only_when_merges_disagree(tmp_path):
    # vocab a b c ab bc abc; merges "b c" before "a b": replaying merges turns "abc" into
    # a + bc, while llama.cpp's llama-bpe takes the whole-word token abc.
    byte = {chr(c): i for i, c in enumerate(range(ord("a"), ord("d")))}
    vocab = {**byte, "bc": 3, "ab": 4, "abc": 5}
    spec = json.loads(_bpe_json(vocab, [["b", "c"], ["a", "b"], ["ab", "c"]]))
    spec["added_tokens"] = [
        {"id": 6, "content": EOT, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
    ]  # fmt: skip
    spec["model"]["vocab"][EOT] = 6
    p = tmp_path / "t.json"
    for ignore, ok in ((True, True), (False, False)):
        spec["model"]["ignore_merges"] = ignore
        p.write_text(json.dumps(spec), encoding="utf-8")
        why = llama_cpp_incompatibility(p)
        assert (why is None) == ok, why
    assert "do not rebuild 1 of its tokens" in why
    # Consistent merges: a tokenizer without ignore_merges is still accepted.
    spec["model"]["merges"] = [["a", "b"], ["b", "c"], ["ab", "c"]]
    p.write_text(json.dumps(spec), encoding="utf-8")
    assert llama_cpp_incompatibility(p) is None


def test_check_refuses_a_lowercasing_normalizer(run, tmp_path):
    spec = json.loads(Path(run[1], "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Lowercase"}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(spec), encoding="utf-8")
    assert "Lowercase normalizer" in llama_cpp_incompatibility(p)


# ----------------------------------------------------------------------------- bad input


def _fails(capsys, args, *needles: str) -> str:
    """Run `azgpt ARGS` in this process; it must exit 2 with one sentence naming `needles`."""
    from azgpt.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("azgpt: error: ") and "Traceback" not in err and "\n" not in err
    for n in needles:
        assert n in err, err
    return err


def _gguf_args(ckpt, out, *extra):
    return ["export", "--ckpt", ckpt, "--format", "gguf", "--out", out, *extra]


def test_unknown_quant(run, tmp_path, capsys):
    _fails(capsys, _gguf_args(run[0], tmp_path / "m.gguf", "--quant", "q3_k"), "--quant", "q4_k_m")
    assert not list(tmp_path.iterdir())
    with pytest.raises(UserError, match="--quant must be one of"):
        export_gguf(str(run[0]), str(tmp_path / "m.gguf"), quant="int4")


def test_quant_without_gguf_format(run, tmp_path, capsys):
    args = ["export", "--ckpt", run[0], "--out", tmp_path / "hf", "--quant", "f16"]
    _fails(capsys, args, "--format gguf")
    assert not (tmp_path / "hf").exists()


def test_incompatible_tokenizer_is_refused_before_writing(run, tmp_path, capsys):
    # A checkpoint whose tokenizer uses azgpt's "az" regex, which llama.cpp cannot run.
    from azgpt.fsutil import sha256_file
    from azgpt.tokenizer import save_tokenizer

    texts = [p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt"))]
    ck = tmp_path / "ck"
    shutil.copytree(run[0], ck)
    tok = train_tokenizer(texts, vocab_size=VOCAB, pretokenizer="az")
    save_tokenizer(tok, tmp_path / "az")
    shutil.copy(tmp_path / "az" / "tokenizer.json", ck / "tokenizer.json")
    meta = json.loads((ck / "meta.json").read_text())
    meta["tokenizer_sha256"] = sha256_file(ck / "tokenizer.json")
    (ck / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "o" / "m.gguf"
    _fails(capsys, _gguf_args(ck, out), "'az' pre-tokenizer", "--pretokenizer gpt4")
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_missing_and_corrupt_checkpoint(run, tmp_path, capsys):
    _fails(capsys, _gguf_args(tmp_path / "nope", tmp_path / "m.gguf"), "does not exist")
    bad = tmp_path / "bad"
    shutil.copytree(run[0], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(capsys, _gguf_args(bad, tmp_path / "m.gguf"), "model.safetensors")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "Modelfile").exists()


def test_existing_output_needs_force(run, tmp_path, capsys):
    from azgpt.cli import main

    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    _fails(capsys, _gguf_args(run[0], out), "exists", "--force")
    assert out.read_bytes() == b"keep" and not (tmp_path / "Modelfile").exists()
    out.unlink()
    # A Modelfile that azgpt did not write is kept; this export's goes beside it as m.Modelfile.
    (tmp_path / "Modelfile").write_text("mine")
    assert main([str(a) for a in _gguf_args(run[0], out)]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and (tmp_path / "Modelfile").read_text() == "mine"
    assert "FROM ./m.gguf" in (tmp_path / "m.Modelfile").read_text()
    # --force replaces azgpt's own files (both of them), and only those.
    before = out.stat().st_mtime_ns
    assert main([str(a) for a in _gguf_args(run[0], out, "--force")]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and out.stat().st_mtime_ns >= before
    assert (tmp_path / "Modelfile").read_text() == "mine"


def test_out_is_a_folder(run, tmp_path, capsys):
    _fails(capsys, _gguf_args(run[0], tmp_path), "is a folder")


def test_disk_full_while_writing(run, tmp_path, monkeypatch):
    # The disk fills up half way through the tensors: one sentence, no file under either name.
    def full(self, *a, **k):
        self.fout[0].write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    with pytest.raises(UserError, match=r"No space left on device; free some space") as e:
        export_gguf(str(run[0]), str(tmp_path / "m.gguf"), quant="q8_0")
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_too_little_free_space_is_refused_up_front(run, tmp_path, monkeypatch):
    import types

    import azgpt.export_gguf as mod

    monkeypatch.setattr(mod.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1000))
    with pytest.raises(UserError, match="MB free but the export needs about"):
        export_gguf(str(run[0]), str(tmp_path / "m.gguf"), quant="f32")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE")
@pytest.mark.parametrize("quant", ["f16", pytest.param("q4_k_m", marks=pytest.mark.slow)])
def test_write_error_from_the_file_system(run, tmp_path, quant):
    # A real failing write (file size limit, as a full disk): the gguf writer's and llama.cpp's
    # quantizer's errors both end as one sentence and leave nothing behind.
    if quant == "q4_k_m":
        need_llama_cpp()
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    r = subprocess.run(
        [sys.executable, "-m", "azgpt", "export", "--ckpt", str(run[0]), "--format", "gguf",
         "--quant", quant, "--out", str(tmp_path / "m.gguf")],
        capture_output=True, text=True, preexec_fn=limit, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.startswith("azgpt: error: cannot write") and "\n" not in err
    assert "m.gguf" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_cli_exports_a_llama_checkpoint(run, tmp_path, capsys):
    # arch=llama checkpoints export too (no refusal); llama.cpp loads the file.
    from azgpt.cli import main
    from azgpt.config import ModelConfig
    from azgpt.model import GPT

    m, _ = load_model(run[0])
    torch.manual_seed(0)
    cfg = ModelConfig(**{**m.config.to_dict(), "arch": "llama", "bias": False})
    ck = _save_checkpoint(GPT(cfg), tmp_path / "ck", run[1])
    out = tmp_path / "m.gguf"
    assert main([str(a) for a in _gguf_args(ck, out, "--quant", "q8_0")]) == 0
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    assert "FROM ./m.gguf" in (tmp_path / "Modelfile").read_text()
    llm = _llama(out)
    ids = _prompts(load_tokenizer(run[1]))[1]
    assert _llama_logits(llm, ids).shape == (len(ids), VOCAB)
