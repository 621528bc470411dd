"""Setting a run up: the accelerator, the checked inputs, the model and optimizer (restored from
a checkpoint on resume), and `Run`, which the loop in train.py carries from step to step."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointWriter, clean_stale_temps, load_weights, read_trainer_state
from .config import ConfigError, RunConfig, size_run
from .data import BatchSource, TokenBatches, TokenData
from .errors import UserError
from .hardware import choose_mixed_precision, compile_mode
from .model import GPT
from .optim import lr_at, make_optimizer
from .resume import check_init_from, check_resume, find_checkpoint, restore_optimizer


@dataclass
class RunState:
    """What changes as training goes on; saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    best_val: float | None = None
    evals_without_improvement: int = 0
    last_loss: float | None = None
    last_eval: dict | None = None
    stop_reason: str | None = None


@dataclass
class Run:
    cfg: RunConfig
    accelerator: object
    model: torch.nn.Module  # as prepared by Accelerate (DDP/FSDP wrapper or the module itself)
    raw: GPT  # the module, unwrapped (compiled in place, so its state dict has plain names)
    optimizer: object
    batches: BatchSource  # train and validation batches (data.TokenBatches by default)
    tokenizer: object
    tokenizer_file: Path
    byte_lens: np.ndarray  # UTF-8 bytes per token id, for bits per byte
    precision: str
    compile_mode: str | None
    fsdp: bool
    n_params: int  # of the whole model (counted before sharding)
    flops_per_token: int  # of the whole model: MFU is never a shard's
    shards: dict | None  # under FSDP: what this process holds (fsdp.shard_report)
    state: RunState = field(default_factory=RunState)
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)  # background writes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    @property
    def tokens_per_step(self) -> int:
        tc = self.cfg.train
        return tc.batch_size * self.cfg.model.block_size * tc.grad_accum * self.world

    def lr(self, step: int) -> float:
        tc = self.cfg.train
        return lr_at(
            step, lr=tc.lr, min_lr=tc.min_lr, warmup_iters=tc.warmup_iters, max_iters=tc.max_iters
        )


@dataclass
class TrainResult:
    ok: bool
    step: int
    last_loss: float | None
    val_loss: float | None
    out_dir: Path
    stop_reason: str | None = None


def make_accelerator(cfg: RunConfig):
    """(accelerator, fsdp): `fsdp` when the launcher asked for sharding (see fsdp.py)."""
    from accelerate import Accelerator

    from . import fsdp as fsdp_mod

    tc = cfg.train
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto."
        )
    cuda = tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available())
    capability = torch.cuda.get_device_capability() if cuda else None
    precision = choose_mixed_precision(tc.mixed_precision, "cuda" if cuda else "cpu", capability)
    if tc.tensorboard:
        import importlib.util

        if not (
            importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
        ):
            raise UserError(
                "train.tensorboard=true needs TensorBoard; install it with `pip install azgpt[tensorboard]`."
            )
    fsdp = fsdp_mod.requested()  # before Accelerator(): azgpt shards, Accelerate must not
    # A run sized in tokens needs the process count for grad_accum and max_iters; launchers
    # (accelerate launch, torchrun) say it in WORLD_SIZE.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        size_run(cfg, world)
    except ConfigError as e:
        raise UserError(str(e)) from None
    accelerator = Accelerator(
        gradient_accumulation_steps=tc.grad_accum,
        mixed_precision=precision,
        cpu=not cuda,
        log_with="tensorboard" if tc.tensorboard else None,
        project_dir=tc.out_dir if tc.tensorboard else None,
    )
    if accelerator.num_processes != world:
        raise UserError(
            f"WORLD_SIZE says {world} process(es) but {accelerator.num_processes} started; "
            "launch with accelerate launch or torchrun, which set it."
        )
    if accelerator.device.type == "cuda":
        # TF32 matmuls: ~2x on fp32 work (bf16 autocast leaves a few fp32 ops) at no loss cost.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator, fsdp and accelerator.num_processes > 1


def read_inputs(
    cfg: RunConfig, batches: BatchSource | None = None
) -> tuple[BatchSource, object, np.ndarray]:
    """The batch source (the token files of `data.dir` unless one is given) and the tokenizer,
    checked against each other and the model."""
    from .fsutil import sha256_file
    from .tokenizer import load_tokenizer, token_byte_lengths, tokenizer_path

    mc = cfg.model
    if batches is None:
        data = TokenData(cfg.data.dir, mc.block_size, mc.vocab_size, tokenizer=cfg.data.tokenizer)
        batches = TokenBatches(data, cfg.train.seed)
    else:
        tp = tokenizer_path(cfg.data.tokenizer)
        if not tp.is_file():
            raise UserError(f"tokenizer file {tp} does not exist; fix data.tokenizer.")
        if sha256_file(tp) != batches.tokenizer_sha256:
            raise UserError(
                f"tokenizer {tp} is not the one {batches.dir} was encoded with (sha256 differs); "
                "set data.tokenizer to that tokenizer."
            )
    if cfg.train.init_from:
        check_init_from(Path(cfg.train.init_from), cfg, batches)
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.get_vocab_size() > mc.vocab_size:
        raise UserError(
            f"the tokenizer has {tok.get_vocab_size()} ids but model.vocab_size is {mc.vocab_size}; raise model.vocab_size."
        )
    byte_lens = token_byte_lengths(tok)
    byte_lens = np.pad(byte_lens, (0, max(0, mc.vocab_size - len(byte_lens))))
    return batches, tok, byte_lens


