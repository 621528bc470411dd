"""Records too long to hold: a JSONL line or a Parquet value handed on in parts, like a long
text document (corpus.PART_CHARS characters, cut before a line that starts with a non-space
character, so the parts joined by newlines are the record's text).

A JSONL line longer than LINE_BYTES is not read whole: it is scanned as a stream (a small JSON
scanner below, which accepts and rejects what `json.loads` does for an object line), the text
field's string is decoded piece by piece into a temporary file, and once the line has proved to
be valid JSON the text is read back in parts. Memory: a few parts, whatever the line's length
(a line with no newline in its text is still one part: the longest line bounds memory, as in
text files).
"""

from __future__ import annotations

import codecs
import re
import tempfile
from collections.abc import Iterator

LINE_BYTES = 8 << 20
"""A JSONL line longer than this is scanned as a stream instead of parsed whole."""
READ_BYTES = 1 << 20

_CUT = re.compile(r"\n(?=\S)")


def parts(pieces: Iterator[str], part_chars: int, continued) -> Iterator[str]:
    """Cut the text made of `pieces` into parts of about `part_chars` characters, before a line
    that starts with a non-space character (or before any line once four parts' worth have piled
    up); every part but the last is wrapped in `continued`. "\\n".join(parts) is the text.
    Linear: each character is searched once and copied twice at most."""
    buf = ""
    start = 0  # where the current part begins in buf
    scanned = 0  # buf[:scanned] holds no cut point after start + part_chars
    for piece in pieces:
        if start:
            buf, scanned, start = buf[start:], max(0, scanned - start), 0
        buf += piece
        while len(buf) - start > part_chars:
            frm = max(start + part_chars, scanned)
            m = _CUT.search(buf, frm)
            if m is not None:
                i = m.start()
            elif (
                len(buf) - start >= 4 * part_chars
                and (j := buf.find("\n", start + part_chars)) >= 0
            ):
                i = j
            else:
                scanned = max(frm, len(buf) - 1)
                break
            yield continued(buf[start:i])
            start = scanned = i + 1
    yield buf[start:]


class BadLine(Exception):
    """The line is not one valid JSON value (what json.loads would reject)."""


class _Stream:
    """The bytes of one line, read in chunks, with lookahead."""

    def __init__(self, first: bytes, rest: Iterator[bytes]):
        self.buf = first
        self.pos = 0
        self.rest = rest

    def more(self, n: int = 1) -> bool:
        """At least n bytes available from pos (False at the end of the line)."""
        while len(self.buf) - self.pos < n:
            chunk = next(self.rest, None)
            if chunk is None:
                return False
            self.buf = self.buf[self.pos :] + chunk
            self.pos = 0
        return True

    def peek(self) -> int | None:
        return self.buf[self.pos] if self.more() else None

    def ws(self) -> None:
        while True:
            if not self.more():
                return
            m = _WS.match(self.buf, self.pos)
            self.pos = m.end()
            if self.pos < len(self.buf):
                return

    def expect(self, b: bytes) -> None:
        if not self.more(len(b)) or self.buf[self.pos : self.pos + len(b)] != b:
            raise BadLine
        self.pos += len(b)


