"""Peak memory of `azgpt clean` on one huge record: a JSONL line and a Parquet value of --mb MB
of text, beside the same text as a .txt document (read in parts since long ago: the reference).

    .venv/bin/python bench/records_memory.py [--mb 150] [--src OTHER_CHECKOUT]

With --src, the same inputs are also cleaned by another checkout of azgpt (e.g. an older commit
unpacked with `git archive`), for a before/after table in one run. Each clean runs as its own
process with --workers 1; its peak RSS is sampled from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rss import PeakRSS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LINES = [
    "Bakı Azərbaycanın paytaxtı və ən böyük şəhəridir, Xəzər dənizinin sahilində yerləşir.",
    "Şəhərin iqlimi mülayim isti və qurudur; burada tez-tez güclü xəzri küləyi əsir.",
    "İçərişəhər qədim divarları, Qız qalası və Şirvanşahlar sarayı ilə tanınır.",
]


def make_text(mb: int) -> str:
    out, size, i = [], 0, 0
    while size < mb << 20:
        line = f"{i}. {LINES[i % 3]}"
        out.append(line)
        size += len(line.encode()) + 1
        i += 1
    return "\n".join(out)


def run(src: Path, args: list[str]) -> tuple[float, int]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "azgpt", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=src)  # fmt: skip
    with PeakRSS(p.pid) as m:
        _, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"azgpt {' '.join(args)} failed:\n{err[-2000:]}")
    return time.perf_counter() - t0, m.peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=150)
    ap.add_argument("--src", help="another azgpt checkout to compare with")
    a = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = Path(tempfile.mkdtemp(prefix="azgpt-records-"))
    text = make_text(a.mb)
    inputs = {"txt": work / "one.txt", "jsonl": work / "one.jsonl", "parquet": work / "one.parquet"}
    inputs["txt"].write_text(text + "\n", encoding="utf-8")
    with open(inputs["jsonl"], "w", encoding="utf-8") as f:
        f.write(json.dumps({"url": "https://xeber.az/1", "text": text}, ensure_ascii=False) + "\n")
    pq.write_table(pa.table({"text": [text]}), inputs["parquet"])
    del text
    rows = []
    for label, src in [("this checkout", ROOT)] + ([("--src", Path(a.src))] if a.src else []):
        for kind, path in inputs.items():
            out = work / f"{kind}.clean.txt"
            secs, peak = run(src, ["clean", str(path), "--out", str(out), "--workers", "1"])
            rows.append((label, kind, secs, peak))
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, {a.mb} MB")
    print("| code | input | seconds | peak RSS MB |\n|---|---|---:|---:|")
    for label, kind, secs, peak in rows:
        print(f"| {label} | one {kind} record of {a.mb} MB | {secs:.0f} | {peak / 2**20:.0f} |")


if __name__ == "__main__":
    main()
