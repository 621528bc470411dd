"""Duplicate removal for `azgpt clean`: exact duplicates, near-duplicates (MinHash LSH) and
boilerplate lines repeated across the documents of one site.

Near-duplicates: a document is a set of word 5-grams; a document whose estimated Jaccard
similarity with a document kept earlier is `threshold` (0.8 by default) or more is dropped.
MinHash signatures (128 permutations, datasketch) are computed in the cleaning workers. The main
process keeps an LSH index of 12 bands of 6 rows: a pair at Jaccard 0.8 shares a band with
probability 0.974 (0.85: 0.997, 0.9: 0.9999; 0.5: 0.17, 0.3: 0.009), and every candidate is then
checked on all 128 values, so the bands only decide whom to compare.

Why 0.8 on 5-grams: a 80-90-word article republished with one word changed and a source line
added keeps Jaccard 0.85-0.87; three different articles on one topic (tests/test_dedup.py) share
no 5-gram at all (Jaccard 0.0), and an article with every eighth word rewritten falls to 0.23. Documents under `MIN_WORDS` words are left to exact dedup: a handful of shingles is too
little evidence.

Why not datasketch's `MinHashLSH` for the index: its parameters for 0.8 (9 bands x 13 rows)
catch a pair at Jaccard 0.8 only 40% of the time, and on the same 30,000 signatures it took 316
us and 3.3 KB per document (a set per bucket, bytes keys) against 122 us and 1.5 KB here (CPU
time, under tracemalloc). The index here is one dict per band from a 64-bit band key to the
first document with it, plus the signatures (512 bytes per kept document) for the check.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field

from .errors import UserError

NEAR_DUP_THRESHOLD = 0.8
NUM_PERM = 128
SHINGLE_WORDS = 5
MIN_WORDS = 20
BANDS, ROWS = 12, 6
_BLOCK = 16384
_SIGN_SLICE = 4096
_POLY = 0x100000001B3  # the 64-bit FNV prime, as the polynomial's base


def _identity(x: int) -> int:
    return x


_WORD = re.compile(r"\w+")


def _need_datasketch():
    try:
        import datasketch
    except ImportError:
        raise UserError(
            "near-duplicate removal needs datasketch, which is not installed; run "
            "`pip install datasketch` (or pass --no-near-dedup)."
        ) from None
    return datasketch


class ExactDedup:
    """One 64-bit digest per unique document (~60 bytes of RAM each, so ~1.2 GB for 20M
    documents); the chance of any false duplicate among 20M is about 1e-5."""

    def __init__(self):
        self.seen: set[int] = set()

    def is_duplicate(self, text: str) -> bool:
        h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
        if h in self.seen:
            return True
        self.seen.add(h)
        return False


@dataclass
class Signer:
    """MinHash signatures of documents; picklable, so cleaning workers compute them."""

    num_perm: int = NUM_PERM
    _template: object = field(default=None, repr=False, compare=False)

    def __getstate__(self):
        return {"num_perm": self.num_perm, "_template": None}

    def sign(self, text: str):
        """The signature (numpy array of `num_perm` values), or None for a short document."""
        words = _WORD.findall(text)
        if len(words) < MIN_WORDS:
            return None
        ds = _need_datasketch()
        import numpy as np

        if self._template is None:
            # Seeded permutations, identical in every process.
            self._template = ds.MinHash(self.num_perm, seed=1, hashfunc=_identity)
        t = self._template
        m = ds.MinHash(
            self.num_perm, seed=1, hashfunc=_identity, permutations=t.permutations, scheme=t.scheme
        )
        # A shingle's 32-bit value: a polynomial over the CRC32 of its 5 words, mod 2^64, folded
        # (datasketch mixes it with MurmurHash3's finaliser before permuting). Hashing words, not
        # joined 5-gram strings: 5.0 instead of 3.3 MB per CPU-second on legal and news text.
        wh = np.fromiter(
            (zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words)
        )
        n = len(words) - SHINGLE_WORDS + 1
        h = np.zeros(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(SHINGLE_WORDS):
                h = h * _POLY + wh[k : k + n]
        h = np.unique((h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF))
        # In slices: datasketch builds a (shingles x permutations) matrix and temporaries of it;
        # whole, a 700 KB legal code (100,000 shingles) took ~150 MB more peak memory.
        for k in range(0, len(h), _SIGN_SLICE):
            m.update_batch(h[k : k + _SIGN_SLICE].tolist())
        return m.hashvalues


class NearDedup:
    """The LSH index over the signatures of the documents kept so far."""

    def __init__(
        self,
        threshold: float = NEAR_DUP_THRESHOLD,
        num_perm: int = NUM_PERM,
        bands: int = BANDS,
        rows: int = ROWS,
    ):
        if not 0.0 < threshold < 1.0:
            raise UserError(f"--near-dup-threshold must be between 0 and 1, got {threshold}.")
        import numpy as np  # the index needs numpy only; datasketch (and scipy) stay in workers

        if bands * rows > num_perm:
            raise ValueError(f"{bands} bands x {rows} rows need {bands * rows} permutations")
        self.np = np
        self.threshold, self.num_perm, self.bands, self.rows = threshold, num_perm, bands, rows
        # Band key = the band's values times random odd 64-bit multipliers, summed mod 2^64.
        self.mult = np.random.default_rng(20261202).integers(
            1, 2**63, size=rows, dtype=np.uint64
        ) | np.uint64(1)
        self.tables: list[dict[int, int]] = [{} for _ in range(bands)]
        self.blocks: list = []  # signatures of kept documents, _BLOCK rows per array
        self.n = 0

    def _signature(self, i: int):
        return self.blocks[i // _BLOCK][i % _BLOCK]

    def is_duplicate(self, signature) -> bool:
        """True if an indexed document is a near-duplicate; else index this one and say False."""
        if signature is None:
            return False
        np = self.np
        b, r = self.bands, self.rows
        with np.errstate(over="ignore"):
            keys = (signature[: b * r].reshape(b, r).astype(np.uint64) * self.mult).sum(axis=1)
        keys = keys.tolist()
        checked = set()
        for table, k in zip(self.tables, keys):
            j = table.get(k)
            if j is not None and j not in checked:
                checked.add(j)
                if (self._signature(j) == signature).mean() >= self.threshold:
                    return True
        if self.n % _BLOCK == 0:
            self.blocks.append(np.empty((_BLOCK, self.num_perm), dtype=signature.dtype))
        self.blocks[-1][self.n % _BLOCK] = signature
        for table, k in zip(self.tables, keys):
            table.setdefault(k, self.n)
        self.n += 1
        return False

    def settings(self) -> dict:
        return {
            "threshold": self.threshold,
            "num_perm": self.num_perm,
            "shingle_words": SHINGLE_WORDS,
            "min_words": MIN_WORDS,
            "bands": self.bands,
            "rows": self.rows,
        }


class LineFilter:
    """Boilerplate lines of a site: a line of at most `max_chars` characters that occurs in at
    least `min_docs` documents and at least `min_share` of the documents of one site (the host
    of their `url`) is removed from all that site's documents.

    Counting is a first pass over the inputs. Memory is bounded: the table of (site, line)
    counts holds at most `max_entries` entries (~100 bytes each); when it fills up, lines seen
    only once so far are forgotten (lossy counting), which boilerplate, repeated on nearly every
    page, survives.
    """

    def __init__(
        self,
        min_docs: int = 3,
        min_share: float = 0.05,
        max_chars: int = 200,
        max_entries: int = 4_000_000,
    ):
        self.min_docs, self.min_share, self.max_chars = min_docs, min_share, max_chars
        self.max_entries = max_entries
        self.counts: Counter = Counter()
        self.site_docs: Counter = Counter()

    def _keys(self, site: str, text: str):
        seen = set()
        for line in text.split("\n"):
            s = line.strip()
            if s and len(s) <= self.max_chars:
                k = hash((site, s))
                if k not in seen:
                    seen.add(k)
                    yield k

    def observe(self, site: str, text: str) -> None:
        self.site_docs[site] += 1
        self.counts.update(self._keys(site, text))
        if len(self.counts) > self.max_entries:
            self.counts = Counter({k: v for k, v in self.counts.items() if v > 1})

    def finish(self) -> None:
        """End of the counting pass: forget the lines too rare to be boilerplate anywhere."""
        self.counts = Counter({k: v for k, v in self.counts.items() if v >= self.min_docs})

    def is_active(self) -> bool:
        return bool(self.site_docs)

    def apply(self, site: str | None, text: str) -> tuple[str, int]:
        """(text without the site's boilerplate lines, number of lines removed)."""
        if site is None or site not in self.site_docs:
            return text, 0
        bar = max(self.min_docs, self.min_share * self.site_docs[site])
        kept, removed = [], 0
        for line in text.split("\n"):
            s = line.strip()
            if s and len(s) <= self.max_chars and self.counts.get(hash((site, s)), 0) >= bar:
                removed += 1
            else:
                kept.append(line)
        return ("\n".join(kept), removed) if removed else (text, 0)
