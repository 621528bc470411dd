"""What each web-quality rule (azgpt/quality.py) removes from a corpus, per source file.

    python bench/quality.py /work/shared/corpus/az_train [--examples 2] [--json out.json]

For every file: documents and bytes, the share of documents (and of bytes) each rule would drop
on its own, the share the rules drop together (the first failing rule decides), and a few
examples per rule. Documents are read and cleaned the way `azgpt clean` reads and cleans them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from azgpt.corpus import discover, iter_documents  # noqa: E402
from azgpt.quality import DEFAULT, RULES, failures, statistics  # noqa: E402
from azgpt.text import clean_document  # noqa: E402


def measure(path: Path, examples: int) -> dict:
    docs = nbytes = 0
    alone: Counter = Counter()
    alone_bytes: Counter = Counter()
    first: Counter = Counter()
    first_bytes = 0
    shown: dict[str, list[str]] = {}
    for raw in iter_documents(path, Counter()):
        text, _ = clean_document(raw)
        if not text:
            continue
        b = len(text.encode("utf-8"))
        docs += 1
        nbytes += b
        failed = failures(statistics(text, DEFAULT), DEFAULT)
        for name in failed:
            alone[name] += 1
            alone_bytes[name] += b
            ex = shown.setdefault(name, [])
            if len(ex) < examples:
                ex.append(text[:160].replace("\n", " | "))
        if failed:
            first[failed[0]] += 1
            first_bytes += b
    return {
        "file": path.name,
        "documents": docs,
        "bytes": nbytes,
        "dropped_documents": sum(first.values()),
        "dropped_share": round(sum(first.values()) / max(docs, 1), 4),
        "dropped_bytes_share": round(first_bytes / max(nbytes, 1), 4),
        "by_first_rule": dict(first),
        "each_rule_alone": {
            r: {
                "documents": alone[r],
                "share": round(alone[r] / max(docs, 1), 4),
                "bytes_share": round(alone_bytes[r] / max(nbytes, 1), 4),
            }
            for r in RULES
            if alone[r]
        },
        "examples": shown,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--examples", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = [measure(p, a.examples) for p in discover(a.inputs)]
    print(
        "| file | documents | dropped (docs) | dropped (bytes) | by rule (documents, first rule) |"
    )
    print("|---|---:|---:|---:|---|")
    for r in rows:
        rules = ", ".join(f"{k} {v:,}" for k, v in sorted(r["by_first_rule"].items())) or "none"
        print(
            f"| {r['file']} | {r['documents']:,} | {r['dropped_share']:.1%} "
            f"| {r['dropped_bytes_share']:.1%} | {rules} |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
