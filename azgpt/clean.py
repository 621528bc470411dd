"""`azgpt clean`: stream documents through the boilerplate-line filter, the text repairs, the
language filter, exact and near-duplicate removal."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from .corpus import (
    Continued,
    WikiText,
    batched,
    continues,
    discover,
    is_jsonl,
    is_parquet,
    iter_sourced,
    ordered_map,
    worker_context,
)
from .dedup import NEAR_DUP_THRESHOLD, ExactDedup, LineFilter, NearDedup, Signer
from .errors import UserError
from .fsutil import atomic_path
from .poolio import Spool, call_spooled, unspool
from .quality import DEFAULT as QUALITY_THRESHOLDS
from .quality import verdict as quality_verdict
from .text import CleanOptions, clean_document, language_verdict

QUALITY_MODES = ("web", "all", "off")
EXAMPLES = 3


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
    """Documents dropped, by reason (a part of a long document counts as one)."""
    input: Counter = field(default_factory=Counter)
    """Problems met while reading (invalid UTF-8 lines, bad JSON lines, ...)."""
    boilerplate_lines: int = 0
    """Lines removed as boilerplate repeated across the documents of one site."""
    near_dedup: dict | None = None
    """The near-duplicate settings (threshold, permutations, shingle size, bands x rows)."""
    quality: str = "off"
    """Which documents the web-quality rules judged: web (records with a url), all, off."""
    quality_examples: dict = field(default_factory=dict)
    """Up to EXAMPLES documents' starts per quality rule that dropped them."""

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
            "boilerplate_lines_removed": self.boilerplate_lines,
            "near_dedup": self.near_dedup,
            "quality": {
                "applied_to": self.quality,
                "thresholds": QUALITY_THRESHOLDS.to_dict() if self.quality != "off" else None,
                "examples": self.quality_examples,
            },
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
        if self.boilerplate_lines:
            lines.append(f"boilerplate lines removed: {self.boilerplate_lines:,}")
        for rule, ex in sorted(self.quality_examples.items()):
            lines.append(f"  e.g. {rule}: {ex[0][:100]!r}")
        return "\n".join(lines)


@dataclass
class _Job:
    opts: CleanOptions
    min_az_share: float
    filter: bool
    signer: Signer | None = None
    quality: str = "off"

    def __call__(self, docs: list[tuple[str, int, bool, bool]]) -> list[tuple]:
        """(text, rule counts, drop reason, input bytes, MinHash signature or None, whether the
        next item continues this document) per document or part of a long document."""
        out = []
        for d, nbytes, web, whole in docs:
            more = continues(d)
            if isinstance(d, WikiText):
                d = d.to_text()
            text, stats = clean_document(d, self.opts)
            reason = None
            if not text:
                reason = "empty_after_cleaning"
            elif self.filter:
                reason = language_verdict(text, self.min_az_share)
                # The parts of a document over PART_CHARS are not judged: their statistics
                # describe a slice, and no menu or hub page is a million characters long.
                if (
                    reason is None
                    and whole
                    and (self.quality == "all" or (web and self.quality == "web"))
                ):
                    rule, _ = quality_verdict(text)
                    reason = f"quality:{rule}" if rule else None
            sig = self.signer.sign(text) if self.signer is not None and reason is None else None
            out.append((text, stats, reason, nbytes, sig, more))
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
    near_dedup: bool = True,
    near_dup_threshold: float = NEAR_DUP_THRESHOLD,
    line_filter: bool = True,
    workers: int = 1,
    batch_docs: int = 256,
    quality: str = "web",
) -> CleanReport:
    """Clean `inputs` into one file `out` (documents separated by blank lines, input order).

    With `filter=False` every input document gives one output document (possibly empty lines
    removed), so repairs can be checked line by line; dedup, near-dedup and the boilerplate-line
    filter are then off too. `dedup=False` turns near-dedup off as well.

    `quality` says which documents the web-quality rules (azgpt/quality.py) judge: "web" (the
    default: records with a `url`, i.e. crawled pages), "all", or "off"; off with filter=False.
    """
    if quality not in QUALITY_MODES:
        raise UserError(f"--quality must be one of {', '.join(QUALITY_MODES)}, got {quality!r}.")
    if not 0.0 <= min_az_share <= 1.0:
        raise UserError(f"--min-az-share must be in [0, 1], got {min_az_share}.")
    files = discover(inputs)
    report = CleanReport(quality=quality if filter else "off")
    exact = ExactDedup() if filter and dedup else None
    near = NearDedup(near_dup_threshold) if filter and dedup and near_dedup else None
    if near is not None:
        report.near_dedup = near.settings()
    job = _Job(
        CleanOptions(cyrillic_to_latin=cyrillic_to_latin),
        min_az_share,
        filter,
        Signer() if near is not None else None,
        report.quality,
    )
    t0 = time.perf_counter()
    lines = _count_site_lines(files, text_field) if filter and line_filter else None
    pool = ProcessPoolExecutor(workers, mp_context=worker_context()) if workers > 1 else None
    spool = Spool("azgpt-clean-") if pool is not None else None
    try:
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
            docs = _documents(files, report, text_field, lines)
            batches = batched(docs, batch_docs, max_chars=4 << 20, size_of=lambda d: len(d[0]))
            if spool is not None:  # replies through files: a killed worker cannot hang the pool
                tasks = ((job, b, spool.path) for b in batches)
                window = 4 * workers
                replies = map(unspool, ordered_map(call_spooled, tasks, pool, window=window))
            else:
                replies = ordered_map(job, batches, None, window=1)
            first = True
            # A long document comes in parts, each cleaned, filtered and deduplicated on its own;
            # the parts kept are written joined by a newline, as one document.
            in_doc = False  # the item read belongs to the document of the item before it
            doc_written = False  # some part of the current document has been written
            for results in replies:
                for text, stats, reason, nbytes, sig, more in results:
                    part_of = in_doc
                    in_doc = more
                    if not part_of:
                        doc_written = False
                    report.documents_in += not more
                    report.bytes_in += nbytes + more
                    report.repairs.update(stats)
                    if filter:
                        if reason is None and exact is not None and exact.is_duplicate(text):
                            reason = "duplicate"
                        if reason is None and near is not None and near.is_duplicate(sig):
                            reason = "near_duplicate"
                        if reason is not None:
                            report.dropped[reason] += 1
                            if reason.startswith("quality:"):
                                ex = report.quality_examples.setdefault(reason[8:], [])
                                if len(ex) < EXAMPLES:
                                    ex.append(text[:200])
                            continue
                    elif not text:
                        report.dropped["empty_after_cleaning"] += 1
                        continue
                    sep = "\n" if part_of and doc_written else "\n\n"
                    data = text if first else sep + text
                    first = False
                    f.write(data)
                    report.documents_out += not (part_of and doc_written)
                    doc_written = True
                    report.bytes_out += len(data.encode("utf-8"))
            if report.documents_out == 0:
                raise UserError(_nothing_left(inputs, report, filter, text_field))
            f.write("\n")
    except BrokenProcessPool:
        raise UserError(
            "a clean worker process died (out of memory, or killed); rerun, with fewer "
            "--workers if memory is short."
        ) from None
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if spool is not None:
            spool.remove()
    report.seconds = time.perf_counter() - t0
    return report


