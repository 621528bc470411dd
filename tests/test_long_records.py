"""JSONL records and Parquet values longer than a part come in parts like long text documents:
the same text as read whole (parts joined by newlines), the same `azgpt clean` output, what
json.loads rejects rejected; a JSONL line over LINE_BYTES is never held whole."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

import azgpt.corpus as C
import azgpt.longrecords as L
from azgpt.cli import main

PARAS = [
    "Bakı Azərbaycanın paytaxtı və ən böyük şəhəridir, Xəzər dənizinin sahilində yerləşir.",
    "  Şəhərin iqlimi mülayim isti və qurudur; burada tez-tez xəzri küləyi əsir.",
    "İçərişəhər qədim divarları, Qız qalası və Şirvanşahlar sarayı ilə tanınır.",
    "",
    'Sitat: "Qala" və \\ işarəsi, tab\tvə emoji 😀 də mətndədir.',
]


def long_text(n: int = 400, tag: str = "A") -> str:
    return "\n".join(
        f"{tag}{i}. {PARAS[i % len(PARAS)]}" if PARAS[i % len(PARAS)] else "" for i in range(n)
    )


def records() -> list[dict]:
    return [
        {"url": "https://xeber.az/uzun", "text": long_text(), "n": [1, {"a": None}]},
        {"url": "https://xeber.az/qisa", "text": "Gəncə qədim şəhərdir. Nizami burada doğulub."},
        {"text": long_text(300, "B"), "url": "https://kitab.az/sonra"},  # url after the text
        {"id": 7, "body": long_text(50)},  # no text field
    ]


def write_jsonl(path: Path, recs: list[dict], bad: bool = True) -> Path:
    lines = [json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(recs)]
    if bad:
        lines.insert(1, json.dumps({"text": long_text(100)})[:-2])  # cut off: not JSON
        lines.insert(2, '{"text": "' + "uzun sətir " * 500 + '", }')  # a trailing comma
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def read(path: Path) -> tuple[list, Counter]:
    stats = Counter()
    return list(C.iter_sourced_documents(path, stats)), stats


@pytest.mark.parametrize("name", ["r.jsonl", "r.jsonl.gz"])
def test_long_jsonl_lines_stream_in_parts_with_the_text_of_the_whole(tmp_path, monkeypatch, name):
    src = write_jsonl(tmp_path / name, records())
    whole, whole_stats = read(src)
    assert not any(C.continues(t) for t, _ in whole)
    assert len(whole) == 3 and whole_stats["bad_json_lines"] == 2
    assert whole_stats["missing_text_field"] == 1

    monkeypatch.setattr(L, "LINE_BYTES", 256)  # every line but the short one is streamed
    monkeypatch.setattr(C, "PART_CHARS", 2000)
    parts, stats = read(src)
    assert stats["long_records_in_parts"] == 2
    assert {k: stats[k] for k in ("bad_json_lines", "missing_text_field")} == {
        "bad_json_lines": 2,
        "missing_text_field": 1,
    }
    docs, cur = [], []
    for text, site in parts:
        cur.append(text)
        assert len(text) <= 4 * 2000 + 200
        if not C.continues(text):
            docs.append(("\n".join(cur), site))
            cur = []
    assert docs == whole  # same texts, same sites (also for the url after the text)
    assert len(parts) > 10


def test_streamed_line_is_read_in_bounded_pieces(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "r.jsonl", records()[:1], bad=False)
    monkeypatch.setattr(L, "LINE_BYTES", 1024)
    sizes = []

    class Spy:
        def __init__(self, f):
            self.f = f

        def readline(self, limit=-1):
            line = self.f.readline(limit)
            sizes.append(len(line))
            return line

    real = C._iter_jsonl
    monkeypatch.setattr(C, "_iter_jsonl", lambda p, f, *a: real(p, Spy(f), *a))
    (_, stats) = read(src)
    assert stats["long_records_in_parts"] == 1
    assert max(sizes) <= 1024 and len(sizes) > 10  # never the whole line at once


def test_scanner_accepts_and_rejects_what_json_loads_does():
    good = [
        {"text": 'a "b" \\ / \b\f\n\r\t é 😀 \ud83d', "url": "u"},
        {"text": "x", "text2": [1, -2.5e3, True, False, None, {"k": [[], {}]}]},
        {"a": 1},
        {},
    ]
    bad = [b'{"text": "a"', b'{"text": "a",}', b'{"text": "a\x01"}', b'{"a": [1,]}',
           b'{"a": 01}', b'{"a": tru}', b'{"text": "\\x"}', b'{"a" 1}', b'{"a": 1} 2',
           b'{"a": [}']  # fmt: skip
    for rec in good:
        line = json.dumps(rec).encode()
        for cut in (1, 5, 17):
            chunks = [line[i : i + cut] for i in range(0, len(line), cut)]
            with L.new_spool() as spool:
                found, url, _ = L.stream_record(chunks[0], iter(chunks[1:]), "text", spool)
                text = "".join(L.spooled_pieces(spool)) if found else None
            assert text == rec.get("text") and url == rec.get("url")
    for line in bad:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
        with L.new_spool() as spool, pytest.raises(L.BadLine):
            L.stream_record(line[:4], iter([line[4:]]), "text", spool)


def test_parquet_values_longer_than_a_part_come_in_parts(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [long_text(), None, "Qısa mətn.", long_text(250, "B")]
    urls = ["https://a.az/1", None, "https://b.az/2", None]
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": texts, "url": urls}), p)
    whole, _ = read(p)
    monkeypatch.setattr(C, "PART_CHARS", 2000)
    parts, stats = read(p)
    assert stats["long_records_in_parts"] == 2 and stats["missing_text_field"] == 1
    docs, cur = [], []
    for text, site in parts:
        cur.append(text)
        if not C.continues(text):
            docs.append(("\n".join(cur), site))
            cur = []
    assert docs == whole == [(texts[0], "a.az"), (texts[2], "b.az"), (texts[3], None)]


def test_clean_output_of_streamed_records_equals_whole(tmp_path, monkeypatch, capsys):
    src = write_jsonl(tmp_path / "r.jsonl", records())
    out1, out2 = tmp_path / "whole.txt", tmp_path / "parts.txt"
    argv = ["clean", str(src), "--workers", "1", "--no-near-dedup"]
    assert main([*argv, "--out", str(out1)]) == 0
    monkeypatch.setattr(L, "LINE_BYTES", 256)
    monkeypatch.setattr(C, "PART_CHARS", 2000)
    assert main([*argv, "--out", str(out2)]) == 0
    capsys.readouterr()
    assert out2.read_text(encoding="utf-8") == out1.read_text(encoding="utf-8")


def test_parquet_batches_are_bounded_by_bytes_not_rows(tmp_path, monkeypatch):
    """Rows of a large text column come in batches of about PARQUET_BATCH_BYTES: Arrow never
    decodes more than that (plus one row) at once, and the documents are the same."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [long_text(40, f"R{i}") for i in range(60)]  # ~3.4 KB each
    p = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": texts, "url": [f"https://a.az/{i}" for i in range(60)]}), p)
    whole, _ = read(p)
    monkeypatch.setattr(C, "PARQUET_BATCH_BYTES", 16 << 10)
    sizes = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **kw):
        for b in real(self, *a, **kw):
            sizes.append(sum(len(t.encode()) for t in b.column(0).to_pylist()))
            yield b

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    batched, _ = read(p)
    assert batched == whole == [(t, "a.az") for t in texts]
    assert len(sizes) >= 10 and max(sizes) <= (16 << 10) + 4000  # a batch of ~16 KB, not all rows
