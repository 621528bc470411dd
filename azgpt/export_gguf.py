"""Export a checkpoint to one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile.

One writer serves both of azgpt's model flavours; small per-architecture functions pick
llama.cpp's architecture, its tensor names and its hyperparameter keys:

- model.arch "gpt2" is llama.cpp's `gpt2`: learned positions, pre-LayerNorm blocks, one fused
  QKV projection split q|k|v, tanh GELU, a head tied to the token embedding (llama.cpp reuses
  `token_embd` when no `output` tensor is stored). Models trained with bias=false get zero
  biases, which `gpt2` requires.
- model.arch "llama" is llama.cpp's `llama`, or `qwen3` when QK-norm is on (`qwen3` is llama
  plus a per-head RMSNorm of queries and keys, `attn_q_norm`/`attn_k_norm`, one weight of
  head_size shared by all heads, as azgpt's): RMSNorm, SwiGLU (`ffn_gate`, `ffn_up`,
  `ffn_down`), rotary positions, grouped-query attention (`head_count_kv`), no biases. A tied
  head stores no `output` tensor; an untied one stores it. Rotary layouts differ: azgpt rotates
  the pairs (i, i + hs/2) of each head ("rotate half", llama.cpp's NEOX rope, which `qwen3`
  uses), while llama.cpp's `llama` rotates adjacent pairs (2i, 2i + 1). For `llama` the rows of
  each query and key head are therefore reordered so that row 2i holds azgpt's row i and row
  2i + 1 its row i + hs/2; attention scores are unchanged, as queries and keys move alike.

nn.Linear keeps its weights (out, in), which is GGUF's row-major layout for ggml's (in, out), so
unlike the transformers export nothing is transposed.

The file is written with the `gguf` package (maintained by the llama.cpp project). It writes
f32, f16, q8_0 and q4_0 itself; q4_k_m is made by llama.cpp's own quantizer
(`llama_model_quantize`, through llama-cpp-python) from an f32 file written first.

The tokenizer goes in as llama.cpp's `gpt2` BPE with the `llama-bpe` pre-tokenizer, which is
azgpt's default (`gpt4`) regex. `check_llama_cpp_tokenizer` refuses, before anything is
written, a tokenizer that llama.cpp would split differently. llama.cpp does not normalise
text: azgpt applies NFC first, so ids agree on NFC text (what `azgpt clean` writes and what
keyboards type) and can differ on decomposed (NFD) input.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chat_template import JINJA_TEMPLATE, OLLAMA_TEMPLATE
from .errors import UserError
from .fsutil import atomic_path, fsync_dir
from .sample import SAMPLING  # the Modelfile samples as `azgpt sample` does
from .tokenizer import EOT, PRETOKENIZERS, build_tokenizer

QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")
LLAMA_CPP_PRE = "llama-bpe"  # llama.cpp's name for Llama-3's regex = azgpt's "gpt4"
PAD = "<|pad|>"


def _retrain_hint() -> str:
    return (
        "retrain it with `azgpt tokenizer train ... --pretokenizer gpt4` (the default) "
        "and train the model on the new token files"
    )


# ----------------------------------------------------------------------------- tokenizer check


def llama_cpp_incompatibility(tokenizer_json: str | Path) -> str | None:
    """Why llama.cpp would tokenize differently from this tokenizer.json, or None if it would
    give the same ids on NFC text."""
    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"is a {model.get('type')} model, not a byte-level BPE"
    if model.get("byte_fallback") or model.get("dropout") or model.get("unk_token"):
        return "uses byte fallback, dropout or an unknown token, which llama.cpp's BPE does not"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "uses subword prefixes or suffixes, which llama.cpp's BPE does not"
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        return f"applies a {norm.get('type')} normalizer, which llama.cpp does not"
    want = json.loads(build_tokenizer("gpt4").to_str())["pre_tokenizer"]
    have = spec.get("pre_tokenizer")

    def strip(p):  # trim_offsets changes offsets only, never ids
        if isinstance(p, dict):
            return {k: strip(v) for k, v in p.items() if k != "trim_offsets"}
        if isinstance(p, list):
            return [strip(v) for v in p]
        return p

    if strip(have) != strip(want):
        try:
            pattern = have["pretokenizers"][0]["pattern"]["Regex"]
            name = next(k for k, v in PRETOKENIZERS.items() if v == pattern)
            return f"uses azgpt's {name!r} pre-tokenizer, which llama.cpp does not implement"
        except (KeyError, IndexError, TypeError, StopIteration):
            return "uses a pre-tokenizer that llama.cpp does not implement"
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return "does not decode byte-level tokens"
    if any(not t.get("special") for t in spec.get("added_tokens") or []):
        return "has non-special added tokens, which llama.cpp would match inside text"
    if not model.get("ignore_merges"):
        # llama.cpp's llama-bpe takes a piece that is itself a token as that token; this
        # tokenizer replays the merges. They agree iff the merges rebuild every token.
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(json.dumps(spec))
        special = {t["content"] for t in spec.get("added_tokens") or []}
        broken = [
            s
            for s, i in tok.get_vocab().items()
            if s not in special and [t.id for t in tok.model.tokenize(s)] != [i]
        ]
        if broken:
            return (
                f"replays merges where llama.cpp takes whole-word tokens, and its merges do not "
                f"rebuild {len(broken)} of its tokens"
            )
    return None


def check_llama_cpp_tokenizer(tokenizer_json: str | Path) -> None:
    why = llama_cpp_incompatibility(tokenizer_json)
    if why:
        raise UserError(
            f"tokenizer {tokenizer_json} {why}, so llama.cpp would tokenize text differently "
            f"from azgpt; {_retrain_hint()}."
        )


# ----------------------------------------------------------------------------- GGUF contents


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    eot: int
    pad: int | None


def gguf_vocab(tokenizer_json: str | Path, n_vocab: int) -> Vocab:
    """Tokens by id (padded to the model's vocab with unused entries), their llama.cpp types and
    the merges as "left right" strings, from tokenizer.json."""
    import gguf

    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
    vocab.update(special)
    by_id: dict[int, str] = {i: s for s, i in vocab.items()}
    if max(by_id) >= n_vocab:
        raise UserError(
            f"tokenizer {tokenizer_json} has ids up to {max(by_id)} but the model's vocabulary "
            f"is {n_vocab}; pass the checkpoint's own tokenizer with --tokenizer."
        )
    tokens, types = [], []
    special_ids = set(special.values())
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            # CONTROL: matched in text only when the caller asks for special tokens (as azgpt
            # treats "<|endoftext|>" inside a document as text); USER_DEFINED would always be.
            types.append(int(gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL))
        else:
            tokens.append(f"<|unused_{i}|>")
            types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return Vocab(tokens, types, merges, special[EOT], special.get(PAD))


def gguf_arch(config) -> str:
    """llama.cpp's architecture for an azgpt model: `gpt2`, `llama`, or `qwen3` (QK-norm)."""
    arch = getattr(config, "arch", "gpt2")
    if arch == "gpt2":
        return "gpt2"
    if arch == "llama":
        return "qwen3" if config.qk_norm else "llama"
    raise ValueError(f"no GGUF architecture for model.arch={arch!r}")


def _tensor_type(name: str, arr: np.ndarray, quant: str, head: str):
    """The GGML type each tensor is stored as: 1-D tensors (norms, biases) and the position
    table stay f32, as llama.cpp's converter and quantizer keep them; matrices take the quant.
    For q4_0 the output head (`head`: `output.weight`, or the tied `token_embd.weight`) is q8_0:
    llama.cpp's own quantizer keeps that tensor at 6+ bits for every 4-bit type, and the writer
    has no Q6_K."""
    from gguf import GGMLQuantizationType as T

    if arr.ndim == 1 or name == "position_embd.weight" or quant == "f32":
        return T.F32
    if quant == "f16":
        return T.F16
    if quant == "q8_0" or (quant == "q4_0" and name == head):
        return T.Q8_0
    if quant == "q4_0":
        return T.Q4_0
    raise ValueError(quant)


def adjacent_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """A query or key matrix (n_heads * hs, in) with each head's rows moved from azgpt's rotate-
    half order (row i pairs with row i + hs/2) to llama.cpp's `llama` order (row 2i pairs with
    2i + 1): new row 2i is old row i, new row 2i + 1 is old row i + hs/2."""
    rows, cols = w.shape
    hs = rows // n_heads
    return w.reshape(n_heads, 2, hs // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gpt2_tensors(sd: dict, c) -> list[tuple[str, np.ndarray]]:
    zeros = lambda n: np.zeros(n, dtype=np.float32)  # noqa: E731
    get = lambda k, n: sd[k] if k in sd else zeros(n)  # noqa: E731
    out = [
        ("token_embd.weight", sd["transformer.wte.weight"]),
        ("position_embd.weight", sd["transformer.wpe.weight"]),
    ]
    for i in range(c.n_layer):
        p, b = f"transformer.h.{i}.", f"blk.{i}."
        d = c.n_embd
        out += [
            (b + "attn_norm.weight", sd[p + "ln_1.weight"]),
            (b + "attn_norm.bias", get(p + "ln_1.bias", d)),
            (b + "attn_qkv.weight", sd[p + "attn.c_attn.weight"]),
            (b + "attn_qkv.bias", get(p + "attn.c_attn.bias", 3 * d)),
            (b + "attn_output.weight", sd[p + "attn.c_proj.weight"]),
            (b + "attn_output.bias", get(p + "attn.c_proj.bias", d)),
            (b + "ffn_norm.weight", sd[p + "ln_2.weight"]),
            (b + "ffn_norm.bias", get(p + "ln_2.bias", d)),
            (b + "ffn_up.weight", sd[p + "mlp.c_fc.weight"]),
            (b + "ffn_up.bias", get(p + "mlp.c_fc.bias", 4 * d)),
            (b + "ffn_down.weight", sd[p + "mlp.c_proj.weight"]),
            (b + "ffn_down.bias", get(p + "mlp.c_proj.bias", d)),
        ]
    out += [
        ("output_norm.weight", sd["transformer.ln_f.weight"]),
        ("output_norm.bias", get("transformer.ln_f.bias", c.n_embd)),
    ]
    return out


def _llama_tensors(sd: dict, c, arch: str) -> list[tuple[str, np.ndarray]]:
    # `qwen3` ropes as azgpt does; `llama` needs each query/key head's rows reordered.
    rope = adjacent_rope_rows if arch == "llama" else (lambda w, n: w)
    out = [("token_embd.weight", sd["transformer.wte.weight"])]
    for i in range(c.n_layer):
        p, b = f"transformer.h.{i}.", f"blk.{i}."
        out += [
            (b + "attn_norm.weight", sd[p + "ln_1.weight"]),
            (b + "attn_q.weight", rope(sd[p + "attn.c_q.weight"], c.n_head)),
            (b + "attn_k.weight", rope(sd[p + "attn.c_k.weight"], c.kv_heads)),
            (b + "attn_v.weight", sd[p + "attn.c_v.weight"]),
            (b + "attn_output.weight", sd[p + "attn.c_proj.weight"]),
            (b + "ffn_norm.weight", sd[p + "ln_2.weight"]),
            (b + "ffn_gate.weight", sd[p + "mlp.c_gate.weight"]),
            (b + "ffn_up.weight", sd[p + "mlp.c_fc.weight"]),
            (b + "ffn_down.weight", sd[p + "mlp.c_proj.weight"]),
        ]
        if c.qk_norm:
            out += [
                (b + "attn_q_norm.weight", sd[p + "attn.q_norm.weight"]),
                (b + "attn_k_norm.weight", sd[p + "attn.k_norm.weight"]),
            ]
    out.append(("output_norm.weight", sd["transformer.ln_f.weight"]))
    if not c.tie_embeddings:  # tied: llama.cpp reuses token_embd as the head
        out.append(("output.weight", sd["lm_head.weight"]))
    return out


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """azgpt's parameters under llama.cpp's tensor names for `gguf_arch(model.config)`,
    float32, (out, in) layout."""
    sd = {k: v.detach().to("cpu").float().numpy() for k, v in model.state_dict().items()}
    c = model.config
    arch = gguf_arch(c)
    out = _gpt2_tensors(sd, c) if arch == "gpt2" else _llama_tensors(sd, c, arch)
    return [(n, np.ascontiguousarray(a, dtype=np.float32)) for n, a in out]


def _add_hparams(w, c, arch: str) -> None:
    """The hyperparameter keys llama.cpp reads for `arch` (written under `{arch}.`)."""
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.ffn_hidden)
    w.add_block_count(c.n_layer)
    w.add_head_count(c.n_head)
    if arch == "gpt2":
        w.add_layer_norm_eps(1e-5)  # torch.nn.LayerNorm's default, which azgpt uses
        return
    from .model import RMS_EPS

    hs = c.n_embd // c.n_head
    w.add_head_count_kv(c.kv_heads)
    w.add_key_length(hs)
    w.add_value_length(hs)
    w.add_rope_dimension_count(hs)  # every dimension of a head rotates
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_layer_norm_rms_eps(RMS_EPS)  # the blocks', the final and the QK norms'
    w.add_vocab_size(c.vocab_size)


def _encode_tensors(model, quant: str):
    """[(name, data, GGML type)]: quantized with the gguf package; a matrix whose rows do not
    split into 32-value blocks falls back to f16, as llama.cpp's converter does."""
    import gguf
    from gguf import GGMLQuantizationType as T

    named = gguf_tensors(model)
    head = "output.weight" if any(n == "output.weight" for n, _ in named) else "token_embd.weight"
    out = []
    for name, arr in named:
        qt = _tensor_type(name, arr, quant, head)
        if qt == T.F32:
            data = arr
        elif qt == T.F16:
            data = arr.astype(np.float16)
        else:
            try:
                data = gguf.quants.quantize(arr, qt)
            except gguf.QuantError:
                qt, data = T.F16, arr.astype(np.float16)
        out.append((name, data, qt))
    return out


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def write_gguf(
    path: Path,
    model,
    meta: dict,
    vocab: Vocab,
    quant: str,
    *,
    name: str,
    tokenizer_sha256: str,
) -> None:
    """Write the model, the tokenizer and the metadata to `path` (an f32/f16/q8_0/q4_0 file)."""
    import gguf

    from . import __version__

    c = model.config
    tensors = _encode_tensors(model, quant)
    _check_space(path, sum(d.nbytes for _, d, _ in tensors) + 64 * len(vocab.tokens))
    arch = gguf_arch(c)
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_name(name)
    w.add_languages(["az"])
    _add_hparams(w, c, arch)
    w.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[quant])))
    if quant in ("q8_0", "q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(LLAMA_CPP_PRE)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    # azgpt starts every document (and every prompt in `azgpt sample`) with <|endoftext|>:
    # as BOS with add_bos_token, llama.cpp and Ollama prepend it too.
    w.add_bos_token_id(vocab.eot)
    w.add_eos_token_id(vocab.eot)
    if vocab.pad is not None:
        w.add_pad_token_id(vocab.pad)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    # The chat template (azgpt/chat_template.py) for llama.cpp's Jinja path and llama-cpp-python,
    # and the end of an assistant turn, which llama.cpp stops on.
    w.add_chat_template(JINJA_TEMPLATE)
    w.add_eot_token_id(vocab.eot)
    w.add_string("azgpt.version", __version__)
    w.add_string("azgpt.tokenizer_sha256", tokenizer_sha256)
    w.add_uint64("azgpt.training_tokens", int(meta.get("tokens_seen") or 0))
    w.add_uint64("azgpt.training_steps", int(meta.get("step") or 0))
    if isinstance(meta.get("val_bpb"), (int, float)):
        w.add_float32("azgpt.val_bits_per_byte", float(meta["val_bpb"]))
    for tname, data, qt in tensors:
        w.add_tensor(tname, data, raw_dtype=qt)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        if w.fout:
            for f in w.fout:
                f.flush()
                os.fsync(f.fileno())
    finally:
        w.close()


def _check_space(path: Path, need: int) -> None:
    free = shutil.disk_usage(path.parent).free
    if free < need + (16 << 20):
        raise UserError(
            f"{path.parent} has {free / 1e6:.0f} MB free but the export needs about "
            f"{need / 1e6:.0f} MB; free some space or choose another --out."
        )


def _llama_cpp(quant: str):
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            f"--quant {quant} uses llama.cpp's quantizer; install it with "
            "`pip install azgpt[gguf]` (llama-cpp-python builds llama.cpp from source, ~10 "
            "minutes) or choose --quant f32, f16, q8_0 or q4_0."
        ) from None
    return llama_cpp


