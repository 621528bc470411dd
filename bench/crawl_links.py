"""Time to turn a page of N links into a record (link collection and extraction), this
checkout against another (--src, e.g. an older commit unpacked with `git archive`).

    .venv/bin/python bench/crawl_links.py [--links 30000] [--src OTHER_CHECKOUT]
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
n = int(sys.argv[2])
links = "".join(f'<li><a href="/xeber/{i}">Xəbər {i}</a></li>' for i in range(n))
body = f"<html><body><p>Bakı Azərbaycanın paytaxtıdır.</p><ul>{links}</ul></body></html>".encode()
import azgpt.crawl as c
t0 = time.perf_counter()
if hasattr(c, "extract"):
    from azgpt.crawl.extract import parse
    from azgpt.crawl.net import Response
    fields, out, kind = parse(Response("http://x.az/", 200, "text/html", "utf-8", body))
else:
    resp = c.Response("http://x.az/", 200, "text/html", "utf-8", body)
    fields, out, kind = c.Crawler.parse(None, resp)
print(f"{time.perf_counter() - t0:.2f} {len(out)} {kind}")
"""


def run(src: Path, n: int) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(n)], capture_output=True,
                       text=True, env=env, check=True)  # fmt: skip
    return r.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--links", type=int, default=30000)
    ap.add_argument("--src")
    a = ap.parse_args()
    importlib.import_module("trafilatura")
    print(f"{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print("| code | links on the page | seconds | links kept | outcome |\n|---|---:|---:|---:|---|")
    for label, src in [("this checkout", ROOT)] + ([("--src", Path(a.src))] if a.src else []):
        secs, kept, kind = run(src, a.links).split()
        print(f"| {label} | {a.links:,} | {secs} | {int(kept):,} | {kind} |")


if __name__ == "__main__":
    main()
