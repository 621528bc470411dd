"""Reading corpora: files or folders of .txt / .txt.gz / .jsonl / .jsonl.gz, Parquet and MediaWiki
XML dumps (.xml / .xml.bz2), streamed document by document. Text files hold documents separated
by blank lines (a document longer than PART_CHARS comes in parts, cut between lines); JSONL
files hold one document per line in a text field, Parquet files one per row in a text column
(read row group by row group); a dump gives one document per article. Partly bad
input (bytes that are not UTF-8, lines that are not JSON) is repaired or skipped and counted;
wholly bad input is a UserError.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from urllib.parse import urlsplit

from .errors import UserError

SUFFIXES = (
    ".txt",
    ".txt.gz",
    ".jsonl",
    ".jsonl.gz",
    ".text",
    ".parquet",
    ".xml",
    ".xml.bz2",
)
BINARY_SUFFIXES = (".parquet", ".xml.bz2")


def _supported(p: Path) -> bool:
    return p.name.endswith(SUFFIXES)


def _walk(folder: Path, links: list[Path]) -> Iterator[Path]:
    """Corpus files under `folder`, recursively; symbolic links met inside it (to files or to
    folders) are not followed but collected in `links`."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise UserError(
            f"cannot list folder {folder} ({e.strerror}); check its permissions."
        ) from None
    for e in entries:
        p = Path(e.path)
        if e.is_symlink():
            if e.is_dir() or _supported(p):
                links.append(p)
        elif e.is_dir():
            yield from _walk(p, links)
        elif e.is_file() and _supported(p):
            yield p


