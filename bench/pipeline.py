"""Data-pipeline benchmark on a real corpus (default ../shared/corpus/az_train).

Prints clean MB/s and peak RSS (near-duplicate removal on, the default, and off), the
near-duplicate stage alone (MinHash signatures + LSH index, one process), the MediaWiki dump
reader's MB/s on a dump built from the corpus, tokenizer training seconds, prepare MB/s and peak
RSS against a plain `Tokenizer.encode_batch` over the same documents in the same run, prepare's
peak RSS on a ~500 MB input (the corpus repeated), and tokens per word on FLORES-200 dev for the
three pre-tokenizer candidates.

    .venv/bin/python bench/pipeline.py [--corpus DIR] [--eval FILE] [--big-mb 500] [--skip-pretok]
    .venv/bin/python bench/pipeline.py --corpus-only     # clean, near-dup and dump-reader rows
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rss import PeakRSS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(args, **kw):
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-m", "azgpt", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )
    with PeakRSS(p.pid) as m:
        out, err = p.communicate()
    if p.returncode:
        raise SystemExit(f"azgpt {' '.join(args)} failed:\n{err}")
    return time.perf_counter() - t0, m.peak, out


def encode_batch_baseline(text_file: Path, tok_dir: Path) -> tuple[float, int]:
    """Plain HF `encode_batch` (Rust, all cores) over the same documents; no file writing."""
    from azgpt.corpus import batched, iter_documents
    from azgpt.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    t0 = time.perf_counter()
    n = 0
    for batch in batched(iter_documents(text_file, Counter()), 2000):
        n += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
    return time.perf_counter() - t0, n


def children_cpu() -> float:
    """CPU seconds used by finished child processes (and their waited-for children): on a
    shared machine, MB per CPU-second moves far less with other load than MB per wall second."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def synthetic_dump(text_file: Path, out: Path, mb: float) -> tuple[int, int]:
    """A pages-articles dump built from cleaned documents cut to article size (at most ~4 KB of
    text, about an average Wikipedia article), with the markup real articles carry (an infobox,
    links, references with citation templates, a table, a file link, categories, a redirect and
    a talk page now and then). Returns (XML bytes, pages)."""
    import bz2
    import re
    from xml.sax.saxutils import escape

    from azgpt.corpus import iter_documents

    head = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11">\n'
        '<siteinfo><namespaces><namespace key="0" /><namespace key="6">Fayl</namespace>'
        '<namespace key="14">Kateqoriya</namespace></namespaces></siteinfo>\n'
    )
    word = re.compile(r"\b(\w{7,})\b")

    def articles():
        for doc in iter_documents(text_file, Counter()):
            part: list[str] = []
            size = 0
            for line in doc.split("\n"):
                part.append(line)
                size += len(line)
                if size > 4000:
                    yield "\n".join(part)
                    part, size = [], 0
            if part:
                yield "\n".join(part)

    total = n = 0
    with bz2.open(out, "wb") as f:
        f.write(head.encode())
        for doc in articles():
            if n % 20 == 19:
                body, ns, extra = "#İSTİQAMƏTLƏNDİRMƏ [[X]]", 0, '<redirect title="X" />'
            elif n % 20 == 9:
                body, ns, extra = doc, 1, ""
            else:
                linked = [word.sub(r"[[\1]]", p, count=3) for p in doc.split("\n")]
                body = (
                    "{{Məlumat qutusu\n| ad = X\n| il = 1900\n}}\n'''X''' "
                    + "<ref>{{cite web|url=https://example.az/|title=Mənbə}}</ref>\n".join(linked)
                    + '\n{| class="wikitable"\n|-\n| 1 || 2\n|}\n'
                    "[[Fayl:Şəkil.jpg|thumb|Şəkil]]\n== İstinadlar ==\n{{İstinadlar}}\n"
                    "[[Kateqoriya:Nümunə]]\n"
                )
                ns, extra = 0, ""
            page = (
                f"<page><title>S{n}</title><ns>{ns}</ns><id>{n}</id>{extra}<revision>"
                f'<text xml:space="preserve">{escape(body)}</text></revision></page>\n'
            ).encode()
            f.write(page)
            total += len(page)
            n += 1
            if total > mb * 1e6:
                break
        f.write(b"</mediawiki>\n")
    return total, n


