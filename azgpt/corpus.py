"""Reading corpora: files or folders of .txt / .txt.gz / .jsonl / .jsonl.gz, streamed document by
document. Text files hold documents separated by blank lines; JSONL files hold one document per
line in a text field. Partly bad input (bytes that are not UTF-8, lines that are not JSON) is
repaired or skipped and counted; wholly bad input is a UserError.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from pathlib import Path

from .errors import UserError

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".text")


def _supported(p: Path) -> bool:
    return p.name.endswith(SUFFIXES)


def discover(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders (recursively, sorted) and check every input exists and is readable text."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"input {p} does not exist; check the path.")
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _supported(q))
            if not found:
                raise UserError(
                    f"folder {p} holds no .txt, .txt.gz, .jsonl or .jsonl.gz files; point at a folder with corpus files."
                )
            out.extend(found)
        else:
            out.append(p)
    for p in out:
        _check_file(p)
    return out


def _open_binary(p: Path):
    if p.name.endswith(".gz"):
        return gzip.open(p, "rb")
    return open(p, "rb")


def _check_file(p: Path) -> None:
    try:
        if p.stat().st_size == 0:
            raise UserError(f"input {p} is empty; give a file that holds text.")
        with _open_binary(p) as f:
            head = f.read(8192)
    except UserError:
        raise
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(
            f"cannot read input {p} ({e}); check that it is a readable text or .gz file."
        ) from None
    if not head.strip():
        raise UserError(f"input {p} is empty; give a file that holds text.")
    if b"\x00" in head:
        raise UserError(f"input {p} is a binary file, not text; give UTF-8 .txt or .jsonl files.")


def _decode(line: bytes, stats: Counter) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        stats["invalid_utf8_lines"] += 1
        return line.decode("utf-8", errors="replace").replace("\ufffd", "")


def is_jsonl(p: Path) -> bool:
    return p.name.endswith((".jsonl", ".jsonl.gz"))


def iter_documents(
    p: Path, stats: Counter, text_field: str = "text", line_docs: bool = False
) -> Iterator[str]:
    """Yield the raw documents of one file, in order. Memory holds one document at a time."""
    try:
        with _open_binary(p) as f:
            if is_jsonl(p):
                yield from _iter_jsonl(p, f, stats, text_field)
            else:
                yield from _iter_txt(f, stats, line_docs)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read input {p} ({e}); check the file.") from None


def _iter_txt(f, stats: Counter, line_docs: bool) -> Iterator[str]:
    lines: list[str] = []
    for raw in f:
        line = _decode(raw, stats).rstrip("\r\n")
        if line_docs:
            if line.strip():
                yield line
            continue
        if line.strip():
            lines.append(line)
        elif lines:
            yield "\n".join(lines)
            lines = []
    if lines:
        yield "\n".join(lines)


def _iter_jsonl(p: Path, f, stats: Counter, text_field: str) -> Iterator[str]:
    good = 0
    for raw in f:
        if not raw.strip():
            continue
        try:
            obj = json.loads(_decode(raw, stats))
        except json.JSONDecodeError:
            stats["bad_json_lines"] += 1
            continue
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            stats["missing_text_field"] += 1
            continue
        good += 1
        yield text
    if good == 0:
        raise UserError(
            f"no line of {p} has a string field {text_field!r}; choose the field with --text-field."
        )


def iter_corpus(
    files: list[Path], stats: Counter, text_field: str = "text", line_docs: bool = False
) -> Iterator[str]:
    for p in files:
        yield from iter_documents(p, stats, text_field, line_docs)


def batched(it: Iterable, n: int) -> Iterator[list]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def ordered_map(fn: Callable, batches: Iterable, pool: Executor | None, window: int) -> Iterator:
    """Map `fn` over `batches` on `pool`, yielding results in input order, with at most `window`
    batches in flight (so memory stays bounded whatever the corpus size)."""
    if pool is None:
        for b in batches:
            yield fn(b)
        return
    from collections import deque

    inflight: deque = deque()
    for b in batches:
        inflight.append(pool.submit(fn, b))
        if len(inflight) >= window:
            yield inflight.popleft().result()
    while inflight:
        yield inflight.popleft().result()


def file_sha256(p: Path, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def worker_context():
    """Worker processes are spawned, not forked: a fork after the tokenizers library has used its
    thread pool (any earlier encode in this process) deadlocks the child."""
    import multiprocessing

    return multiprocessing.get_context("spawn")


def default_workers() -> int:
    return max(
        1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
