"""The corpus readers `azgpt clean` gained: MediaWiki XML dumps (.xml / .xml.bz2) and Parquet
files and folders, on small inputs the tests write; bad input gets one sentence and exit 2."""

from __future__ import annotations

import bz2
import json
import pickle
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import read_output_docs

pytest.importorskip("mwparserfromhell")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from azgpt.cli import main  # noqa: E402
from azgpt.corpus import discover, iter_corpus, iter_sourced, wikitext_to_text  # noqa: E402

NS = "http://www.mediawiki.org/xml/export-0.11/"

BAKI = """{{Infobox şəhər
| ad = Bakı
| əhali = 2300000
}}
'''Bakı''' — [[Azərbaycan]]ın paytaxtı və ən böyük şəhəri.<ref>{{cite web|url=http://x.az|title=Mənbə}}</ref> Şəhər [[Xəzər dənizi|Xəzər dənizinin]] qərb sahilində yerləşir.<ref name="a"/>
__TOC__
== Tarixi ==
* İçərişəhər qədim divarlarla əhatə olunub.
* [[Qız qalası]] şəhərin rəmzidir.
{| class="wikitable"
|-
! İl !! Əhali
|-
| 1897 || 111904
|}
[[Fayl:Baku skyline.jpg|thumb|Bakının mənzərəsi]]
[[File:Flag.svg|20px]]
<!-- redaktor qeydi -->
Ətraflı məlumat üçün [http://example.az rəsmi sayta] baxın.
[[Kateqoriya:Azərbaycan şəhərləri]]
[[en:Baku]]
"""
BAKI_TEXT = (
    "Bakı — Azərbaycanın paytaxtı və ən böyük şəhəri. Şəhər Xəzər dənizinin qərb sahilində yerləşir.\n"
    "Tarixi\n"
    "İçərişəhər qədim divarlarla əhatə olunub.\n"
    "Qız qalası şəhərin rəmzidir.\n"
    "Ətraflı məlumat üçün rəsmi sayta baxın."
)
GENCE = "'''Gəncə''' Azərbaycanın ikinci böyük şəhəridir. [[Nizami Gəncəvi]] burada doğulub."
GENCE_TEXT = "Gəncə Azərbaycanın ikinci böyük şəhəridir. Nizami Gəncəvi burada doğulub."


def page(title: str, ns: int, text: str, redirect: str | None = None) -> str:
    red = f'<redirect title="{redirect}" />' if redirect else ""
    esc = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}"
        f"<revision><id>2</id><model>wikitext</model><format>text/x-wiki</format>"
        f'<text bytes="{len(text)}" xml:space="preserve">{esc}</text></revision></page>\n'
    )


def dump(pages: list[str]) -> bytes:
    head = (
        f'<mediawiki xmlns="{NS}" version="0.11" xml:lang="az">\n<siteinfo><sitename>Vikipediya'
        "</sitename><namespaces>"
        '<namespace key="0" case="first-letter" />'
        '<namespace key="6" case="first-letter">Fayl</namespace>'
        '<namespace key="10" case="first-letter">Şablon</namespace>'
        '<namespace key="14" case="first-letter">Kateqoriya</namespace>'
        "</namespaces></siteinfo>\n"
    )
    return (head + "".join(pages) + "</mediawiki>\n").encode("utf-8")


def wiki_pages() -> list[str]:
    return [
        page("Bakı", 0, BAKI),
        page("Baku", 0, "#İSTİQAMƏTLƏNDİRMƏ [[Bakı]]", redirect="Bakı"),
        page("Müzakirə:Bakı", 1, "Bu məqalə haqqında müzakirə."),
        page("Şablon:Infobox şəhər", 10, "{{{ad}}} şablonu"),
        page("Gəncə", 0, GENCE),
    ]


@pytest.fixture
def wiki_bz2(tmp_path) -> Path:
    p = tmp_path / "azwiki-20261201-pages-articles.xml.bz2"
    p.write_bytes(bz2.compress(dump(wiki_pages())))
    return p


