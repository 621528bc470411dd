"""The training loop: Hugging Face Accelerate on one CPU, one GPU or many processes.

Read it top to bottom: `train` sets up a `Run` (accelerator, data, model, optimizer, restored
state), then loops over `train_step`; every `eval_interval` steps it calls `evaluate`, `save` and
`sample_text`. A `Logger` owns metrics.jsonl, the progress bar and the one host sync per log
interval. `RunState` is everything that changes from step to step and goes into a checkpoint.

The loop is Accelerate's idiomatic one (`accumulate`, `backward`, clip when gradients sync). The
LR is set per step from `optim.lr_at`, batches are a pure function of (seed, step, micro-step), and
every evaluation writes a checkpoint, so `--resume` continues exactly where a run stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checkpoint import (
    RunLock,
    clean_stale_temps,
    full_model_state,
    latest_checkpoint,
    load_weights,
    now,
    optimizer_state,
    read_json,
    read_trainer_state,
    restore_optimizer_state,
    save_checkpoint,
    step_dirs,
)
from .config import ModelConfig, RunConfig
from .data import TokenData
from .errors import UserError
from .fsutil import atomic_path, open_no_follow
from .model import GPT
from .optim import lr_at, make_optimizer
from .sample import SAMPLING

# ----------------------------------------------------------------------------- hardware facts

# Dense tensor-core peaks (FLOP/s) from vendor data sheets, per compute dtype: (bf16, fp16, tf32).
# MFU in the progress bar and metrics.jsonl is measured against the peak of the dtype the run
# computes in ("no" mixed precision runs TF32 matmuls on CUDA). bench/gpu.py also measures the
# card's real bf16 matmul peak and reports MFU against both.
PEAK_FLOPS = {
    "H200": (989e12, 989e12, 494e12),
    "H100 SXM": (989e12, 989e12, 494e12),
    "H100 NVL": (835e12, 835e12, 418e12),
    "H100 PCIe": (756e12, 756e12, 378e12),
    "H100": (989e12, 989e12, 494e12),
    "GH200": (989e12, 989e12, 494e12),
    "B200": (2250e12, 2250e12, 1100e12),
    "A100": (312e12, 312e12, 156e12),
    "A800": (312e12, 312e12, 156e12),
    "L40S": (362e12, 362e12, 183e12),
    "L40": (181e12, 181e12, 90e12),
    "L4": (121e12, 121e12, 60e12),
    "A10G": (70e12, 70e12, 35e12),
    "A10": (125e12, 125e12, 62e12),
    "A6000": (155e12, 155e12, 77e12),
    "RTX 4090": (165e12, 165e12, 83e12),
    "RTX 3090": (71e12, 71e12, 36e12),
    # Pre-Ampere: no bf16 tensor cores (bf16 is emulated), fp16 tensor cores, no TF32.
    "V100": (None, 125e12, 15.7e12),
    "T4": (None, 65e12, 8.1e12),
}
_DTYPE_COLUMN = {"bf16": 0, "fp16": 1, "no": 2}


def peak_flops(card: str, precision: str) -> float | None:
    """The data-sheet peak of `card` (a CUDA device name) for mixed precision `precision`."""
    for key, peaks in PEAK_FLOPS.items():  # ordered: specific names before generic ones
        if key in card:
            return peaks[_DTYPE_COLUMN[precision]]
    return None


def choose_mixed_precision(setting: str, device_type: str, capability: tuple[int, int] | None):
    """The precision a run computes in. `auto`: bf16 only where the card has bf16 tensor cores
    (compute capability 8.0+, Ampere and later); `torch.cuda.is_bf16_supported()` also says yes
    on a T4 or V100, where bf16 is emulated at a fraction of fp16's speed, so older cards get
    fp16 with loss scaling. CPU runs in fp32."""
    if device_type != "cuda":
        if setting == "fp16":
            raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU.")
        return "no" if setting == "auto" else setting
    native_bf16 = capability is not None and capability >= (8, 0)
    if setting == "auto":
        return "bf16" if native_bf16 else "fp16"
    if setting == "bf16" and not native_bf16:
        warnings.warn(
            f"train.mixed_precision=bf16 on a card of compute capability {capability} is emulated "
            "and slow; fp16 (or auto) uses its tensor cores",
            stacklevel=2,
        )
    return setting


def compile_mode(cfg: RunConfig, device_type: str) -> str | None:
    c = cfg.train.compile
    if c == "off" or (c == "auto" and device_type != "cuda"):
        return None
    return "default" if c in ("auto", "on") else c


# ----------------------------------------------------------------------------- the run


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
    data: TokenData
    tokenizer: object
    tokenizer_file: Path
    byte_lens: np.ndarray  # UTF-8 bytes per token id, for bits per byte
    precision: str
    compile_mode: str | None
    fsdp: bool
    n_params: int
    state: RunState = field(default_factory=RunState)

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


def train(cfg: RunConfig, resume: bool = False) -> TrainResult:
    """Train (or, with `resume`, continue) the run `cfg` describes."""
    tc = cfg.train
    accelerator = make_accelerator(cfg)
    inputs = read_inputs(cfg)  # read-only checks first: a refused run creates no file at all
    lock = RunLock(Path(tc.out_dir))
    if accelerator.is_main_process:
        lock.acquire()
    try:
        run = setup(cfg, resume, accelerator, inputs)
        return loop(run)
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            f"CUDA ran out of memory with batch_size={tc.batch_size}, block_size={cfg.model.block_size}; lower "
            "train.batch_size (and raise train.grad_accum to keep the global batch), or lower model.block_size."
        ) from None
    finally:
        if tc.tensorboard:
            accelerator.end_training()
        lock.release()


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator

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
    accelerator = Accelerator(
        gradient_accumulation_steps=tc.grad_accum,
        mixed_precision=precision,
        cpu=not cuda,
        log_with="tensorboard" if tc.tensorboard else None,
        project_dir=tc.out_dir if tc.tensorboard else None,
    )
    if accelerator.device.type == "cuda":
        # TF32 matmuls: ~2x on fp32 work (bf16 autocast leaves a few fp32 ops) at no loss cost.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def read_inputs(cfg: RunConfig) -> tuple[TokenData, object, np.ndarray]:
    """The token files and the tokenizer, checked against each other and the model."""
    from .tokenizer import load_tokenizer, token_byte_lengths

    mc = cfg.model
    data = TokenData(cfg.data.dir, mc.block_size, mc.vocab_size, tokenizer=cfg.data.tokenizer)
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.get_vocab_size() > mc.vocab_size:
        raise UserError(
            f"the tokenizer has {tok.get_vocab_size()} ids but model.vocab_size is {mc.vocab_size}; raise model.vocab_size."
        )
    byte_lens = token_byte_lengths(tok)
    byte_lens = np.pad(byte_lens, (0, max(0, mc.vocab_size - len(byte_lens))))
    return data, tok, byte_lens


def setup(cfg: RunConfig, resume: bool, accelerator, inputs) -> Run:
    """Model and optimizer, restored from the latest checkpoint on resume."""
    from accelerate.utils import DistributedType, set_seed

    from .tokenizer import tokenizer_path

    tc, mc = cfg.train, cfg.model
    out_dir = Path(tc.out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out_dir)
    data, tok, byte_lens = inputs

    ckpt = find_checkpoint(out_dir, resume, accelerator)
    if ckpt is not None:
        check_resume(ckpt, cfg, data, accelerator.num_processes)

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
    model.to(accelerator.device)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    mode = compile_mode(cfg, accelerator.device.type)
    if mode:
        # Compile the module, not its DDP/FSDP wrapper (in place: the state dict keeps plain
        # names). Under FSDP each block is compiled on its own, inside its sharding unit.
        for m in model.transformer.h if fsdp else [model]:
            m.compile(mode=mode)
    optimizer = make_optimizer(
        model,
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        betas=(tc.beta1, tc.beta2),
        device_type=accelerator.device.type,
        optimizer=tc.optimizer,
        muon_lr=tc.muon_lr,
    )
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
        data=data,
        tokenizer=tok,
        tokenizer_file=tokenizer_path(cfg.data.tokenizer),
        byte_lens=byte_lens,
        precision=accelerator.mixed_precision,
        compile_mode=mode,
        fsdp=fsdp,
        n_params=n_params,
        state=state,
    )
    accelerator.print(
        f"model: {n_params:,} parameters ({n_params / 1e6:.1f}M); {run.world} process(es) on "
        f"{run.device.type}{' (FSDP)' if fsdp else ''}, mixed precision {run.precision}, "
        f"compile {mode or 'off'}; {run.tokens_per_step:,} tokens per step"
    )
    return run


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


def check_resume(ckpt: Path, cfg: RunConfig, data: TokenData, world: int) -> None:
    """Refuse a resume that would not continue the same run: another model shape, other data,
    or another data order."""
    fix = "the checkpoint is incomplete; use another one."
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
    meta = read_json(ckpt / "meta.json", fix)
    was = meta.get("tokenizer_sha256")
    if was and was != data.manifest["tokenizer"]["sha256"]:
        raise UserError(
            f"{ckpt} was trained on data from another tokenizer than {data.dir} (sha256 differs); "
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


# ----------------------------------------------------------------------------- one step


def train_step(run: Run, step: int, forward) -> torch.Tensor:
    """One optimizer step over `grad_accum` micro-batches; returns the mean loss, on the device
    (reading it back is a host sync, left to the logger)."""
    tc = run.cfg.train
    acc = run.accelerator
    for g in run.optimizer.param_groups:
        g["lr"] = run.lr(step) * g.get("lr_scale", 1.0)  # Muon groups: train.muon_lr / train.lr
    skip_nonfinite = tc.nan_policy == "skip" and acc.scaler is None
    total = torch.zeros((), device=run.device)
    for micro in range(tc.grad_accum):
        x, y = run.data.get_batch(
            tc.seed, step, micro, tc.batch_size, run.rank, run.world, run.device
        )
        with acc.accumulate(run.model):
            loss = forward(x, y)
            acc.backward(loss)
            update = True
            if acc.sync_gradients and (tc.grad_clip > 0 or skip_nonfinite):
                norm = acc.clip_grad_norm_(
                    run.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf")
                )
                # nan_policy=skip: one host sync per step to drop an update with non-finite
                # gradients before it reaches the weights (fp16 runs leave this to the scaler).
                if skip_nonfinite and not torch.isfinite(norm):
                    update = False
            if update:
                run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        total += loss.detach() / tc.grad_accum
    return total


def first_step(run: Run, step: int) -> torch.Tensor:
    """The first step, where a compiled model is first run: if compiling fails (no working
    Triton or C++ compiler, say), warn once and train uncompiled from the same state."""
    if not run.compile_mode:
        return train_step(run, step, run.model)
    acc_step = run.accelerator.step  # the accumulation counter a failed try advances
    try:
        return train_step(run, step, run.model)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        warnings.warn(
            f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:100]}); training uncompiled",
            stacklevel=1,
        )
        for m in [run.raw, *run.raw.transformer.h]:
            m._compiled_call_impl = None  # back to the eager forward
        run.compile_mode = None
        run.optimizer.zero_grad(set_to_none=True)
        run.accelerator.step = acc_step
        return train_step(run, step, run.model)


# ----------------------------------------------------------------------------- evaluate, sample, save


def evaluate(run: Run) -> dict:
    """Loss, perplexity and bits per byte on a fixed set of validation windows, through the
    prepared model (under FSDP the forward is a collective: every rank takes part)."""
    from .evaluate import bits_per_byte

    tc = run.cfg.train
    run.model.eval()
    tot = torch.zeros(3, dtype=torch.float64, device=run.device)  # nll sum, tokens, bytes
    with torch.no_grad():
        for x, y in run.data.eval_batches(
            tc.seed, tc.eval_iters, tc.batch_size, run.rank, run.world, run.device
        ):
            with run.accelerator.autocast():
                loss = run.model(x, y)
            tot[0] += loss.double() * y.numel()
            tot[1] += y.numel()
            tot[2] += float(run.byte_lens[y.cpu().numpy()].sum())
    tot = run.accelerator.reduce(tot, reduction="sum")
    run.model.train()
    nll, n, nbytes = tot.tolist()
    vl = nll / max(n, 1)
    return {"val_loss": vl, "val_ppl": math.exp(min(vl, 50)), "val_bpb": bits_per_byte(nll, nbytes)}


def sample_text(run: Run, weights: dict | None = None) -> str:
    """A line sampled from `sample_prompt`, on the main process. Under FSDP the sample comes
    from a local copy built from the gathered weights (`weights`), since the sharded model's
    forward needs every rank."""
    from .tokenizer import EOT, decode, encode

    tc = run.cfg.train
    if tc.sample_tokens <= 0 or not run.main:
        return ""
    if run.fsdp:
        if weights is None:
            return ""
        model = GPT(run.raw.config).to(run.device)
        model.load_state_dict({k: v for k, v in weights.items()}, strict=False)
        if run.raw.config.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
    else:
        model = run.raw
    eot = run.tokenizer.token_to_id(EOT)
    ids = [eot] + encode(run.tokenizer, tc.sample_prompt)  # as `azgpt sample` does
    g = torch.Generator(device=run.device).manual_seed(tc.seed)
    x = torch.tensor([ids[-run.cfg.model.block_size :]], device=run.device)
    model.eval()
    with torch.no_grad(), run.accelerator.autocast():
        out = [
            int(t)
            for t in model.generate(
                x,
                tc.sample_tokens,
                SAMPLING["temperature"],
                SAMPLING["top_k"],
                SAMPLING["top_p"],
                eot,
                g,
            )
        ]
    model.train()
    return tc.sample_prompt + decode(run.tokenizer, [t for t in out if t != eot])


def save(run: Run, ev: dict | None) -> dict | None:
    """Write a checkpoint (every rank calls this: gathering sharded state is a collective).
    Returns the gathered weights under FSDP (for the sample), else None."""
    st, tc = run.state, run.cfg.train
    vl = ev["val_loss"] if ev else None
    is_best = vl is not None and math.isfinite(vl) and (st.best_val is None or vl < st.best_val)
    if is_best:
        st.best_val, st.evals_without_improvement = vl, 0
    elif ev:
        st.evals_without_improvement += 1
    weights = full_model_state(run.model) if run.fsdp else None
    opt = optimizer_state(run.model, run.optimizer)
    run.accelerator.wait_for_everyone()
    if not run.main:
        return None
    extra = {"rng.torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        extra["rng.cuda"] = torch.cuda.get_rng_state(run.device)
    loader = {"step": st.step, "micro": 0, **data_order(run.cfg, run.world)}
    trainer_state = {
        "step": st.step,
        "tokens_seen": st.tokens_seen,
        "best_val_loss": st.best_val,
        "evals_without_improvement": st.evals_without_improvement,
        "loader": loader,
    }
    if run.accelerator.scaler is not None:
        trainer_state["scaler"] = {
            k: (v.item() if torch.is_tensor(v) else v)
            for k, v in run.accelerator.scaler.state_dict().items()
        }
    meta = {
        "step": st.step,
        "tokens_seen": st.tokens_seen,
        "val_loss": vl,
        "val_bpb": ev.get("val_bpb") if ev else None,
        "best_val_loss": st.best_val,
        "params": run.n_params,
        "tokenizer_sha256": run.data.manifest["tokenizer"]["sha256"],
        "tokenizer_path": str(run.tokenizer_file.resolve()),
        "data_dir": str(Path(run.cfg.data.dir).resolve()),
        "loader": loader,
        "config": run.cfg.to_dict(),
        "azgpt_version": __version__,
        "time": now(),
    }
    save_checkpoint(
        run.out_dir,
        st.step,
        run.raw,
        opt,
        meta,
        trainer_state,
        extra,
        is_best=is_best,
        keep_last=tc.keep_last,
        model_sd=weights,
        tokenizer_file=run.tokenizer_file,
    )
    return weights


# ----------------------------------------------------------------------------- logging


class Logger:
    """metrics.jsonl, the progress bar and TensorBoard. Step losses stay on the device in a
    buffer and are read back (one host sync) every `log_interval` steps and before every
    evaluation, so no unchecked step ever goes into a checkpoint."""

    clock = staticmethod(time.perf_counter)  # throughput's clock

    def __init__(self, run: Run):
        from tqdm.auto import tqdm

        self.run = run
        tc = run.cfg.train
        self.path = run.out_dir / "metrics.jsonl"
        self.buf = torch.zeros(tc.log_interval, device=run.device)
        self.steps: list[int] = []
        self.flops_per_token = run.raw.flops_per_token()
        self.peak = None
        if run.device.type == "cuda":
            # MFU counts the whole model's FLOPs (not a rank's FSDP shard) against the data
            # sheet peak of the dtype in use, summed over processes.
            peak = peak_flops(torch.cuda.get_device_name(run.device), run.precision)
            self.peak = peak * run.world if peak else None
        self.t_last, self.tokens_at_last = self.clock(), run.state.tokens_seen
        self.pbar = tqdm(
            total=tc.max_iters,
            initial=run.state.step,
            disable=not run.main,
            dynamic_ncols=True,
            desc="train",
            unit="step",
        )
        if tc.tensorboard:
            flat = {f"{sec}.{k}": v for sec, t in run.cfg.to_dict().items() for k, v in t.items()}
            run.accelerator.init_trackers("tensorboard", config=flat)
        if run.main and run.state.step == 0:
            self.path.unlink(missing_ok=True)
            self.write(
                {
                    "event": "start",
                    "params": run.n_params,
                    "config": run.cfg.to_dict(),
                    "world": run.world,
                    "precision": run.precision,
                    "mfu_peak": "data sheet",
                    "time": now(),
                }
            )
        elif run.main:
            truncate_metrics(self.path, run.state.step)

    def write(self, row: dict) -> None:
        if self.run.main:
            fd = open_no_follow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            with open(fd, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def print(self, msg: str) -> None:
        if self.run.main:  # tqdm.write prints even where the bar is disabled
            self.pbar.write(msg)

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.buf[len(self.steps)] = loss
        self.steps.append(step)

    @property
    def full(self) -> bool:
        return len(self.steps) == len(self.buf)

    def _rows(self, steps, losses, tps=None, mfu=None) -> None:
        for s, v in zip(steps, losses):
            row = {"step": s + 1, "tokens": (s + 1) * self.run.tokens_per_step, "loss": v}
            row["lr"] = self.run.lr(s)
            if tps is not None:
                row["tok_per_s"] = tps
            if mfu is not None:
                row["mfu"] = mfu
            self.write(row)

    def flush(self) -> bool:
        """Read back, check and log the buffered losses; False when training must stop."""
        run, tc = self.run, self.run.cfg.train
        n = len(self.steps)
        if n == 0:
            return True
        steps, self.steps = self.steps, []
        losses = run.accelerator.reduce(self.buf[:n].clone(), reduction="mean").tolist()
        bad = [s for s, v in zip(steps, losses) if not math.isfinite(v)]
        if bad and tc.nan_policy == "stop":
            first = steps.index(bad[0])
            self._rows(steps[:first], losses[:first])
            last_ck = latest_checkpoint(run.out_dir)
            if run.main:
                print(
                    f"azgpt: error: the loss became {losses[first]} at step {bad[0] + 1}; "
                    f"training stopped, the last good checkpoint is {last_ck or 'none (none was written yet)'}. "
                    "Lower train.lr or use train.mixed_precision=bf16.",
                    file=sys.stderr,
                )
            self.write({"event": "nonfinite_loss", "step": bad[0] + 1})
            return False
        for s in bad:  # nan_policy=skip: those updates were dropped
            self.write({"event": "skipped_step", "step": s + 1})
        if bad:
            self.pbar.write(
                f"skipped {len(bad)} update(s) with a non-finite loss (first at step {bad[0] + 1})"
            )
        t = self.clock()
        tps = (run.state.tokens_seen - self.tokens_at_last) / max(t - self.t_last, 1e-9)
        self.t_last, self.tokens_at_last = t, run.state.tokens_seen
        mfu = self.flops_per_token * tps / self.peak if self.peak else None
        good = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
        self._rows([s for s, _ in good], [v for _, v in good], tps, mfu)
        if good:
            run.state.last_loss = good[-1][1]
        post = {"tok/s": f"{tps:,.0f}", "lr": f"{run.lr(steps[-1]):.2e}"}
        if run.state.last_loss is not None:
            post["loss"] = f"{run.state.last_loss:.4f}"
        if mfu is not None:
            post["mfu"] = f"{100 * mfu:.1f}%"  # against the data-sheet peak (see PEAK_FLOPS)
        self.pbar.set_postfix(post, refresh=False)
        self.pbar.update(n)
        if tc.tensorboard and run.state.last_loss is not None:
            run.accelerator.log(
                {"train_loss": run.state.last_loss, "lr": run.lr(steps[-1]), "tokens_per_s": tps},
                step=steps[-1] + 1,
            )
        return True

    def restart_clock(self) -> None:
        """Throughput counts training steps only (not evaluation or checkpoint time)."""
        self.t_last = self.clock()

    def close(self) -> None:
        self.pbar.close()


# ----------------------------------------------------------------------------- the loop


def loop(run: Run) -> TrainResult:
    from .report import plot_losses

    log = Logger(run)
    try:
        return _loop(run, log, plot_losses)
    finally:
        log.close()  # ends the progress bar's line, so an error message starts on its own


def _loop(run: Run, log: Logger, plot_losses) -> TrainResult:
    tc, st = run.cfg.train, run.state
    end = min(tc.max_iters, tc.stop_at) if tc.stop_at else tc.max_iters
    ok, first = True, True
    while st.step < end:
        loss = first_step(run, st.step) if first else train_step(run, st.step, run.model)
        first = False
        st.tokens_seen += run.tokens_per_step
        log.add(st.step, loss)
        st.step += 1
        at_eval = st.step % tc.eval_interval == 0 or st.step == end
        if log.full or at_eval:
            if not log.flush():
                ok, st.stop_reason = False, "nonfinite_loss"
                break
        if not at_eval:
            continue
        ev = evaluate(run) if tc.eval_iters > 0 else None
        st.last_eval = ev
        if ev:
            log.write({"event": "eval", "step": st.step, "tokens": st.tokens_seen, **ev})
            log.print(
                f"step {st.step}: val loss {ev['val_loss']:.4f}, ppl {ev['val_ppl']:.2f}, bpb {ev['val_bpb']:.4f}"
            )
            if tc.tensorboard:
                run.accelerator.log(ev, step=st.step)
        weights = save(run, ev)
        if ev:
            text = sample_text(run, weights)
            if text:
                log.print(f"  sample: {text!r}")
                log.write({"event": "sample", "step": st.step, "text": text})
        if run.main:
            try:
                plot_losses(log.path, run.out_dir / "loss.png")
            except Exception as e:  # a plot must never kill a run
                warnings.warn(f"could not draw loss.png ({e})", stacklevel=1)
        if tc.early_stop_patience and st.evals_without_improvement >= tc.early_stop_patience:
            st.stop_reason = "early_stop"
            log.print(
                f"early stop at step {st.step}: {st.evals_without_improvement} evaluations without a "
                f"better validation loss (best {st.best_val:.4f}, kept as `best`)"
            )
            break
        log.restart_clock()
    if ok and st.stop_reason is None:
        st.stop_reason = "max_iters" if st.step >= tc.max_iters else "stop_at"
    log.write({"event": "end", "step": st.step, "reason": st.stop_reason, "time": now()})
    log.close()
    if run.main and ok:
        run.accelerator.print(
            f"done: step {st.step} ({st.stop_reason}), checkpoints in {run.out_dir} "
            f"(last -> {os.readlink(run.out_dir / 'last')})"
        )
    return TrainResult(
        ok,
        st.step,
        st.last_loss,
        st.last_eval["val_loss"] if st.last_eval else None,
        run.out_dir,
        st.stop_reason,
    )


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows past the checkpoint's step (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if not isinstance(row, dict) or row.get("event") == "end":
            continue
        if row.get("event") == "start" or (
            isinstance(row.get("step"), int) and row["step"] <= step
        ):
            keep.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(keep) + "\n" if keep else "", encoding="utf-8")
