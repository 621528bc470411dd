"""Data-pipeline benchmark on a real corpus (default ../shared/corpus/az_train).

Prints clean MB/s, tokenizer training seconds, prepare MB/s and peak RSS against a plain
`Tokenizer.encode_batch` over the same documents in the same run, prepare's peak RSS on a
~500 MB input (the corpus repeated), and tokens per word on FLORES-200 dev for the three
pre-tokenizer candidates.

    .venv/bin/python bench/pipeline.py [--corpus DIR] [--eval FILE] [--big-mb 500] [--skip-pretok]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rss import PeakRSS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(args, **kw):
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-m", "azgpt", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )
    with PeakRSS(p.pid) as m:
        out, err = p.communicate()
    if p.returncode:
        raise SystemExit(f"azgpt {' '.join(args)} failed:\n{err}")
    return time.perf_counter() - t0, m.peak, out


def encode_batch_baseline(text_file: Path, tok_dir: Path) -> tuple[float, int]:
    """Plain HF `encode_batch` (Rust, all cores) over the same documents; no file writing."""
    from azgpt.corpus import batched, iter_documents
    from azgpt.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    t0 = time.perf_counter()
    n = 0
    for batch in batched(iter_documents(text_file, Counter()), 2000):
        n += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus" / "az_train"))
    ap.add_argument(
        "--eval", default=str(ROOT.parent / "shared" / "eval" / "flores200_azj_Latn.dev.txt")
    )
    ap.add_argument("--big-mb", type=int, default=500)
    ap.add_argument("--skip-pretok", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="azgpt-bench-"))
    corpus = Path(a.corpus)
    mb_in = sum(p.stat().st_size for p in corpus.rglob("*.txt")) / 1e6
    res: dict = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "corpus_mb": round(mb_in, 1),
    }

    secs, rss, _ = run(
        [
            "clean",
            str(corpus),
            "--out",
            str(work / "clean.txt"),
            "--report",
            str(work / "clean.json"),
        ]
    )
    res["clean_mb_s"] = round(mb_in / secs, 2)
    clean_mb = (work / "clean.txt").stat().st_size / 1e6

    secs, _, _ = run(["tokenizer", "train", str(work / "clean.txt"), "--out", str(work / "tok")])
    res["tokenizer_train_s"] = round(secs, 1)

    base_s, base_tokens = encode_batch_baseline(work / "clean.txt", work / "tok")
    res["encode_batch_mb_s"] = round(clean_mb / base_s, 2)
    secs, rss, _ = run(
        [
            "prepare",
            str(work / "clean.txt"),
            "--tokenizer",
            str(work / "tok"),
            "--out",
            str(work / "data"),
        ]
    )
    m = json.loads((work / "data" / "manifest.json").read_text())
    res["prepare_mb_s"] = round(clean_mb / secs, 2)
    res["prepare_speedup_vs_encode_batch"] = round(base_s / secs, 2)
    res["prepare_backend"] = m["encoder_backend"]
    res["prepare_peak_rss_mb"] = round(rss / 1e6)
    assert (
        m["train"]["tokens"] + m["val"]["tokens"]
        == base_tokens + m["train"]["documents"] + m["val"]["documents"]
    )

    if a.big_mb:
        big = work / "big.txt"
        reps = max(1, round(a.big_mb / clean_mb))
        src = (work / "clean.txt").read_bytes()
        with open(big, "wb") as f:
            for _ in range(reps):
                f.write(src)
                f.write(b"\n\n")
        big_mb = big.stat().st_size / 1e6
        secs, rss, _ = run(
            ["prepare", str(big), "--tokenizer", str(work / "tok"), "--out", str(work / "bigdata")]
        )
        res["big_input_mb"] = round(big_mb)
        res["big_prepare_mb_s"] = round(big_mb / secs, 2)
        res["big_prepare_peak_rss_mb"] = round(rss / 1e6)
        res["big_output_mb"] = round(
            sum(p.stat().st_size for p in (work / "bigdata").glob("*.npy")) / 1e6
        )
        big.unlink()

    _, _, out = run(["tokenizer", "stats", "--tokenizer", str(work / "tok"), "--json", a.eval])
    res["flores_tokens_per_word"] = json.loads(out)["tokens_per_word"]

    if not a.skip_pretok:
        res["pretokenizers"] = {}
        for name in ("az", "gpt2", "gpt4"):
            run(
                [
                    "tokenizer",
                    "train",
                    str(work / "clean.txt"),
                    "--out",
                    str(work / f"tok_{name}"),
                    "--pretokenizer",
                    name,
                ]
            )
            _, _, out = run(
                ["tokenizer", "stats", "--tokenizer", str(work / f"tok_{name}"), "--json", a.eval]
            )
            s = json.loads(out)
            res["pretokenizers"][name] = {
                k: s[k] for k in ("tokens_per_word", "bytes_per_token", "share_words_3plus_tokens")
            }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