def quantize_with_llama_cpp(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's own quantizer (K-quants, with its per-tensor choices) on an f32 GGUF."""
    llama_cpp = _llama_cpp(quant)
    ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = min(os.cpu_count() or 1, 8)
    _check_space(dst, src.stat().st_size // 3)
    # llama.cpp logs a line per tensor through llama-cpp-python's logger; azgpt reports the
    # outcome in one line instead.
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    finally:
        log.setLevel(level)
    if rc != 0:
        raise OSError(errno.EIO, "llama.cpp's quantizer could not write it; is the disk full?")


# ----------------------------------------------------------------------------- Modelfile


MODELFILE_MARK = "# azgpt"  # the first line of every Modelfile azgpt writes


def modelfile_text(
    gguf_path: Path,
    modelfile: Path,
    *,
    block_size: int,
    name: str,
    chat: bool = False,
    system: str | None = None,
) -> str:
    """An Ollama Modelfile, sampling as `azgpt sample`. A base model gets the raw prompt; a
    model fine-tuned with `azgpt finetune` (chat) gets azgpt's chat template in Ollama's Go
    syntax, stops at the end of a turn (and at any role token), and `SYSTEM` when given."""
    rel = os.path.relpath(gguf_path.resolve(), modelfile.resolve().parent)
    src = rel if rel.startswith(("/", ".")) else "./" + rel
    if any(ch.isspace() for ch in src):
        src = str(gguf_path.resolve())
    if chat:
        # The GGUF adds the leading <|endoftext|> itself (add_bos_token): the template must not.
        head = f"{MODELFILE_MARK}: {_ollama_name(name)}, an Azerbaijani chat model fine-tuned with azgpt."
        template = [f'TEMPLATE """{OLLAMA_TEMPLATE}"""']
        if system is not None:
            template.append(f'SYSTEM """{system}"""')
        stops = [EOT, "<|user|>", "<|system|>", "<|assistant|>"]
    else:
        head = (
            f"{MODELFILE_MARK}: {_ollama_name(name)}, an Azerbaijani base model (not a chat model)."
        )
        # A base model continues text: the prompt goes in as it is.
        template = ['TEMPLATE """{{ .Prompt }}"""']
        stops = [EOT]
    return "\n".join(
        [
            head,
            f"# ollama create {_ollama_name(name)} -f {modelfile.name}",
            f"FROM {src}",
            *template,
            f"PARAMETER temperature {SAMPLING['temperature']}",
            f"PARAMETER top_k {SAMPLING['top_k']}",
            f"PARAMETER top_p {SAMPLING['top_p']}",
            f"PARAMETER num_ctx {block_size}",
            *(f'PARAMETER stop "{s}"' for s in stops),
            "",
        ]
    )


def _is_azgpt_gguf(p: Path) -> bool:
    import gguf

    try:
        return "azgpt.version" in gguf.GGUFReader(p).fields
    except Exception:  # not a GGUF at all
        return False


def _is_azgpt_modelfile(p: Path) -> bool:
    try:
        with open(p, encoding="utf-8") as f:
            return f.readline().startswith(MODELFILE_MARK)
    except (OSError, UnicodeDecodeError):
        return False


def default_modelfile(out_p: Path) -> Path:
    """`Modelfile` beside the GGUF, unless azgpt's Modelfile there serves another GGUF (or the
    file is not azgpt's): then NAME.Modelfile, so several quantizations share one folder."""
    mf = out_p.parent / "Modelfile"
    if not mf.exists():
        return mf
    if _is_azgpt_modelfile(mf):
        text = mf.read_text(encoding="utf-8")
        if any(
            ln.startswith("FROM ") and Path(ln[5:]).name == out_p.name for ln in text.splitlines()
        ):
            return mf
    return out_p.parent / (out_p.stem + ".Modelfile")


def _ollama_name(name: str) -> str:
    s = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name.lower()).strip("-.")
    return s or "azgpt"


# ----------------------------------------------------------------------------- the command


def export_gguf(
    ckpt: str,
    out: str,
    *,
    quant: str = "f16",
    tokenizer: str | None = None,
    modelfile: str | None = None,
    force: bool = False,
    system: str | None = None,
) -> tuple[Path, Path]:
    """`azgpt export --format gguf`: the GGUF file and its Modelfile; returns both paths.

    Nothing is written until every input has been checked; both files are written under
    temporary names and renamed at the end, so a failure leaves no partial file behind.
    """
    from .checkpoint import checkpoint_tokenizer, load_model

    if quant not in QUANTS:
        raise UserError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}.")
    for opt, v in (("--out", out), ("--modelfile", modelfile)):
        if v is not None and any(ord(ch) < 32 or ord(ch) == 127 for ch in str(v)):
            raise UserError(
                f"{opt} {str(v)!r} holds a newline or control character, which would break the "
                "Modelfile; choose a plain file name."
            )
    if system is not None and (
        '"""' in system or any(ord(c) < 32 and c not in "\n\t" for c in system)
    ):
        raise UserError(
            '--system must not hold """ or control characters (the Modelfile quotes it in """); '
            "rephrase it."
        )
    out_p = Path(out)
    mf_p = Path(modelfile) if modelfile else default_modelfile(out_p)
    for p, opt, ours in (
        (out_p, "--out", _is_azgpt_gguf),
        (mf_p, "--modelfile", _is_azgpt_modelfile),
    ):
        if p.is_dir():
            raise UserError(f"{opt} {p} is a folder; give a file name such as model.gguf.")
        if p.exists() and not force and not (opt == "--modelfile" and not modelfile and ours(p)):
            raise UserError(f"{opt} {p} exists; choose another name or pass --force.")
        if p.exists() and not ours(p):
            raise UserError(
                f"{opt} {p} exists and was not written by azgpt; --force only replaces azgpt's "
                "own files, so choose another name (nothing was changed)."
            )
    if out_p.resolve() == mf_p.resolve():
        raise UserError(f"--modelfile {mf_p} is the GGUF file itself; choose another name.")
    model, meta = load_model(ckpt, "cpu")
    model.eval()
    chat = bool(meta.get("chat_template"))
    if system is not None and not chat:
        raise UserError(
            f"--system applies to chat models, and {ckpt} is a base model; fine-tune it with "
            "`azgpt finetune` first, or leave out --system."
        )
    _, sha, tok_path = checkpoint_tokenizer(ckpt, meta, tokenizer)
    check_llama_cpp_tokenizer(tok_path)
    if quant == "q4_k_m":
        _llama_cpp(quant)
    vocab = gguf_vocab(tok_path, model.config.vocab_size)
    run = Path(ckpt).resolve()  # runs/NAME/step-000300 (best and last are links to one)
    name = f"azgpt-{run.parent.name if run.name.startswith('step-') else run.name}"
    name = "".join(ch if ch.isprintable() else "-" for ch in name)  # no line breaks in files
    try:
        with atomic_path(out_p) as tmp, atomic_path(mf_p) as mf_tmp:
            if quant == "q4_k_m":
                f32 = tmp.with_name(tmp.name + ".f32")
                try:
                    write_gguf(f32, model, meta, vocab, "f32", name=name, tokenizer_sha256=sha)
                    quantize_with_llama_cpp(f32, tmp, quant)
                finally:
                    f32.unlink(missing_ok=True)
            else:
                write_gguf(tmp, model, meta, vocab, quant, name=name, tokenizer_sha256=sha)
            mf_tmp.write_text(
                modelfile_text(
                    out_p,
                    mf_p,
                    block_size=model.config.block_size,
                    name=name,
                    chat=chat,
                    system=system,
                ),
                encoding="utf-8",
            )
    except OSError as e:
        # numpy's tofile reports a short write without an errno ("N requested and M written")
        why = e.strerror or f"a write was cut short: {e}; is the disk full?"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            why += "; free some space"
        raise UserError(f"cannot write {out_p} ({why}); nothing was written under --out.") from None
    fsync_dir(out_p.parent)
    return out_p, mf_p
