"""The training loop: Hugging Face Accelerate on one CPU, one GPU or many processes.

The loop is Accelerate's idiomatic one (`accumulate`, `backward`, clip when gradients sync).
The LR is set per step from `optim.lr_at`, batches are a pure function of (seed, step, micro-step)
and every evaluation writes a checkpoint, so `--resume` continues exactly where a run stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checkpoint import (
    RunLock,
    clean_stale_temps,
    latest_checkpoint,
    load_weights,
    now,
    read_json,
    read_trainer_state,
    restore_optimizer,
    save_checkpoint,
    step_dirs,
)
from .config import RunConfig
from .data import TokenData
from .errors import UserError
from .model import GPT
from .optim import lr_at, make_optimizer

# Dense bf16 tensor-core peaks (FLOP/s) from vendor data sheets, for MFU in the progress bar.
# bench/gpu.py measures the card's real matmul peak instead.
GPU_BF16_PEAK = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "A6000": 155e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def gpu_peak_flops(name: str) -> float | None:
    for key, v in GPU_BF16_PEAK.items():  # ordered: specific names before generic ones
        if key in name:
            return v
    return None


@dataclass
class TrainResult:
    ok: bool
    step: int
    last_loss: float | None
    val_loss: float | None
    out_dir: Path


def _mixed_precision(cfg: RunConfig, device_type: str) -> str:
    mp = cfg.train.mixed_precision
    if mp == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "no"
    if mp == "fp16" and device_type != "cuda":
        raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU.")
    return mp


def _want_compile(cfg: RunConfig, device_type: str) -> str | None:
    c = cfg.train.compile
    if c == "off" or (c == "auto" and device_type != "cuda"):
        return None
    return "default" if c in ("auto", "on") else c


def check_resume_shape(ckpt: Path, cfg: RunConfig) -> dict:
    saved = read_json(ckpt / "config.json", "the checkpoint is incomplete; use another one.")
    want = cfg.model.to_dict()
    diff = {k: (saved.get(k), v) for k, v in want.items() if k != "dropout" and saved.get(k) != v}
    if diff:
        desc = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise UserError(
            f"checkpoint {ckpt} is from a model of another shape ({desc}); use the config it was trained with."
        )
    return saved


def train(cfg: RunConfig, resume: bool = False) -> TrainResult:
    from accelerate import Accelerator

    tc, mc = cfg.train, cfg.model
    out_dir = Path(tc.out_dir)
    want_cuda = tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available())
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto."
        )
    device_type = "cuda" if want_cuda else "cpu"
    mp = _mixed_precision(cfg, device_type)
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
        mixed_precision=mp,
        cpu=not want_cuda,
        log_with="tensorboard" if tc.tensorboard else None,
        project_dir=str(out_dir) if tc.tensorboard else None,
    )
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if device.type == "cuda":
        # TF32 matmuls: ~2x on fp32 work (bf16 autocast leaves a few fp32 ops) at no loss cost.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    lock = RunLock(out_dir)
    if main:
        lock.acquire()
    try:
        return _train(cfg, resume, accelerator, device, rank, world, main, mp)
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            f"CUDA ran out of memory with batch_size={tc.batch_size}, block_size={mc.block_size}; lower "
            "train.batch_size (and raise train.grad_accum to keep the global batch), or lower model.block_size."
        ) from None
    finally:
        if tc.tensorboard:
            accelerator.end_training()
        lock.release()


def _train(cfg, resume, accelerator, device, rank, world, main, mp) -> TrainResult:
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm

    from .report import plot_losses
    from .tokenizer import decode, encode, load_tokenizer, token_byte_lengths

    tc, mc = cfg.train, cfg.model
    out_dir = Path(tc.out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out_dir)

    data = TokenData(cfg.data.dir, mc.block_size, mc.vocab_size, tokenizer=cfg.data.tokenizer)
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.get_vocab_size() > mc.vocab_size:
        raise UserError(
            f"the tokenizer has {tok.get_vocab_size()} ids but model.vocab_size is {mc.vocab_size}; raise model.vocab_size."
        )
    byte_lens = token_byte_lengths(tok)
    byte_lens = np.pad(byte_lens, (0, max(0, mc.vocab_size - len(byte_lens))))
    eot = tok.token_to_id("<|endoftext|>")

    ckpt = None
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None and step_dirs(out_dir):
            raise UserError(
                f"{out_dir} holds step-* folders but none is a complete checkpoint; move them away to start "
                "over, or choose another train.out_dir (nothing was changed)."
            )
        if ckpt is None:
            accelerator.print(f"no checkpoint in {out_dir} yet; starting from scratch")
    elif step_dirs(out_dir):
        raise UserError(
            f"{out_dir} already holds checkpoints; pass --resume to continue that run or choose another train.out_dir."
        )
    if ckpt is not None:
        check_resume_shape(ckpt, cfg)
        was = read_json(ckpt / "meta.json", "the checkpoint is incomplete; use another one.").get(
            "tokenizer_sha256"
        )
        if was and was != data.manifest["tokenizer"]["sha256"]:
            raise UserError(
                f"{ckpt} was trained on data from another tokenizer than {cfg.data.dir} (sha256 differs); "
                "resume with the data and tokenizer it was trained with."
            )

    set_seed(tc.seed)
    gcfg = dataclasses.replace(mc)
    model = GPT(gcfg)
    n_params = model.num_params()
    optimizer = make_optimizer(
        model,
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        betas=(tc.beta1, tc.beta2),
        device_type=device.type,
    )

    start_step, tokens_seen, best_val = 0, 0, math.inf
    if ckpt is not None:
        load_weights(model, ckpt / "model.safetensors")
        info, tensors = read_trainer_state(ckpt)
        model.to(device)
        if info.get("optimizer"):
            restore_optimizer(
                optimizer,
                {k: v for k, v in tensors.items() if k.startswith("state.")},
                info["optimizer"],
            )
        else:
            warnings.warn(
                f"{ckpt} holds no optimizer state (an FSDP run); AdamW moments restart",
                stacklevel=1,
            )
        start_step = int(info["step"])
        tokens_seen = int(info["tokens_seen"])
        best_val = float(info.get("best_val_loss", math.inf))
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        accelerator.print(f"resuming from {ckpt} at step {start_step}")

    model.to(device)
    raw_model = model
    model, optimizer = accelerator.prepare(model, optimizer)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if ckpt is not None and accelerator.scaler is not None and "scaler" in info:
        accelerator.scaler.load_state_dict(info["scaler"])

    compile_mode = _want_compile(cfg, device.type)
    fwd = model
    if compile_mode:
        try:
            fwd = torch.compile(model, mode=compile_mode)
        except Exception as e:  # compile itself failed (e.g. unsupported platform)
            warnings.warn(
                f"torch.compile unavailable ({type(e).__name__}); training uncompiled", stacklevel=1
            )
            fwd, compile_mode = model, None

    tokens_per_step = tc.batch_size * mc.block_size * tc.grad_accum * world
    flops_per_token = raw_model.flops_per_token()
    peak = None
    if device.type == "cuda":
        peak = gpu_peak_flops(torch.cuda.get_device_name(device))
        if peak:
            peak *= world
    if main:
        accelerator.print(
            f"model: {n_params:,} parameters ({n_params / 1e6:.1f}M); {world} process(es) on {device.type}, "
            f"mixed precision {mp}, compile {compile_mode or 'off'}; {tokens_per_step:,} tokens per step"
        )
    metrics_path = out_dir / "metrics.jsonl"
    if tc.tensorboard:
        # Event files under OUT_DIR/tensorboard; hyper-parameters as flat scalars.
        flat = {f"{sec}.{k}": v for sec, t in cfg.to_dict().items() for k, v in t.items()}
        accelerator.init_trackers("tensorboard", config=flat)

    def log(row: dict) -> None:
        if main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    if main and start_step == 0:
        metrics_path.unlink(missing_ok=True)
        log(
            {
                "event": "start",
                "params": n_params,
                "config": cfg.to_dict(),
                "world": world,
                "time": now(),
            }
        )
    elif main:
        _truncate_metrics(metrics_path, start_step)

    eval_enabled = tc.eval_iters > 0

    def evaluate() -> dict:
        raw_model.eval()
        tot = torch.zeros(3, dtype=torch.float64, device=device)  # nll sum, tokens, bytes
        with torch.no_grad():
            for x, y in data.eval_batches(
                tc.seed, tc.eval_iters, tc.batch_size, rank, world, device
            ):
                with accelerator.autocast():
                    loss = raw_model(x, y)
                n = y.numel()
                tot[0] += loss.double() * n
                tot[1] += n
                tot[2] += float(byte_lens[y.cpu().numpy()].sum())
        tot = accelerator.reduce(tot, reduction="sum")
        raw_model.train()
        nll, n, nbytes = tot.tolist()
        vl = nll / max(n, 1)
        return {
            "val_loss": vl,
            "val_ppl": math.exp(min(vl, 50)),
            "val_bpb": nll / (math.log(2) * max(nbytes, 1)),
        }

    def sample_line() -> str:
        if tc.sample_tokens <= 0 or not main:
            return ""
        raw_model.eval()
        ids = [eot] + encode(tok, tc.sample_prompt)  # as `azgpt sample` does
        g = torch.Generator(device=device).manual_seed(tc.seed)
        x = torch.tensor([ids[-mc.block_size :]], device=device)
        with torch.no_grad(), accelerator.autocast():
            out = [int(t) for t in raw_model.generate(x, tc.sample_tokens, 0.8, 50, 0.95, eot, g)]
        raw_model.train()
        return tc.sample_prompt + decode(tok, [t for t in out if t != eot])

    def checkpoint(step: int, ev: dict | None) -> None:
        nonlocal best_val
        # FSDP shards the weights: gather a full state dict (a collective, so on every rank).
        # Its sharded optimizer state is not saved: FSDP resumes restore weights, step and data
        # position, and restart the AdamW moments (exact resume holds for 1 process and DDP).
        full_sd = accelerator.get_state_dict(model) if fsdp else None
        accelerator.wait_for_everyone()
        if not main:
            return
        vl = ev["val_loss"] if ev else None
        is_best = vl is not None and vl < best_val
        if is_best:
            best_val = vl
        extra = {"rng.torch": torch.get_rng_state()}
        if device.type == "cuda":
            extra["rng.cuda"] = torch.cuda.get_rng_state(device)
        state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "best_val_loss": best_val if best_val < math.inf else None,
            "loader": {"seed": tc.seed, "step": step, "micro": 0},
        }
        if accelerator.scaler is not None:
            state["scaler"] = {
                k: (v.item() if torch.is_tensor(v) else v)
                for k, v in accelerator.scaler.state_dict().items()
            }
        meta = {
            "step": step,
            "tokens_seen": tokens_seen,
            "val_loss": vl,
            "val_bpb": ev.get("val_bpb") if ev else None,
            "best_val_loss": best_val if best_val < math.inf else None,
            "params": n_params,
            "tokenizer_sha256": data.manifest["tokenizer"]["sha256"],
            "tokenizer_path": str(Path(cfg.data.tokenizer).resolve()),
            "data_dir": str(Path(cfg.data.dir).resolve()),
            "loader": state["loader"],
            "config": cfg.to_dict(),
            "azgpt_version": __version__,
            "time": now(),
        }
        save_checkpoint(
            out_dir,
            step,
            raw_model,
            None
            if fsdp
            else (optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer),
            meta,
            state,
            extra,
            is_best=is_best,
            keep_last=tc.keep_last,
            model_sd=full_sd,
        )

    pbar = tqdm(
        total=tc.max_iters,
        initial=start_step,
        disable=not main,
        dynamic_ncols=True,
        desc="train",
        unit="step",
    )
    loss_buf = torch.zeros(tc.log_interval, device=device)
    buf_steps: list[int] = []
    last_loss = None
    last_eval = None
    t_last = time.perf_counter()
    tokens_at_last = tokens_seen
    compiled_checked = compile_mode is None
    step = start_step
    ok = True

    skip_nonfinite = tc.nan_policy == "skip" and accelerator.scaler is None

    def run_micro(step, micro):
        x, y = data.get_batch(tc.seed, step, micro, tc.batch_size, rank, world, device)
        with accelerator.accumulate(model):
            loss = fwd(x, y)
            accelerator.backward(loss)
            skipped = False
            if accelerator.sync_gradients and (tc.grad_clip > 0 or skip_nonfinite):
                norm = accelerator.clip_grad_norm_(
                    model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf")
                )
                # nan_policy=skip: one host sync per step to drop an update with non-finite
                # gradients before it reaches the weights (fp16 runs leave this to the scaler).
                if skip_nonfinite and not torch.isfinite(norm):
                    skipped = True
            if not skipped:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def log_rows(steps: list[int], losses: list[float], tps, mfu) -> None:
        for s, v in zip(steps, losses):
            row = {
                "step": s + 1,
                "tokens": (s + 1) * tokens_per_step,
                "loss": v,
                "lr": lr_at(
                    s,
                    lr=tc.lr,
                    min_lr=tc.min_lr,
                    warmup_iters=tc.warmup_iters,
                    max_iters=tc.max_iters,
                ),
            }
            if tps is not None:
                row["tok_per_s"] = tps
            if mfu is not None:
                row["mfu"] = mfu
            log(row)

    def flush() -> bool:
        """Read back, check and log the buffered step losses; False when training must stop."""
        nonlocal buf_steps, t_last, tokens_at_last, last_loss
        n = len(buf_steps)
        if n == 0:
            return True
        losses = accelerator.reduce(loss_buf[:n].clone(), reduction="mean").tolist()
        bad = [s for s, v in zip(buf_steps, losses) if not math.isfinite(v)]
        if bad and tc.nan_policy == "skip":
            for s in bad:
                log({"event": "skipped_step", "step": s + 1})
            pbar.write(
                f"skipped {len(bad)} update(s) with a non-finite loss (first at step {bad[0] + 1})"
            )
        elif bad:
            first = buf_steps.index(bad[0])
            log_rows(buf_steps[:first], losses[:first], None, None)
            last_ck = latest_checkpoint(out_dir)
            if main:
                print(
                    f"azgpt: error: the loss became {losses[first]} at step {bad[0] + 1}; "
                    f"training stopped, the last good checkpoint is {last_ck or 'none (none was written yet)'}. "
                    "Lower train.lr or use train.mixed_precision=bf16.",
                    file=sys.stderr,
                )
            log({"event": "nonfinite_loss", "step": bad[0] + 1})
            return False
        now_t = time.perf_counter()
        tps = (tokens_seen - tokens_at_last) / max(now_t - t_last, 1e-9)
        t_last, tokens_at_last = now_t, tokens_seen
        mfu = flops_per_token * tps / peak if peak else None
        last = buf_steps[-1]
        log_rows(buf_steps, losses, tps, mfu)
        last_loss = losses[-1]
        lr_now = lr_at(
            last, lr=tc.lr, min_lr=tc.min_lr, warmup_iters=tc.warmup_iters, max_iters=tc.max_iters
        )
        post = {"loss": f"{last_loss:.4f}", "lr": f"{lr_now:.2e}", "tok/s": f"{tps:,.0f}"}
        if mfu is not None:
            post["mfu"] = f"{100 * mfu:.1f}%"
        pbar.set_postfix(post, refresh=False)
        pbar.update(n)
        if tc.tensorboard:
            accelerator.log(
                {"train_loss": last_loss, "lr": lr_now, "tokens_per_s": tps}, step=last + 1
            )
        buf_steps = []
        return True

    end = min(tc.max_iters, tc.stop_at) if tc.stop_at else tc.max_iters
    while step < end:
        lr = lr_at(
            step, lr=tc.lr, min_lr=tc.min_lr, warmup_iters=tc.warmup_iters, max_iters=tc.max_iters
        )
        for g in optimizer.param_groups:
            g["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for micro in range(tc.grad_accum):
            if not compiled_checked:
                acc_step = accelerator.step  # the accumulation counter the failed try advanced
                try:
                    loss = run_micro(step, micro)
                except Exception as e:
                    if isinstance(e, torch.cuda.OutOfMemoryError):
                        raise
                    warnings.warn(
                        f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:100]}); training uncompiled",
                        stacklevel=1,
                    )
                    fwd = model
                    optimizer.zero_grad(set_to_none=True)
                    accelerator.step = acc_step
                    loss = run_micro(step, micro)
                compiled_checked = True
            else:
                loss = run_micro(step, micro)
            step_loss += loss / tc.grad_accum
        tokens_seen += tokens_per_step
        loss_buf[len(buf_steps)] = step_loss
        buf_steps.append(step)
        step += 1
        at_eval = step % tc.eval_interval == 0 or step == end
        # Losses stay on the device until here: one host sync per log interval, and always
        # before an evaluation, so no unchecked step ever goes into a checkpoint.
        if len(buf_steps) == tc.log_interval or at_eval:
            if not flush():
                ok = False
                break
        if at_eval:
            ev = evaluate() if eval_enabled else None
            last_eval = ev
            if ev:
                log({"event": "eval", "step": step, "tokens": tokens_seen, **ev})
                text = sample_line()
                msg = f"step {step}: val loss {ev['val_loss']:.4f}, ppl {ev['val_ppl']:.2f}, bpb {ev['val_bpb']:.4f}"
                if main:  # tqdm.write prints even where the bar is disabled
                    pbar.write(msg)
                if text:
                    pbar.write(f"  sample: {text!r}")
                    log({"event": "sample", "step": step, "text": text})
                if tc.tensorboard:
                    accelerator.log(ev, step=step)
            checkpoint(step, ev)
            if main:
                try:
                    plot_losses(metrics_path, out_dir / "loss.png")
                except Exception as e:  # a plot must never kill a run
                    warnings.warn(f"could not draw loss.png ({e})", stacklevel=1)
            t_last = time.perf_counter()  # throughput counts training steps only
    pbar.close()
    if main and ok:
        accelerator.print(
            f"done: step {step}, checkpoints in {out_dir} (last -> {os.readlink(out_dir / 'last')})"
        )
    return TrainResult(ok, step, last_loss, last_eval["val_loss"] if last_eval else None, out_dir)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows past the checkpoint's step (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if row.get("step", 0) <= step or row.get("event") == "start":
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(keep) + "\n" if keep else "", encoding="utf-8")
    os.replace(tmp, path)
