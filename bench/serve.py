"""`azgpt serve` under concurrent streaming clients: aggregate tokens/s and time to first token.

For each model (the demo model, configs/tiny.toml, and a gpt100m-shaped one, configs/gpt100m.toml;
random weights unless a checkpoint is given: speed does not depend on the values), a real
`azgpt serve` process on 127.0.0.1 answers 1, 4, 8 and 16 clients that each stream one
`/api/generate` request at the same moment (fixed length: `ignore_eos`), then the same 8
requests one after another, alternated with 8 concurrent ones round by round (their ratio per
round, and its median, is the batching gain). Batching pays when the 8 concurrent clients get
several times the aggregate tokens/s of the sequential 8.

Long prompts (--long-prompt 480): a lone request with a 480-token prompt (its time to first
token is the baseline), then, while one stream is decoding, 8 such requests arriving together:
their time to first token p50/p99 and the longest gap between two chunks of the running stream
(how long a prompt's prefill stalled it; the engine prefills one chunk per decoding step).
With the server stopped, the compute floor of that test: one forward over the 8 prompts
batched against one prompt alone (no scheduler's p99 / lone can beat it where a batch costs
the sum of its rows, as on a CPU).

.venv/bin/python bench/serve.py [--models demo,gpt100m] [--tokens 64] [--threads 2]
                                [--repeat 3] [--demo-ckpt runs/tiny/last] [--dtype int8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "Azərbaycanın paytaxtı Bakı şəhəridir və",
    "Xəzər dənizinin sahilində yerləşən şəhərlərdən biri",
    "Gəncə qədim tarixi olan bir şəhərdir, burada",
    "Kür çayı Azərbaycanın ən uzun çayıdır və",
    "Novruz bayramında ailələr bir yerə toplaşır,",
    "Şəki sarayı XVIII əsrdə tikilmişdir və onun",
    "Səhər tezdən bazara gedən qadın gördü ki,",
    "Məktəbdə riyaziyyat dərsində müəllim dedi:",
]


def make_checkpoint(config: Path, tok_dir: Path, out: Path) -> Path:
    """A checkpoint of the config's model shape with random weights and the given tokenizer."""
    import torch

    from azgpt.checkpoint import save_model_files
    from azgpt.config import load_config
    from azgpt.model import GPT

    torch.manual_seed(0)
    model = GPT(load_config(config, []).model)
    out.mkdir(parents=True, exist_ok=True)
    save_model_files(model, out)
    shutil.copyfile(tok_dir / "tokenizer.json", out / "tokenizer.json")
    (out / "meta.json").write_text("{}\n")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_one(base: str, prompt: str, tokens: int, seed: int, out: dict) -> None:
    body = {
        "model": "bench",
        "prompt": prompt,
        "options": {"num_predict": tokens, "seed": seed, "ignore_eos": True},
    }
    t0 = time.perf_counter()
    first = None
    with requests.post(f"{base}/api/generate", json=body, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line:
                continue
            obj = json.loads(line)
            if first is None and obj.get("response"):
                first = time.perf_counter()
            if obj.get("done"):
                out["tokens"] = obj["eval_count"]
    out.update(start=t0, first=first, end=time.perf_counter())


def run_clients(base: str, n: int, tokens: int, sequential: bool = False) -> dict:
    results = [{} for _ in range(n)]
    if sequential:
        for i in range(n):
            stream_one(base, PROMPTS[i % len(PROMPTS)], tokens, i, results[i])
    else:
        threads = [
            threading.Thread(
                target=stream_one, args=(base, PROMPTS[i % len(PROMPTS)], tokens, i, results[i])
            )
            for i in range(n)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    total = sum(r["tokens"] for r in results)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    ttft = sorted((r["first"] - r["start"]) * 1000 for r in results)
    return {
        "clients": n,
        "sequential": sequential,
        "tokens": total,
        "seconds": round(wall, 2),
        "tokens_per_s": round(total / wall, 1),
        "ttft_p50_ms": round(statistics.median(ttft)),
        "ttft_p99_ms": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]),
    }