def discover(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders (recursively, sorted) and check every input exists and is readable text.

    One rule for links: a path named on the command line is read, link or not (the user chose
    it); a symbolic link found inside a folder, to a file or to a folder, is skipped with a
    warning, so a link planted in a shared folder cannot pull another file into the corpus."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"input {p} does not exist; check the path.")
        if p.is_dir():
            links: list[Path] = []
            found = list(_walk(p, links))
            if links:
                import warnings

                shown = ", ".join(str(q) for q in links[:3]) + (", ..." if len(links) > 3 else "")
                warnings.warn(
                    f"skipped {len(links)} symbolic link(s) inside {p} ({shown}); name them on "
                    "the command line to read them",
                    stacklevel=2,
                )
            if not found:
                raise UserError(
                    f"folder {p} holds no .txt, .txt.gz, .jsonl, .jsonl.gz, .parquet or .xml(.bz2) "
                    "files; point at a folder with corpus files."
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
    if p.name.endswith(".bz2"):
        return bz2.open(p, "rb")
    return open(p, "rb")


def is_parquet(p: Path) -> bool:
    return p.name.endswith(".parquet")


def is_wiki_dump(p: Path) -> bool:
    return p.name.endswith((".xml", ".xml.bz2"))


def _check_file(p: Path) -> None:
    try:
        if p.stat().st_size == 0:
            raise UserError(f"input {p} is empty; give a file that holds text.")
        if is_parquet(p):
            with open(p, "rb") as f:
                if f.read(4) != b"PAR1":
                    raise UserError(f"input {p} is not a Parquet file; check the file.")
            return
        with _open_binary(p) as f:
            head = f.read(8192)
    except UserError:
        raise
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise UserError(
            f"cannot read input {p} ({e}); check that it is a readable text, .gz or .bz2 file."
        ) from None
    if not head.strip():
        raise UserError(f"input {p} is empty; give a file that holds text.")
    if b"\x00" in head:
        raise UserError(f"input {p} is a binary file, not text; give UTF-8 .txt or .jsonl files.")
    if is_wiki_dump(p) and b"<mediawiki" not in head:
        raise UserError(
            f"input {p} is not a MediaWiki XML dump (no <mediawiki> element at its start); "
            "give a *-pages-articles*.xml.bz2 file."
        )


def legacy_code_page(data: bytes) -> str:
    """The Windows code page legacy bytes are most likely in: cp1251 where most letters are high
    bytes (Cyrillic), else cp1254 (Turkish/Azerbaijani Latin; identical to cp1252 except that it
    has ğ ı İ ş Ş where cp1252 has ð ý Ý þ Þ). The crawler asks the same of a page's text."""
    high = sum(b >= 0x80 for b in data)
    ascii_letters = sum(65 <= b <= 90 or 97 <= b <= 122 for b in data)
    return "cp1251" if high > ascii_letters else "cp1254"


def _decode(line: bytes, stats: Counter) -> str:
    """A line as text. Not UTF-8: either UTF-8 with a few damaged bytes (dropped), or a legacy
    Windows code page (legacy_code_page), decoded as such. Dropping the bytes instead would keep
    "Azrbaycan razisind"."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        pass
    kept = line.decode("utf-8", errors="ignore")
    multibyte = sum(ord(c) > 127 for c in kept)
    bad = len(line) - len(kept.encode("utf-8"))
    if multibyte >= bad:  # mostly good UTF-8 with a few stray bytes
        stats["invalid_utf8_lines"] += 1
        return kept
    codec = legacy_code_page(line)
    stats[f"{codec}_lines_decoded"] += 1
    return line.decode(codec, errors="replace").replace("\ufffd", "")


def is_jsonl(p: Path) -> bool:
    return p.name.endswith((".jsonl", ".jsonl.gz"))


def iter_documents(
    p: Path, stats: Counter, text_field: str = "text", line_docs: bool = False
) -> Iterator[str]:
    """Yield the raw documents of one file, in order; a long text document comes in parts (see
    `Continued`). Memory holds one document, or one part, at a time."""
    for text, _ in iter_sourced_documents(p, stats, text_field, line_docs):
        yield text


def iter_sourced_documents(
    p: Path,
    stats: Counter,
    text_field: str = "text",
    line_docs: bool = False,
    raw_wikitext: bool = False,
) -> Iterator[tuple[str, str | None]]:
    """Yield (document, site) for one file: the site is the host of the record's `url` field
    (JSONL, Parquet: crawled pages), None where the input has no URLs. With `raw_wikitext`, a
    dump's articles come as WikiText (call `.to_text()`)."""
    if is_parquet(p):
        yield from _iter_parquet(p, stats, text_field)
        return
    try:
        with _open_binary(p) as f:
            if is_jsonl(p):
                yield from _iter_jsonl(p, f, stats, text_field)
            elif is_wiki_dump(p):
                for text in _iter_mediawiki(p, f, stats, raw_wikitext):
                    yield text, None
            else:
                for text in _iter_txt(f, stats, line_docs):
                    yield text, None
    except EOFError:
        raise UserError(
            f"input {p} ends in the middle (truncated); download or copy it again."
        ) from None
    except (OSError, gzip.BadGzipFile, zlib.error) as e:
        raise UserError(
            f"cannot read input {p} ({str(e)[:80]}): the file is corrupt; download or copy it again."
        ) from None


PART_CHARS = 1 << 20
"""A text document longer than this (a file without blank lines is one document) is handed on
in parts of about this many characters, cut between lines; memory is then bounded by the part
(and by the longest line), not by the document."""


class Continued(str):
    """A part of a long document that the next item continues, after a newline. The last part
    of a document is a plain str, as is a whole document, so code that does not care sees text;
    `continues(item)` tells the parts apart."""

    def __reduce__(self):
        return (Continued, (str(self),))


def continues(item) -> bool:
    """True when the next item is the rest of this item's document (joined by a newline)."""
    return isinstance(item, Continued)


def _iter_txt(f, stats: Counter, line_docs: bool) -> Iterator[str]:
    lines: list[str] = []
    size = 0
    for raw in f:
        line = _decode(raw, stats).rstrip("\r\n")
        if line_docs:
            if line.strip():
                yield line
            continue
        if line.strip():
            # Cut before a line that starts with a non-space character: no pre-tokenizer joins a
            # newline to what follows it then, so the parts encode to the ids of the whole. Lines
            # that start with a space only delay the cut, up to four parts' worth.
            if size >= PART_CHARS and (not line[0].isspace() or size >= 4 * PART_CHARS):
                yield Continued("\n".join(lines))
                lines, size = [], 0
            lines.append(line)
            size += len(line) + 1
        elif lines:
            yield "\n".join(lines)
            lines, size = [], 0
    if lines:
        yield "\n".join(lines)


def _lines(f, limit: int) -> Iterator[tuple[bytes, Iterator[bytes] | None]]:
    """(line, None) for lines up to `limit` bytes; (first `limit` bytes, an iterator over the
    rest of the line) for longer ones (the caller must exhaust it before asking for more)."""
    while raw := f.readline(limit):
        if len(raw) < limit or raw.endswith(b"\n"):
            yield raw, None
            continue

        def rest():
            while chunk := f.readline(limit):
                yield chunk
                if chunk.endswith(b"\n"):
                    return

        yield raw, rest()


def _iter_jsonl(p: Path, f, stats: Counter, text_field: str) -> Iterator[str]:
    from . import longrecords

    good = 0
    for raw, rest in _lines(f, longrecords.LINE_BYTES):
        if rest is not None:  # a line too long to hold: scanned as a stream
            with longrecords.new_spool() as spool:
                try:
                    found, url, info = longrecords.stream_record(raw, rest, text_field, spool)
                except longrecords.BadLine:
                    found = None
                for _ in rest:  # the rest of a bad line
                    pass
                if found is None:
                    stats["bad_json_lines"] += 1
                    continue
                if info.get("invalid_utf8"):
                    stats["invalid_utf8_lines"] += 1
                if not found:
                    stats["missing_text_field"] += 1
                    continue
                good += 1
                stats["long_records_in_parts"] += 1
                site = _site(url)
                pieces = longrecords.spooled_pieces(spool)
                for part in longrecords.parts(pieces, PART_CHARS, Continued):
                    yield part, site
            continue
        if not raw.strip():
            continue
        try:
            obj = json.loads(_decode(raw, stats))
        except (json.JSONDecodeError, RecursionError):  # malformed, or nested absurdly deep
            stats["bad_json_lines"] += 1
            continue
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            stats["missing_text_field"] += 1
            continue
        good += 1
        site = _site(obj.get("url"))
        del obj, raw
        if len(text) <= PART_CHARS:
            yield text, site
            continue
        for part in longrecords.parts(iter((text,)), PART_CHARS, Continued):
            yield part, site
    if good == 0:
        raise UserError(
            f"no line of {p} has a string field {text_field!r}; choose the field with --text-field."
        )


def _site(url) -> str | None:
    if not isinstance(url, str):
        return None
    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:
        return None
    return (host[4:] if host.startswith("www.") else host) or None


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"reading this input needs {module.split('.')[0]}, which is not installed; "
            "run `pip install azgpt[crawl]`."
        ) from None


# ----------------------------------------------------------------------------- Parquet


def _iter_parquet(p: Path, stats: Counter, text_field: str) -> Iterator[tuple[str, str | None]]:
    """Rows of one Parquet file, row group by row group (memory: one row group's columns)."""
    pa = _need("pyarrow")
    pq = _need("pyarrow.parquet")
    try:
        pf = pq.ParquetFile(p, pre_buffer=False)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise _parquet_error(p, e) from None

    def is_text(t) -> bool:
        if pa.types.is_dictionary(t):
            t = t.value_type
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)

    if text_field not in schema.names:
        raise UserError(
            f"Parquet file {p} has no column {text_field!r} (its columns: "
            f"{', '.join(schema.names) or 'none'}); choose the text column with --text-field."
        )
    if not is_text(schema.field(text_field).type):
        raise UserError(
            f"column {text_field!r} of Parquet file {p} holds {schema.field(text_field).type}, not "
            "text; choose the text column with --text-field."
        )
    cols = [text_field]
    if text_field != "url" and "url" in schema.names and is_text(schema.field("url").type):
        cols.append("url")
    try:
        for i in range(pf.num_row_groups):
            # One row group at a time, in batches of about PARQUET_BATCH_BYTES of text: Arrow
            # holds one batch's decoded columns, Python one batch of strings (rows of 1 MB in
            # batches of 1,024 were a gigabyte at once).
            rows = _parquet_batch_rows(pf.metadata.row_group(i), text_field)
            for batch in pf.iter_batches(
                batch_size=rows, row_groups=[i], columns=cols, use_threads=False
            ):
                col = batch.column(0)
                urls = batch.column(1).to_pylist() if len(cols) > 1 else [None] * len(col)
                for text, url in zip(_parquet_texts(pa, col, stats), urls):
                    if text is None:
                        stats["missing_text_field"] += 1
                        continue
                    if isinstance(text, str):
                        yield text, _site(url)
                        continue
                    site = _site(url)
                    for part in text:  # a value longer than a part, in parts
                        yield part, site
    except (pa.ArrowException, OSError) as e:
        raise _parquet_error(p, e) from None


