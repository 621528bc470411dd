"""Pure str -> str cleaning for Azerbaijani text. No I/O.

`clean_document(text, opts)` returns the cleaned document and a Counter of the rules that
fired, so the `azgpt clean` report can say how often each repair happened.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

import ftfy
import ftfy.bad_codecs  # noqa: F401  (registers the sloppy-windows-* codecs)

AZ_LOWER = "abcçdeəfgğhxıijkqlmnoöprsştuüvyz"
AZ_UPPER = "ABCÇDEƏFGĞHXIİJKQLMNOÖPRSŞTUÜVYZ"
AZ_ALPHABET = AZ_LOWER + AZ_UPPER

# ftfy without the rewrites that would change correct text: curly quotes are real
# Azerbaijani typography, and width/ligature folding is NFKC-like (see DESIGN: NFC only).
_FTFY = ftfy.TextFixerConfig(
    uncurl_quotes=False,
    fix_character_width=False,
    fix_latin_ligatures=False,
    unescape_html=False,
    # "â€ " is read as E2 80 A0 (a dagger) by this rule; in Azerbaijani text it is far more often
    # a closing quote (E2 80 9D) that lost its 0x9D, which the residual pass restores.
    restore_byte_a0=False,
    # Its guesses on lines mixing text and mojibake turn "â€ " into a dagger; the residual pass
    # below handles mixed lines character by character instead.
    decode_inconsistent_utf8=False,
    normalization="NFC",
    explain=True,
)

# Codecs that UTF-8 bytes are commonly mis-decoded with, in the order they are tried, and the
# bytes each leaves undefined (those are the bytes that get dropped in transit). A dropped byte
# can be ambiguous (🎓 and 🍓 differ only in it); ties go to the first byte listed.
_MOJIBAKE_CODECS = {
    "windows-1252": b"\x8f\x9d\x81\x8d\x90",
    "windows-1254": b"\x8e\x8f\x9d\x8d\x90\x9e\x81",
    "windows-1251": b"\x98",
}
# Characters that almost only occur in mojibake of Azerbaijani UTF-8 text (lead bytes of
# ə ı İ ş ğ ç ö ü Ə and emoji read as cp1252/cp1254/cp1251).
_MOJIBAKE_MARKERS = set("ÃÄÅÆÉÐÑâðЙДСРГЖЋџ™Ÿ€±") | {chr(c) for c in range(0x80, 0xA0)}
_PLAUSIBLE_PUNCT = set("«»“”„‘’‚–—…№°•·€©®™×÷±²³½¼¾§¶")
_COMMON_CYRILLIC = set(
    "АБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯабвгдеёжзийклмнопрстуфхцчшщъыьэюяӘәҒғҜҝҺһӨөҮүҸҹЈј"
)

# Look-alikes of ə/Ə that are always wrong in Azerbaijani Latin text.
_SCHWA_LOOKALIKES = {"\u01dd": "ə", "\u018e": "Ə"}
# Cyrillic letters that look like Latin ones; replaced only inside words that also hold
# Latin letters (a keyboard-layout or OCR artefact), never in genuinely Cyrillic words.
_CYR_LOOKALIKE = {
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i",
    "ј": "j", "һ": "h", "ә": "ə", "ө": "ö", "ү": "ü", "к": "k",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P",
    "С": "C", "Т": "T", "Х": "X", "У": "Y", "І": "I", "Ј": "J", "Һ": "H", "Ә": "Ə",
    "Ө": "Ö", "Ү": "Ü", "Ѕ": "S",
}  # fmt: skip

# The standard (1991+) transliteration of Cyrillic-script Azerbaijani to the Latin alphabet.
_CYR_TO_LAT = {
    "А": "A", "Б": "B", "В": "V", "Г": "Q", "Ғ": "Ğ", "Д": "D", "Е": "E", "Ә": "Ə",
    "Ж": "J", "З": "Z", "И": "İ", "Ы": "I", "Ј": "Y", "К": "K", "Ҝ": "G", "Л": "L",
    "М": "M", "Н": "N", "О": "O", "Ө": "Ö", "П": "P", "Р": "R", "С": "S", "Т": "T",
    "У": "U", "Ү": "Ü", "Ф": "F", "Х": "X", "Һ": "H", "Ч": "Ç", "Ҹ": "C", "Ш": "Ş",
    "Й": "Y", "Э": "E", "Ю": "Yu", "Я": "Ya", "Ё": "Yo", "Ц": "Ts", "Щ": "Şç",
    "Ъ": "", "Ь": "", "Ӯ": "U", "Қ": "G", "Ҡ": "G",
}  # fmt: skip
_CYR_TO_LAT.update({k.lower(): v.lower() for k, v in list(_CYR_TO_LAT.items())})
_CYR_TO_LAT["и"] = "i"
_CYR_TO_LAT["ы"] = "ı"

# Invisible characters removed outright: zero-width space/joiners used as junk, BOM, word
# joiner, soft hyphen, bidi controls. ZWJ (U+200D) is kept between emoji (family sequences).
_INVISIBLE = re.compile(
    "[\u200b\u200c\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\u00ad]"
)
_ZWJ_NEAR_LETTER = re.compile(r"(?<=\w)\u200d|\u200d(?=\w)")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SPACES = re.compile("[\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000 ]+")
_LETTERS = re.compile(r"[^\W\d_]+")
_CYRILLIC = re.compile("[\u0400-\u04ff]")
_LATIN_LETTER = re.compile("[A-Za-zÀ-ɏ]")


@dataclass
class CleanOptions:
    cyrillic_to_latin: bool = False
    """Transliterate Cyrillic-script Azerbaijani to Latin (1991+ standard)."""
    fix_a_umlaut: bool = True
    """In documents with no ə at all, read ä/Ä as ə/Ə (older web text)."""


def _rank(c: str) -> int | None:
    """How likely `c` is in Azerbaijani text (0 best); None when implausible."""
    o = ord(c)
    if c in AZ_ALPHABET:
        return 0
    if c in _PLAUSIBLE_PUNCT:
        return 1
    if 0xC0 <= o <= 0x17F:
        return 2
    if c in _COMMON_CYRILLIC:
        return 3
    if 0x1F300 <= o <= 0x1FAFF or 0x2600 <= o <= 0x27BF:
        return 4
    return None


def _byte(c: str, codec: str, undefined: bytes = b"") -> int | None:
    try:
        b = c.encode(codec)
    except UnicodeEncodeError:
        # Sloppy decoders and latin-1 turn undefined bytes into C1 controls, and ftfy turns those
        # into their cp1252 characters (0x8E -> Ž): map either back to the byte.
        o = ord(c)
        if 0x80 <= o < 0xA0:
            return o
        try:
            b = c.encode("cp1252")
        except UnicodeEncodeError:
            return None
        return b[0] if len(b) == 1 and b[0] in undefined else None
    return b[0] if len(b) == 1 else None


def _utf8_len(lead: int) -> int:
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _undo_codec(line: str, codec: str, undefined: bytes, weak: bool) -> tuple[str, int]:
    """Re-decode every UTF-8 sequence in `line` that was read as `codec`; correct text stays.

    Single-byte codecs map one character to one byte, so the line is walked character by
    character: a lead byte followed by continuation bytes is replaced by the character they
    encode when that character is plausible. One missing continuation byte (a byte the codec
    leaves undefined, dropped in transit) is re-inserted where that gives a plausible character.
    A lead byte with no continuation at all is only completed when `weak` is set (the line holds
    other mojibake) and the result is an Azerbaijani letter: on its own, `Г` or `Ä` is far more
    often a real Cyrillic letter or an old spelling of `ə` than a damaged `Ø` or `Ğ`. `Æ` is the
    exception: Azerbaijani never uses it, and it is what `Ə` (C6 8F) becomes without its 0x8F.
    """
    out, i, n, fixes = [], 0, len(line), 0
    while i < n:
        lead = _byte(line[i], codec, undefined)
        need = _utf8_len(lead) if lead is not None and line[i] in _LEADS else 0
        if need:
            conts = []
            for c in line[i + 1 : i + need]:
                b = _byte(c, codec, undefined)
                if b is None or not 0x80 <= b <= 0xBF:
                    break
                conts.append(b)
            got = None
            if len(conts) == need - 1:
                ch = bytes([lead, *conts]).decode("utf-8", errors="replace")
                if len(ch) == 1 and _rank(ch) is not None:
                    got = (ch, need)
            if got is None and len(conts) >= need - 2 and (need > 2 or weak or line[i] == "Æ"):
                have = conts[: need - 2]
                best = None
                for pos in range(len(have) + 1):
                    for u in undefined:
                        seq = bytes([lead, *have[:pos], u, *have[pos:]])
                        ch = seq.decode("utf-8", errors="replace")
                        r = _rank(ch) if len(ch) == 1 else None
                        if need == 2 and r != 0:
                            continue
                        if r is not None and (best is None or r < best[0]):
                            best = (r, ch)
                if best:
                    got = (best[1], need - 1)
            if got:
                out.append(got[0])
                i += got[1]
                fixes += 1
                continue
        out.append(line[i])
        i += 1
    return "".join(out), fixes


# Characters that start a UTF-8 multi-byte sequence when read as one of the codecs above.
_LEADS = set("ÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖ×ØÙÚÛÜÝÞßàáâãäåæçèéêëìíîïðñòóôğıŞşİ") | set(
    "ВГДЕЖЗИЙКЛМНОПРСТУФвр"
)


def repair_mojibake(line: str, stats: Counter) -> str:
    """Undo UTF-8 read as cp1252 / cp1254 / latin-1 / cp1251, also in lines that mix correct
    text with mojibake and where bytes were dropped in transit.

    Lines without any mojibake marker are returned as they are (most of a clean corpus, and the
    reason `clean` is fast). Otherwise ftfy first (whole-line and layered mojibake, many
    encodings), then a character-level pass for what it leaves (mixed lines, cp1254, cp1251),
    then the pass that restores dropped bytes, which only runs when the line has shown mojibake.
    """
    if not any(c in _MOJIBAKE_MARKERS for c in line):
        return line
    fixed = ftfy.fix_and_explain(line, _FTFY).text
    if fixed != line:
        stats["mojibake_ftfy"] += 1
    evidence = fixed != line
    for weak in (False, True):
        if weak and not evidence:
            break
        for codec, undefined in _MOJIBAKE_CODECS.items():
            fixed, k = _undo_codec(fixed, codec, undefined, weak)
            if k:
                stats["mojibake_residual"] += k
                evidence = True
    return fixed


# cp1254 (Turkish/Azerbaijani Latin) bytes read as cp1251: ı ü ş ç ö ğ ä and capitals come out
# as э ь ю з ц р д inside otherwise Latin words ("Respublikasэnэn" for "Respublikasının").
_CP1254_AS_1251 = {
    bytes([b]).decode("cp1251"): bytes([b]).decode("cp1254")
    for b in b"\xe7\xf0\xfd\xdd\xf6\xfe\xfc\xc7\xd0\xd6\xde\xdc\xe4\xc4"
}
# р/Р (from ğ/Ğ) are also look-alikes of p/P: a word needs one of the others to be repaired.
_CP1254_SURE = set(_CP1254_AS_1251) - {"р", "Р"}


def fix_cp1254_read_as_cp1251(text: str, stats: Counter) -> str:
    """Letter runs that mix Latin letters with only the Cyrillic letters cp1254's Azerbaijani
    letters become under cp1251 (at least one of them other than р/Р) are read back: a page in
    cp1254 that was decoded as cp1251 (a wrong charset declaration) comes back whole. On the
    39.6 MB of /work/shared/corpus it changed one word (a comment's typo "baцı")."""
    if not _CYRILLIC.search(text):
        return text

    def sub(m: re.Match) -> str:
        w = m.group(0)
        cyr = [c for c in w if "\u0400" <= c <= "\u04ff"]
        if not cyr or not all(c in _CP1254_AS_1251 for c in cyr):
            return w
        if not _LATIN_LETTER.search(w) or not _CP1254_SURE.intersection(cyr):
            return w
        stats["cp1254_read_as_cp1251"] += len(cyr)
        return "".join(_CP1254_AS_1251.get(c, c) for c in w)

    return _LETTERS.sub(sub, text)


def fix_lookalikes(text: str, stats: Counter) -> str:
    """ǝ/Ǝ -> ə/Ə always; Cyrillic look-alikes -> Latin inside letter runs that mix both scripts
    (only when every Cyrillic letter of the run is a look-alike, so a Russian word glued to a
    Latin one stays intact), and a lone Cyrillic ә/Ә in mostly-Latin text."""
    for bad, good in _SCHWA_LOOKALIKES.items():
        k = text.count(bad)
        if k:
            text = text.replace(bad, good)
            stats["lookalike_schwa"] += k
    if not _CYRILLIC.search(text):
        return text
    n_cyr = len(_CYRILLIC.findall(text))
    mostly_latin = len(_LATIN_LETTER.findall(text)) > 4 * n_cyr

    def sub(m: re.Match) -> str:
        w = m.group(0)
        cyr = [c for c in w if "\u0400" <= c <= "\u04ff"]
        if not cyr or not all(c in _CYR_LOOKALIKE for c in cyr):
            return w
        if not _LATIN_LETTER.search(w) and not (mostly_latin and set(cyr) <= {"ә", "Ә"}):
            return w
        out = "".join(_CYR_LOOKALIKE.get(c, c) for c in w)
        stats["lookalike_cyrillic"] += len(cyr)
        return out

    return _LETTERS.sub(sub, text)


def cyrillic_to_latin(text: str, stats: Counter) -> str:
    if not _CYRILLIC.search(text):
        return text
    out = []
    n = 0
    for i, c in enumerate(text):
        t = _CYR_TO_LAT.get(c)
        if t is None:
            out.append(c)
            continue
        n += 1
        # Digraphs keep the case of their word: ЮСИФ -> YUSİF, Юсиф -> Yusif.
        if len(t) > 1 and c.isupper():
            nxt = text[i + 1] if i + 1 < len(text) else ""
            if nxt.isupper():
                t = t.upper()
        out.append(t)
    stats["cyrillic_to_latin"] += n
    return "".join(out)


def fix_invisible(text: str, stats: Counter) -> str:
    text2 = _INVISIBLE.sub("", text)
    text2 = _ZWJ_NEAR_LETTER.sub("", text2)
    text2 = _CONTROL.sub("", text2.replace("\r\n", "\n").replace("\r", "\n"))
    if text2 != text:
        stats["invisible_removed"] += len(text) - len(text2)
    return text2


def normalize_whitespace(text: str, stats: Counter) -> str:
    lines = []
    for line in text.split("\n"):
        s = _SPACES.sub(" ", line).strip()
        if s:
            lines.append(s)
    out = "\n".join(lines)
    if out != text:
        stats["whitespace"] += 1
    return out


def repair_letters(text: str, stats: Counter) -> str:
    """The repairs every text gets, documents and chat messages alike: line ends, mojibake,
    invisible characters, NFC, cp1254 words read as cp1251, look-alike letters. Lines and blank
    lines are kept. Order matters: bytes before letters."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # Mojibake first: C1 control characters are evidence of it, so they must survive until then.
    text = "\n".join(repair_mojibake(line, stats) for line in text.split("\n"))
    text = fix_invisible(text, stats)
    nfc = unicodedata.normalize("NFC", text)
    if nfc != text:
        stats["nfc"] += 1
        text = nfc
    text = fix_cp1254_read_as_cp1251(text, stats)
    return fix_lookalikes(text, stats)


def clean_document(text: str, opts: CleanOptions | None = None) -> tuple[str, Counter]:
    """Clean one document; returns (text, rule counts)."""
    opts = opts or CleanOptions()
    stats: Counter = Counter()
    text = repair_letters(text, stats)
    if opts.cyrillic_to_latin:
        text = cyrillic_to_latin(text, stats)
    if opts.fix_a_umlaut and ("ä" in text or "Ä" in text) and "ə" not in text and "Ə" not in text:
        stats["a_umlaut_to_schwa"] += text.count("ä") + text.count("Ä")
        text = text.replace("ä", "ə").replace("Ä", "Ə")
    text = normalize_whitespace(text, stats)
    return text, stats


def az_share(text: str) -> float:
    """Share of the letters ə, q, x (absent from Turkish, rare in English) among Latin letters."""
    latin = 0
    az = 0
    for c in text:
        if c.isalpha():
            if "a" <= c.lower() <= "z" or c in AZ_ALPHABET:
                latin += 1
                if c in "əƏqQxX":
                    az += 1
    return az / latin if latin else 0.0


def language_verdict(text: str, min_share: float) -> str | None:
    """None when the document passes the Azerbaijani filter, else the reason it is dropped."""
    letters = sum(c.isalpha() for c in text)
    if letters == 0:
        return "no_letters"
    latin = sum(1 for c in text if c.isalpha() and ("a" <= c.lower() <= "z" or c in AZ_ALPHABET))
    if latin / letters < 0.5:
        return "not_latin_script"
    if az_share(text) < min_share:
        return "not_azerbaijani"
    return None