_WS = re.compile(rb"[ \t\n\r]*")
_RUN = re.compile(rb'[^"\\\x00-\x1f]*')
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_ESCAPES = {
    ord('"'): '"',
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_MAX_DEPTH = 900  # json.loads gives up on nesting near Python's recursion limit


def _drop_counted(exc: UnicodeDecodeError):
    _dropped[0] += 1
    return "", exc.end


_dropped = [0]


def _string(s: _Stream, sink, stats: dict) -> None:
    """Read a JSON string (after its opening quote), handing decoded pieces to `sink` (None:
    skip them). Bytes that are not UTF-8 are dropped and counted, as the line reader does for a
    line of mostly good UTF-8."""
    dec = codecs.getincrementaldecoder("utf-8")("azgpt-drop-counted")
    while True:
        if not s.more():
            raise BadLine
        m = _RUN.match(s.buf, s.pos)
        run = s.buf[s.pos : m.end()]
        s.pos = m.end()
        if sink is not None and run:
            sink(dec.decode(run))
        if s.pos >= len(s.buf):
            continue
        c = s.buf[s.pos]
        if c == 0x22:  # the closing quote
            s.pos += 1
            if sink is not None:
                sink(dec.decode(b"", final=True))
            return
        if c < 0x20:  # a control character: json.loads (strict) rejects it
            raise BadLine
        # a backslash
        if not s.more(2):
            raise BadLine
        e = s.buf[s.pos + 1]
        if e in _ESCAPES:
            s.pos += 2
            if sink is not None:
                sink(dec.decode(b"", final=True) + _ESCAPES[e])
            continue
        if e != ord("u") or not s.more(6):
            raise BadLine
        code = _hex(s.buf[s.pos + 2 : s.pos + 6])
        s.pos += 6
        if 0xD800 <= code < 0xDC00 and s.more(6) and s.buf[s.pos : s.pos + 2] == b"\\u":
            low = _hex(s.buf[s.pos + 2 : s.pos + 6])
            if 0xDC00 <= low < 0xE000:  # a surrogate pair is one character, as json.loads reads
                s.pos += 6
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
        if sink is not None:
            sink(dec.decode(b"", final=True) + chr(code))


def _hex(b: bytes) -> int:
    if len(b) != 4 or not all(c in b"0123456789abcdefABCDEF" for c in b):
        raise BadLine
    return int(b, 16)


def _value(s: _Stream, sink, stats: dict, depth: int = 0) -> None:
    """Read one JSON value; a string's pieces go to `sink` when given (only at the top call)."""
    stack: list[int] = []  # open containers: ord("{") or ord("[")
    expect_key = False
    while True:
        s.ws()
        c = s.peek()
        if c is None:
            raise BadLine
        if stack and c in (0x7D, 0x5D) and not expect_key:
            # an empty container closes right away: handled where it opened
            raise BadLine
        if expect_key:
            if c != 0x22:
                raise BadLine
            s.pos += 1
            _string(s, None, stats)
            s.ws()
            s.expect(b":")
            s.ws()
            c = s.peek()
            if c is None:
                raise BadLine
            expect_key = False
        if c == 0x22:
            s.pos += 1
            _string(s, sink if not stack else None, stats)
        elif c in (0x7B, 0x5B):  # { [
            s.pos += 1
            s.ws()
            close = 0x7D if c == 0x7B else 0x5D
            if s.peek() == close:
                s.pos += 1
            else:
                if len(stack) + depth >= _MAX_DEPTH:
                    raise BadLine
                stack.append(c)
                expect_key = c == 0x7B
                continue
        elif c in b"tfn":
            for lit in (b"true", b"false", b"null"):
                if s.more(len(lit)) and s.buf[s.pos : s.pos + len(lit)] == lit:
                    s.pos += len(lit)
                    break
            else:
                raise BadLine
        else:
            for lit in (b"NaN", b"Infinity", b"-Infinity"):  # json.loads accepts these
                if s.more(len(lit)) and s.buf[s.pos : s.pos + len(lit)] == lit:
                    s.pos += len(lit)
                    break
            else:
                s.more(64)
                m = _NUMBER.match(s.buf, s.pos)
                if m is None or m.end() == s.pos:
                    raise BadLine
                s.pos = m.end()
        # after a value: close containers or move to the next item
        while stack:
            s.ws()
            c = s.peek()
            if c == 0x2C:  # ,
                s.pos += 1
                expect_key = stack[-1] == 0x7B
                break
            if c == (0x7D if stack[-1] == 0x7B else 0x5D):
                s.pos += 1
                stack.pop()
                continue
            raise BadLine
        if not stack and not expect_key:
            return


def stream_record(
    first: bytes, rest: Iterator[bytes], text_field: str, spool
) -> tuple[bool, object, dict]:
    """Scan one JSONL line (its first bytes and the rest) that holds a JSON object; the string
    value of `text_field` (the last one, as json.loads keeps) is written to `spool` as UTF-8.
    Returns (whether the field held a string, the `url` field's value if a string of at most
    64 KB, stats). Raises BadLine for what json.loads would reject."""
    codecs.register_error("azgpt-drop-counted", _drop_counted)
    _dropped[0] = 0
    s = _Stream(first, rest)
    stats: dict = {}
    s.ws()
    found = False
    url = None
    if s.peek() != 0x7B:  # valid JSON but not an object: json.loads reads it, with no field
        _value(s, None, stats, 0)
        s.ws()
        if s.more():
            raise BadLine
        return False, None, stats
    s.expect(b"{")
    s.ws()
    if s.peek() == 0x7D:
        s.pos += 1
    else:
        while True:
            s.ws()
            s.expect(b'"')
            key_parts = _Capped(4096)
            _string(s, key_parts, stats)
            key = key_parts.text()
            s.ws()
            s.expect(b":")
            s.ws()
            is_string = s.peek() == 0x22
            if key == text_field and is_string:
                spool.seek(0)
                spool.truncate()
                _value(s, lambda t: spool.write(t.encode("utf-8", "surrogatepass")), stats, 1)
                found = True
            elif key == text_field:
                _value(s, None, stats, 1)
                found = False
            elif key == "url" and is_string:
                got = _Capped(65536)
                _value(s, got, stats, 1)
                url = got.text()
            else:
                _value(s, None, stats, 1)
            s.ws()
            c = s.peek()
            if c == 0x2C:
                s.pos += 1
                continue
            if c == 0x7D:
                s.pos += 1
                break
            raise BadLine
    s.ws()
    if s.more():
        raise BadLine  # something after the object
    stats["invalid_utf8"] = _dropped[0] > 0
    return found, url, stats


class _Capped:
    """Collects decoded pieces up to `limit` characters (keys and URLs are short)."""

    def __init__(self, limit: int):
        self.limit, self.pieces, self.n = limit, [], 0

    def __call__(self, piece: str) -> None:
        if self.n < self.limit:
            self.pieces.append(piece)
            self.n += len(piece)

    def text(self) -> str:
        return "".join(self.pieces)


def spooled_pieces(spool, size: int = READ_BYTES) -> Iterator[str]:
    """The spooled text, decoded piece by piece."""
    spool.seek(0)
    dec = codecs.getincrementaldecoder("utf-8")("surrogatepass")
    while chunk := spool.read(size):
        yield dec.decode(chunk)
    yield dec.decode(b"", final=True)


def new_spool():
    return tempfile.TemporaryFile(prefix="azgpt-record-")
