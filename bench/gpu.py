"""GPU throughput check: the card's bf16 matmul peak, then training at the given shapes.

One call measures, for each batch x context shape: steady-state tokens/s, MFU against the
matmul peak measured in the same run, peak GPU memory and the spread of step times; then a
loss-curve check (compiled vs plain path, same seed) over the first steps. Rows are appended to
bench/RESULTS.md with the card, date, versions and command.

    python bench/gpu.py                                   # configs/gpt100m.toml at 12x512 and 32x1024
    python bench/gpu.py --data out/az/data --tokenizer out/az/tokenizer   # real corpus tokens
    python bench/gpu.py --config configs/tiny.toml --shapes 4x64 --steps 20 --loss-steps 20   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def matmul_peak(device, seconds: float = 2.0) -> float:
    """Best achieved FLOP/s of a large square matmul (bf16 on CUDA, fp32 on CPU)."""
    import torch

    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        reps = 20 if device.type == "cuda" else 3
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 * reps / dt)
    return best


def synthetic_data(work: Path, vocab: int, n_tokens: int) -> tuple[Path, Path]:
    """Random token files (uniform ids) with a manifest, for machines without a prepared corpus."""
    import numpy as np

    from azgpt.prepare import run_prepare
    from azgpt.tokenizer import save_tokenizer, train_tokenizer

    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "data/sample").glob("*.txt"))]
    save_tokenizer(train_tokenizer(texts, vocab_size=2048), work / "tok")
    run_prepare(
        [str(ROOT / "data/sample")], str(work / "tok"), str(work / "data"), val_fraction=0.05
    )
    rng = np.random.default_rng(0)
    man = json.loads((work / "data/manifest.json").read_text())
    for split, n in (("train", n_tokens), ("val", max(n_tokens // 100, 200_000))):
        arr = rng.integers(0, vocab, size=n, dtype=np.uint16)
        np.save(work / "data" / f"{split}.npy", arr)
        man[split].update({"tokens": n, "max_token_id": int(arr.max())})
    (work / "data/manifest.json").write_text(json.dumps(man))
    return work / "tok", work / "data"


def run_shape(cfg_path, tok, data, out, batch, block, steps, compile_mode, extra=()):
    import torch

    from azgpt.config import load_config
    from azgpt.train import train

    over = [
        f"--data.dir={data}",
        f"--data.tokenizer={tok}",
        f"--train.out_dir={out}",
        f"--train.batch_size={batch}",
        f"--model.block_size={block}",
        f"--train.max_iters={steps}",
        "--train.tokens=0",  # a benchmark is sized in steps of one micro-batch
        "--train.batch_tokens=0",
        "--train.grad_accum=1",
        f"--train.eval_interval={steps}",
        "--train.eval_iters=0",
        "--train.sample_tokens=0",
        "--train.log_interval=5",
        f"--train.compile={compile_mode}",
        "--train.warmup_iters=10",
        *extra,
    ]
    cfg = load_config(cfg_path, over)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "event" not in r]
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return cfg, steps_rows, wall, mem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs/gpt100m.toml"))
    ap.add_argument("--shapes", default="12x512,32x1024")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument(
        "--compile",
        default="auto",
        help="train.compile value (auto, off, default, reduce-overhead, ...)",
    )
    ap.add_argument("--data", help="a prepared data folder (default: random tokens)")
    ap.add_argument("--tokenizer", help="its tokenizer folder")
    ap.add_argument(
        "--loss-steps",
        type=int,
        default=200,
        help="steps of the compiled-vs-plain loss check (0 skips)",
    )
    ap.add_argument("--results", default=str(ROOT / "bench/RESULTS.md"))
    a = ap.parse_args()

    import torch

    from azgpt.config import load_config
    from azgpt.model import GPT

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = (
        torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak(device)
    print(
        f"{card}: measured matmul peak {peak / 1e12:.1f} TFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'})",
        flush=True,
    )

    from azgpt.train import peak_flops

    sheet = peak_flops(card, "bf16") if device.type == "cuda" else None
    work = Path(tempfile.mkdtemp(prefix="azgpt-gpu-"))
    base = load_config(a.config)
    if a.data:
        tok, data = Path(a.tokenizer), Path(a.data)
    else:
        tok, data = synthetic_data(work, base.model.vocab_size, 20_000_000)
    results = []
    for shape in a.shapes.split(","):
        batch, block = (int(x) for x in shape.lower().split("x"))
        cfg, rows, wall, mem = run_shape(
            a.config, tok, data, work / f"run_{shape}", batch, block, a.steps, a.compile
        )
        gcfg = cfg.model
        with torch.device("meta"):  # shapes only, no memory
            fpt = GPT(gcfg).flops_per_token()
        tps_rows = [r["tok_per_s"] for r in rows[len(rows) // 2 :]]  # steady state: second half
        tps = statistics.median(tps_rows)
        step_ms = [1000 * batch * block / t for t in tps_rows]
        res = {
            "shape": f"{batch} x {block}",
            "tokens_per_s": round(tps),
            "mfu": fpt * tps / peak,  # against the matmul peak measured above
            # against the data sheet, as `azgpt train`'s progress bar reports it
            "mfu_sheet": fpt * tps / sheet if sheet else None,
            "peak_mem_gib": mem,
            "step_ms_p10": sorted(step_ms)[len(step_ms) // 10],
            "step_ms_p50": statistics.median(step_ms),
            "step_ms_p90": sorted(step_ms)[(9 * len(step_ms)) // 10],
            "wall_s": wall,
            "final_loss": rows[-1]["loss"],
        }
        results.append(res)
        print(json.dumps(res), flush=True)

    loss_note = ""
    if a.loss_steps:
        b0, t0_ = (int(x) for x in a.shapes.split(",")[0].lower().split("x"))
        _, fast, _, _ = run_shape(
            a.config,
            tok,
            data,
            work / "loss_fast",
            b0,
            t0_,
            a.loss_steps,
            a.compile,
            ["--train.log_interval=1"],
        )
        _, plain, _, _ = run_shape(
            a.config,
            tok,
            data,
            work / "loss_plain",
            b0,
            t0_,
            a.loss_steps,
            "off",
            ["--train.log_interval=1"],
        )
        diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(fast, plain)]
        k = max(1, len(diffs) // 10)
        tail = sum(x["loss"] for x in fast[-k:]) / k - sum(y["loss"] for y in plain[-k:]) / k
        loss_note = f"loss check over {a.loss_steps} steps (compile={a.compile} vs off): max |diff| {max(diffs):.4f}, last-10% mean diff {tail:+.4f}"
        print(loss_note, flush=True)

    import accelerate

    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    head = (
        f"\n### {card}, {time.strftime('%Y-%m-%d')}\n\n"
        f"torch {torch.__version__}, accelerate {accelerate.__version__}, CUDA {torch.version.cuda}; "
        f"matmul peak measured {peak / 1e12:.1f} TFLOP/s; compile={a.compile}; data={'corpus tokens' if a.data else 'random tokens'}; `{cmd}`\n\n"
        "| shape (batch x context) | tokens/s | MFU vs measured peak | MFU vs data sheet | peak memory GiB | step ms p10 / p50 / p90 |\n"
        "|---|---:|---:|---:|---:|---|\n"
    )
    body = "".join(
        f"| {r['shape']} | {r['tokens_per_s']:,} | {100 * r['mfu']:.1f}% | "
        f"{'%.1f%%' % (100 * r['mfu_sheet']) if r['mfu_sheet'] else 'n/a'} | {r['peak_mem_gib']:.1f} | "
        f"{r['step_ms_p10']:.1f} / {r['step_ms_p50']:.1f} / {r['step_ms_p90']:.1f} |\n"
        for r in results
    )
    p = Path(a.results)
    if not p.exists():
        p.write_text(
            "# Benchmark results\n\nRows appended by bench/gpu.py (GPU) and written by hand from bench/pipeline.py and bench/cpu_train.py.\n"
        )
    with open(p, "a", encoding="utf-8") as f:
        f.write(head + body + (f"\n{loss_note}\n" if loss_note else ""))
    print(f"appended to {p}")


if __name__ == "__main__":
    main()