PARQUET_BATCH_BYTES = 16 << 20  # decoded text per Arrow batch (one row when a row is larger)


def _parquet_batch_rows(row_group, name: str) -> int:
    """Rows per batch so that a batch holds about PARQUET_BATCH_BYTES of decoded text, from the
    size the row group records for column `name` (1 to 1,024 rows)."""
    n = row_group.num_rows
    sizes = [
        c.total_uncompressed_size
        for j in range(row_group.num_columns)
        if (c := row_group.column(j)).path_in_schema == name
    ]
    per_row = (sizes[0] if sizes else 0) / max(n, 1)
    return max(1, min(1024, int(PARQUET_BATCH_BYTES // max(per_row, 1))))


def _parquet_texts(pa, col, stats: Counter) -> Iterator:
    """The column's values: str, None, or for a value over PART_CHARS bytes an iterator over its
    parts, decoded straight from Arrow's buffer (a Python str of the whole value never exists)."""
    import numpy as np

    from . import longrecords

    t = col.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)) or len(col) == 0:
        yield from col.to_pylist()
        return
    bufs = col.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64 if pa.types.is_large_string(t) else np.int32)
    offsets = offsets[col.offset : col.offset + len(col) + 1]
    if int((offsets[1:] - offsets[:-1]).max()) <= PART_CHARS:
        yield from col.to_pylist()
        return
    data = memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")
    for i in range(len(col)):
        if not col[i].is_valid:
            yield None
            continue
        a, b = int(offsets[i]), int(offsets[i + 1])
        if b - a <= PART_CHARS:
            yield col[i].as_py()
            continue
        stats["long_records_in_parts"] += 1
        yield longrecords.parts(_utf8_pieces(data[a:b]), PART_CHARS, Continued)


