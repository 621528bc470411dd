"""The modern recipe measured against the seed's: gpt2+AdamW vs llama, Muon, and both.

.venv/bin/python bench/recipe.py [--steps 150] [--corpus ../shared/corpus/az_train]

Builds (once, into out/recipe/) the cleaned corpus, an 8,192-id tokenizer and token files, then
trains the four variants on the same batches (seed, data order and token budget equal), one
optimizer step of each in turn so that a busy shared machine slows all four alike. Writes
bench/recipe.json (curves and table) and bench/recipe.png (validation loss against tokens).
Table: tokens each variant needs to reach the baseline's final validation loss, validation and
FLORES-200 dev bits per byte after the full budget, and median seconds per optimizer step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = [  # (name, model overrides, optimizer)
    ("gpt2+adamw", {}, "adamw"),
    ("llama+adamw", {"arch": "llama", "qk_norm": True}, "adamw"),
    ("gpt2+muon", {}, "muon"),
    ("llama+muon", {"arch": "llama", "qk_norm": True}, "muon"),
]


def build_data(corpus: Path, work: Path, vocab: int) -> tuple[Path, Path]:
    """clean -> tokenizer (`vocab` ids) -> prepare, through the CLI, skipped when present."""
    az = [sys.executable, "-m", "azgpt"]
    tok, data = work / f"tok{vocab}", work / f"data{vocab}"
    if not (work / "clean.txt").exists():
        subprocess.run([*az, "clean", str(corpus), "--out", str(work / "clean.txt")], check=True)
    if not (tok / "tokenizer.json").exists():
        subprocess.run(
            [*az, "tokenizer", "train", str(work / "clean.txt"), "--out", str(tok)]
            + ["--vocab-size", str(vocab)],
            check=True,
        )
    if not (data / "manifest.json").exists():
        subprocess.run(
            [*az, "prepare", str(work / "clean.txt"), "--tokenizer", str(tok), "--out", str(data)],
            check=True,
        )
    return tok, data


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the validation curve first reaches `target` (linear between evals)."""
    prev = None
    for tok, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(tok)
            t0, l0 = prev
            return t0 + (tok - t0) * (l0 - target) / (l0 - loss)
        prev = (tok, loss)
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared/corpus/az_train"))
    ap.add_argument("--eval", default=str(ROOT.parent / "shared/eval/flores200_azj_Latn.dev.txt"))
    ap.add_argument("--work", default=str(ROOT / "out/recipe"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=15)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--flores-lines", type=int, default=0, help="score only the first N (0: all)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--muon-lr", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/recipe"))
    a = ap.parse_args()

    import numpy as np
    import torch

    from azgpt.config import ModelConfig
    from azgpt.data import TokenData
    from azgpt.evaluate import bits_per_byte, eval_texts
    from azgpt.model import GPT
    from azgpt.optim import lr_at, make_optimizer
    from azgpt.tokenizer import load_tokenizer, token_byte_lengths

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir, data_dir = build_data(Path(a.corpus), work, a.vocab)
    tok = load_tokenizer(tok_dir)
    byte_lens = token_byte_lengths(tok)
    data = TokenData(data_dir, a.block, a.vocab, tokenizer=tok_dir)
    flores = a.eval
    if a.flores_lines:
        lines = Path(a.eval).read_text(encoding="utf-8").splitlines()[: a.flores_lines]
        flores = str(work / f"flores_{a.flores_lines}.txt")
        Path(flores).write_text("\n".join(lines) + "\n", encoding="utf-8")
    seed, warmup = 1337, max(1, a.steps // 10)
    tokens_per_step = a.batch * a.block

    runs = []
    for name, over, opt in VARIANTS:
        cfg = ModelConfig(
            vocab_size=a.vocab,
            block_size=a.block,
            n_layer=a.layers,
            n_head=a.heads,
            n_embd=a.width,
            **over,
        )
        cfg.validate()
        torch.manual_seed(seed)
        model = GPT(cfg)
        optim = make_optimizer(
            model,
            lr=a.lr,
            weight_decay=0.1,
            betas=(0.9, 0.95),
            device_type="cpu",
            optimizer=opt,
            muon_lr=a.muon_lr,
        )
        runs.append(
            {
                "name": name,
                "model": model,
                "optim": optim,
                "times": [],
                "curve": [],
                "params": model.num_params(),
            }
        )

    def val(model) -> tuple[float, float]:
        model.eval()
        nll = n = nbytes = 0.0
        with torch.no_grad():
            for x, y in data.eval_batches(seed, a.eval_batches, a.batch):
                loss = model(x, y)
                nll += float(loss) * y.numel()
                n += y.numel()
                nbytes += float(byte_lens[y.numpy()].sum())
        model.train()
        return nll / n, bits_per_byte(nll, nbytes)

    t_start = time.time()
    for step in range(a.steps):
        x, y = data.get_batch(seed, step, 0, a.batch)
        for r in runs:
            t0 = time.perf_counter()
            for g in r["optim"].param_groups:
                g["lr"] = lr_at(
                    step, lr=a.lr, min_lr=a.lr / 10, warmup_iters=warmup, max_iters=a.steps
                ) * g.get("lr_scale", 1.0)
            loss = r["model"](x, y)
            r["optim"].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(r["model"].parameters(), 1.0)
            r["optim"].step()
            r["times"].append(time.perf_counter() - t0)
            r["last"] = loss.item()
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            for r in runs:
                vl, _ = val(r["model"])
                r["curve"].append(((step + 1) * tokens_per_step, vl))
            print(
                f"step {step + 1}/{a.steps} ({time.time() - t_start:.0f} s): "
                + ", ".join(f"{r['name']} {r['curve'][-1][1]:.3f}" for r in runs),
                flush=True,
            )

    base_final = runs[0]["curve"][-1][1]
    table = []
    for r in runs:
        vl, vbpb = val(r["model"])
        r["model"].eval()
        fl = eval_texts(r["model"], tok, [flores], line_docs=True)
        reach = tokens_to_reach(r["curve"], base_final)
        table.append(
            {
                "variant": r["name"],
                "params": r["params"],
                "tokens_to_baseline_final": reach,
                "tokens_ratio": None if reach is None else reach / runs[0]["curve"][-1][0],
                "val_loss": round(vl, 4),
                "val_bpb": round(vbpb, 4),
                "flores_bpb": round(fl["bpb"], 4),
                "s_per_step": round(statistics.median(r["times"]), 3),
                "step_time_ratio": None,
            }
        )
    for row in table:
        row["step_time_ratio"] = round(row["s_per_step"] / table[0]["s_per_step"], 3)
        if row["tokens_ratio"] is not None:
            row["tokens_ratio"] = round(row["tokens_ratio"], 3)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        t, vl = zip(*r["curve"])
        ax.plot(np.array(t) / 1e3, vl, marker="o", ms=3, label=r["name"])
    ax.axhline(base_final, color="grey", ls=":", lw=1)
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{a.layers} layers, width {a.width}, context {a.block}, vocab {a.vocab}")
    ax.legend()
    fig.tight_layout()
    out = Path(a.out)
    fig.savefig(out.with_suffix(".png"), dpi=110)
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{a.threads} threads",
        "date": time.strftime("%Y-%m-%d"),
        "command": "bench/recipe.py " + " ".join(sys.argv[1:]),
        "args": vars(a),
        "tokens_per_step": tokens_per_step,
        "wall_s": round(time.time() - t_start),
        "table": table,
        "curves": {r["name"]: r["curve"] for r in runs},
    }
    out.with_suffix(".json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    print(json.dumps(table, indent=1))
    assert all(math.isfinite(r["val_loss"]) for r in table)


if __name__ == "__main__":
    main()
