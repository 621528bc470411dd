"""Export to a Hugging Face transformers folder (a causal LM + a fast tokenizer).

arch "gpt2" goes to GPT2LMHeadModel: azgpt's parameter names are GPT-2's, so export is a key
map; the only change is that GPT-2's Conv1D layers store their weights transposed (in_features,
out_features). arch "llama" goes to LlamaForCausalLM, or Qwen3ForCausalLM when QK-norm is on
(Llama has no QK-norm; Qwen3 is Llama plus RMSNorm on each head's queries and keys): one
tensor per tensor, the rotary layout already being transformers' "rotate half".

The tokenizer carries azgpt's chat template (azgpt/chat_template.py) as `chat_template` (in
tokenizer_config.json and chat_template.jinja, which older and newer transformers read), and,
like every azgpt path, starts each encoding with `<|endoftext|>` (a post-processor;
`apply_chat_template` tokenizes without it, its template emits that token itself).
`generation_config.json`'s eos is the end of an assistant turn, so `generate` stops there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .chat_template import JINJA_TEMPLATE, end_of_turn_id
from .checkpoint import checkpoint_tokenizer, load_model
from .errors import UserError
from .fsutil import _umask, fsync_dir, is_disk_full
from .sample import SAMPLING
from .tokenizer import EOT

# What an export folder holds; `--force` replaces a folder only when it holds nothing else.
HF_FILES = {
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "README.md",
    "azgpt_meta.json",
}


def check_replaceable(out_dir: Path) -> None:
    """Refuse `--force` on a folder azgpt did not write (or that holds anything else)."""
    names = sorted(p.name for p in out_dir.iterdir())
    foreign = [n for n in names if n not in HF_FILES or not (out_dir / n).is_file()]
    if foreign or "azgpt_meta.json" not in names:
        shown = ", ".join(foreign[:3]) or "no azgpt_meta.json"
        raise UserError(
            f"export folder {out_dir} holds files azgpt did not write ({shown}); --force only "
            "replaces an earlier azgpt export, so choose another --out (nothing was changed)."
        )


def hf_tokenizer(tok, block_size: int):
    """transformers' fast tokenizer for azgpt's `tok`: specials parsed (transformers'
    convention), `<|endoftext|>` prepended to every encoding, the chat template attached."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer.from_str(tok.to_str())  # a copy: the caller's tokenizer keeps its settings
    t.encode_special_tokens = False
    eot = t.token_to_id(EOT)
    t.post_processor = TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, eot)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=t,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=None,
        pad_token="<|pad|>",
        model_max_length=block_size,
        clean_up_tokenization_spaces=False,
        chat_template=JINJA_TEMPLATE,
    )


def write_chat_template(folder: Path) -> None:
    """Both places transformers looks: chat_template.jinja (4.50+) and the tokenizer_config.json
    field (older releases read only that)."""
    (folder / "chat_template.jinja").write_text(JINJA_TEMPLATE, encoding="utf-8")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = JINJA_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if k.endswith(CONV1D):
            v = v.t().contiguous()
        sd[k] = v
    c = model.config
    if not c.bias:  # GPT-2 always has biases: zeros are the same function
        for i in range(c.n_layer):
            p = f"transformer.h.{i}."
            sd[p + "attn.c_attn.bias"] = torch.zeros(3 * c.n_embd)
            sd[p + "attn.c_proj.bias"] = torch.zeros(c.n_embd)
            sd[p + "mlp.c_fc.bias"] = torch.zeros(4 * c.n_embd)
            sd[p + "mlp.c_proj.bias"] = torch.zeros(c.n_embd)
            sd[p + "ln_1.bias"] = torch.zeros(c.n_embd)
            sd[p + "ln_2.bias"] = torch.zeros(c.n_embd)
        sd["transformer.ln_f.bias"] = torch.zeros(c.n_embd)
    return sd