def setup(
    cfg: RunConfig, resume: bool, accelerator, inputs, fsdp: bool = False, model_hook=None
) -> Run:
    """Model and optimizer, restored from the latest checkpoint on resume, or (a new run with
    `train.init_from`) the weights of another run's checkpoint with a fresh optimizer at step 0."""
    from accelerate.utils import set_seed

    from .tokenizer import tokenizer_path

    tc, mc = cfg.train, cfg.model
    out_dir = Path(tc.out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out_dir)
    batches, tok, byte_lens = inputs

    ckpt = find_checkpoint(out_dir, resume, accelerator)
    if ckpt is not None:
        check_resume(ckpt, cfg, batches, accelerator.num_processes)
    # checked in read_inputs; a resumed run continues from its own checkpoint instead
    init = Path(tc.init_from) if tc.init_from and ckpt is None else None

    set_seed(tc.seed)
    model = GPT(dataclasses.replace(mc))
    n_params = model.num_params()
    state = RunState()
    opt_saved = None
    if ckpt is not None:
        load_weights(model, ckpt / "model.safetensors")
        info, tensors = read_trainer_state(ckpt)
        state = RunState(
            step=int(info["step"]),
            tokens_seen=int(info["tokens_seen"]),
            # null when the run never evaluated (eval_iters=0) or no evaluation was finite yet
            best_val=info.get("best_val_loss"),
            evals_without_improvement=int(info.get("evals_without_improvement", 0)),
        )
        opt_saved = (tensors, info.get("optimizer"))
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        if accelerator.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    elif init is not None:
        load_weights(model, init / "model.safetensors")
        accelerator.print(f"starting from the weights of {init} (fresh optimizer, step 0)")
    if model_hook is not None:  # e.g. LoRA adapters (azgpt/lora.py), once the weights are in
        model = model_hook(model, ckpt)
    flops_per_token = model.flops_per_token()  # of the whole model, before any sharding
    model.to(accelerator.device)
    mode = compile_mode(cfg, accelerator.device.type)
    if mode:
        # Compile the module in place (its state dict keeps plain names), never a wrapper.
        # Under FSDP each block is compiled on its own, inside its sharding unit.
        for m in model.transformer.h if fsdp else [model]:
            m.compile(mode=mode)
    shards = None
    if fsdp:
        from . import fsdp as fsdp_mod

        fsdp_mod.shard(model, accelerator.device.type, accelerator.num_processes)
        shards = fsdp_mod.shard_report(model)
    optimizer = make_optimizer(  # after sharding: the optimizer holds the sharded parameters
        model,
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        betas=(tc.beta1, tc.beta2),
        device_type=accelerator.device.type,
        optimizer=tc.optimizer,
        muon_lr=tc.muon_lr,
    )
    if fsdp:
        wrapped, optimizer = model, accelerator.prepare(optimizer)
    else:
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    if opt_saved is not None:
        restore_optimizer(wrapped, optimizer, ckpt, *opt_saved, cfg, accelerator)
        if accelerator.scaler is not None and "scaler" in info:
            accelerator.scaler.load_state_dict(info["scaler"])
        accelerator.print(f"resuming from {ckpt} at step {state.step}")

    run = Run(
        cfg=cfg,
        accelerator=accelerator,
        model=wrapped,
        raw=model,
        optimizer=optimizer,
        batches=batches,
        tokenizer=tok,
        tokenizer_file=tokenizer_path(cfg.data.tokenizer),
        byte_lens=byte_lens,
        precision=accelerator.mixed_precision,
        compile_mode=mode,
        fsdp=fsdp,
        n_params=n_params,
        flops_per_token=flops_per_token,
        shards=shards,
        state=state,
    )
    accelerator.print(
        f"model: {n_params:,} parameters ({n_params / 1e6:.1f}M); {run.world} process(es) on "
        f"{run.device.type}{fsdp_banner(shards, run.world)}, mixed precision {run.precision}, "
        f"compile {mode or 'off'}; {run.tokens_per_step:,} tokens per step"
    )
    return run


def fsdp_banner(shards: dict | None, world: int) -> str:
    """' (FSDP: ...)' only when every parameter is really sharded."""
    if not shards or shards["dtensor_params"] != shards["params"]:
        return ""
    share = shards["local_numel"] / max(shards["numel"], 1)
    return f" (FSDP: every parameter sharded, {share:.0%} of the elements on each of {world})"
