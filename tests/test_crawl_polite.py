"""The crawler against what real sites do, each case a small site the test serves on 127.0.0.1:
robots.txt with a byte order mark, a versioned user-agent line, over 500 KiB, answering 503 for a
while, changed after a day; page-level robots directives; one server under several names; a host
with a long crawl delay beside a fast one; 429/503 with Retry-After; addresses that must not be
reached; a server that drips its headers; pages in legacy code pages; hub pages; a page with
thousands of links."""

from __future__ import annotations

import codecs
import gzip
import html as htmllib
import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("trafilatura")
pytest.importorskip("protego")

from azgpt.crawl import CrawlOptions, run_crawl  # noqa: E402

ARRIVAL_JITTER = 0.01  # arrival gaps at the server may fall short of the spacing by travel time

PROSE = [
    "Bakı Azərbaycanın paytaxtı və ən böyük şəhəridir. Şəhər Xəzər dənizinin qərb sahilində, "
    "Abşeron yarımadasının cənub hissəsində yerləşir.",
    "İçərişəhər qədim divarları, Qız qalası və Şirvanşahlar sarayı ilə tanınır. Bu abidələr "
    "UNESCO-nun Ümumdünya irsi siyahısına daxil edilmişdir.",
    "Şəhərin iqlimi mülayim isti və qurudur, burada tez-tez güclü xəzri küləyi əsir. Bakı həm də "
    "neft sənayesinin qədim mərkəzlərindən biridir.",
]


def article(title: str, links: list[str] = (), head: str = "") -> bytes:
    more = "".join(f'<li><a href="{h}">{h}</a></li>' for h in links)
    paras = "".join(f"<p>{title}: {p}</p>" for p in PROSE)
    return (
        f'<!DOCTYPE html><html lang="az"><head><meta charset="utf-8"><title>{title}</title>{head}'
        f"</head><body><main><article><h1>{title}</h1>{paras}</article></main>"
        f"<aside><ul>{more}</ul></aside></body></html>"
    ).encode()


class Site(ThreadingHTTPServer):
    """A site whose answers are `routes[path](handler)`; every request is logged."""

    daemon_threads = True

    def __init__(self, routes: dict):
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes = routes
        self.log: list[tuple[float, str, str]] = []  # (arrival, host header, path)
        self.lock = threading.Lock()
        self.hits: dict[str, int] = {}

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def paths(self) -> list[str]:
        return [p for _, _, p in self.log]


class Handler(BaseHTTPRequestHandler):
    server: Site

    def log_message(self, *args):
        pass

    def send(self, status: int, body: bytes = b"", ctype="text/html; charset=utf-8", **hdr):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in hdr.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        s = self.server
        with s.lock:
            s.log.append((time.time(), self.headers.get("Host", ""), self.path))
            n = s.hits[self.path] = s.hits.get(self.path, 0) + 1
        route = s.routes.get(self.path)
        try:
            if route is None:
                self.send(404, b"<html><body>yoxdur</body></html>")
            else:
                route(self, n)
        except (BrokenPipeError, ConnectionResetError):
            pass


@contextmanager
def serve(routes: dict):
    s = Site(routes)
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    try:
        yield s
    finally:
        s.shutdown()
        s.server_close()


def ok(body: bytes, ctype: str = "text/html; charset=utf-8", **hdr):
    return lambda h, n: h.send(200, body, ctype, **hdr)


def robots(text: str | bytes):
    data = text.encode() if isinstance(text, str) else text
    return lambda h, n: h.send(200, data, "text/plain")


def opts(**kw) -> CrawlOptions:
    base = dict(
        delay=0.0,
        depth=1,
        timeout=2.0,
        max_bytes=1_000_000,
        shard_pages=100,
        progress=False,
        allow_private=True,
        retry_base=0.05,
        max_retries=2,
    )
    base.update(kw)
    return CrawlOptions(**base)


def crawl(tmp_path: Path, seeds: list[str], name: str = "out", **kw):
    urls = tmp_path / f"{name}.txt"
    urls.write_text("\n".join(seeds) + "\n", encoding="utf-8")
    out = tmp_path / name
    return run_crawl(urls, out, opts(**kw)), out