def _nothing_left(inputs: list[str], report: CleanReport, filter: bool, text_field: str) -> str:
    """The one sentence for an empty result, true to what happened and to the options given."""
    where = ", ".join(map(str, inputs))
    if report.documents_in == 0:
        missing = report.input.get("missing_text_field", 0)
        held = f" ({missing:,} records have it empty or null)" if missing else ""
        return (
            f"no record of {where} has text in the field {text_field!r}{held}; "
            "choose the text field with --text-field."
        )
    reasons = ", ".join(f"{k}={v:,}" for k, v in sorted(report.dropped.items()))
    if not filter:
        return f"every document of {where} is empty after cleaning ({reasons}); check the input."
    hint = "lower --min-az-share or pass --no-filter"
    if any(k.startswith("quality:") for k in report.dropped):
        hint += " (--quality off keeps what the web-quality rules dropped)"
    return f"no documents are left after cleaning {where} (dropped: {reasons}); {hint}."


def _count_site_lines(files: list[Path], text_field: str) -> LineFilter | None:
    """First pass over the inputs that can name a site (JSONL, Parquet): count short lines per
    site. None when no document has a URL."""
    lf = LineFilter()
    for text, site in iter_sourced(
        [p for p in files if is_jsonl(p) or is_parquet(p)], Counter(), text_field
    ):
        if site is not None:
            lf.observe(site, text)
    if not lf.is_active():
        return None
    lf.finish()
    return lf


def _documents(files, report: CleanReport, text_field: str, lines: LineFilter | None):
    """(raw document, its input bytes, whether it came with a url, whether it is a whole
    document rather than a part of a long one), boilerplate lines of its site already removed."""
    in_doc = False
    for text, site in iter_sourced(files, report.input, text_field, raw_wikitext=True):
        nbytes = len(text.encode("utf-8"))
        more = continues(text)
        whole = not more and not in_doc
        in_doc = more
        if lines is not None and site is not None:
            text, removed = lines.apply(site, text)
            report.boilerplate_lines += removed
            if more and removed:
                text = Continued(text)  # still a part the next item continues
        yield text, nbytes, site is not None, whole


def write_report(report: CleanReport, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(
            json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
