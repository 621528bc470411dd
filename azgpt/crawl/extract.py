"""From a page's bytes to its record: the character set, the main text (trafilatura), the
links, and the page's own robots directives.

The character set is chosen as browsers choose it (a byte order mark, then the Content-Type
header's charset, then a `<meta charset>` in the first 4 KB, else UTF-8), then checked: bytes
that are valid UTF-8 are UTF-8; otherwise, judged on the page's text (tags removed, entities
unescaped), a decoding that leaves U+FFFD, UTF-8 mojibake
(`Ã¼`, `Ä±`), words that mix Latin and Cyrillic letters (cp1254 bytes read as cp1251 turn
`ı ü ş` into `э ь ю` inside Latin words), Latin letters Azerbaijani does not use (Cyrillic
cp1251 bytes read as cp1254 give `Àçåðáàéäæàí`) or, in Azerbaijani-looking text, ý þ ð inside
words (cp1254's ı ş ğ read as latin-1 or cp1252: `yaþamýþ`) loses to one among UTF-8, cp1254 and
cp1251 that leaves fewer such signs; between those two code pages, ties go to the one
`corpus.legacy_code_page` (the file reader's choice) picks for the text's bytes. The choice is
kept in each record's `encoding` (`cp1254 (detected; declared cp1251)`).
"""

from __future__ import annotations

import codecs
import html as htmllib
import json
import re

from ..corpus import legacy_code_page
from ..text import AZ_ALPHABET, az_share
from .net import TEXT_TYPES, Response
from .robots import directives
from .urls import normalize_url

MAX_LINKS = 1000
"""Links kept per page (in page order); a page with 150,000 links is a sitemap, not prose."""
SITEMAP_LINKS = 10
"""A page with more than this many times MAX_LINKS links is judged by its link text before
extraction."""
MAX_LINK_SHARE = 0.5
"""A page whose main text is more than this share (characters) of link text is skipped as a
hub page or link list (`mostly_links`)."""

_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_MOJIBAKE = re.compile("Ã[\x80-\xbf¡-ÿ]|Ä[±°]|É™|Å[Ÿž]")
_MIXED = re.compile(r"\b(?=\w*[A-Za-zəƏıİğĞşŞçÇöÖüÜ])(?=\w*[\u0400-\u04ff])\w+\b")
# A tag: `[^<>]` keeps the scan linear on a page of stray `<`.
_TAG = re.compile(r"<[^<>]*>")
_TAG_BYTES = re.compile(rb"<[^<>]*>")
# What cp1254's ı ş ğ İ Ş Ğ are in latin-1 and cp1252.
_LATIN1_TELLTALE = "ýþðÝÞÐ"
_TELLTALE = re.compile(rf"(?<=[^\W\d_])[{_LATIN1_TELLTALE}]|[{_LATIN1_TELLTALE}](?=[^\W\d_])")
# Latin letters with diacritics that Azerbaijani does not use: not ä (ə in older text, and in
# cp1254, which has no ə) nor the telltale ones, which count only in Azerbaijani-looking text.
_FOREIGN = re.compile(
    "["
    + "".join(
        c
        for c in map(chr, range(0xC0, 0x250))
        if c.isalpha() and c not in AZ_ALPHABET + "äÄ" + _LATIN1_TELLTALE
    )
    + "]"
)
_AZ_LOOKING = 0.01
"""Share of ə, q, x among Latin letters from which a text counts as Azerbaijani-looking
(Azerbaijani: about 13%, also where ə is written ä; English: about 0.3%)."""


def _codec(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name.strip()).name
    except LookupError:
        return None


def _visible(text: str, html: bool) -> str:
    return htmllib.unescape(_TAG.sub(" ", text)) if html else text


def _with_schwa(text: str) -> str:
    # Pages in cp1254, which has no ə, write it ä.
    return text.replace("ä", "ə").replace("Ä", "Ə")


def _doubts(text: str) -> int:
    """Signs of a wrong decoding in a page's text: replacement characters, UTF-8 mojibake,
    mixed-script words, Latin letters Azerbaijani does not use, and (in Azerbaijani-looking
    text) ý þ ð inside words."""
    n = text.count("\ufffd") + len(_MOJIBAKE.findall(text)) + len(_MIXED.findall(text))
    n += len(_FOREIGN.findall(text))
    if _TELLTALE.search(text) and az_share(_with_schwa(text[:100_000])) >= _AZ_LOOKING:
        n += len(_TELLTALE.findall(text))
    return n


