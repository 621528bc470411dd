"""Resume checks: which checkpoint a run continues from, and refusals of a resume that would not
continue the same run (another model shape, other data, another data order)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import (
    latest_checkpoint,
    read_json,
    restore_optimizer_state,
    step_dirs,
)
from .config import ModelConfig, RunConfig
from .data import BatchSource
from .errors import UserError


def find_checkpoint(out_dir: Path, resume: bool, accelerator) -> Path | None:
    if not resume:
        if step_dirs(out_dir):
            raise UserError(
                f"{out_dir} already holds checkpoints; pass --resume to continue that run or choose another train.out_dir."
            )
        return None
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None and step_dirs(out_dir):
        raise UserError(
            f"{out_dir} holds step-* folders but none is a complete checkpoint; move them away to start "
            "over, or choose another train.out_dir (nothing was changed)."
        )
    if ckpt is None:
        accelerator.print(f"no checkpoint in {out_dir} yet; starting from scratch")
    return ckpt


# What decides which windows a step reads: changing any of them before --resume would silently
# train on another data order than the run it continues.
DATA_ORDER_KEYS = ("seed", "batch_size", "grad_accum", "world", "block_size")


def data_order(cfg: RunConfig, world: int) -> dict:
    tc = cfg.train
    return {
        "seed": tc.seed,
        "batch_size": tc.batch_size,
        "grad_accum": tc.grad_accum,
        "world": world,
        "block_size": cfg.model.block_size,
    }


def check_shape(ckpt: Path, cfg: RunConfig, fix: str) -> None:
    """Refuse a checkpoint whose model config.json differs from the run's model section."""
    saved = read_json(ckpt / "config.json", fix)
    want = cfg.model.to_dict()
    # A key the checkpoint lacks (written before the field existed) holds its default.
    saved = {**ModelConfig().to_dict(), **saved}
    diff = {k: (saved.get(k), v) for k, v in want.items() if k != "dropout" and saved.get(k) != v}
    if diff:
        desc = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise UserError(
            f"checkpoint {ckpt} is from a model of another shape ({desc}); use the config it was trained with."
        )


def check_resume(ckpt: Path, cfg: RunConfig, source: BatchSource, world: int) -> None:
    """Refuse a resume that would not continue the same run: another model shape, other data,
    or another data order."""
    fix = "the checkpoint is incomplete; use another one."
    check_shape(ckpt, cfg, fix)
    meta = read_json(ckpt / "meta.json", fix)
    was = meta.get("tokenizer_sha256")
    if was and was != source.tokenizer_sha256:
        raise UserError(
            f"{ckpt} was trained on data from another tokenizer than {source.dir} (sha256 differs); "
            "resume with the data and tokenizer it was trained with."
        )
    loader = meta.get("loader") or {}
    now_order = data_order(cfg, world)
    for key in DATA_ORDER_KEYS:
        if key in loader and loader[key] != now_order[key]:
            name = "the number of processes" if key == "world" else f"train.{key}"
            if key == "block_size":
                name = "model.block_size"
            raise UserError(
                f"{name} is {now_order[key]} but {ckpt} was trained with {loader[key]}, which would change "
                f"the data order; set it back to {loader[key]} to resume, or start a new run in another train.out_dir."
            )


def restore_optimizer(model, optimizer, ckpt, tensors, saved, cfg, accelerator) -> None:
    if not saved:
        raise UserError(
            f"{ckpt}/trainer_state.json holds no optimizer state; use another checkpoint."
        )
    if saved.get("format") != "named":
        raise UserError(
            f"{ckpt} holds optimizer state in an older format; resume it with the azgpt version that wrote it."
        )
    restore_optimizer_state(model, optimizer, tensors, saved)
    # The config's betas and weight decay win over the checkpoint's (the LR is set every step).
    tc = cfg.train
    for g in optimizer.param_groups:
        if "lr_scale" in g:  # a Muon group: no betas; its peak lr is train.muon_lr
            g["lr_scale"] = tc.muon_lr / tc.lr
            g["weight_decay"] = tc.weight_decay
            continue
        was = (tuple(g["betas"]), g["weight_decay"])
        g["betas"] = (tc.beta1, tc.beta2)
        if g["weight_decay"] > 0:
            g["weight_decay"] = tc.weight_decay
        if was != (tuple(g["betas"]), g["weight_decay"]):
            accelerator.print(
                f"resume: AdamW betas {was[0]} -> {g['betas']}, weight decay {was[1]} -> {g['weight_decay']}"
            )


def check_init_from(ckpt: Path, cfg: RunConfig, source: BatchSource) -> None:
    """`train.init_from`: a complete checkpoint of the run's model shape whose tokenizer is the
    one the batches were encoded with (ids from another tokenizer would train on noise)."""
    if not all((ckpt / n).is_file() for n in ("model.safetensors", "config.json", "meta.json")):
        raise UserError(
            f"train.init_from={ckpt} is not a complete checkpoint folder (model.safetensors, "
            "config.json, meta.json); point it at one such as runs/NAME/best."
        )
    fix = "the checkpoint is incomplete; use another one."
    check_shape(ckpt, cfg, fix)
    was = read_json(ckpt / "meta.json", fix).get("tokenizer_sha256")
    if was != source.tokenizer_sha256:
        raise UserError(
            f"train.init_from={ckpt} was trained with another tokenizer than the data in "
            f"{source.dir} (sha256 differs); prepare the data with the checkpoint's tokenizer."
        )