def dump_reader_rows(text_file: Path, work: Path, mb: float) -> tuple[dict, Path]:
    """The dump reader alone (bz2 + XML streaming + wikitext to text), in this process."""
    import resource

    from azgpt.corpus import discover, iter_corpus

    dump = work / "azwiki-bench-pages-articles.xml.bz2"
    xml_bytes, pages = synthetic_dump(text_file, dump, mb)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    out_bytes = articles = 0
    for doc in iter_corpus(discover([dump]), Counter()):
        articles += 1
        out_bytes += len(doc.encode("utf-8"))
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "dump_xml_mb": round(xml_bytes / 1e6, 1),
        "dump_bz2_mb": round(dump.stat().st_size / 1e6, 1),
        "dump_pages": pages,
        "dump_articles": articles,
        "dump_reader_xml_mb_s": round(xml_bytes / 1e6 / secs, 2),
        "dump_reader_text_mb_s": round(out_bytes / 1e6 / secs, 2),
        "dump_reader_xml_mb_per_cpu_s": round(xml_bytes / 1e6 / cpu, 2),
        "dump_reader_maxrss_growth_mb": round(
            (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1e3
        ),
    }, dump


def near_dedup_rows(text_file: Path) -> dict:
    """MinHash signatures and the LSH index alone, one process, over the cleaned documents
    (exact duplicates are already gone there, so what it finds is near-duplicates only)."""
    import tracemalloc

    from azgpt.corpus import iter_documents
    from azgpt.dedup import NearDedup, Signer

    docs = list(iter_documents(text_file, Counter()))
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    signer, near = Signer(), NearDedup()
    t0 = time.process_time()
    sigs = [signer.sign(d) for d in docs]
    t_sign = time.process_time() - t0
    tracemalloc.start()
    t0 = time.process_time()
    dups = sum(near.is_duplicate(s) for s in sigs)
    t_index = time.process_time() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "near_dedup_docs": len(docs),
        "near_dedup_signed": sum(s is not None for s in sigs),
        "near_dedup_found": dups,
        "near_dedup_sign_mb_per_cpu_s": round(mb / t_sign, 2),
        "near_dedup_index_mb_per_cpu_s": round(mb / t_index, 2),
        "near_dedup_index_peak_mb": round(peak / 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus" / "az_train"))
    ap.add_argument(
        "--eval", default=str(ROOT.parent / "shared" / "eval" / "flores200_azj_Latn.dev.txt")
    )
    ap.add_argument("--big-mb", type=int, default=500)
    ap.add_argument("--skip-pretok", action="store_true")
    ap.add_argument("--dump-mb", type=float, default=30.0, help="size of the synthetic dump (XML)")
    ap.add_argument("--corpus-only", action="store_true", help="clean, near-dup and dump rows only")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="azgpt-bench-"))
    corpus = Path(a.corpus)
    mb_in = sum(p.stat().st_size for p in corpus.rglob("*.txt")) / 1e6
    res: dict = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "corpus_mb": round(mb_in, 1),
    }

    cpu0 = children_cpu()
    secs, rss, _ = run(
        [
            "clean",
            str(corpus),
            "--out",
            str(work / "clean.txt"),
            "--report",
            str(work / "clean.json"),
        ]
    )
    res["clean_mb_s"] = round(mb_in / secs, 2)
    res["clean_mb_per_cpu_s"] = round(mb_in / (children_cpu() - cpu0), 2)
    res["clean_peak_rss_mb"] = round(rss / 1e6)
    rep = json.loads((work / "clean.json").read_text())
    res["clean_docs_in_out"] = [rep["documents_in"], rep["documents_out"]]
    res["clean_dropped"] = rep["dropped"]
    clean_mb = (work / "clean.txt").stat().st_size / 1e6
    cpu0 = children_cpu()
    secs, rss, _ = run(["clean", str(corpus), "--out", str(work / "c2.txt"), "--no-near-dedup"])
    res["clean_no_near_dedup_mb_s"] = round(mb_in / secs, 2)
    res["clean_no_near_dedup_mb_per_cpu_s"] = round(mb_in / (children_cpu() - cpu0), 2)
    res["clean_no_near_dedup_peak_rss_mb"] = round(rss / 1e6)
    (work / "c2.txt").unlink()
    res.update(near_dedup_rows(work / "clean.txt"))
    rows, dump = dump_reader_rows(work / "clean.txt", work, a.dump_mb)
    res.update(rows)
    # End to end: `azgpt clean` on the dump converts wikitext in its worker processes.
    cpu0 = children_cpu()
    secs, rss, _ = run(["clean", str(dump), "--out", str(work / "wiki.txt")])
    res["clean_dump_xml_mb_s"] = round(rows["dump_xml_mb"] / secs, 2)
    res["clean_dump_xml_mb_per_cpu_s"] = round(rows["dump_xml_mb"] / (children_cpu() - cpu0), 2)
    res["clean_dump_peak_rss_mb"] = round(rss / 1e6)
    if a.corpus_only:
        print(json.dumps(res, indent=2))
        return

    secs, _, _ = run(["tokenizer", "train", str(work / "clean.txt"), "--out", str(work / "tok")])
    res["tokenizer_train_s"] = round(secs, 1)

    base_s, base_tokens = encode_batch_baseline(work / "clean.txt", work / "tok")
    res["encode_batch_mb_s"] = round(clean_mb / base_s, 2)
    secs, rss, _ = run(
        [
            "prepare",
            str(work / "clean.txt"),
            "--tokenizer",
            str(work / "tok"),
            "--out",
            str(work / "data"),
        ]
    )
    m = json.loads((work / "data" / "manifest.json").read_text())
    res["prepare_mb_s"] = round(clean_mb / secs, 2)
    res["prepare_speedup_vs_encode_batch"] = round(base_s / secs, 2)
    res["prepare_backend"] = m["encoder_backend"]
    res["prepare_peak_rss_mb"] = round(rss / 1e6)
    assert (
        m["train"]["tokens"] + m["val"]["tokens"]
        == base_tokens + m["train"]["documents"] + m["val"]["documents"]
    )

    if a.big_mb:
        big = work / "big.txt"
        reps = max(1, round(a.big_mb / clean_mb))
        src = (work / "clean.txt").read_bytes()
        with open(big, "wb") as f:
            for _ in range(reps):
                f.write(src)
                f.write(b"\n\n")
        big_mb = big.stat().st_size / 1e6
        secs, rss, _ = run(
            ["prepare", str(big), "--tokenizer", str(work / "tok"), "--out", str(work / "bigdata")]
        )
        res["big_input_mb"] = round(big_mb)
        res["big_prepare_mb_s"] = round(big_mb / secs, 2)
        res["big_prepare_peak_rss_mb"] = round(rss / 1e6)
        res["big_output_mb"] = round(
            sum(p.stat().st_size for p in (work / "bigdata").glob("*.npy")) / 1e6
        )
        big.unlink()

    _, _, out = run(["tokenizer", "stats", "--tokenizer", str(work / "tok"), "--json", a.eval])
    res["flores_tokens_per_word"] = json.loads(out)["tokens_per_word"]

    if not a.skip_pretok:
        res["pretokenizers"] = {}
        for name in ("az", "gpt2", "gpt4"):
            run(
                [
                    "tokenizer",
                    "train",
                    str(work / "clean.txt"),
                    "--out",
                    str(work / f"tok_{name}"),
                    "--pretokenizer",
                    name,
                ]
            )
            _, _, out = run(
                ["tokenizer", "stats", "--tokenizer", str(work / f"tok_{name}"), "--json", a.eval]
            )
            s = json.loads(out)
            res["pretokenizers"][name] = {
                k: s[k] for k in ("tokens_per_word", "bytes_per_token", "share_words_3plus_tokens")
            }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
