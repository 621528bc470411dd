"""`azgpt crawl` against a small site served by the test itself on 127.0.0.1 (and nowhere else):
robots.txt with a disallowed folder and a crawl delay for azgpt, pages linking to each other, a
redirect loop, a 404, a page that drips past the timeout, a page over the size cap, a gzip bomb,
a binary file, and one article under two URLs (plus links that differ only in fragment, tracking
parameters and letter case of the scheme)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("trafilatura")
pytest.importorskip("protego")

from azgpt.cli import main  # noqa: E402
from azgpt.crawl import CrawlOptions, normalize_url, run_crawl  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CRAWL_DELAY = 0.1
# The server stamps each request when it arrives; the crawler spaces the moments it sends them.
# Travel and accept times vary by a few milliseconds, so arrival gaps may fall short by that much.
ARRIVAL_JITTER = 0.01
TIMEOUT = 1.0  # generous: a loaded machine must not time out ordinary pages
MAX_BYTES = 100_000
CONTACT = "corpus@example.org"

NAV = ["Ana səhifə", "Xəbərlər", "Əlaqə", "Haqqımızda"]
COOKIE = "Bu sayt kukilərdən istifadə edir. Razılaşmaq üçün düyməni basın."
COMMENT = "Çox maraqlı yazıdır, müəllifə təşəkkür edirəm!"
FOOTER = "Bütün hüquqlar qorunur. Saytdan istifadə qaydaları."

ARTICLES = {
    "baki": (
        "Bakı haqqında",
        [
            "Bakı Azərbaycanın paytaxtı və ən böyük şəhəridir. Şəhər Xəzər dənizinin qərb "
            "sahilində, Abşeron yarımadasının cənub hissəsində yerləşir.",
            "İçərişəhər qədim divarları, Qız qalası və Şirvanşahlar sarayı ilə tanınır. Bu "
            "abidələr UNESCO-nun Ümumdünya irsi siyahısına daxil edilmişdir.",
            "Şəhərin iqlimi mülayim isti və qurudur, burada tez-tez güclü xəzri küləyi əsir. "
            "Bakı həm də neft sənayesinin qədim mərkəzlərindən biridir.",
        ],
    ),
    "gence": (
        "Gəncə haqqında",
        [
            "Gəncə Azərbaycanın ikinci böyük şəhəridir və ölkənin qərbində, Kiçik Qafqaz "
            "dağlarının ətəyində yerləşir.",
            "Böyük şair Nizami Gəncəvi bu şəhərdə yaşayıb yaratmışdır. Onun məqbərəsi şəhərin "
            "kənarında ucalır və hər il minlərlə qonaq qəbul edir.",
            "Gəncə çayı şəhəri iki hissəyə bölür. Şəhərdə çoxlu park, muzey və universitet var, "
            "tələbələr burada həyatı canlı saxlayır.",
        ],
    ),
    "seki": (
        "Şəki haqqında",
        [
            "Şəki Böyük Qafqaz dağlarının cənub ətəyində yerləşən qədim şəhərdir. Şəhər öz "
            "memarlığı və sənətkarlığı ilə məşhurdur.",
            "Şəki xan sarayı rəngli şəbəkə pəncərələri və divar rəsmləri ilə diqqəti cəlb edir. "
            "Sarayın tikintisində bir dənə də mismar işlədilməyib.",
            "Şəki halvası və ipək parçaları bütün ölkədə tanınır. Qonaqlar karvansarada "
            "gecələyib şəhərin köhnə küçələrini gəzməyi sevirlər.",
        ],
    ),
}
DATES = {"baki": "2026-11-28", "gence": "2026-11-29", "seki": "2026-11-30"}
NOTES = "Qeydlər\nAzərbaycan dilində düz mətn faylı da toplanır.\nHər sətir ayrıca oxunur.\n"


def page(title: str, body: str, links: list[str], date: str = "") -> bytes:
    nav = "".join(f'<li><a href="/">{n}</a></li>' for n in NAV)
    more = "".join(f'<li><a href="{h}">{h}</a></li>' for h in links)
    meta = f'<meta property="article:published_time" content="{date}">' if date else ""
    return f"""<!DOCTYPE html><html lang="az"><head><meta charset="utf-8"><title>{title}</title>
{meta}</head><body>
<header><nav class="menu"><ul>{nav}</ul></nav></header>
<div id="cookie-banner" class="cookie-consent"><p>{COOKIE}</p><button>Razıyam</button></div>
<main><article><h1>{title}</h1>{body}</article></main>
<aside class="related"><h3>Digər yazılar</h3><ul>{more}</ul></aside>
<section id="comments" class="comments"><h3>Şərhlər</h3>
<div class="comment"><p>{COMMENT}</p></div></section>
<footer><p>{FOOTER}</p></footer>
</body></html>""".encode()


def article_html(key: str) -> bytes:
    title, paras = ARTICLES[key]
    others = [f"/articles/{k}.html" for k in ARTICLES if k != key] + ["/"]
    return page(title, "".join(f"<p>{p}</p>" for p in paras), others, DATES[key])


INDEX_LINKS = [
    "/articles/baki.html",
    "/articles/baki.html?utm_source=menu#top",  # the same URL once normalised
    "HTTP://127.0.0.1:{port}/articles/baki.html",
    "/articles/gence.html#comments",
    "/story?id=2",  # the Gəncə article again, under another URL
    "/moved",  # redirects to the Şəki article
    "/private/secret.html",  # disallowed for azgpt by robots.txt
    "/loop/a",
    "/missing.html",
    "/slow.html",
    "/big.html",
    "/bomb.html",
    "/files/photo.png",
    "/notes.txt",
    "mailto:info@example.org",
    "/ignored.html",  # rel=nofollow
]
BOMB = gzip.compress(b" " * 30_000_000, compresslevel=9)  # ~30 KB that inflates to 30 MB
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
ROBOTS = f"""User-agent: *
Disallow: /

