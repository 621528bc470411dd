"""`azgpt clean`: stream documents through the text repairs, dedup and the language filter."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .corpus import batched, discover, iter_corpus, ordered_map, worker_context
from .errors import UserError, atomic_path
from .text import CleanOptions, clean_document, language_verdict


@dataclass
class CleanReport:
    documents_in: int = 0
    documents_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    repairs: Counter = field(default_factory=Counter)
    """How many times each repair rule fired."""
    dropped: Counter = field(default_factory=Counter)
    """Documents dropped, by reason."""
    input: Counter = field(default_factory=Counter)
    """Problems met while reading (invalid UTF-8 lines, bad JSON lines, ...)."""

    def to_dict(self) -> dict:
        return {
            "documents_in": self.documents_in,
            "documents_out": self.documents_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.bytes_in / 1e6 / self.seconds, 3) if self.seconds else None,
            "repairs": dict(sorted(self.repairs.items())),
            "dropped": dict(sorted(self.dropped.items())),
            "input": dict(sorted(self.input.items())),
        }

    def format(self) -> str:
        lines = [
            f"documents: {self.documents_in:,} in, {self.documents_out:,} out"
            f" ({self.bytes_in / 1e6:.2f} MB -> {self.bytes_out / 1e6:.2f} MB in {self.seconds:.1f}s)"
        ]
        for title, c in (
            ("repairs", self.repairs),
            ("dropped", self.dropped),
            ("input problems", self.input),
        ):
            if c:
                lines.append(f"{title}: " + ", ".join(f"{k}={v:,}" for k, v in sorted(c.items())))
        return "\n".join(lines)


@dataclass
class _Job:
    opts: CleanOptions
    min_az_share: float
    filter: bool

    def __call__(self, docs: list[str]) -> list[tuple[str, Counter, str | None, int]]:
        out = []
        for d in docs:
            text, stats = clean_document(d, self.opts)
            reason = None
            if not text:
                reason = "empty_after_cleaning"
            elif self.filter:
                reason = language_verdict(text, self.min_az_share)
            out.append((text, stats, reason, len(d.encode("utf-8"))))
        return out


def run_clean(
    inputs: list[str],
    out: str,
    *,
    text_field: str = "text",
    cyrillic_to_latin: bool = False,
    filter: bool = True,
    min_az_share: float = 0.03,
    dedup: bool = True,
    workers: int = 1,
    batch_docs: int = 256,
) -> CleanReport:
    """Clean `inputs` into one file `out` (documents separated by blank lines, input order).

    With `filter=False` every input document gives one output document (possibly empty lines
    removed), so repairs can be checked line by line; dedup is then off too.
    """
    if not 0.0 <= min_az_share <= 1.0:
        raise UserError(f"--min-az-share must be in [0, 1], got {min_az_share}.")
    files = discover(inputs)
    report = CleanReport()
    job = _Job(CleanOptions(cyrillic_to_latin=cyrillic_to_latin), min_az_share, filter)
    # Exact dedup keeps one 64-bit digest per unique document (~60 bytes of RAM each, so ~1.2 GB
    # for 20M documents); the chance of any false duplicate among 20M is about 1e-5.
    seen: set[int] = set()
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(workers, mp_context=worker_context()) if workers > 1 else None
    try:
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
            docs = iter_corpus(files, report.input, text_field)
            first = True
            for results in ordered_map(
                job, batched(docs, batch_docs), pool, window=4 * max(1, workers)
            ):
                for text, stats, reason, nbytes in results:
                    report.documents_in += 1
                    report.bytes_in += nbytes
                    report.repairs.update(stats)
                    if filter:
                        if reason is None and dedup:
                            h = int.from_bytes(
                                hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(),
                                "little",
                            )
                            if h in seen:
                                reason = "duplicate"
                            else:
                                seen.add(h)
                        if reason is not None:
                            report.dropped[reason] += 1
                            continue
                    elif not text:
                        report.dropped["empty_after_cleaning"] += 1
                        continue
                    data = text if first else "\n\n" + text
                    first = False
                    f.write(data)
                    report.documents_out += 1
                    report.bytes_out += len(data.encode("utf-8"))
            if report.documents_out == 0:
                raise UserError(
                    f"no documents are left after cleaning {', '.join(map(str, inputs))}; "
                    "check the input language or lower --min-az-share (or pass --no-filter)."
                )
            f.write("\n")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    report.seconds = time.perf_counter() - t0
    return report


def write_report(report: CleanReport, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(
            json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
