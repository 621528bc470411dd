"""`azgpt finetune`: supervised fine-tuning of a base checkpoint on conversations, through the
same training loop as `azgpt train` (azgpt/train.py): its checkpoints, metrics, report, exact
resume, early stopping, NaN guard and DDP all hold.

The run starts from the base's weights (`train.init_from`, fresh optimizer), draws packed rows
of conversations (azgpt/chatpack.py) instead of token windows, scores only assistant tokens and
the end of each assistant turn, and validates on a held-out share of the conversations.

Configuration, lowest precedence first: the base run's own model and train sections; the
fine-tuning defaults derived from the `[sft]` section (learning rates scaled from the base's,
warmup, decay, weight decay 0, a number of steps from `sft.epochs`); the `--config` file; the
`--section.key=value` overrides. configs/sft.toml writes the `[sft]` defaults out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass
class SFTConfig:
    epochs: float = 4.0
    """Passes over the training conversations (sets train.max_iters unless that is given)."""
    lr_scale: float = 0.8
    """Peak learning rates (train.lr and train.muon_lr) as a share of the base run's."""
    min_lr_scale: float = 0.0
    """train.min_lr as a share of the fine-tuning peak (0: decay to zero, as nanochat)."""
    warmup_iters: int = 0
    """Warmup steps (the base model is trained already; nanochat uses none)."""
    weight_decay: float = 0.0
    """AdamW weight decay while fine-tuning (nanochat: 0)."""
    val_fraction: float = 0.1
    """Share of the conversations held out for validation (chosen by a hash of each)."""
    evals_per_epoch: int = 2
    """Evaluations (and checkpoints) per epoch, unless train.eval_interval is given."""
    lora: bool = False
    """Train LoRA adapters (peft) instead of every weight; `--lora` sets it."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: float = 32.0
    """LoRA scale numerator: the update B @ A is scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input."""
    lora_targets: str = "c_attn,c_q,c_k,c_v,attn.c_proj,c_fc,c_gate,mlp.c_proj"
    """Comma-separated Linear module names (suffixes) that get adapters; the head never does."""

    def validate(self) -> None:
        if not self.epochs > 0:
            raise UserError(f"sft.epochs must be positive, got {self.epochs}.")
        if not 0 < self.lr_scale <= 10:
            raise UserError(f"sft.lr_scale must be in (0, 10], got {self.lr_scale}.")
        if not 0 <= self.min_lr_scale <= 1:
            raise UserError(f"sft.min_lr_scale must be in [0, 1], got {self.min_lr_scale}.")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"sft.val_fraction must be in [0, 1), got {self.val_fraction}.")
        if self.evals_per_epoch < 1:
            raise UserError(f"sft.evals_per_epoch must be at least 1, got {self.evals_per_epoch}.")
        if self.lora_r < 1:
            raise UserError(f"sft.lora_r must be at least 1, got {self.lora_r}.")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"sft.lora_dropout must be in [0, 1), got {self.lora_dropout}.")


# Train keys the fine-tuning defaults set; a user's value for one of them wins.
_DERIVED = ("lr", "muon_lr", "min_lr", "warmup_iters", "weight_decay", "max_iters")


def _set_sft(sft: SFTConfig, key: str, value, from_cli: bool) -> None:
    from .config import ConfigError, _coerce

    hints = typing.get_type_hints(SFTConfig)
    if key not in hints:
        raise UserError(
            f"unknown config key sft.{key}; valid keys in [sft] are {', '.join(hints)}."
        )
    try:
        setattr(sft, key, _coerce("sft", key, value, hints[key], from_cli))
    except ConfigError as e:
        raise UserError(str(e)) from None


def build_config(
    base: Path,
    base_meta: dict,
    data: list[str],
    out: str | None,
    config_path,
    overrides,
    lora: bool = False,
):
    """(RunConfig, SFTConfig) for fine-tuning `base` on `data`; see the module docstring."""
    from .checkpoint import read_json
    from .config import ConfigError, RunConfig, _apply, parse_overrides

    sft = SFTConfig()
    cfg = RunConfig()
    fix = "the checkpoint is incomplete; use another one."
    try:
        for key, value in read_json(base / "config.json", fix).items():
            _apply(cfg, "model", key, value, from_cli=False)
        base_train = (base_meta.get("config") or {}).get("train") or {}
        for key, value in base_train.items():
            if key in {f.name for f in dataclasses.fields(cfg.train)}:
                _apply(cfg, "train", key, value, from_cli=False)
    except ConfigError as e:
        raise UserError(f"{base}: {e}") from None
    base_lr, base_muon = cfg.train.lr, cfg.train.muon_lr

    given: list[tuple[str, str, object, bool]] = []  # (section, key, value, from_cli)
    if config_path is not None:
        p = Path(config_path)
        if not p.is_file():
            raise UserError(
                f"config file {p} does not exist; pass a TOML file such as configs/sft.toml."
            )
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file {p} is not valid TOML ({e}); fix the syntax.") from None
        for section, table in raw.items():
            if not isinstance(table, dict):
                raise UserError(f"{p}: top-level key {section!r} must be a table such as [sft].")
            given += [(section, k, v, False) for k, v in table.items()]
    try:
        given += [(s, k, v, True) for s, k, v in parse_overrides(overrides or [])]
    except ConfigError as e:
        raise UserError(str(e)) from None
    for section, key, value, cli in given:
        if section == "sft":
            _set_sft(sft, key, value, cli)
    if lora:
        sft.lora = True
    sft.validate()

    tc = cfg.train
    tc.lr = base_lr * sft.lr_scale
    tc.muon_lr = base_muon * sft.lr_scale
    tc.min_lr = tc.lr * sft.min_lr_scale
    tc.warmup_iters = sft.warmup_iters
    tc.weight_decay = sft.weight_decay
    tc.init_from = str(base)
    tc.out_dir = out or str(Path("runs") / f"{base.resolve().parent.name}-sft")
    tc.sample_tokens = 0  # the plain-text sample says nothing about a chat model
    tc.stop_at = 0
    tc.early_stop_patience = 0
    tc.tensorboard = False
    cfg.data.dir = str(data[0])
    explicit = set()
    try:
        for section, key, value, cli in given:
            if section != "sft":
                _apply(cfg, section, key, value, from_cli=cli)
                explicit.add(f"{section}.{key}")
        cfg.validate()
    except ConfigError as e:
        raise UserError(str(e)) from None
    if sft.lora and tc.optimizer != "adamw":
        # Adapters are trained with AdamW in every reference LoRA recipe (litgpt, torchtune,
        # peft's examples); Muon would also leave AdamW's group (all frozen) empty.
        if "train.optimizer" in explicit:
            raise UserError(
                f"--lora trains its adapters with AdamW; drop train.optimizer={tc.optimizer}."
            )
        tc.optimizer = "adamw"
    return cfg, sft, explicit


def finetune(
    ckpt: str,
    data: list[str],
    out: str | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    resume: bool = False,
    lora: bool = False,
):
    """Fine-tune checkpoint `ckpt` on the conversations in `data`; returns the TrainResult."""
    from .chat_template import check_chat_tokenizer
    from .chatdata import load_chats, split_val
    from .chatpack import ChatBatches
    from .checkpoint import checkpoint_tokenizer, read_json
    from .tokenizer import EOT

    base = Path(ckpt)
    if not base.is_dir():
        raise UserError(f"checkpoint folder {base} does not exist; pass --ckpt runs/NAME/best.")
    meta = read_json(base / "meta.json", "the checkpoint is incomplete; use another one.")
    tok, sha, tok_path = checkpoint_tokenizer(base, meta)
    check_chat_tokenizer(tok, f"the tokenizer of {base}")
    cfg, sft, explicit = build_config(base, meta, data, out, config_path, overrides, lora)
    cfg.data.tokenizer = str(tok_path)

    mc, tc = cfg.model, cfg.train
    convs, report = load_chats(data, tok, mc.block_size + 1)
    train_c, val_c = split_val(convs, sft.val_fraction)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batches = ChatBatches(
        train_c,
        val_c,
        mc.block_size,
        tok.token_to_id(EOT),
        seed=tc.seed,
        grad_accum=tc.grad_accum,
        tokenizer_sha256=sha,
        dir=Path(data[0]),
    )
    per_epoch = batches.steps_per_epoch(tc.batch_size, tc.grad_accum, world)
    if "train.max_iters" not in explicit:
        tc.max_iters = max(1, math.ceil(sft.epochs * per_epoch))
    if "train.eval_interval" not in explicit:
        tc.eval_interval = max(1, math.ceil(per_epoch / sft.evals_per_epoch))
    if "train.eval_iters" not in explicit:
        tc.eval_iters = batches.val_iters(tc.batch_size, world) if val_c else 0
    if "train.log_interval" not in explicit:
        tc.log_interval = max(1, min(tc.log_interval, tc.eval_interval))
    if world == 1 or os.environ.get("RANK", "0") == "0":
        print(
            f"chat data: {report.conversations} conversations from {report.records} records "
            f"({sum(v['count'] for v in report.skipped.values())} skipped, {report.truncated} "
            f"truncated); {len(train_c)} train / {len(val_c)} held out, packed into "
            f"{batches.n_train} + {batches.n_val} rows of {mc.block_size}; {tc.max_iters} steps "
            f"({per_epoch:.2f} per epoch), lr {tc.lr:.3g}, from {base}"
        )
    hook = None
    if sft.lora:
        from .lora import lora_hook, lora_info

        info = lora_info(sft, base)
        batches.meta["lora"] = info
        hook = lora_hook(sft, base, info)
    from .train import train

    result = train(cfg, resume=resume, batches=batches, model_hook=hook)
    if world == 1 or os.environ.get("RANK", "0") == "0":
        rep = {
            **report.as_dict(),
            "train_conversations": len(train_c),
            "val_conversations": len(val_c),
        }
        rep["sft"] = dataclasses.asdict(sft)
        path = Path(tc.out_dir) / "chat_data.json"
        path.write_text(json.dumps(rep, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        # The held-out conversations as a chat file: `azgpt eval --chat RUN/chat_val.jsonl`
        # scores the base and the fine-tuned model on exactly what training never saw.
        with open(Path(tc.out_dir) / "chat_val.jsonl", "w", encoding="utf-8") as f:
            for c in val_c:
                f.write(json.dumps({"messages": c.messages}, ensure_ascii=False) + "\n")
    return result
