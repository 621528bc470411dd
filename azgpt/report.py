"""Plots and a markdown report from a run's metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError, atomic_path, check_writable


def read_metrics(path: Path) -> tuple[list[dict], list[dict], dict]:
    """(train rows, eval rows, start row) from metrics.jsonl; lines cut by a kill are skipped."""
    train, evals, start = [], [], {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        ev = row.get("event")
        if ev == "eval":
            evals.append(row)
        elif ev == "start":
            start = row
        elif ev is None and "loss" in row:
            train.append(row)
    return train, evals, start


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(metrics: Path, out: Path) -> None:
    train, evals, _ = read_metrics(metrics)
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


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{metrics} does not exist; pass a run folder written by `azgpt train`.")
    train, evals, start = read_metrics(metrics)
    if not train:
        raise UserError(
            f"{metrics} holds no training steps yet; train for at least one log interval."
        )
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
    last = train[-1]
    lines = [
        f"# azgpt run report: {run.name}",
        "",
        f"- steps: {last['step']:,}, tokens seen: {last['tokens']:,}",
        f"- parameters: {start.get('params', 'n/a'):,}"
        if start.get("params")
        else "- parameters: n/a",
        f"- processes: {start.get('world', 1)}",
        f"- final train loss: {last['loss']:.4f}",
    ]
    if evals:
        e = evals[-1]
        best = min(evals, key=lambda r: r["val_loss"])
        lines += [
            f"- final validation: loss {e['val_loss']:.4f}, perplexity {e['val_ppl']:.2f}, bits per byte {e['val_bpb']:.4f}",
            f"- best validation loss: {best['val_loss']:.4f} at step {best['step']:,}",
        ]
    tps = [r["tok_per_s"] for r in train[len(train) // 2 :]]
    lines.append(f"- median tokens/s (second half): {sorted(tps)[len(tps) // 2]:,.0f}")
    lines += [
        "",
        "## Loss",
        "",
        "![loss](loss.png)",
        "",
        "## Learning rate",
        "",
        "![lr](lr.png)",
        "",
        "## Throughput",
        "",
        "![throughput](throughput.png)",
        "",
    ]
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
