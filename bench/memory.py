"""Peak memory of clean, prepare and eval on large inputs of two awkward shapes.

  one-document: a file with no blank line at all (one document of the whole size)
  500KB-docs:   documents of ~500 KB each

Each command runs as its own process; its peak RSS (with all its worker processes) is sampled
from /proc. The target is under 1 GB for every row. Text is the embedded sample corpus repeated
(or --corpus, e.g. ../shared/corpus/az_train), so the numbers are reproducible anywhere.

    .venv/bin/python bench/memory.py [--mb 300] [--eval-mb 300] [--corpus DIR] [--no-filter]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _rss import PeakRSS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "azgpt", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    with PeakRSS(p.pid) as m:
        out, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"azgpt {' '.join(args)} failed:\n{err[-2000:]}")
    return time.perf_counter() - t0, m.peak


def write_inputs(src: Path, work: Path, mb: int) -> dict[str, Path]:
    files = sorted(src.rglob("*.txt")) if src.is_dir() else [src]
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    lines = [x for x in text.splitlines() if x.strip()]
    work.mkdir(parents=True, exist_ok=True)
    one = work / "one-document.txt"
    docs = work / "500KB-docs.txt"
    target = mb << 20
    with open(one, "w", encoding="utf-8") as a, open(docs, "w", encoding="utf-8") as b:
        n = size = doc = 0
        while size < target:
            line = lines[n % len(lines)] + "\n"
            a.write(line)  # never a blank line: the whole file is one document
            b.write(line)
            size += len(line.encode("utf-8"))
            doc += len(line.encode("utf-8"))
            if doc >= 500_000:
                b.write("\n")
                doc = 0
            n += 1
    return {"one-document": one, "500KB-docs": docs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=300, help="size of each input for clean and prepare")
    ap.add_argument("--eval-mb", type=int, default=300, help="size of each input for eval --text")
    ap.add_argument("--corpus", default=str(ROOT / "data" / "sample"))
    ap.add_argument("--no-filter", action="store_true", help="also time clean --no-filter")
    a = ap.parse_args()
    from trainkit import make_data, tiny_config  # the test kit's small tokenizer and model

    from azgpt.train import train

    work = Path(tempfile.mkdtemp(prefix="azgpt-mem-"))
    tok, data = make_data(work / "kit")
    # A context of 128 and batches of 64 windows keep eval's run time down; memory is what counts.
    cfg = tiny_config(
        tok,
        data,
        work / "run",
        **{"train.max_iters": 2, "model.n_layer": 1, "model.block_size": 128},
    )
    train(cfg)
    inputs = write_inputs(Path(a.corpus), work, a.mb)
    small = write_inputs(Path(a.corpus), work / "eval", a.eval_mb) if a.eval_mb != a.mb else inputs
    second = work / "second.txt"
    second.write_text("Bakı Azərbaycanın paytaxtıdır.\n", encoding="utf-8")
    rows = []
    for shape, path in inputs.items():
        for flags in ([], ["--no-filter"]) if a.no_filter else ([],):
            clean_out = str(work / f"{shape}.clean.txt")
            secs, peak = run(["clean", str(path), "--out", clean_out, *flags])
            rows.append((" ".join(["clean", *flags]), shape, a.mb, secs, peak))
        # prepare needs two documents for a train/val split: a one-line second file
        out = str(work / f"{shape}.data")
        secs, peak = run(["prepare", str(path), str(second), "--tokenizer", str(tok), "--out", out])
        rows.append(("prepare", shape, a.mb, secs, peak))
        secs, peak = run(
            [
                "eval",
                "--ckpt",
                str(work / "run" / "last"),
                "--text",
                str(small[shape]),
                "--batch-size",
                "64",
            ]  # fmt: skip
        )
        rows.append(("eval --text", shape, a.eval_mb, secs, peak))
    print(
        f"\n{platform.machine()}, {__import__('os').cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    )
    print("| command | input | MB | seconds | peak RSS MB |\n|---|---|---:|---:|---:|")
    for cmd, shape, mb, secs, peak in rows:
        print(f"| {cmd} | {shape} | {mb} | {secs:.0f} | {peak / 2**20:.0f} |")


if __name__ == "__main__":
    main()