def decode_page(body: bytes, header_charset: str | None, html: bool) -> tuple[str, str]:
    """(text, the encoding used, as recorded)."""
    for bom, name in _BOMS:
        if body.startswith(bom):
            return body[len(bom) :].decode(name, errors="replace"), name
    declared = _codec(header_charset)
    if declared is None and html:
        m = _META_CHARSET.search(body[:4096])
        declared = _codec(m.group(1).decode("ascii", "ignore")) if m else None
    first = declared or "utf-8"
    try:
        utf8 = body.decode("utf-8")
    except UnicodeDecodeError:
        utf8 = None
    if utf8 is not None:
        # Valid UTF-8 is UTF-8, whatever was declared: legacy text with letters above ASCII
        # almost never is. ASCII alone reads the same in every candidate.
        if first == "utf-8":
            return utf8, first
        if utf8.isascii():
            return body.decode(first, errors="replace"), first
        return utf8, f"utf-8 (detected; declared {declared})"
    text = body.decode(first, errors="replace")
    bad = _doubts(_visible(text, html))
    if bad == 0:
        return text, first
    legacy = legacy_code_page(_TAG_BYTES.sub(b" ", body) if html else body)
    best, best_name, best_bad = text, first, bad
    for name in ("utf-8", legacy, "cp1251" if legacy == "cp1254" else "cp1254"):
        if name == first:
            continue
        t = body.decode(name, errors="replace")
        b = _doubts(_visible(t, html))
        if b < best_bad:
            best, best_name, best_bad = t, name, b
    if best_name == first:
        return text, first
    return best, f"{best_name} (detected; declared {declared or 'nothing'})"


def parse(resp: Response, max_links: int = MAX_LINKS):
    """(record fields or None, outgoing links, skip kind) for a 2xx text response."""
    if b"\x00" in resp.body[:4096] and not resp.body.startswith(
        (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    ):
        return None, [], "not_text"
    header = directives(resp.robots_tag)
    html = resp.content_type not in TEXT_TYPES
    text, encoding = decode_page(resp.body, resp.charset, html)
    if not html:
        if "noindex" in header:
            return None, [], "noindex"
        return {"title": None, "date": None, "text": text.strip(), "encoding": encoding}, [], None
    import trafilatura
    from trafilatura.utils import load_html

    tree = load_html(text)
    if tree is None:
        return None, [], "no_text"
    metas = tree.xpath(
        "//meta[translate(@name, 'ROBOTSAZGP', 'robotsazgp')='robots' or "
        "translate(@name, 'ROBOTSAZGP', 'robotsazgp')='azgpt']/@content"
    )
    rules = header | directives([str(m) for m in metas])
    links: dict[str, None] = {}  # ordered set: one pass, no list search per link
    anchors: set[str] = set()
    n_anchors = anchor_chars = 0
    tree.make_links_absolute(resp.url, resolve_base_href=True, handle_failures="discard")
    for a in tree.iter("a"):
        label = " ".join(a.text_content().split())
        n_anchors += 1
        anchor_chars += len(label)
        if label:
            anchors.add(label)
        if "nofollow" in rules or len(links) >= max_links:
            continue
        href = a.get("href")
        if href and "nofollow" not in (a.get("rel") or "").lower():
            u = normalize_url(href)
            if u:
                links[u] = None
    if "noindex" in rules:
        return None, list(links), "noindex"
    if n_anchors > SITEMAP_LINKS * max_links:
        # The extractor's time grows with the square of the links (5,000 links: 1.9 s of its
        # 2.1 s; 20,000: over a minute); a page of this many links, most of its text theirs, is
        # a link list, skipped before extraction.
        body = " ".join(" ".join(tree.xpath("//body//text()")).split())
        if anchor_chars > MAX_LINK_SHARE * max(len(body), 1):
            return None, list(links), "mostly_links"
    out = trafilatura.extract(
        tree,
        url=resp.url,
        output_format="json",
        with_metadata=True,
        include_comments=False,
        include_tables=False,
        deduplicate=False,
    )
    doc = json.loads(out) if out else {}
    main = (doc.get("text") or doc.get("raw_text") or "").strip()
    if main and link_share(main, anchors) > MAX_LINK_SHARE:
        return None, list(links), "mostly_links"
    fields = {"title": doc.get("title"), "date": doc.get("date"), "text": main}
    fields["encoding"] = encoding
    return fields, list(links), None


def link_share(text: str, anchors: set[str]) -> float:
    """Share of the text's characters in lines that are (a bullet, then) a link's whole text."""
    total = linked = 0
    for line in text.split("\n"):
        s = " ".join(line.split())
        if not s:
            continue
        total += len(s)
        if s in anchors or s.lstrip("-•*· ").strip() in anchors:
            linked += len(s)
    return linked / total if total else 0.0