def _utf8_pieces(view: memoryview, size: int = 1 << 20) -> Iterator[str]:
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")("replace")
    for k in range(0, len(view), size):
        yield dec.decode(view[k : k + size])
    yield dec.decode(b"", final=True)


def _parquet_error(p: Path, e: Exception) -> UserError:
    """One sentence for a Parquet file Arrow cannot read (its messages run over several lines,
    e.g. a damaged footer's "Couldn't deserialize thrift: ...")."""
    detail = " ".join(str(e).split())[:120].rstrip(".")
    return UserError(
        f"cannot read Parquet file {p} ({detail}): it is damaged or truncated; copy or download "
        "it again."
    )


# ----------------------------------------------------------------------------- MediaWiki dumps

# Canonical (English) names of the file and category namespaces; the dump's own <siteinfo> adds
# the local ones (Azerbaijani Wikipedia: Fayl, Kateqoriya; older pages also write Şəkil).
_FILE_CATEGORY_NS = {"file", "image", "media", "category", "şəkil"}
# Interlanguage links ([[en:Baku]]) and other prefixed links whose label is not prose.
_INTERWIKI = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)*:")
_MAGIC = re.compile(r"__[A-ZÇƏĞIİÖŞÜ]+__")
# Tags whose contents are not running prose (tables, references, galleries, math, code).
_DROP_TAGS = {
    "table",
    "ref",
    "references",
    "gallery",
    "imagemap",
    "math",
    "chem",
    "score",
    "timeline",
    "syntaxhighlight",
    "source",
    "pre",
    "templatedata",
    "graph",
    "mapframe",
    "maplink",
}