User-agent: azgpt
Disallow: /private/
Crawl-delay: {CRAWL_DELAY}
"""


class Site(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.log: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()
        self.victim: int | None = None  # pid to SIGKILL when request number `kill_at` arrives
        self.kill_at: int | None = None
        self.pages_seen = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def paths(self) -> list[str]:
        return [p for _, p, _ in self.log]


class Handler(BaseHTTPRequestHandler):
    server: Site

    def log_message(self, *args):  # keep the test output quiet
        pass

    def send(self, status: int, body: bytes, ctype: str = "text/html; charset=utf-8", **hdr):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if "no_length" not in hdr:
            self.send_header("Content-Length", str(len(body)))
        for k, v in hdr.items():
            if k != "no_length":
                self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        s = self.server
        with s.lock:
            s.log.append((time.time(), self.path, self.headers.get("User-Agent", "")))
            if self.path != "/robots.txt":
                s.pages_seen += 1
                if s.victim and s.pages_seen == s.kill_at:
                    os.kill(s.victim, signal.SIGKILL)
                    s.victim = None
                    return
        path = self.path
        port = s.server_address[1]
        try:
            if path == "/robots.txt":
                self.send(200, ROBOTS.encode(), "text/plain")
            elif path == "/":
                links = "".join(
                    f'<li><a href="{h.format(port=port)}">{h}</a></li>' for h in INDEX_LINKS[:-1]
                )
                links += f'<li><a rel="nofollow" href="{INDEX_LINKS[-1]}">x</a></li>'
                self.send(200, page("Şəhərlər", f"<ul>{links}</ul>", []))
            elif path.startswith("/articles/") and path[10:-5] in ARTICLES:
                self.send(200, article_html(path[10:-5]))
            elif path == "/story?id=2":
                self.send(200, article_html("gence"))
            elif path == "/moved":
                self.send(301, b"", Location="/articles/seki.html")
            elif path == "/loop/a":
                self.send(302, b"", Location="/loop/b")
            elif path == "/loop/b":
                self.send(302, b"", Location=f"{s.base}/loop/a")
            elif path == "/slow.html":
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                for _ in range(40):  # one byte every 0.1 s: never a read timeout, 4 s in all
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif path == "/big.html":  # no Content-Length: the cap must hold while reading
                body = (
                    b"<html><body><p>" + "Böyük səhifə. ".encode() * 20_000 + b"</p></body></html>"
                )
                self.send(200, body, no_length=True)
            elif path == "/bomb.html":
                self.send(200, BOMB, Content_Encoding="gzip")
            elif path == "/files/photo.png":
                self.send(200, PNG, "image/png")
            elif path == "/notes.txt":
                self.send(200, NOTES.encode(), "text/plain; charset=utf-8")
            else:
                self.send(404, b"<html><body>Tapilmadi</body></html>")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the crawler gave up on this response (timeout, size cap)


@contextmanager
def serve():
    s = Site()
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    try:
        yield s
    finally:
        s.shutdown()
        s.server_close()


@pytest.fixture
def site():
    with serve() as s:
        yield s


def seeds_file(tmp_path: Path, site: Site) -> Path:
    p = tmp_path / "urls.txt"
    p.write_text(f"# seeds\n{site.base}/\n", encoding="utf-8")
    return p


def opts(**kw) -> CrawlOptions:
    base = dict(
        delay=0.0,
        depth=2,
        same_site=True,
        timeout=TIMEOUT,
        max_bytes=MAX_BYTES,
        contact=CONTACT,
        shard_pages=2,
        progress=False,
        allow_private=True,  # the test site is on 127.0.0.1
    )
    base.update(kw)
    return CrawlOptions(**base)


def cli_args(urls: Path, out: Path) -> list[str]:
    return [
        "crawl",
        str(urls),
        "--out",
        str(out),
        "--allow-private",
        "--delay",
        "0",
        "--depth",
        "2",
        "--same-site",
        "--timeout",
        str(TIMEOUT),
        "--max-bytes",
        str(MAX_BYTES),
        "--contact",
        CONTACT,
        "--shard-pages",
        "2",
    ]


def records(out: Path, drop=("fetched_at",)) -> list[dict]:
    recs = []
    for shard in sorted(out.glob("shard-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                for k in drop:
                    r.pop(k)
                recs.append(r)
    return recs


def article_paths() -> set[str]:
    return {f"/articles/{k}.html" for k in ARTICLES}


# ----------------------------------------------------------------------------- one crawl


@pytest.fixture(scope="module")
def crawled(tmp_path_factory):
    """One crawl of the site, shared by the tests that only look at what it did."""
    tmp = tmp_path_factory.mktemp("crawled")
    with serve() as site:
        report = run_crawl(seeds_file(tmp, site), tmp / "crawl", opts())
        yield site, tmp / "crawl", report


def test_robots_delay_and_user_agent(crawled):
    site, out, report = crawled
    paths = site.paths()
    assert paths[0] == "/robots.txt" and paths.count("/robots.txt") == 1
    assert not [p for p in paths if p.startswith("/private/")]
    assert "/ignored.html" not in paths  # rel=nofollow
    # The crawl delay (0.1 s) held between every two requests, robots.txt included.
    times = [t for t, _, _ in site.log]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= CRAWL_DELAY - ARRIVAL_JITTER, gaps
    for _, _, ua in site.log:
        assert ua.startswith("azgpt/") and CONTACT in ua
    assert report.skipped["robots_disallowed"] == 1


def test_each_page_requested_once_and_written_once(crawled):
    site, out, report = crawled
    paths = site.paths()
    assert len(paths) == len(set(paths)), sorted(paths)
    assert paths.count("/articles/baki.html") == 1  # the variants of its URL were one URL
    recs = records(out)
    urls = [r["url"] for r in recs]
    assert len(urls) == len(set(urls))
    texts = [r["text"] for r in recs]
    assert len(texts) == len(set(texts))
    # The Gəncə article was fetched under two URLs and written once.
    assert sum("Nizami Gəncəvi" in t for t in texts) == 1
    assert "/story?id=2" in paths and "/articles/gence.html" in paths
    assert report.skipped["duplicate_text"] == 1
    # The redirect's target is recorded under its final URL.
    assert f"{site.base}/articles/seki.html" in urls


def test_main_text_without_navigation(crawled):
    site, out, _ = crawled
    recs = {r["url"]: r for r in records(out)}
    for key, (title, paras) in ARTICLES.items():
        matches = [r for r in recs.values() if paras[0][:40] in r["text"]]
        assert len(matches) == 1, key
        r = matches[0]
        assert r["title"] == title
        assert r["date"] == DATES[key]
        for p in paras:
            assert p in r["text"]
        for junk in [*NAV, COOKIE, COMMENT, FOOTER, "Digər yazılar"]:
            assert junk not in r["text"], (key, junk)
    notes = recs[f"{site.base}/notes.txt"]
    assert notes["text"] == NOTES.strip()
    for r in recs.values():
        assert set(r) == {"url", "title", "date", "text", "sha256", "encoding"}
        assert r["sha256"] == __import__("hashlib").sha256(r["text"].encode()).hexdigest()


def test_bounded_responses_are_errors_by_kind(crawled):
    site, out, report = crawled
    assert report.errors["redirect_loop"] == 1
    assert site.paths().count("/loop/a") == 1  # the loop is seen before asking again
    assert report.errors["http_404"] == 1
    assert report.errors["timeout"] == 1
    assert report.errors["too_large"] == 2  # the big page and the gzip bomb
    assert report.skipped["not_text"] == 1  # the PNG
    text = " ".join(r["text"] for r in records(out))
    assert "Böyük səhifə" not in text
    assert report.written == len(records(out)) == 5  # 3 articles, the index, the notes
    assert report.queued == 0


def test_rerun_after_a_finished_crawl_fetches_nothing(tmp_path, crawled):
    site, out, report = crawled
    before = list(site.log)
    again = run_crawl(seeds_file(tmp_path, site), out, opts())
    assert site.log == before
    assert again.written == report.written and again.fetched == report.fetched


def test_max_pages_and_depth(tmp_path, site):
    out = tmp_path / "c"
    r = run_crawl(seeds_file(tmp_path, site), out, opts(max_pages=3))
    assert r.fetched == 3
    assert len([p for p in site.paths() if p != "/robots.txt"]) == 3
    out0 = tmp_path / "d0"
    r0 = run_crawl(seeds_file(tmp_path, site), out0, opts(depth=0))
    assert r0.fetched == 1 and r0.queued == 0


def test_clean_reads_the_shards_as_they_are(crawled, capsys):
    _, out, _ = crawled
    clean = out.parent / "clean.txt"
    assert main(["clean", str(out), "--out", str(clean), "--workers", "1"]) == 0
    capsys.readouterr()
    text = clean.read_text(encoding="utf-8")
    for _, paras in ARTICLES.values():
        assert paras[1] in text
    assert COOKIE not in text


# ----------------------------------------------------------------------------- kill -9


def crawl_process(urls: Path, out: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "azgpt", *cli_args(urls, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def test_killed_crawls_resume_to_the_same_output(tmp_path, site, crawled):
    ref_site, ref_out, _ = crawled  # the same site crawled once without a kill (another port)
    reference = [{**r, "url": r["url"].replace(ref_site.base, site.base)} for r in records(ref_out)]
    urls = seeds_file(tmp_path, site)
    out = tmp_path / "killed"
    in_flight = []
    # Killed by itself right after a page's commit and right after renaming a finished shard
    # (before the state forgets the shard's records), and by the server as the 3rd and the 4th
    # page request of a run arrive (the crawler is waiting on them).
    for point in ("after_page_commit", 3, "after_shard_rename", 4):
        if isinstance(point, str):
            p = crawl_process(urls, out, {"AZGPT_FAULT_CRAWL": point})
        else:
            site.pages_seen, site.kill_at = 0, point
            p = crawl_process(urls, out)
            site.victim = p.pid
        assert p.wait(timeout=60) == -signal.SIGKILL, p.stderr.read().decode()
        if not isinstance(point, str):
            in_flight.append(site.paths()[-1])
    run_crawl(urls, out, opts())  # the last run, to the end, in this process

    assert records(out) == reference
    assert sorted(out.glob("shard-*")) and not list(out.glob(".shard*"))
    # Nothing was fetched twice except the two requests the kills interrupted.
    paths = site.paths()
    twice = sorted(p for p in set(paths) if paths.count(p) > 1)
    assert twice == sorted(set(in_flight)), twice
    assert in_flight == ["/story?id=2", "/slow.html"]  # a duplicate URL; the slow page
    assert sorted(set(paths)) == sorted(set(ref_site.paths()))
    times = [t for t, _, _ in site.log]
    assert min(b - a for a, b in zip(times, times[1:])) >= CRAWL_DELAY - ARRIVAL_JITTER


# ----------------------------------------------------------------------------- small parts


def test_normalize_url():
    assert normalize_url("HTTP://Example.COM:80/a?utm_source=x&b=2&a=1#frag") == (
        "http://example.com/a?a=1&b=2"
    )
    assert (
        normalize_url("../b.html", "http://example.com/x/y/z.html") == "http://example.com/x/b.html"
    )
    assert normalize_url("mailto:a@b.org") is None
    assert normalize_url("javascript:void(0)") is None


def test_a_malformed_port_is_a_bad_url_at_once(tmp_path, capsys):
    from azgpt.crawl import Crawler

    for url in ("http://127.0.0.1:99999/", "http://127.0.0.1:80x/", "http://[::1]:65536/a"):
        assert normalize_url(url) is None, url  # a link to it is dropped
    assert normalize_url("http://127.0.0.1:65535/") == "http://127.0.0.1:65535/"
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("http://127.0.0.1:1/\nhttp://127.0.0.1:99999/\n", encoding="utf-8")
    assert main(["crawl", str(seeds), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "seeds.txt line 2" in err and len(err.splitlines()) == 1
    # One already queued (a state from an older azgpt) is counted as bad_url, not taken for an
    # unreachable robots.txt and asked again with backoff.
    crawler = Crawler(tmp_path / "state", CrawlOptions(progress=False, allow_private=True))
    try:
        crawler.add_seeds(["http://127.0.0.1:99999/"])
        crawler.step(*crawler.next_url())
        report = crawler.report()
    finally:
        crawler.close()
    assert report.errors == {"bad_url": 1} and not report.retried and report.queued == 0


def test_bad_input_one_sentence(tmp_path, capsys):
    def err(argv, *mentions):
        assert main([str(a) for a in argv]) == 2
        e = capsys.readouterr().err
        assert len(e.splitlines()) == 1 and "Traceback" not in e
        for m in mentions:
            assert str(m) in e
        return e

    out = tmp_path / "out"
    err(["crawl", tmp_path / "nope.txt", "--out", out], "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("http://127.0.0.1:1/\nftp://example.org/x\n", encoding="utf-8")
    err(["crawl", bad, "--out", out], "bad.txt line 2")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    err(["crawl", empty, "--out", out], "empty.txt")
    err(["crawl", bad, "--out", out, "--max-pages", "0"], "--max-pages")
    ok = tmp_path / "ok.txt"
    ok.write_text("http://127.0.0.1:1/\n")
    err(["crawl", ok, "--out", out, "--delay", "-1"], "--delay")
    err(["crawl", ok, "--out", out, "--depth", "-1"], "--depth")
    f = tmp_path / "file"
    f.write_text("x")
    err(["crawl", ok, "--out", f], "--out")
    assert not out.exists()


def test_missing_extra_names_the_install(tmp_path, capsys, monkeypatch):
    urls = tmp_path / "u.txt"
    urls.write_text("http://127.0.0.1:1/\n")
    monkeypatch.setitem(sys.modules, "trafilatura", None)  # as if it were not installed
    assert main(["crawl", str(urls), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "trafilatura" in err and "pip install azgpt[crawl]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_summary_and_second_crawler_refused(tmp_path, site, capsys):
    import fcntl

    urls = seeds_file(tmp_path, site)
    out = tmp_path / "o"
    assert main([*cli_args(urls, out)[:-2], "--shard-pages", "10", "--max-pages", "3"]) == 0
    stdout, err = capsys.readouterr()
    assert stdout.startswith("pages: 3 fetched, 3 written in 1 shard (")
    assert "crawl:" in err and "written=3" in err  # the progress bar
    fd = os.open(out / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert main(cli_args(urls, out)) == 2
        e = capsys.readouterr().err
        assert "another crawl" in e and str(out) in e and len(e.splitlines()) == 1
    finally:
        os.close(fd)
