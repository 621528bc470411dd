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

import math
import os
import warnings
from pathlib import Path

import torch

from . import __version__
from .checkpoint import RunLock, full_model_state, model_state, now, optimizer_state
from .config import RunConfig
from .data import BatchSource, as_batch
from .errors import UserError
from .fsdp import clip_grad_norm
from .hardware import choose_mixed_precision, eager, peak_flops  # noqa: F401  (re-exported)
from .metrics import Logger
from .model import GPT
from .resume import check_resume, data_order  # noqa: F401  (re-exported)
from .run import Run, TrainResult, make_accelerator, read_inputs, setup
from .sample import SAMPLING

# The loop reads top to bottom below; what it stands on lives beside it: hardware.py (card data
# sheets, precision, compile mode), run.py (setup), resume.py (resume checks), metrics.py (the
# logger).


def train(
    cfg: RunConfig, resume: bool = False, batches: BatchSource | None = None, model_hook=None
) -> TrainResult:
    """Train (or, with `resume`, continue) the run `cfg` describes, on `batches` (a
    `data.BatchSource`; default: the token files of `data.dir`)."""
    tc = cfg.train
    accelerator, fsdp = make_accelerator(cfg)
    # read-only checks first: a refused run creates no file at all
    inputs = read_inputs(cfg, batches)
    lock = RunLock(Path(tc.out_dir))
    if accelerator.is_main_process:
        lock.acquire()
    try:
        run = setup(cfg, resume, accelerator, inputs, fsdp, model_hook=model_hook)
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
        x, y, kw = as_batch(
            run.batches.train_batch(step, micro, tc.batch_size, run.rank, run.world, run.device)
        )
        with acc.accumulate(run.model):
            if run.fsdp:  # reduce-scatter gradients after the last micro-batch only
                run.model.set_requires_gradient_sync(acc.sync_gradients)
            loss = forward(x, y, **kw)
            acc.backward(loss)
            update = True
            if acc.sync_gradients and (tc.grad_clip > 0 or skip_nonfinite):
                max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
                if run.fsdp:
                    acc.unscale_gradients()
                    norm = clip_grad_norm(run.model.parameters(), max_norm)
                else:
                    norm = acc.clip_grad_norm_(run.model.parameters(), max_norm)
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
    with torch.no_grad(), eager(run.raw):
        for b in run.batches.val_batches(
            tc.eval_iters, tc.batch_size, run.rank, run.world, run.device
        ):
            x, y, kw = as_batch(b)
            with run.accelerator.autocast():
                loss = run.model(x, y, **kw)
            # Targets -1 (padding, prompts) are outside the loss's mean and every sum here; a
            # batch of padding only (a process out of rows) adds nothing, not its NaN mean.
            keep = y >= 0
            n = keep.sum()
            tot[0] += torch.where(n > 0, loss.double() * n, 0.0)
            tot[1] += n
            ids = y[keep].cpu().numpy()
            tot[2] += float(run.byte_lens[ids].sum())
    tot = run.accelerator.reduce(tot, reduction="sum")
    run.model.train()
    nll, n, nbytes = tot.tolist()
    vl = nll / max(n, 1)
    return {"val_loss": vl, "val_ppl": math.exp(min(vl, 50)), "val_bpb": bits_per_byte(nll, nbytes)}


def sample_text(run: Run, weights: dict | None = None) -> str:
    """A line sampled from `sample_prompt`, on the main process, from the uncompiled module (a
    growing KV cache would recompile the training graph). Under FSDP the sample comes from a
    local copy built from the gathered weights (`weights`), since the sharded model's forward
    needs every rank; every tensor of the copy must come from them."""
    from .tokenizer import EOT, decode, encode

    tc = run.cfg.train
    if tc.sample_tokens <= 0 or not run.main:
        return ""
    if run.fsdp:
        if weights is None:
            return ""
        cuda = [run.device] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the init's draws stay out of the run's RNG
            model = GPT(run.raw.config).to(run.device)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if run.raw.config.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
            missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:  # a bug, not bad input: never sample from random weights
            raise RuntimeError(
                f"the gathered weights do not fit the model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
    else:
        model = run.raw
    eot = run.tokenizer.token_to_id(EOT)
    ids = [eot] + encode(run.tokenizer, tc.sample_prompt)  # as `azgpt sample` does
    g = torch.Generator(device=run.device).manual_seed(tc.seed)
    x = torch.tensor([ids[-run.cfg.model.block_size :]], device=run.device)
    model.eval()
    with torch.no_grad(), run.accelerator.autocast(), eager(model):
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
    """Checkpoint the run: every rank calls this (gathering sharded state is a collective); the
    main process copies weights and optimizer state to host memory here, and a background thread
    writes them (`CheckpointWriter`) while training goes on. Returns the gathered weights under
    FSDP (for the sample), else None."""
    st, tc = run.state, run.cfg.train
    vl = ev["val_loss"] if ev else None
    is_best = vl is not None and math.isfinite(vl) and (st.best_val is None or vl < st.best_val)
    if is_best:
        st.best_val, st.evals_without_improvement = vl, 0
    elif ev:
        st.evals_without_improvement += 1
    # Host copies, taken before the next step changes anything (under FSDP the gathered state
    # is already a fresh copy).
    custom = getattr(run.raw, "checkpoint_state", None)  # LoRA: merged weights, the adapter
    if custom is not None:
        weights, adapter = custom()
    else:
        weights = full_model_state(run.model) if run.fsdp else model_state(run.raw)
        adapter = {}
    opt = optimizer_state(run.model, run.optimizer)
    run.accelerator.wait_for_everyone()
    if not run.main:
        return None
    extra = {"rng.torch": torch.get_rng_state(), **adapter}
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
        "tokenizer_sha256": run.batches.tokenizer_sha256,
        "tokenizer_path": str(run.tokenizer_file.resolve()),
        "data_dir": str(Path(run.batches.dir).resolve()),
        "init_from": str(Path(tc.init_from).resolve()) if tc.init_from else None,
        **getattr(run.batches, "meta", {}),  # what a source says about the run (chat format)
        "loader": loader,
        "config": run.cfg.to_dict(),
        "azgpt_version": __version__,
        "time": now(),
    }
    run.writer.submit(
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
    return weights if run.fsdp else None


# ----------------------------------------------------------------------------- the loop


def loop(run: Run) -> TrainResult:
    from .report import plot_losses

    log = Logger(run)
    try:
        return _loop(run, log, plot_losses)
    finally:
        log.close()  # ends the progress bar's line, so an error message starts on its own
        run.writer.wait(raise_error=False)  # on an error: let the write in flight finish


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
    run.writer.wait()  # the last checkpoint is on disk before the run says it is done
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
