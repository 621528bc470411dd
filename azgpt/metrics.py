"""The metrics logger: metrics.jsonl, the progress bar, TensorBoard, and the one host sync per
log interval."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import latest_checkpoint, now
from .fsutil import atomic_path, open_no_follow
from .hardware import peak_flops

if TYPE_CHECKING:
    from .run import Run


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
        self.flops_per_token = run.flops_per_token  # the whole model's, not a shard's
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
        shards = self.shards() if run.state.step == 0 else None  # a collective: every rank
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
                    "fsdp": shards,
                    "time": now(),
                }
            )
        elif run.main:
            truncate_metrics(self.path, run.state.step)

    def shards(self) -> list[dict] | None:
        """Under FSDP, what each process holds (fsdp.shard_report), gathered on every rank."""
        run = self.run
        if not run.shards:
            return None
        keys = ("params", "dtensor_params", "numel", "local_numel")
        mine = torch.tensor([run.shards[k] for k in keys], device=run.device)
        rows = run.accelerator.gather(mine[None]).tolist()
        return [dict(zip(keys, r)) for r in rows]

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
            run.writer.wait()  # a checkpoint still being written is the last good one
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