def to_hf_llama_state_dict(model) -> dict[str, torch.Tensor]:
    """azgpt llama names -> transformers' Llama/Qwen3 names."""
    names = {
        "transformer.wte.weight": "model.embed_tokens.weight",
        "transformer.ln_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    per_layer = {
        "ln_1.weight": "input_layernorm.weight",
        "ln_2.weight": "post_attention_layernorm.weight",
        "attn.c_q.weight": "self_attn.q_proj.weight",
        "attn.c_k.weight": "self_attn.k_proj.weight",
        "attn.c_v.weight": "self_attn.v_proj.weight",
        "attn.c_proj.weight": "self_attn.o_proj.weight",
        "attn.q_norm.weight": "self_attn.q_norm.weight",
        "attn.k_norm.weight": "self_attn.k_norm.weight",
        "mlp.c_gate.weight": "mlp.gate_proj.weight",
        "mlp.c_fc.weight": "mlp.up_proj.weight",
        "mlp.c_proj.weight": "mlp.down_proj.weight",
    }
    for i in range(model.config.n_layer):
        for ours, theirs in per_layer.items():
            names[f"transformer.h.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_embeddings:
            continue  # tied: transformers re-ties it to the embedding
        sd[names[k]] = v.detach().cpu().contiguous()
    return sd


def _hf_llama(c, eot: int | None, pad: int | None):
    """A transformers LlamaForCausalLM (Qwen3ForCausalLM with QK-norm) of config `c`."""
    from .model import RMS_EPS

    if c.qk_norm:
        try:
            from transformers import Qwen3Config as Config
            from transformers import Qwen3ForCausalLM as Model
        except ImportError:  # transformers < 4.51
            raise UserError(
                "exporting a llama model with qk_norm needs Qwen3ForCausalLM from transformers "
                "4.51 or later; upgrade it with `pip install -U 'transformers>=4.51'`."
            ) from None
    else:
        from transformers import LlamaConfig as Config
        from transformers import LlamaForCausalLM as Model
    cfg = Config(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.ffn_hidden,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.kv_heads,
        head_dim=c.n_embd // c.n_head,
        max_position_embeddings=c.block_size,
        rms_norm_eps=RMS_EPS,
        rope_theta=c.rope_theta,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=c.tie_embeddings,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=pad,
    )
    return Model(cfg)


def _model_card(meta: dict, cfg, n_params: int) -> str:
    fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "n/a"  # noqa: E731
    return "\n".join(
        [
            "---",
            "language: az",
            "library_name: transformers",
            "pipeline_tag: text-generation",
            f"tags: [azgpt, {'llama' if cfg.arch == 'llama' else 'gpt2'}, azerbaijani]",
            "---",
            "",
            "# Azerbaijani GPT trained with azgpt",
            "",
            f"A {'Llama' if cfg.arch == 'llama' else 'GPT-2'}-architecture model ({n_params / 1e6:.1f}M parameters: {cfg.n_layer} layers, {cfg.n_head} heads, "
            f"width {cfg.n_embd}, context {cfg.block_size}, vocab {cfg.vocab_size}) trained from scratch on Azerbaijani text.",
            "",
            "| fact | value |",
            "|---|---|",
            f"| training steps | {fmt(meta.get('step'), ',')} |",
            f"| tokens seen | {fmt(meta.get('tokens_seen'), ',')} |",
            f"| validation loss (nats/token) | {fmt(meta.get('val_loss'), '.4f')} |",
            f"| validation bits per byte | {fmt(meta.get('val_bpb'), '.4f')} |",
            f"| tokenizer sha256 | `{meta.get('tokenizer_sha256', 'n/a')}` |",
            f"| azgpt version | {meta.get('azgpt_version', 'n/a')} |",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'tok = AutoTokenizer.from_pretrained("PATH")',
            'model = AutoModelForCausalLM.from_pretrained("PATH")',
            'ids = tok("Azərbaycanın paytaxtı", return_tensors="pt").input_ids  # starts with <|endoftext|>',
            "print(tok.decode(model.generate(ids, max_new_tokens=30, do_sample=True)[0]))",
            "# a model fine-tuned with `azgpt finetune` chats through the chat template:",
            'msgs = [{"role": "user", "content": "Salam!"}]',
            "ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors='pt')",
            "```",
            "",
        ]
    )


def to_hf_model(model, eot: int | None, pad: int | None):
    """The transformers model equal to azgpt `model` (GPT2LMHeadModel, LlamaForCausalLM or
    Qwen3ForCausalLM), in eval mode."""
    c = model.config
    if c.arch == "llama":
        hf = _hf_llama(c, eot, pad)
        missing, unexpected = hf.load_state_dict(to_hf_llama_state_dict(model), strict=False)
        bad_missing = [k for k in missing if not (k == "lm_head.weight" and c.tie_embeddings)]
        if bad_missing or unexpected:
            raise RuntimeError(
                f"export key map is incomplete: missing {bad_missing[:5]}, unexpected {unexpected[:5]}"
            )
    else:
        hf = _hf_gpt2(model, eot, pad)
    hf.tie_weights()
    hf.eval()
    return hf


def _hf_gpt2(model, eot, pad):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf_cfg = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=pad,
        tie_word_embeddings=True,
    )
    hf = GPT2LMHeadModel(hf_cfg)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    bad_missing = [
        k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))
    ]
    if bad_missing or unexpected:
        raise RuntimeError(
            f"export key map is incomplete: missing {bad_missing[:5]}, unexpected {unexpected[:5]}"
        )
    return hf