def first_token_ms(base: str, ids: list[int], out: dict) -> None:
    body = {"model": "bench", "prompt": "", "context": ids, "options": {"num_predict": 4}}
    t0 = time.perf_counter()
    with requests.post(f"{base}/api/generate", json=body, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line and json.loads(line).get("response") is not None:
                out["ttft_ms"] = (time.perf_counter() - t0) * 1000
                break


def long_prompts(base: str, n_prompt: int, clients: int = 8) -> dict:
    """TTFT of `clients` simultaneous `n_prompt`-token prompts beside a running stream, the
    longest stall of that stream meanwhile, and a lone prompt's TTFT."""
    import random

    rng = random.Random(0)
    health = requests.get(base + "/health", timeout=10).json()
    text = " ".join(PROMPTS * 40)
    pool = requests.post(base + "/tokenize", json={"text": text}, timeout=60).json()["ids"]
    prompts = [[rng.choice(pool) for _ in range(n_prompt)] for _ in range(clients + 1)]
    lone: dict = {}
    first_token_ms(base, prompts[-1], lone)
    gaps: list[float] = []
    stop = threading.Event()

    def runner():
        body = {"prompt": PROMPTS[0], "options": {"num_predict": -1, "ignore_eos": True}}
        with requests.post(f"{base}/api/generate", json=body, stream=True, timeout=3600) as r:
            last = None
            for _line in r.iter_lines():
                now = time.perf_counter()
                if last is not None and not stop.is_set():
                    gaps.append((now - last, now))
                last = now
                if stop.is_set():
                    break

    t = threading.Thread(target=runner, daemon=True)
    t.start()
    time.sleep(3)  # the stream is decoding
    outs = [{} for _ in range(clients)]
    t0 = time.perf_counter()
    threads = [
        threading.Thread(target=first_token_ms, args=(base, p, o)) for p, o in zip(prompts, outs)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t1 = time.perf_counter()
    stop.set()
    t.join(timeout=60)
    window = [g for g, at in gaps if t0 <= at <= t1 + 0.5]
    ttft = sorted(o["ttft_ms"] for o in outs)
    return {
        "prompt_tokens": n_prompt,
        "clients": clients,
        "context": health["context"],
        "lone_ttft_ms": round(lone["ttft_ms"]),
        "ttft_p50_ms": round(statistics.median(ttft)),
        "ttft_p99_ms": round(ttft[-1]),
        "p99_vs_lone": round(ttft[-1] / lone["ttft_ms"], 2),
        "longest_stall_ms": round(max(window) * 1000) if window else None,
        "running_stream_chunks_meanwhile": len(window),
    }


def prefill_floor(ckpt: Path, n_prompt: int, clients: int, threads: int) -> dict:
    """The compute floor of the long-prompt test, measured in this process with the server
    stopped: one forward over `clients` prompts of `n_prompt` tokens batched, against one
    prompt alone (the Linears as `azgpt serve` runs them; prefill never runs the compiled
    decoding step, so it is not compiled here; median of 3). Every prompt's prefill must
    be done before the last first token, so no scheduler's p99 / lone can beat this ratio where
    a batch costs its rows' sum (a CPU)."""
    import torch

    from azgpt.checkpoint import load_model
    from azgpt.cpu_linear import pack_linears
    from azgpt.model import KVCache

    torch.set_num_threads(threads)
    model, _ = load_model(ckpt, "cpu")
    model.eval()
    backend = pack_linears(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2000, (clients, n_prompt), generator=g)

    def once(rows: int) -> float:
        cache = KVCache(model.config, rows, n_prompt + 1)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(x[:rows], cache=cache, last_only=True)
        return time.perf_counter() - t0

    once(1)
    lone = statistics.median(once(1) for _ in range(3))
    batch = statistics.median(once(clients) for _ in range(3))
    return {
        "linear_backend": backend,
        "one_prompt_forward_ms": round(lone * 1000),
        "all_prompts_forward_ms": round(batch * 1000),
        "floor_p99_vs_lone": round(batch / lone, 2),
    }


def median_of(runs) -> dict:
    """The run with the median aggregate tokens/s (a shared machine is noisy), and all of them."""
    runs = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**runs[len(runs) // 2], "runs": [r["tokens_per_s"] for r in runs]}


def median_run(base: str, n: int, tokens: int, repeat: int) -> dict:
    return median_of(run_clients(base, n, tokens) for _ in range(repeat))


def bench_model(
    label: str,
    ckpt: Path,
    levels: list[int],
    tokens: int,
    threads: int,
    repeat: int,
    log: Path,
    long_prompt: int = 0,
    prefill_chunk: str = "auto",
    stall_ms: int = 75,
    dtype: str = "auto",
):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "azgpt", "serve", "--ckpt", str(ckpt), "--port", str(port)]
    cmd += ["--max-batch", str(max(levels)), "--device", "cpu"]
    cmd += ["--prefill-chunk", str(prefill_chunk), "--stall-ms", str(stall_ms)]
    cmd += ["--dtype", dtype]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"azgpt serve exited: {log.read_text()}")
            try:
                if requests.get(base + "/health", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"azgpt serve did not start: {log.read_text()}")
            time.sleep(0.3)
        info = requests.get(base + "/health", timeout=5).json()
        run_clients(base, 2, 8)  # warm-up
        for n in levels:
            rows.append({"model": label, **median_run(base, n, tokens, repeat)})
            print(json.dumps(rows[-1]), flush=True)
        # The 8-concurrent vs 8-sequential ratio from alternated rounds, so that a slow or
        # fast phase of a shared machine falls on both halves of a round.
        pairs = []
        for _ in range(repeat):
            pairs.append((run_clients(base, 8, tokens), run_clients(base, 8, tokens, True)))
        ratios = [round(c["tokens_per_s"] / s["tokens_per_s"], 2) for c, s in pairs]
        info["paired_8"] = {
            "concurrent": [c["tokens_per_s"] for c, _ in pairs],
            "sequential": [s["tokens_per_s"] for _, s in pairs],
            "ratios": ratios,
            "median_ratio": statistics.median(ratios),
        }
        rows.append({"model": label, **median_of(s for _, s in pairs)})
        print(json.dumps(rows[-1]), flush=True)
        print(json.dumps(info["paired_8"]), flush=True)
        if long_prompt:
            info["long_prompts"] = long_prompts(base, long_prompt)
            print(json.dumps(info["long_prompts"]), flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return info, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,gpt100m")
    ap.add_argument("--levels", default="1,4,8,16")
    ap.add_argument("--tokens", type=int, default=64, help="tokens each client streams")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--repeat", type=int, default=3, help="runs per level; the median is kept")
    ap.add_argument("--demo-ckpt", help="a trained demo checkpoint (default: random weights)")
    ap.add_argument("--long-prompt", type=int, default=480, help="0: skip the long-prompt run")
    ap.add_argument("--prefill-chunk", default="auto", help="the server's --prefill-chunk")
    ap.add_argument("--stall-ms", type=int, default=75, help="the server's --stall-ms")
    ap.add_argument("--dtype", default="auto", help="the server's --dtype (auto: float32 here)")
    a = ap.parse_args()

    from azgpt.tokenizer import save_tokenizer, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="azgpt-serve-bench-"))
    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "data/sample").glob("*.txt"))]
    # The demo's 2,048-id tokenizer for both models: the gpt100m shape keeps its 32,000-id
    # output layer (the same compute); the server never samples ids the tokenizer lacks.
    save_tokenizer(train_tokenizer(texts, vocab_size=2048), work / "tok")
    levels = [int(x) for x in a.levels.split(",")]
    summary = []
    for label in a.models.split(","):
        if label == "demo" and a.demo_ckpt:
            ckpt = Path(a.demo_ckpt)
        else:
            config = {"demo": "tiny.toml", "gpt100m": "gpt100m.toml"}[label]
            ckpt = make_checkpoint(ROOT / "configs" / config, work / "tok", work / label)
        info, rows = bench_model(
            label, ckpt, levels, a.tokens, a.threads, a.repeat, work / f"{label}.log",
            a.long_prompt if label == "gpt100m" else 0, a.prefill_chunk, a.stall_ms, a.dtype,
        )  # fmt: skip
        if "long_prompts" in info:
            info["long_prompts"]["floor"] = prefill_floor(ckpt, a.long_prompt, 8, a.threads)
            print(json.dumps(info["long_prompts"]["floor"]), flush=True)
        summary.append((label, info, rows, info["paired_8"]))

    print(
        f"\n{platform.machine()}, {os.cpu_count()} cores, torch threads {a.threads}, "
        f"{a.tokens} tokens per client, --dtype {a.dtype}, median of {a.repeat} runs, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print("| model | clients | aggregate tokens/s | TTFT p50 (ms) | TTFT p99 (ms) |")
    print("|---|---:|---:|---:|---:|")
    for label, info, rows, _ in summary:
        name = f"{label} ({info['parameters'] / 1e6:.1f}M, context {info['context']})"
        for r in rows:
            clients = f"{r['clients']} one after another" if r["sequential"] else str(r["clients"])
            print(
                f"| {name} | {clients} | {r['tokens_per_s']:,.1f} | {r['ttft_p50_ms']:,} | "
                f"{r['ttft_p99_ms']:,} |"
            )
    for label, _, _, pair in summary:
        print(
            f"{label}: 8 concurrent / 8 sequential = {pair['median_ratio']:.2f}x aggregate "
            f"tokens/s (median of {len(pair['ratios'])} alternated rounds: {pair['ratios']})"
        )
    for label, info, _, _ in summary:
        if "long_prompts" in info:
            lp = info["long_prompts"]
            print(
                f"{label}: {lp['clients']} x {lp['prompt_tokens']}-token prompts beside a running "
                f"stream: TTFT p50 {lp['ttft_p50_ms']:,} ms, p99 {lp['ttft_p99_ms']:,} ms "
                f"({lp['p99_vs_lone']}x a lone prompt's {lp['lone_ttft_ms']:,} ms); longest "
                f"stall of the running stream {lp['longest_stall_ms']:,} ms"
            )
            fl = lp["floor"]
            print(
                f"{label}: compute floor: {lp['clients']} prompts in one forward "
                f"{fl['all_prompts_forward_ms']:,} ms vs one {fl['one_prompt_forward_ms']:,} ms "
                f"= {fl['floor_p99_vs_lone']}x ({fl['linear_backend']})"
            )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