def records(out: Path) -> list[dict]:
    recs = []
    for shard in sorted(out.glob("shard-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            recs += [json.loads(line) for line in f]
    return recs


# ----------------------------------------------------------------------------- robots.txt


@pytest.mark.parametrize(
    "name, robots_txt, allowed, refused",
    [
        # A byte order mark before the first group: that group must still count.
        ("bom", codecs.BOM_UTF8 + b"User-agent: *\nDisallow: /\n", [], ["/a", "/b"]),
        # A versioned user-agent line names azgpt by its product token.
        (
            "product_token",
            "User-agent: *\nDisallow: /\n\nUser-agent: azgpt/0.1\nDisallow: /b\n",
            ["/a"],
            ["/b"],
        ),
        # Groups whose names are prefixes of azgpt (or another case and a version of one) are
        # other crawlers' groups; azgpt falls back to `*`.
        (
            "prefix_groups",
            "User-agent: az\nDisallow: /\n\nUser-agent: azg\nUser-agent: a\nDisallow: /\n\n"
            "User-agent: Az/1.0\nDisallow: /\n\nUser-agent: *\nDisallow: /b\n",
            ["/a"],
            ["/b"],
        ),
        # `*` disallows everything; a group for `az` allowing all is not azgpt's.
        ("star_only", "User-agent: *\nDisallow: /\n\nUser-agent: az\nAllow: /\n", [], ["/a"]),
        # Azgpt's own group, in another case and with a version, wins over `*`.
        (
            "own_group_any_case",
            "User-agent: *\nDisallow: /\n\nUser-agent: AzGPT/2.0\nDisallow: /b\n",
            ["/a"],
            ["/b"],
        ),
        # Over 500 KiB: the first 500 KiB are rules, the rest is ignored, the host is not lost.
        (
            "large",
            "User-agent: *\nDisallow: /b\n" + "# padding comment line\n" * 30_000,
            ["/a"],
            ["/b"],
        ),
    ],
)
def test_robots_txt_as_rfc_9309_reads_it(tmp_path, name, robots_txt, allowed, refused):
    routes = {"/robots.txt": robots(robots_txt), "/": ok(article("Giriş", ["/a", "/b"]))}
    routes |= {p: ok(article(p)) for p in ("/a", "/b")}
    with serve(routes) as site:
        report, _ = crawl(tmp_path, [f"{site.base}/"] if allowed else [f"{site.base}/a"])
        for p in allowed:
            assert p in site.paths(), (name, site.paths())
        for p in refused:
            assert p not in site.paths(), (name, site.paths())
        assert site.paths().count("/robots.txt") == 1


def test_robots_groups_match_the_product_token_exactly(tmp_path):
    """RFC 9309 2.2.1: a group is azgpt's when its product token equals `azgpt` (any case, any
    version); otherwise `*` holds, for Disallow and for the crawl delay alike."""
    from azgpt.crawl.robots import parse_robots, robots_text

    for name, applies in [
        ("az", False),
        ("azg", False),
        ("a", False),
        ("AZ", False),
        ("azgp", False),
        ("Az/1.0", False),
        ("azgpt-news", False),
        ("gpt", False),
        ("azgpt", True),
        ("AzGPT/2.0", True),
    ]:
        body = f"User-agent: {name}\nDisallow: /\nCrawl-delay: 7\n\nUser-agent: *\nAllow: /\n"
        rules = parse_robots(robots_text(body.encode()))
        assert rules.can_fetch("http://x/page", "azgpt") is not applies, name
        assert rules.crawl_delay("azgpt") == (7 if applies else None), name
    rules = parse_robots(robots_text(b"User-agent: *\nDisallow: /\n\nUser-agent: az\nAllow: /\n"))
    assert not rules.can_fetch("http://x/page", "azgpt")
    # A crawl: the long delay of a group for `az` does not make azgpt skip the host.
    routes = {
        "/robots.txt": robots("User-agent: az\nCrawl-delay: 50\n\nUser-agent: *\nAllow: /\n"),
        "/": ok(article("Giriş")),
    }
    with serve(routes) as site:
        report, out = crawl(tmp_path, [f"{site.base}/"], max_crawl_delay=1.0)
        assert site.paths() == ["/robots.txt", "/"]
        assert not report.skipped and len(records(out)) == 1


def test_robots_txt_5xx_waits_and_retries_then_crawls(tmp_path):
    def flaky(h, n):
        if n <= 2:
            h.send(503, b"busy", "text/plain")
        else:
            h.send(200, b"User-agent: *\nAllow: /\n", "text/plain")

    routes = {"/robots.txt": flaky, "/": ok(article("Giriş", ["/a"])), "/a": ok(article("A"))}
    with serve(routes) as site:
        report, out = crawl(tmp_path, [f"{site.base}/"])
        # While robots.txt answered 503, nothing else was asked; the URLs stayed queued.
        assert site.paths()[:3] == ["/robots.txt"] * 3
        assert site.paths()[3:] == ["/", "/a"]
        assert report.retried["robots_unavailable"] == 2
        assert len(records(out)) == 2 and report.queued == 0
        times = [t for t, _, p in site.log if p == "/robots.txt"]
        # The backoff doubles: 0.05 s, then 0.1 s.
        assert times[1] - times[0] >= 0.05 - ARRIVAL_JITTER
        assert times[2] - times[1] >= 0.1 - ARRIVAL_JITTER


def test_robots_txt_unreachable_for_good_gives_up_counted(tmp_path):
    routes = {"/robots.txt": lambda h, n: h.send(500, b"", "text/plain"), "/": ok(article("X"))}
    with serve(routes) as site:
        report, _ = crawl(tmp_path, [f"{site.base}/"])
        assert set(site.paths()) == {"/robots.txt"}
        assert site.paths().count("/robots.txt") == 3  # the first try and max_retries=2 more
        assert report.errors["robots_unreachable"] == 1 and report.queued == 0


def test_robots_txt_is_fetched_again_after_24_hours(tmp_path):
    rules = {"text": "User-agent: *\nAllow: /\n"}
    routes = {
        "/robots.txt": lambda h, n: h.send(200, rules["text"].encode(), "text/plain"),
        "/a": ok(article("A")),
        "/b": ok(article("B")),
        "/c": ok(article("C")),
    }
    with serve(routes) as site:
        urls = tmp_path / "u.txt"
        out = tmp_path / "out"
        urls.write_text(f"{site.base}/a\n")
        run_crawl(urls, out, opts())
        rules["text"] = "User-agent: *\nDisallow: /\n"  # the site now refuses crawlers
        urls.write_text(f"{site.base}/a\n{site.base}/b\n")
        run_crawl(urls, out, opts())
        assert "/b" in site.paths()  # kept for a day: the old rules still hold
        assert site.paths().count("/robots.txt") == 1
        with sqlite3.connect(out / "state.sqlite") as db:  # a day later
            db.execute("UPDATE hosts SET robots_fetched_at = robots_fetched_at - 86401")
        urls.write_text(f"{site.base}/a\n{site.base}/b\n{site.base}/c\n")
        report = run_crawl(urls, out, opts())
        assert site.paths().count("/robots.txt") == 2
        assert "/c" not in site.paths() and report.skipped["robots_disallowed"] == 1


def test_meta_robots_and_x_robots_tag_are_directives(tmp_path):
    routes = {
        "/robots.txt": robots("User-agent: *\nAllow: /\n"),
        "/": ok(article("Giriş", ["/preview", "/xnoindex", "/other", "/nofollow"])),
        # Not noindex, although the word "none" is in it.
        "/preview": ok(
            article("Önbaxış", head='<meta name="robots" content="max-image-preview:none">')
        ),
        "/xnoindex": ok(article("Gizli"), X_Robots_Tag="noindex"),
        "/other": ok(article("Başqası"), X_Robots_Tag="otherbot: noindex"),
        "/nofollow": ok(
            article("Keçid", ["/hidden"], head='<META NAME="ROBOTS" CONTENT="NoFollow">')
        ),
        "/hidden": ok(article("Gizli keçid")),
    }
    with serve(routes) as site:
        report, out = crawl(tmp_path, [f"{site.base}/"], depth=2)
        written = {r["url"].removeprefix(site.base) for r in records(out)}
        assert written == {"/", "/preview", "/other", "/nofollow"}
        assert report.skipped["noindex"] == 1
        assert "/hidden" not in site.paths()


# ----------------------------------------------------------------------------- politeness


def test_one_server_under_several_names_keeps_one_delay(tmp_path):
    routes = {"/robots.txt": robots("User-agent: azgpt\nCrawl-delay: 0.2\n")}
    routes |= {f"/{i}": ok(article(f"S{i}")) for i in range(3)}
    with serve(routes) as site:
        port = site.server_address[1]
        seeds = [
            f"http://127.0.0.1:{port}/0",
            f"http://127.1:{port}/1",
            f"http://localhost:{port}/2",
        ]
        crawl(tmp_path, seeds, depth=0)
        pages = [(t, host) for t, host, p in site.log if p != "/robots.txt"]
        assert len({host for _, host in pages}) == 3  # three names ...
        times = [t for t, _, _ in site.log]
        gaps = [b - a for a, b in zip(times, times[1:])]
        # ... one server: each request waited for the crawl delay after the one before.
        assert min(gaps) >= 0.2 - ARRIVAL_JITTER, gaps


def fast_site() -> tuple[list[str], dict]:
    """A host that allows everything: a front page linking five pages (paths, routes)."""
    pages = [f"/f{i}" for i in range(5)]
    routes = {"/robots.txt": robots("User-agent: *\nAllow: /\n"), "/": ok(article("Tez", pages))}
    return pages, routes | {p: ok(article(p)) for p in pages}


def test_a_slow_host_does_not_hold_up_a_fast_one(tmp_path):
    many = [f"/p{i}" for i in range(300)]
    slow_routes = {
        "/robots.txt": robots("User-agent: *\nCrawl-delay: 0.2\n"),
        "/": ok(article("Yavaş", many)),
    }
    slow_routes |= {p: ok(article(p)) for p in many}
    fast_pages, fast_routes = fast_site()
    with serve(slow_routes) as slow, serve(fast_routes) as fast:
        report, _ = crawl(tmp_path, [f"{slow.base}/", f"{fast.base}/"], max_pages=12)
        # 300 queued URLs of the slow host come first in the queue; the fast host still got
        # all its pages while the slow one waited out its delay.
        assert sorted(p for p in fast.paths() if p != "/robots.txt") == sorted(["/", *fast_pages])
        assert report.fetched == 12


def test_a_slow_hosts_crawl_delay_is_not_slept_in_the_step_that_reads_it(tmp_path):
    """The slow host is first in the queue and its robots.txt asks for 60 s between requests.
    The step that reads it leaves the page queued instead of sleeping: every page of the fast
    host is asked before the slow host's second request (its first page)."""
    slow_routes = {
        "/robots.txt": robots("User-agent: *\nCrawl-delay: 60\n"),
        "/": ok(article("Yavaş", ["/s1"])),
        "/s1": ok(article("S1")),
    }
    fast_pages, fast_routes = fast_site()
    with serve(slow_routes) as slow, serve(fast_routes) as fast:
        t0 = time.monotonic()
        report, _ = crawl(tmp_path, [f"{slow.base}/", f"{fast.base}/"], max_pages=6)
        took = time.monotonic() - t0
    assert slow.paths()[0] == "/robots.txt"  # the slow host had the first turn
    fast_times = [t for t, _, p in fast.log if p != "/robots.txt"]
    assert sorted(p for p in fast.paths() if p != "/robots.txt") == sorted(["/", *fast_pages])
    slow_times = [t for t, _, _ in slow.log]
    second_slow = slow_times[1] if len(slow_times) > 1 else float("inf")
    assert all(t < second_slow for t in fast_times), (slow.log, fast.log)
    assert report.fetched == 6 and report.queued == 1  # the slow host's page waits its turn
    assert took < 30  # nowhere near the slow host's 60 s


def test_a_host_over_the_crawl_delay_cap_is_skipped_and_counted(tmp_path):
    routes = {
        "/robots.txt": robots("User-agent: *\nCrawl-delay: 1000000000\n"),
        "/": ok(article("X")),
    }
    with serve(routes) as site:
        report, _ = crawl(tmp_path, [f"{site.base}/", f"{site.base}/a"], max_crawl_delay=1.0)
        assert site.paths() == ["/robots.txt"]
        assert report.skipped["crawl_delay_too_long"] == 2 and report.queued == 0


def test_429_and_503_are_retried_after_retry_after_then_counted(tmp_path):
    def once_busy(h, n):
        if n == 1:
            h.send(503, b"", Retry_After="1")
        else:
            h.send(200, article("Sonra"))

    routes = {
        "/robots.txt": robots("User-agent: *\nAllow: /\n"),
        "/later": once_busy,
        "/tomorrow": lambda h, n: h.send(429, b"", Retry_After="86400"),
        "/never": lambda h, n: h.send(503, b""),
    }
    with serve(routes) as site:
        report, out = crawl(
            tmp_path, [f"{site.base}/later", f"{site.base}/tomorrow", f"{site.base}/never"]
        )
        later = [t for t, _, p in site.log if p == "/later"]
        assert len(later) == 2 and later[1] - later[0] >= 1.0 - ARRIVAL_JITTER
        assert [r["url"] for r in records(out)] == [f"{site.base}/later"]
        assert site.paths().count("/tomorrow") == 1  # a day is over the cap: not waited for
        assert report.errors["retry_after_too_long"] == 1
        assert site.paths().count("/never") == 3  # the first try and max_retries=2 more
        assert report.errors["http_503"] == 1
        assert report.retried["http_503"] == 3 and report.queued == 0


# ----------------------------------------------------------------------------- addresses


def test_private_addresses_are_refused_without_allow_private(tmp_path):
    routes = {"/robots.txt": robots("User-agent: *\nAllow: /\n"), "/": ok(article("X"))}
    with serve(routes) as site:
        report, _ = crawl(tmp_path, [f"{site.base}/"], allow_private=False)
        assert site.log == []  # not even robots.txt
        assert report.skipped["private_address"] == 1


def test_redirects_and_links_to_private_addresses_are_not_followed(tmp_path, monkeypatch):
    import azgpt.crawl.net as net

    # As if 127.0.0.1 were a public address: then a redirect or a link to the cloud metadata
    # address or a private network must still be refused.
    real = net.is_public
    monkeypatch.setattr(net, "is_public", lambda a: a == "127.0.0.1" or real(a))
    routes = {
        "/robots.txt": robots("User-agent: *\nAllow: /\n"),
        "/": ok(article("Giriş", ["http://10.1.2.3/x", "/go"])),
        "/go": lambda h, n: h.send(302, b"", Location="http://169.254.169.254/latest/meta-data/"),
    }
    with serve(routes) as site:
        report, _ = crawl(tmp_path, [f"{site.base}/"], allow_private=False, timeout=0.5)
        assert report.skipped["private_address"] == 2
        assert "timeout" not in report.errors and "connection" not in report.errors


def test_timeout_bounds_a_server_that_drips_its_headers(tmp_path):
    sent = {"bytes": 0}

    def drip(h, n):
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(60):  # one header byte every 0.1 s: 6 s in all, no read ever times out
            h.wfile.write(b"X")
            h.wfile.flush()
            sent["bytes"] += 1
            time.sleep(0.1)
        h.wfile.write(b": y\r\nContent-Length: 0\r\n\r\n")

    routes = {"/robots.txt": robots("User-agent: *\nAllow: /\n"), "/drip": drip}
    with serve(routes) as site:
        report, _ = crawl(tmp_path, [f"{site.base}/drip"], timeout=0.5)
        assert report.errors["timeout"] == 1
        # The crawler hung up at its deadline: the server could not send the rest.
        time.sleep(0.3)
        assert sent["bytes"] < 30, sent


# ----------------------------------------------------------------------------- pages

LEGACY = (
    "Bakı şähäri Xäzär dänizinin sahilindä yerläşir. Qış burada yumşaq keçir, yay isä isti olur. "
    "Şuşa, Gäncä vä Şäki qädim şähärlärdir, onların küçäläri daş ilä döşänib."
)


def legacy_page(meta: str = "") -> bytes:
    html = f"<html><head>{meta}<title>Köhnä</title></head><body><article><p>{LEGACY}</p><p>{LEGACY}</p></article></body></html>"
    return html.encode("cp1254")


def test_pages_in_legacy_code_pages_are_decoded_right(tmp_path):
    routes = {
        "/robots.txt": robots("User-agent: *\nAllow: /\n"),
        "/undeclared": ok(legacy_page(), "text/html"),
        "/wrong-header": ok(legacy_page(), "text/html; charset=windows-1251"),
        "/wrong-meta": ok(legacy_page('<meta charset="windows-1251">'), "text/html"),
        "/right": ok(legacy_page(), "text/html; charset=windows-1254"),
    }
    with serve(routes) as site:
        seeds = [
            f"{site.base}{p}" for p in ("/undeclared", "/wrong-header", "/wrong-meta", "/right")
        ]
        _, out = crawl(tmp_path, seeds, depth=0)
        recs = {r["url"].removeprefix(site.base): r for r in records(out)}
        # One page's text, written once (the others are the same text).
        assert len(recs) == 1
        rec = next(iter(recs.values()))
        assert LEGACY in rec["text"] and "\ufffd" not in rec["text"]
        assert rec["encoding"].startswith("cp1254")
        assert "/undeclared" in recs  # the first one asked


def test_each_page_records_the_decoder_choice(tmp_path):
    routes = {
        "/robots.txt": robots("User-agent: *\nAllow: /\n"),
        "/a": ok(legacy_page(), "text/html; charset=windows-1251"),
        "/b": ok(article("UTF")),
    }
    with serve(routes) as site:
        _, out = crawl(tmp_path, [f"{site.base}/a", f"{site.base}/b"], depth=0)
        enc = {r["url"].removeprefix(site.base): r["encoding"] for r in records(out)}
        assert enc == {"/a": "cp1254 (detected; declared cp1251)", "/b": "utf-8"}


RUSSIAN = (
    "Азербайджан — государство в восточной части Закавказья, на берегу Каспийского моря. "
    "Столица — город Баку, крупнейший порт и промышленный центр страны."
)
# Cyrillic-script Azerbaijani: ә, ҹ, һ, ө, ү are not in cp1251 and come as numeric references.
AZ_CYRILLIC = (
    "Азәрбајҹан Республикасы Ҹәнуби Гафгазда јерләшир. Пајтахты Бакы шәһәридир, о, Хәзәр "
    "дәнизинин саһилиндә јерләшир. Өлкәнин әһалиси он милјондан чохдур."
)


def page_in(text: str, codec: str, meta: str = "", title: str = "Səhifə") -> bytes:
    html = (
        f"<html><head>{meta}<title>{title}</title></head><body><article><p>{text}</p>"
        f"<p>{text}</p></article></body></html>"
    )
    return html.encode(codec, "xmlcharrefreplace")


@pytest.mark.parametrize(
    "text, codec, header, meta, chosen",
    [
        # cp1251 (Russian and Cyrillic Azerbaijani): undeclared, declared UTF-8 or cp1254.
        (RUSSIAN, "cp1251", None, "", "cp1251 (detected; declared nothing)"),
        (AZ_CYRILLIC, "cp1251", None, "", "cp1251 (detected; declared nothing)"),
        (RUSSIAN, "cp1251", "utf-8", "", "cp1251 (detected; declared utf-8)"),
        (AZ_CYRILLIC, "cp1251", "utf-8", "", "cp1251 (detected; declared utf-8)"),
        (RUSSIAN, "cp1251", "windows-1254", "", "cp1251 (detected; declared cp1254)"),
        (
            AZ_CYRILLIC,
            "cp1251",
            None,
            '<meta charset="windows-1254">',
            "cp1251 (detected; declared cp1254)",
        ),
        # cp1254 declared latin-1 (header) or cp1252 (meta): `Bakı` would be `Baký`.
        (LEGACY, "cp1254", "iso-8859-1", "", "cp1254 (detected; declared iso8859-1)"),
        (
            LEGACY,
            "cp1254",
            None,
            '<meta charset="windows-1252">',
            "cp1254 (detected; declared cp1252)",
        ),
        # What already held: cp1254 undeclared or declared cp1251, declared charsets that are right.
        (LEGACY, "cp1254", None, "", "cp1254 (detected; declared nothing)"),
        (LEGACY, "cp1254", "windows-1251", "", "cp1254 (detected; declared cp1251)"),
        (LEGACY, "cp1254", "windows-1254", "", "cp1254"),
        (RUSSIAN, "cp1251", "windows-1251", "", "cp1251"),
        (AZ_CYRILLIC, "utf-8", None, "", "utf-8"),
        (PROSE[0], "utf-8", "utf-8", "", "utf-8"),
        # Valid UTF-8 is UTF-8, also when declared otherwise.
        (AZ_CYRILLIC, "utf-8", "windows-1251", "", "utf-8 (detected; declared cp1251)"),
        (PROSE[0], "utf-8", "iso-8859-1", "", "utf-8 (detected; declared iso8859-1)"),
        # Not Azerbaijani: French in UTF-8 and Icelandic in latin-1 keep their declarations.
        ("Élève à l'école d'été, où la fête a commencé.", "utf-8", None, "", "utf-8"),
        ("Þjóðin á það skýrt að ræða við þá sem hafa.", "latin-1", "iso-8859-1", "", "iso8859-1"),
    ],
)
def test_decode_page_judges_charsets_on_the_text(text, codec, header, meta, chosen):
    from azgpt.crawl.extract import decode_page

    title = "Səhifə" if text in (RUSSIAN, AZ_CYRILLIC, LEGACY, PROSE[0]) else "Page"
    html, encoding = decode_page(page_in(text, codec, meta, title), header, True)
    assert encoding == chosen
    assert "\ufffd" not in html
    assert text in htmllib.unescape(html)


def test_pages_in_cp1251_or_declared_latin1_are_written_with_the_right_letters(tmp_path):
    routes = {
        "/robots.txt": robots("User-agent: *\nAllow: /\n"),
        "/ru": ok(page_in(RUSSIAN, "cp1251"), "text/html"),
        "/az-utf8": ok(page_in(AZ_CYRILLIC, "cp1251"), "text/html; charset=utf-8"),
        "/az-1254": ok(
            page_in("1. " + AZ_CYRILLIC, "cp1251", '<meta charset="windows-1254">'), "text/html"
        ),
        "/latin1": ok(page_in(LEGACY, "cp1254"), "text/html; charset=iso-8859-1"),
        "/cp1252": ok(
            page_in("2. " + LEGACY, "cp1254", '<meta charset="windows-1252">'), "text/html"
        ),
    }
    with serve(routes) as site:
        _, out = crawl(tmp_path, [f"{site.base}{p}" for p in routes if p != "/robots.txt"], depth=0)
    recs = {r["url"].removeprefix(site.base): r for r in records(out)}
    expect = {"/ru": RUSSIAN, "/az-utf8": AZ_CYRILLIC, "/az-1254": AZ_CYRILLIC}
    expect |= {"/latin1": LEGACY, "/cp1252": LEGACY}
    assert set(recs) == set(expect)
    for path, text in expect.items():
        assert text in recs[path]["text"] and "\ufffd" not in recs[path]["text"], path
        assert recs[path]["encoding"].startswith("cp1251" if text != LEGACY else "cp1254"), path
        assert "detected" in recs[path]["encoding"], path


# A news site's front page: headlines and the sections they belong to.
HEADLINES = [
    ("Prezident Bakıda yeni məktəbin açılışında iştirak edib", "Təhsil"),
    ("Xəzər dənizində güclü külək gözlənilir", "Hava"),
    ("Gəncədə kitab sərgisi keçiriləcək", "Mədəniyyət"),
    ("Milli komanda növbəti oyuna hazırlaşır", "İdman"),
    ("Neftin qiyməti yenidən bahalaşıb", "İqtisadiyyat"),
    ("Şəkidə turistlərin sayı artıb", "Turizm"),
]


def test_hub_pages_of_links_are_skipped(tmp_path):
    items = "".join(f'<li><a href="/n{i}">{h}</a></li>' for i, (h, _) in enumerate(HEADLINES))
    hub = (
        '<html lang="az"><head><meta charset="utf-8"><title>Xəbərlər</title></head><body>'
        f"<main><h1>Son xəbərlər</h1><ul>{items}</ul></main></body></html>"
    ).encode()
    routes = {
        "/robots.txt": robots("User-agent: *\nAllow: /\n"),
        "/": ok(hub),
        "/n0": ok(article("Məktəb")),
    }
    with serve(routes) as site:
        report, out = crawl(tmp_path, [f"{site.base}/"])
        assert [r["url"] for r in records(out)] == [f"{site.base}/n0"]
        assert report.skipped["mostly_links"] == 1
        assert "/n0" in site.paths()  # its links were still followed


def test_links_per_page_are_capped(tmp_path):
    links = "".join(f'<a href="/l{i}">{i}</a> ' for i in range(20_000))
    big = f"<html><body><article><p>{PROSE[0]}</p><p>{links}</p></article></body></html>".encode()
    routes = {"/robots.txt": robots("User-agent: *\nAllow: /\n"), "/": ok(big)}
    with serve(routes) as site:
        report, out = crawl(tmp_path, [f"{site.base}/"], max_pages=1, max_links=100)
        assert report.skipped["mostly_links"] == 1  # 20,000 links: a link list
        with sqlite3.connect(out / "state.sqlite") as db:
            assert db.execute("SELECT count(*) FROM urls").fetchone()[0] == 101
            first = db.execute("SELECT url FROM urls WHERE depth=1 ORDER BY id LIMIT 1").fetchone()
        assert first[0] == f"{site.base}/l0"  # in page order


def test_a_crawled_hub_page_does_not_survive_clean(tmp_path, capsys):
    """The pipeline end to end: a site's front page (menu, headlines with times, teasers that
    are not sentences) and one article, crawled, then cleaned with the defaults: the article is
    in the corpus, no line of the front page is."""
    from azgpt.cli import main

    heads = HEADLINES
    menu = "".join(f'<li><a href="/bolme/{i}">{c}</a></li>' for i, (_, c) in enumerate(heads))
    items = "".join(
        f'<div class="item"><h3><a href="/n{i}">{h}</a></h3><span>{10 + i}:30</span>'
        f"<p>{c} xəbərləri bölməsində oxuyun</p></div>"
        for i, (h, c) in enumerate(heads)
    )
    front = (
        '<html lang="az"><head><meta charset="utf-8"><title>Xəbər portalı</title></head><body>'
        f"<nav><ul>{menu}</ul></nav><main><h1>Son xəbərlər</h1>{items}</main></body></html>"
    ).encode()
    routes = {
        "/robots.txt": robots("User-agent: *\nAllow: /\n"),
        "/": ok(front),
        "/n0": ok(article("Məktəb")),
    }
    with serve(routes) as site:
        _, out = crawl(tmp_path, [f"{site.base}/"])
    clean = tmp_path / "clean.txt"
    assert main(["clean", str(out), "--out", str(clean), "--workers", "1"]) == 0
    capsys.readouterr()
    text = clean.read_text(encoding="utf-8")
    assert PROSE[0] in text
    for h, c in heads:
        assert h not in text and f"{c} xəbərləri" not in text