def export_hf(ckpt: str, out: str, *, tokenizer: str | None = None, force: bool = False) -> Path:
    try:
        from transformers import GenerationConfig
    except ImportError:
        raise UserError(
            "export needs transformers; install it with `pip install azgpt[hf]`."
        ) from None
    out_dir = Path(out)
    here, ck = Path.cwd().resolve(), Path(ckpt).resolve()
    if out_dir.resolve() in (here, *here.parents) or out_dir.resolve() in (ck, *ck.parents):
        raise UserError(
            f"export folder {out_dir} holds the current folder or the checkpoint; choose a new folder for --out."
        )
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not force:
            raise UserError(
                f"export folder {out_dir} exists and is not empty; choose another --out or pass --force."
            )
        if not out_dir.is_dir():
            raise UserError(
                f"--out {out_dir} is a file, not an export folder; choose another --out (nothing was changed)."
            )
        check_replaceable(out_dir)
    model, meta = load_model(ckpt, "cpu")
    tok, _, _ = checkpoint_tokenizer(ckpt, meta, tokenizer)
    c = model.config
    eot = tok.token_to_id(EOT)
    pad = tok.token_to_id("<|pad|>")
    hf = to_hf_model(model, eot, pad)

    tmp = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        hf.save_pretrained(tmp, safe_serialization=True)
        hf_tokenizer(tok, c.block_size).save_pretrained(tmp)
        write_chat_template(tmp)
        GenerationConfig(
            bos_token_id=eot,
            eos_token_id=end_of_turn_id(tok),
            pad_token_id=pad,
            do_sample=True,
            temperature=SAMPLING["temperature"],
            top_k=SAMPLING["top_k"],
            top_p=SAMPLING["top_p"],
            max_new_tokens=SAMPLING["max_new_tokens"],
        ).save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(meta, c, model.num_params()), encoding="utf-8")
        (tmp / "azgpt_meta.json").write_text(
            json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        for f in tmp.iterdir():  # safetensors writes 0600; outputs follow the umask
            os.chmod(f, 0o666 & ~_umask())
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        tmp.rename(out_dir)
        fsync_dir(out_dir.parent)
    except OSError as e:
        why = "the disk is full" if is_disk_full(e) else e.strerror
        raise UserError(
            f"cannot write export folder {out_dir} ({why}); choose a writable --out or free space."
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