def run(capsys, argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_sentence_error(capsys, argv, *mentions) -> str:
    rc, _, err = run(capsys, argv)
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for m in mentions:
        assert str(m) in err, (m, err)
    return err


# ----------------------------------------------------------------------------- MediaWiki


def test_wikitext_to_text_drops_markup_keeps_prose():
    assert wikitext_to_text(BAKI, {"Fayl", "Kateqoriya"}) == BAKI_TEXT


def test_dump_reader_articles_only(wiki_bz2):
    stats = Counter()
    docs = list(iter_corpus(discover([wiki_bz2]), stats))
    assert docs == [BAKI_TEXT, GENCE_TEXT]
    assert stats["wiki_redirects"] == 1
    assert stats["wiki_other_namespace"] == 2


def test_plain_xml_dump_and_folder_discovery(tmp_path):
    d = tmp_path / "dumps"
    d.mkdir()
    (d / "azwiki-pages-articles1.xml").write_bytes(dump([page("Gəncə", 0, GENCE)]))
    (d / "notes.md").write_text("not a corpus file")
    assert list(iter_corpus(discover([d]), Counter())) == [GENCE_TEXT]


def test_clean_reads_a_dump(capsys, tmp_path, wiki_bz2):
    out = tmp_path / "clean.txt"
    report = tmp_path / "r.json"
    rc, stdout, err = run(
        capsys, ["clean", wiki_bz2, "--out", out, "--report", report, "--workers", "1"]
    )
    assert rc == 0, err
    assert read_output_docs(out) == [BAKI_TEXT, GENCE_TEXT]
    r = json.loads(report.read_text())
    assert r["documents_in"] == 2
    assert r["input"]["wiki_redirects"] == 1


def test_clean_converts_articles_in_worker_processes(tmp_path, wiki_bz2):
    from azgpt.clean import run_clean
    from azgpt.corpus import WikiText

    w = WikiText(GENCE, {"Fayl"})
    assert pickle.loads(pickle.dumps(w)).to_text() == GENCE_TEXT
    out = tmp_path / "clean.txt"
    run_clean([str(wiki_bz2)], str(out), workers=2, batch_docs=1)
    assert read_output_docs(out) == [BAKI_TEXT, GENCE_TEXT]


def test_truncated_bz2_is_one_sentence(capsys, tmp_path, wiki_bz2):
    data = wiki_bz2.read_bytes()
    bad = tmp_path / "cut-pages-articles.xml.bz2"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.txt"
    one_sentence_error(capsys, ["clean", bad, "--out", out, "--workers", "1"], bad)
    assert not out.exists() and not list(tmp_path.glob(".o.txt*"))


def test_truncated_xml_is_one_sentence(capsys, tmp_path):
    bad = tmp_path / "cut-pages-articles.xml"
    bad.write_bytes(dump(wiki_pages())[:-200])
    out = tmp_path / "o.txt"
    one_sentence_error(capsys, ["clean", bad, "--out", out, "--workers", "1"], bad, "truncated")
    assert not out.exists()


def test_empty_dump_is_one_sentence(capsys, tmp_path):
    out = tmp_path / "o.txt"
    empty = tmp_path / "empty-pages-articles.xml.bz2"
    empty.write_bytes(bz2.compress(dump([page("Müzakirə:X", 1, "söhbət")])))
    one_sentence_error(
        capsys, ["clean", empty, "--out", out, "--workers", "1"], empty, "no articles"
    )
    zero = tmp_path / "zero-pages-articles.xml.bz2"
    zero.write_bytes(b"")
    one_sentence_error(capsys, ["clean", zero, "--out", out, "--workers", "1"], zero, "empty")
    notbz2 = tmp_path / "junk-pages-articles.xml.bz2"
    notbz2.write_bytes(b"this is not bzip2 at all")
    one_sentence_error(capsys, ["clean", notbz2, "--out", out, "--workers", "1"], notbz2)
    other = tmp_path / "feed.xml"
    other.write_text("<rss><channel/></rss>")
    one_sentence_error(capsys, ["clean", other, "--out", out, "--workers", "1"], other, "MediaWiki")
    assert not out.exists()


# ----------------------------------------------------------------------------- Parquet

ROWS = [
    ("Bakı Azərbaycanın paytaxtıdır.", "https://www.xeber.az/a/1"),
    ("Gəncə qədim şəhərdir, Nizami burada doğulub.", "https://xeber.az/a/2"),
    (None, "https://xeber.az/a/3"),
    ("Şəki xan sarayı ilə məşhurdur.", None),
    ("Quba almasını hamı tanıyır.", "https://kitab.az/q"),
]


def write_parquet(path: Path, rows, text_col="content", row_group_size=2) -> Path:
    table = pa.table(
        {
            "id": list(range(len(rows))),
            text_col: [r[0] for r in rows],
            "url": [r[1] for r in rows],
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_folder_row_group_by_row_group(tmp_path, monkeypatch):
    d = tmp_path / "pq"
    (d / "part").mkdir(parents=True)
    write_parquet(d / "a.parquet", ROWS[:3])
    write_parquet(d / "part" / "b.parquet", ROWS[3:])
    calls = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, row_groups=None, **kw):
        calls.append(row_groups)
        return real(self, *a, row_groups=row_groups, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    stats = Counter()
    got = list(iter_sourced(discover([d]), stats, "content"))
    assert got == [
        (ROWS[0][0], "xeber.az"),
        (ROWS[1][0], "xeber.az"),
        (ROWS[3][0], None),
        (ROWS[4][0], "kitab.az"),
    ]
    assert stats["missing_text_field"] == 1
    assert calls == [[0], [1], [0]]  # two row groups of a.parquet, one of b.parquet


def test_clean_reads_parquet_with_text_field(capsys, tmp_path):
    p = write_parquet(tmp_path / "x.parquet", ROWS)
    out = tmp_path / "o.txt"
    rc, _, err = run(
        capsys,
        ["clean", p, "--out", out, "--text-field", "content", "--no-filter", "--workers", "1"],
    )
    assert rc == 0, err
    assert read_output_docs(out) == [r[0] for r in ROWS if r[0]]


def test_parquet_without_the_text_column(capsys, tmp_path):
    p = write_parquet(tmp_path / "x.parquet", ROWS, text_col="body")
    out = tmp_path / "o.txt"
    err = one_sentence_error(
        capsys, ["clean", p, "--out", out, "--workers", "1"], p, "'text'", "--text-field"
    )
    assert "body" in err  # the columns it does have
    one_sentence_error(
        capsys, ["clean", p, "--out", out, "--text-field", "id", "--workers", "1"], "'id'", "int64"
    )
    assert not out.exists()


def test_not_a_parquet_file(capsys, tmp_path):
    p = tmp_path / "x.parquet"
    p.write_bytes(b"PAR1 but then nothing a Parquet reader can use")
    out = tmp_path / "o.txt"
    one_sentence_error(capsys, ["clean", p, "--out", out, "--workers", "1"], p)
    q = tmp_path / "y.parquet"
    q.write_text("id,text\n1,salam\n")
    one_sentence_error(capsys, ["clean", q, "--out", out, "--workers", "1"], q, "not a Parquet")
    assert not out.exists()


@pytest.mark.parametrize("module", ["pyarrow", "mwparserfromhell"])
def test_missing_extra_names_the_install(capsys, tmp_path, monkeypatch, wiki_bz2, module):
    src = write_parquet(tmp_path / "x.parquet", ROWS) if module == "pyarrow" else wiki_bz2
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    out = tmp_path / "o.txt"
    argv = ["clean", src, "--out", out, "--text-field", "content", "--workers", "1"]
    one_sentence_error(capsys, argv, module, "pip install azgpt[crawl]")
    assert not out.exists()


def test_damaged_parquet_footer_is_one_sentence(capsys, tmp_path):
    p = write_parquet(tmp_path / "x.parquet", ROWS)
    data = bytearray(p.read_bytes())
    data[-60:-8] = b"A" * 52  # the footer's metadata, between its start and the length field
    p.write_bytes(bytes(data))
    out = tmp_path / "o.txt"
    err = one_sentence_error(capsys, ["clean", p, "--out", out, "--workers", "1"], p, "damaged")
    assert "thrift" not in err.split("(", 1)[0]
    assert not out.exists()


@pytest.mark.parametrize("no_filter", [True, False])
def test_all_null_text_column_names_the_field_not_no_filter(capsys, tmp_path, no_filter):
    p = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": pa.array([None, None, None], pa.string())}), p)
    out = tmp_path / "o.txt"
    argv = ["clean", p, "--out", out, "--workers", "1"] + (["--no-filter"] if no_filter else [])
    err = one_sentence_error(capsys, argv, p, "'text'", "3 records", "--text-field")
    assert "--no-filter" not in err
    assert not out.exists()


def test_wiki_page_over_the_parse_budget_is_skipped_counted_and_named(capsys, tmp_path):
    """Unclosed <ref> tags make mwparserfromhell rescan the page once per tag (its issue #364):
    400 of them in a 60 KB page would take seconds, in a 400 KB page minutes."""
    from azgpt.corpus import WIKI_PARSE_BUDGET, parse_cost

    para = "Bakı Azərbaycanın paytaxtıdır və Xəzər dənizinin sahilində yerləşir. " * 2
    trap = "".join(f"<ref>qeyd {i} {para}\n" for i in range(400))
    assert parse_cost(trap) > WIKI_PARSE_BUDGET
    assert parse_cost(BAKI) < WIKI_PARSE_BUDGET // 100  # closed refs, links, templates
    p = tmp_path / "azwiki-pages-articles.xml.bz2"
    p.write_bytes(bz2.compress(dump([page("Bakı", 0, BAKI), page("Tələ", 0, trap)])))
    out, rep = tmp_path / "o.txt", tmp_path / "r.json"
    rc, stdout, err = run(capsys, ["clean", p, "--out", out, "--report", rep, "--workers", "1"])
    assert rc == 0, err
    assert read_output_docs(out) == [BAKI_TEXT]
    inp = json.loads(rep.read_text())["input"]
    assert inp["wiki_pages_over_parse_budget"] == 1
    assert inp["wiki_page_over_parse_budget: Tələ"] == 1
    assert "Tələ" in stdout


def test_wiki_page_of_unclosed_templates_is_skipped_before_parsing(capsys, tmp_path):
    """Unclosed `{{` make mwparserfromhell's time grow faster than the square of the page (20 KB
    of `{{a|` took 11.5 s, 60 KB would take minutes): such a page, and one of unclosed `{{` with
    `[[` nested over many lines, are skipped before parsing, counted and named; a page of many
    closed templates is still converted."""
    from azgpt.corpus import WIKI_PARSE_BUDGET, parse_cost

    trap = "{{a|" * (60 * 1024 // 4)
    mixed = "{{a|b=[[c\n" * (60 * 1024 // 10)
    closed = "".join(
        f"{{{{Şablon|a={i}|b=[[Bakı]]}}}} Bakı şəhəri haqqında {i}-ci cümlə.\n" for i in range(2000)
    )
    assert parse_cost(trap) > WIKI_PARSE_BUDGET and parse_cost(mixed) > WIKI_PARSE_BUDGET
    assert parse_cost(closed) < WIKI_PARSE_BUDGET // 100
    pages = [
        page("Bakı", 0, BAKI),
        page("Tələ", 0, trap),
        page("Qarışıq", 0, mixed),
        page("Şablonlar", 0, closed),
        page("Gəncə", 0, GENCE),
    ]
    p = tmp_path / "azwiki-pages-articles.xml.bz2"
    p.write_bytes(bz2.compress(dump(pages)))
    out, rep = tmp_path / "o.txt", tmp_path / "r.json"
    rc, stdout, err = run(capsys, ["clean", p, "--out", out, "--report", rep, "--workers", "1"])
    assert rc == 0, err
    docs = read_output_docs(out)
    assert docs[0] == BAKI_TEXT and docs[-1] == GENCE_TEXT and len(docs) == 3
    assert docs[1].startswith("Bakı şəhəri haqqında 0-ci cümlə.\nBakı şəhəri haqqında 1-ci")
    inp = json.loads(rep.read_text())["input"]
    assert inp["wiki_pages_over_parse_budget"] == 2
    assert inp["wiki_page_over_parse_budget: Tələ"] == 1
    assert inp["wiki_page_over_parse_budget: Qarışıq"] == 1
    assert "Tələ" in stdout and "Qarışıq" in stdout
