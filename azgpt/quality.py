"""Document quality rules for web text: the statistics FineWeb, C4 and Gopher (as implemented in
datatrove) use to tell prose from navigation, hub pages, menus and link lists, with thresholds
checked on Azerbaijani.

`clean` applies them to records that carry a `url` (crawled pages) by default, and to every
document with `--quality all`. Each rule has one name (the report counts drops as
`quality:<name>` and keeps examples); all thresholds live in `Thresholds` below.

Measured on /work/shared/corpus (ten files of literature, legal codes, religious texts, news,
user comments; docs/cleaning.md has the table and the command): with every rule on, legal
codes, classical literature and translated news lose 0.0% of their documents, the Bible 0.1%,
the Qur'an translations 0.4% and poems 0.7% (4 of 617); what goes are one-line comments and
sentences (too_few_words) and the days of headlines (lines_without_punctuation: 97.9%).

Left out on purpose:
- Gopher's upper bound on words per document (100,000): a code of law or a volume of poetry is
  one document of 100,000 to 300,000 words here.
- Gopher's stop-word rule (at least two of "the, be, to, of, and, that, have, with"), with
  Azerbaijani function words (və, bu, bir, ilə, üçün, da, də, ki, ...): classical verse uses few
  of them (51 of 617 poems have fewer than two), while headlines, which a hub page lists, have
  them.
- Gopher's mean word length upper bound of 10: Azerbaijani is agglutinative; the legal codes
  average 7.6 letters a word, and single sentences reach 11. 14 still catches base64, hashes and
  URLs run together.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

# A line "ends a sentence" when its last character is one of these (FineWeb's stop characters,
# plus the colon and semicolon that close the items of Azerbaijani legal lists) ...
END_PUNCT = frozenset(".!?…:;")
# ... or when it ends in closing quotes or brackets that follow one (`dedi."`, `(1990).)`).
# A quote or bracket alone ends a headline, not a sentence: `Nazir: "İslahatlar davam edəcək"`,
# `Bakıda güclü külək gözlənilir (foto)`, `... [FOTO]`.
CLOSERS = "\"'”“’»)]"
BULLETS = frozenset("•●○▪▫■□◦‣►▶➢➤✓✔-–—*·")
ELLIPSES = ("...", "…")


@dataclass(frozen=True)
class Thresholds:
    """Where each rule draws its line. A document is dropped by the first rule it fails, in this
    order."""

    min_words: int = 20
    """too_few_words: fewer whitespace-separated words (Gopher: 50, which drops 8% of the Qur'an
    suras and 1.1% of the poems here; 20 drops 0.4% and 0.2%)."""
    min_mean_word_length: float = 3.0
    """mean_word_length: mean characters per word below this (Gopher: 3) ..."""
    max_mean_word_length: float = 14.0
    """... or above this (Gopher: 10; see the module docstring)."""
    max_symbol_ratio: float = 0.1
    """symbol_ratio: ('#' + ellipses) per word above this (Gopher: 0.1)."""
    max_bullet_lines: float = 0.9
    """bullet_lines: share of lines starting with a bullet above this (Gopher: 0.9)."""
    max_ellipsis_lines: float = 0.3
    """ellipsis_lines: share of lines ending in an ellipsis above this (Gopher: 0.3)."""
    min_alpha_words: float = 0.8
    """non_alpha_words: share of words with a letter below this (Gopher: 0.8)."""
    min_punct_lines: float = 0.12
    """lines_without_punctuation: share of lines that end a sentence (ends_sentence) below this
    (FineWeb: 0.12)."""
    short_line_chars: int = 20
    max_short_lines: float = 0.67
    """short_lines: share of lines under `short_line_chars` characters above this (FineWeb: 30
    characters, which takes a whole volume of Füzuli and 6% of the poems, whose 8-syllable
    verses are 22-30 characters; menu items are under 20)."""
    max_dup_lines: float = 0.5
    """duplicate_lines: share of lines that repeat an earlier line above this (Gopher: 0.3) ..."""
    max_dup_line_chars: float = 0.5
    """... or share of characters in such lines above this (Gopher: 0.2). Refrains repeat lines:
    Psalm 136 has 47% repeated lines, Vaqif's müxəmməs 30%; Gopher's bounds dropped 1% of the
    poems."""
    max_newlines_per_word: float = 0.4
    """newline_ratio: lines per word above this, one or two words a line (FineWeb: 0.3, which
    takes poems of two- and three-word lines)."""

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT = Thresholds()
RULES = (
    "too_few_words",
    "mean_word_length",
    "symbol_ratio",
    "bullet_lines",
    "ellipsis_lines",
    "non_alpha_words",
    "lines_without_punctuation",
    "short_lines",
    "duplicate_lines",
    "newline_ratio",
)


def ends_sentence(line: str) -> bool:
    """The line (stripped) ends in END_PUNCT, possibly followed by CLOSERS."""
    t = line.rstrip(CLOSERS)
    return bool(t) and t[-1] in END_PUNCT


def statistics(text: str, th: Thresholds = DEFAULT) -> dict[str, float]:
    """The measures the rules compare with their thresholds (one pass over lines and words)."""
    lines = [s for s in (line.strip() for line in text.split("\n")) if s]
    words = text.split()
    nw = len(words) or 1
    nl = len(lines) or 1
    seen: Counter = Counter()
    dup_lines = dup_chars = 0
    for s in lines:
        if seen[s]:
            dup_lines += 1
            dup_chars += len(s)
        seen[s] += 1
    chars = sum(len(s) for s in lines) or 1
    return {
        "words": len(words),
        "mean_word_length": sum(len(w) for w in words) / nw,
        "symbol_ratio": (text.count("#") + sum(text.count(e) for e in ELLIPSES)) / nw,
        "bullet_lines": sum(s[0] in BULLETS for s in lines) / nl,
        "ellipsis_lines": sum(s.endswith(ELLIPSES) for s in lines) / nl,
        "alpha_words": sum(any(c.isalpha() for c in w) for w in words) / nw,
        "punct_lines": sum(ends_sentence(s) for s in lines) / nl,
        "short_lines": sum(len(s) < th.short_line_chars for s in lines) / nl,
        "dup_lines": dup_lines / nl,
        "dup_line_chars": dup_chars / chars,
        "newlines_per_word": len(lines) / nw,
    }


def failures(s: dict[str, float], th: Thresholds = DEFAULT) -> list[str]:
    """Every rule that statistics `s` fail, in the order of RULES."""
    checks = (
        ("too_few_words", s["words"] < th.min_words),
        (
            "mean_word_length",
            not th.min_mean_word_length <= s["mean_word_length"] <= th.max_mean_word_length,
        ),
        ("symbol_ratio", s["symbol_ratio"] > th.max_symbol_ratio),
        ("bullet_lines", s["bullet_lines"] > th.max_bullet_lines),
        ("ellipsis_lines", s["ellipsis_lines"] > th.max_ellipsis_lines),
        ("non_alpha_words", s["alpha_words"] < th.min_alpha_words),
        ("lines_without_punctuation", s["punct_lines"] < th.min_punct_lines),
        ("short_lines", s["short_lines"] > th.max_short_lines),
        (
            "duplicate_lines",
            s["dup_lines"] > th.max_dup_lines or s["dup_line_chars"] > th.max_dup_line_chars,
        ),
        ("newline_ratio", s["newlines_per_word"] > th.max_newlines_per_word),
    )
    return [name for name, failed in checks if failed]


def verdict(text: str, th: Thresholds = DEFAULT) -> tuple[str | None, dict[str, float]]:
    """(the first rule the document fails, or None; the statistics it was judged on)."""
    s = statistics(text, th)
    failed = failures(s, th)
    return (failed[0] if failed else None), s