def wikitext_to_text(wikitext: str, drop_namespaces: set[str] | frozenset = frozenset()) -> str:
    """Plain text of an article's wikitext: templates, tables, references, file and category
    links, interlanguage links and behaviour switches dropped; link labels and headings kept."""
    mwp = _need("mwparserfromhell")
    code = mwp.parse(wikitext)
    drop_ns = _FILE_CATEGORY_NS | {n.lower() for n in drop_namespaces}

    def dropped(node) -> bool:
        if isinstance(node, mwp.nodes.Template):
            return True
        if isinstance(node, mwp.nodes.Tag):
            return str(node.tag).strip().lower() in _DROP_TAGS
        if isinstance(node, mwp.nodes.Wikilink):
            title = str(node.title).strip()
            if ":" in title:
                prefix = title.lstrip(":").split(":", 1)[0].strip().lower()
                return prefix in drop_ns or bool(_INTERWIKI.match(title))
        return False

    def prune(wikicode) -> None:
        # One pass that rebuilds each node list: Wikicode.remove() searches the whole tree per
        # call, which made a 400 KB article with thousands of references take minutes.
        kept = []
        for node in wikicode.nodes:
            if dropped(node):
                continue
            for child in node.__children__():
                prune(child)
            kept.append(node)
        wikicode.nodes = kept

    prune(code)
    text = code.strip_code(normalize=True, collapse=True)
    text = _MAGIC.sub("", text)
    lines = (line.strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class WikiText(str):
    """An article's wikitext not yet turned into text (`azgpt clean` converts it in its worker
    processes, where the parsing, the slow part of reading a dump, runs in parallel)."""

    def __new__(cls, text: str, drop_namespaces=frozenset()):
        obj = super().__new__(cls, text)
        obj.drop_namespaces = frozenset(drop_namespaces)
        return obj

    def __reduce__(self):
        return (WikiText, (str(self), self.drop_namespaces))

    def to_text(self) -> str:
        return wikitext_to_text(str(self), self.drop_namespaces)


def _iter_mediawiki(p: Path, f, stats: Counter, raw: bool = False) -> Iterator[str]:
    """Articles of a MediaWiki XML dump: namespace 0, redirects skipped, one page in memory.
    With `raw`, yields WikiText for the caller to convert."""
    import xml.etree.ElementTree as ET

    _need("mwparserfromhell")
    drop_ns: set[str] = set()
    root = None
    articles = 0
    try:
        for event, elem in ET.iterparse(f, events=("start", "end")):
            if root is None:
                root = elem
                if _local(elem.tag) != "mediawiki":
                    raise UserError(
                        f"input {p} is not a MediaWiki XML dump (its root is <{_local(elem.tag)}>); "
                        "give a *-pages-articles*.xml.bz2 file."
                    )
                continue
            if event != "end":
                continue
            tag = _local(elem.tag)
            if tag == "namespace" and elem.get("key") in ("6", "14") and elem.text:
                drop_ns.add(elem.text.strip())
            elif tag == "page":
                text = _page_text(elem, stats)
                root.clear()
                if text is None:
                    continue
                articles += 1
                if raw:
                    yield WikiText(text, drop_ns)
                    continue
                text = wikitext_to_text(text, drop_ns)
                if not text:
                    stats["wiki_empty_after_markup"] += 1
                    continue
                yield text
    except ET.ParseError as e:
        raise UserError(
            f"input {p} is not well-formed MediaWiki XML ({e}); the dump may be truncated, "
            "download it again."
        ) from None
    if articles == 0:
        raise UserError(
            f"input {p} holds no articles (namespace 0 pages that are not redirects); "
            "give a *-pages-articles*.xml.bz2 dump."
        )


# mwparserfromhell rescans the rest of the page for each unclosed paired tag (`<ref>` with no
# `</ref>`) and for each unclosed template with parameters (`{{name|` with no `}}`, also across
# lines, also with `[[` nested in it), and within a line for each unclosed `[` (its open issue
# #364). Measured on this VM: 200 unclosed <ref> in a 600 KB page took 8.4 s, 2,000 unclosed
# `[http://` on one 20 KB line 2.1 s, i.e. 5-7e-8 s per unit of `parse_cost`; 16 KB of `{{a|`
# (4,096 unclosed) 6.4 s and 16 KB of `{{a\n|b=c\n` 2.4 s, 0.5-1.2e-7 s per unclosed template
# times the page's length, hence their weight of 2; a `{{` with no `|` after its name (`{{`,
# `{{{`, `{{a\n{{a`) fails at once and costs nothing. A page over WIKI_PARSE_BUDGET (~1-1.5 s)
# is skipped, counted and named in the report instead of holding clean for minutes.
WIKI_PARSE_BUDGET = 20_000_000
WIKI_NAMED = 20  # over-budget pages named in the report, at most
TEMPLATE_WEIGHT = 2
_PAIRED = (
    "ref|span|div|small|big|sup|sub|center|font|s|u|code|nowiki|poem|blockquote|math|gallery|"
    "syntaxhighlight|source|pre|noinclude|includeonly|onlyinclude|p|i|b|em|strong"
)
_OPEN_TAG = re.compile(rf"<({_PAIRED})\b[^<>]*(?<!/)>", re.I)
_CLOSE_TAG = re.compile(rf"</({_PAIRED})\s*>", re.I)
_PIPED_TEMPLATE = re.compile(r"\{\{[^{}|]*\|")  # `{{name|`, the name may span lines


def parse_cost(wikitext: str) -> int:
    """An estimate of mwparserfromhell's work on a page, linear to compute: unclosed paired
    tags, and TEMPLATE_WEIGHT times unclosed templates with parameters (more `{{` than `}}`,
    at most as many as `{{name|`), times the page's length, plus per line its unclosed `[`
    times the line's length."""
    unclosed = Counter(m.group(1).lower() for m in _OPEN_TAG.finditer(wikitext))
    unclosed.subtract(m.group(1).lower() for m in _CLOSE_TAG.finditer(wikitext))
    opened = sum(max(0, n) for n in unclosed.values())
    templates = wikitext.count("{{") - wikitext.count("}}")
    if templates > 0:
        templates = min(templates, sum(1 for _ in _PIPED_TEMPLATE.finditer(wikitext)))
        opened += TEMPLATE_WEIGHT * templates
    cost = opened * len(wikitext)
    for line in wikitext.split("\n"):
        extra = line.count("[") - line.count("]")
        if extra > 0:
            cost += extra * len(line)
    return cost


def _page_text(page, stats: Counter) -> str | None:
    ns = text = title = None
    redirect = False
    for child in page:
        tag = _local(child.tag)
        if tag == "title":
            title = (child.text or "").strip()
        elif tag == "ns":
            ns = (child.text or "").strip()
        elif tag == "redirect":
            redirect = True
        elif tag == "revision":
            for c in child:
                if _local(c.tag) == "text":
                    text = c.text or ""
    if ns != "0":
        stats["wiki_other_namespace"] += 1
        return None
    if redirect or (text or "").lstrip().lower().startswith("#redirect"):
        stats["wiki_redirects"] += 1
        return None
    if text and parse_cost(text) > WIKI_PARSE_BUDGET:
        stats["wiki_pages_over_parse_budget"] += 1
        if stats["wiki_pages_over_parse_budget"] <= WIKI_NAMED:
            stats[f"wiki_page_over_parse_budget: {title}"] += 1
        return None
    return text


def iter_corpus(
    files: list[Path], stats: Counter, text_field: str = "text", line_docs: bool = False
) -> Iterator[str]:
    for p in files:
        yield from iter_documents(p, stats, text_field, line_docs)


def iter_sourced(
    files: list[Path], stats: Counter, text_field: str = "text", raw_wikitext: bool = False
) -> Iterator[tuple[str, str | None]]:
    for p in files:
        yield from iter_sourced_documents(p, stats, text_field, raw_wikitext=raw_wikitext)


def batched(
    it: Iterable, n: int, max_chars: int | None = None, size_of: Callable = len
) -> Iterator[list]:
    """Lists of at most `n` items and, when `max_chars` is given, about `max_chars` characters
    (`size_of(item)`), so the work in flight is bounded by size, not only by count: 256
    documents of 500 KB are 128 MB, and a pool holds several batches at once."""
    batch, size = [], 0
    for x in it:
        batch.append(x)
        size += size_of(x) if max_chars is not None else 0
        if len(batch) == n or (max_chars is not None and size >= max_chars):
            yield batch
            batch, size = [], 0
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


def worker_context():
    """Worker processes are spawned, not forked: a fork after the tokenizers library has used its
    thread pool (any earlier encode in this process) deadlocks the child."""
    import multiprocessing

    return multiprocessing.get_context("spawn")


def default_workers() -> int:
    return max(
        1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
