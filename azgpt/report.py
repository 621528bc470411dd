"""Plots and a markdown report from a run's metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .fsutil import atomic_path, check_writable


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Metrics:
    """What a metrics.jsonl holds, whatever state the run left it in (cut by a kill, stopped by
    a NaN, empty): malformed and non-finite rows are counted, never fatal."""

    train: list[dict] = field(default_factory=list)  # rows with finite step, tokens and loss
    evals: list[dict] = field(default_factory=list)
    start: dict = field(default_factory=dict)
    end: dict = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)  # nonfinite_loss, skipped_step, ...
    skipped_lines: int = 0


def read_metrics(path: Path) -> Metrics:
    m = Metrics()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            row = None
        if not isinstance(row, dict):
            m.skipped_lines += bool(line.strip())
            continue
        ev = row.get("event")
        if ev == "eval":
            if all(_num(row.get(k)) for k in ("step", "tokens", "val_loss", "val_ppl", "val_bpb")):
                m.evals.append(row)
            else:
                m.skipped_lines += 1
        elif ev == "start":
            m.start = row
        elif ev == "end":
            m.end = row
        elif ev is not None:
            m.events.append(row)
        elif all(_num(row.get(k)) for k in ("step", "tokens", "loss")):
            m.train.append(row)
        else:
            m.skipped_lines += 1  # a NaN loss, or a row cut by a kill
    return m


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(metrics: Path, out: Path) -> None:
    m = read_metrics(metrics)
    train, evals = m.train, m.evals
    if not train:
        return
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs, ys = [r["tokens"] for r in train], [r["loss"] for r in train]
    ema, smooth = ys[0], []
    for y in ys:  # exponential moving average over ~20 steps, for a readable trend
        ema = 0.95 * ema + 0.05 * y
        smooth.append(ema)
    ax.plot(xs, ys, color="tab:blue", alpha=0.3, lw=0.8)
    ax.plot(xs, smooth, color="tab:blue", lw=1.5, label="train (smoothed)")
    if evals:
        ax.plot(
            [r["tokens"] for r in evals],
            [r["val_loss"] for r in evals],
            "o-",
            color="tab:orange",
            label="validation",
        )
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _line_plot(out: Path, rows: list[dict], key: str, ylabel: str) -> None:
    rows = [r for r in rows if _num(r.get(key))]
    if not rows:
        return
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["tokens"] for r in rows], [r[key] for r in rows], lw=1)
    ax.set_xlabel("tokens")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _why_stopped(m: Metrics) -> str:
    nonfinite = [e for e in m.events if e.get("event") == "nonfinite_loss"]
    reason = m.end.get("reason")
    if reason == "nonfinite_loss" or (nonfinite and not m.end):
        step = nonfinite[-1].get("step", "?") if nonfinite else "?"
        return f"stopped: the loss became non-finite at step {step} (train.nan_policy=stop)"
    if reason == "early_stop":
        return (
            f"stopped early at step {m.end.get('step')}: train.early_stop_patience evaluations "
            "without a better validation loss (`best` holds the best checkpoint)"
        )
    if reason == "stop_at":
        return f"paused at step {m.end.get('step')} (train.stop_at); continue with --resume"
    if reason == "max_iters":
        return f"finished: ran to train.max_iters ({m.end.get('step')} steps)"
    return "still running, or ended without a final row (killed?); continue with --resume"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{metrics} does not exist; pass a run folder written by `azgpt train`.")
    m = read_metrics(metrics)
    train, evals, start = m.train, m.evals, m.start
    out_dir = Path(out) if out else run / "report"
    check_writable(out_dir / "report.md", "--out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create report folder {out_dir} ({e.strerror}); choose another --out."
        ) from None
    plot_losses(metrics, out_dir / "loss.png")
    _line_plot(out_dir / "lr.png", train, "lr", "learning rate")
    _line_plot(out_dir / "throughput.png", train, "tok_per_s", "tokens / s")
    lines = [f"# azgpt run report: {run.name}", ""]
    if train:
        last = train[-1]
        lines.append(f"- steps: {last['step']:,}, tokens seen: {last['tokens']:,}")
    else:
        lines.append("- no training step was logged yet")
    params = start.get("params")
    lines.append(f"- parameters: {params:,}" if _num(params) else "- parameters: n/a")
    lines.append(f"- processes: {start.get('world', 1)}")
    if train:
        lines.append(f"- final train loss: {train[-1]['loss']:.4f}")
    if evals:
        e = evals[-1]
        best = min(evals, key=lambda r: r["val_loss"])
        lines += [
            f"- final validation: loss {e['val_loss']:.4f}, perplexity {e['val_ppl']:.2f}, bits per byte {e['val_bpb']:.4f}",
            f"- best validation loss: {best['val_loss']:.4f} at step {best['step']:,}",
        ]
    tps = [r["tok_per_s"] for r in train[len(train) // 2 :] if _num(r.get("tok_per_s"))]
    if tps:
        lines.append(f"- median tokens/s (second half): {sorted(tps)[len(tps) // 2]:,.0f}")
    lines.append(f"- {_why_stopped(m)}")
    skipped = [e for e in m.events if e.get("event") == "skipped_step"]
    if skipped:
        lines.append(
            f"- {len(skipped)} update(s) skipped for a non-finite loss (train.nan_policy=skip)"
        )
    if m.skipped_lines:
        lines.append(f"- {m.skipped_lines} unreadable line(s) in metrics.jsonl were ignored")
    lines.append("")
    for title, png in (("Loss", "loss"), ("Learning rate", "lr"), ("Throughput", "throughput")):
        if (out_dir / f"{png}.png").is_file():
            lines += [f"## {title}", "", f"![{png}]({png}.png)", ""]
    if evals:
        lines += [
            "## Evaluations",
            "",
            "| step | tokens | val loss | ppl | bpb |",
            "|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['step']:,} | {r['tokens']:,} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | {r['val_bpb']:.4f} |"
            for r in evals
        ]
        lines.append("")
    if start.get("config"):
        lines += [
            "## Configuration",
            "",
            "```json",
            json.dumps(start["config"], indent=2, ensure_ascii=False),
            "```",
            "",
        ]
    path = out_dir / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return path
