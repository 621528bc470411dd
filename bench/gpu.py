"""Every GPU measurement in one call: the card's bf16 matmul peak, then both recipes (gpt2 +
AdamW: configs/gpt100m.toml; llama + Muon: configs/gpt100m_modern.toml) at each batch x context
shape (steady-state tokens/s, MFU against the measured peak and the data sheet, peak memory,
step-time spread), a loss-curve check per recipe (compiled vs plain, same seed), the peak
memory of configs/gpt100m_4gb.toml at its own shape, and decoding speed at 1, 8 and 32 rows,
eager and with the compiled decoding step. Rows are appended to docs/results.md with the card,
date, versions and command. bench/gpu.sh runs this, the optimizer-step benchmark and the
`gpu`-marked tests.

    python bench/gpu.py                                   # 12x512 and 32x1024
    python bench/gpu.py --data out/az/data --tokenizer out/az/tokenizer   # real corpus tokens
    python bench/gpu.py --smoke --shapes 2x32 --steps 4 --loss-steps 4 --gen-tokens 8 --compile off --results /tmp/R.md   # CPU
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
    """Train `steps` steps of the run file at batch x block; (cfg, metric rows, wall s, peak GiB)."""
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
        torch.cuda.empty_cache()  # each shape's peak is its own
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "event" not in r]
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return cfg, steps_rows, wall, mem


RECIPES = {  # name -> (run file, extra overrides)
    "gpt2 + AdamW": ("configs/gpt100m.toml", []),
    "llama + Muon": ("configs/gpt100m_modern.toml", []),
}
# --smoke: the same code paths at tiny shapes, for CI on a CPU (a minute or two).
SMOKE_MODEL = [
    "--model.n_layer=2",
    "--model.n_embd=64",
    "--model.n_head=2",
    "--model.vocab_size=2048",
]


def decode_speeds(cfg_path, device, tokens: int, smoke: bool, rows_list) -> dict:
    """Decoding tokens/s of the run file's model (random weights) through the Decoder that
    `azgpt sample`, `chat` and `serve` run, cast as they cast it (`cast_model`, --dtype auto:
    bf16 on the GPU), with 1, 8 and 32 rows decoding together (serve's clients), eagerly and
    with the compiled decoding step (`--compile on`); a short warm-up run first."""
    import torch

    from azgpt.config import load_config
    from azgpt.generate import Decoder, Row, SamplingParams, cast_model
    from azgpt.model import GPT
    from azgpt.tokenizer import train_tokenizer

    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "data/sample").glob("*.txt"))]
    tok = train_tokenizer(texts, vocab_size=2048)
    cfg = load_config(cfg_path, SMOKE_MODEL if smoke else [])
    torch.manual_seed(0)
    model = cast_model(
        GPT(cfg.model).to(device), "auto", device, max(rows_list), compile="on"
    )  # --compile on: the step compiled on a GPU and for the tiny smoke model too
    ids = [tok.token_to_id("<|endoftext|>"), *tok.encode("Azərbaycanın paytaxtı").ids]
    ctx = min(cfg.model.block_size, len(ids) + tokens + 1)

    def run(rows: int, n: int, graph) -> float:
        dec = Decoder(model, tok, max_batch=max(rows_list), ctx=ctx)
        dec.graph = graph
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        for _ in range(rows):
            dec.add(Row(ids, params, lambda ev: None))
        dec.step()  # the prompts' prefill and each row's first token
        t0 = time.perf_counter()
        while dec.rows:
            dec.step()  # each step reads its logits back: the time is the GPU's too
        return rows * (n - 1) / (time.perf_counter() - t0)

    out = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    for mode, graph in (("eager", None), ("compiled", model.decode_graph)):
        if mode == "compiled" and graph is None:
            continue
        run(2, 8, graph)  # warm-up
        out[mode] = {r: round(run(r, tokens, graph), 1) for r in rows_list}
        if graph is not None:
            assert graph.calls > 0, "the compiled step did not run"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="12x512,32x1024")
    ap.add_argument("--steps", type=int, default=100, help="steps per throughput shape")
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
        help="steps of the compiled-vs-plain loss check, per recipe (0 skips)",
    )
    ap.add_argument("--gen-tokens", type=int, default=256, help="tokens of the decoding check")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: a CPU run of every path")
    ap.add_argument("--results", default=str(ROOT / "docs/results.md"))
    a = ap.parse_args()

    import torch

    from azgpt.model import GPT

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = (
        torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak(device, 0.3 if a.smoke else 2.0)
    print(
        f"{card}: measured matmul peak {peak / 1e12:.1f} TFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'})",
        flush=True,
    )

    from azgpt.config import load_config
    from azgpt.train import peak_flops

    sheet = peak_flops(card, "bf16") if device.type == "cuda" else None
    work = Path(tempfile.mkdtemp(prefix="azgpt-gpu-"))
    model_over = SMOKE_MODEL if a.smoke else []
    if a.data:
        tok, data = Path(a.tokenizer), Path(a.data)
    else:
        vocab = load_config(ROOT / RECIPES["gpt2 + AdamW"][0], model_over).model.vocab_size
        tok, data = synthetic_data(work, vocab, 200_000 if a.smoke else 20_000_000)

    # 1. throughput of both recipes at each shape
    results = []
    for name, (cfg_file, extra) in RECIPES.items():
        for shape in a.shapes.split(","):
            batch, block = (int(x) for x in shape.lower().split("x"))
            out = work / f"run_{len(results)}"
            cfg, rows, wall, mem = run_shape(
                ROOT / cfg_file, tok, data, out, batch, block, a.steps, a.compile,
                [*model_over, *extra],
            )  # fmt: skip
            with torch.device("meta"):  # shapes only, no memory
                fpt = GPT(cfg.model).flops_per_token()
            tps_rows = [r["tok_per_s"] for r in rows[len(rows) // 2 :]]  # steady state
            tps = statistics.median(tps_rows)
            step_ms = [1000 * batch * block / t for t in tps_rows]
            res = {
                "recipe": name,
                "shape": f"{batch} x {block}",
                "tokens_per_s": round(tps),
                "mfu": fpt * tps / peak,  # against the matmul peak measured above
                "mfu_sheet": fpt * tps / sheet if sheet else None,  # as the progress bar
                "peak_mem_gib": mem,
                "step_ms_p10": sorted(step_ms)[len(step_ms) // 10],
                "step_ms_p50": statistics.median(step_ms),
                "step_ms_p90": sorted(step_ms)[(9 * len(step_ms)) // 10],
                "wall_s": wall,
                "final_loss": rows[-1]["loss"],
            }
            results.append(res)
            print(json.dumps(res), flush=True)

    # 2. loss curves, compiled vs plain, for both recipes
    notes = []
    if a.loss_steps:
        b0, t0_ = (int(x) for x in a.shapes.split(",")[0].lower().split("x"))
        for name, (cfg_file, extra) in RECIPES.items():
            curves = []
            for j, mode in enumerate((a.compile, "off")):
                _, rows, _, _ = run_shape(
                    ROOT / cfg_file, tok, data, work / f"loss_{len(notes)}_{j}", b0, t0_,
                    a.loss_steps, mode, ["--train.log_interval=1", *model_over, *extra],
                )  # fmt: skip
                curves.append(rows)
            fast, plain = curves
            diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(fast, plain)]
            k = max(1, len(diffs) // 10)
            tail = sum(x["loss"] for x in fast[-k:]) / k - sum(y["loss"] for y in plain[-k:]) / k
            notes.append(
                f"{name}: loss check over {a.loss_steps} steps (compile={a.compile} vs off): "
                f"max |diff| {max(diffs):.4f}, last-10% mean diff {tail:+.4f}"
            )
            print(notes[-1], flush=True)

    # 3. the 4 GB preset's peak memory, at its own shape (micro-batch 4 x 256)
    small = load_config(ROOT / "configs/gpt100m_4gb.toml", model_over)
    _, _, _, mem = run_shape(
        ROOT / "configs/gpt100m_4gb.toml", tok, data, work / "run_4gb", small.train.batch_size,
        small.model.block_size, 4 if a.smoke else 20, a.compile,
        [*model_over, "--train.mixed_precision=auto"],
    )  # fmt: skip
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else float("nan")
    notes.append(
        f"configs/gpt100m_4gb.toml peak memory: {mem:.2f} GiB allocated, {reserved:.2f} GiB "
        "reserved (the file's estimate: ~2.5 GB allocated, under 3.5 GB with the context)"
    )
    print(notes[-1], flush=True)

    # 4. decoding speed (random weights of the gpt100m shape)
    rows_list = (1, 2) if a.smoke else (1, 8, 32)
    gen = decode_speeds(ROOT / "configs/gpt100m.toml", device, a.gen_tokens, a.smoke, rows_list)
    size = "the smoke model" if a.smoke else "the gpt100m shape"
    for mode in ("eager", "compiled"):
        if mode in gen:
            speeds = ", ".join(f"{r} rows {v:,.0f}" for r, v in gen[mode].items())
            notes.append(
                f"decoding, {size}, {gen['dtype']}, {mode} step (the Decoder of sample/chat/"
                f"serve, {a.gen_tokens} greedy tokens per row): {speeds} tokens/s"
            )
            print(notes[-1], flush=True)

    import accelerate

    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    head = (
        f"\n### {card}, {time.strftime('%Y-%m-%d')}{' (smoke: tiny shapes)' if a.smoke else ''}\n\n"
        f"torch {torch.__version__}, accelerate {accelerate.__version__}, CUDA {torch.version.cuda}; "
        f"matmul peak measured {peak / 1e12:.1f} TFLOP/s; compile={a.compile}; data={'corpus tokens' if a.data else 'random tokens'}; `{cmd}`\n\n"
        "| recipe | shape (batch x context) | tokens/s | MFU vs measured peak | MFU vs data sheet | peak memory GiB | step ms p10 / p50 / p90 |\n"
        "|---|---|---:|---:|---:|---:|---|\n"
    )
    body = "".join(
        f"| {r['recipe']} | {r['shape']} | {r['tokens_per_s']:,} | {100 * r['mfu']:.1f}% | "
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
        f.write(head + body + "".join(f"\n{n}\n" for n in notes))
    print(f"appended to {p}")


if __name__ == "__main__":
    main()
