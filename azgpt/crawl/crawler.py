"""`azgpt crawl`: polite, resumable fetching of web pages into gzipped JSONL shards.

Politeness: robots.txt (RFC 9309, matched for the `azgpt` product token, with its crawl-delay and
request-rate) is read once per host; one request at a time, and a host is asked again only
`delay` seconds after its previous response ended. Every response is bounded: redirects,
connect/read timeouts plus a deadline for the whole body (a server that drips one byte at a time
never trips a read timeout), a size cap checked against Content-Length, while reading, and again
while decompressing (a gzip bomb stops at the cap), and only HTML and plain text are read.

Resumability: all state lives in `DIR/state.sqlite` (queue, hosts and their robots.txt, text
digests, counters, and the records of the shard being filled). A page's record, its URL marked
done and the links it adds are one transaction, so a kill at any moment loses nothing committed
and fetches nothing committed again (only the request in flight at the kill is repeated). Shards
are written whole under a temporary name and renamed; a kill between the rename and the
transaction that empties the pending records rewrites the same shard on restart.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import signal
import sqlite3
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

from . import __version__
from .errors import UserError
from .fsutil import atomic_path, fsync_dir

UA_TOKEN = "azgpt"
HTML_TYPES = ("text/html", "application/xhtml+xml")
TEXT_TYPES = ("text/plain",)
# RFC 9309 asks crawlers to read at least 500 KiB of robots.txt.
ROBOTS_MAX_BYTES = 512 * 1024
STATE = "state.sqlite"

# Outcomes that are not errors: the page was not wanted or held nothing new.
SKIP_KINDS = {
    "robots_disallowed",
    "offsite",
    "not_text",
    "no_text",
    "duplicate_text",
    "duplicate_url",
    "noindex",
}


def need_crawl_libs():
    try:
        import protego  # noqa: F401
        import trafilatura  # noqa: F401
        import urllib3  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"azgpt crawl needs {e.name}, which is not installed; run `pip install azgpt[crawl]`."
        ) from None


def user_agent(contact: str | None) -> str:
    """The User-Agent: names azgpt (the token robots.txt groups match) and, if given, a contact."""
    ua = f"{UA_TOKEN}/{__version__} (language-model corpus crawler"
    return ua + (f"; +{contact})" if contact else ")")


def normalize_url(url: str, base: str | None = None) -> str | None:
    """Absolute http(s) URL with lower-case scheme and host, no default port, sorted query without
    tracking parameters, no fragment; None for anything else (mailto:, javascript:, garbage)."""
    from courlan import normalize_url as courlan_normalize

    try:
        if base is not None:
            url = urljoin(base, url.strip())
        url = urldefrag(url.strip())[0]
        if urlsplit(url).scheme.lower() not in ("http", "https") or not urlsplit(url).hostname:
            return None
        return urldefrag(courlan_normalize(url))[0]
    except ValueError:
        return None


def origin(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


def site(url: str) -> str:
    host = (urlsplit(url).hostname or "").lower()
    return host[4:] if host.startswith("www.") else host


def read_seeds(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"URL file {p} does not exist; give a text file with one URL per line.")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"URL file {p} is not UTF-8 text; give one URL per line.") from None
    seeds: list[str] = []
    for i, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        u = normalize_url(s)
        if u is None:
            raise UserError(f"{p} line {i}: {s!r} is not an http(s) URL; fix or remove that line.")
        if u not in seeds:
            seeds.append(u)
    if not seeds:
        raise UserError(f"URL file {p} holds no URLs; put one http(s) URL per line.")
    return seeds


@dataclass
class CrawlOptions:
    max_pages: int = 1000
    """Stop after this many page requests (redirect hops counted, robots.txt not), over all
    runs on one DIR."""
    delay: float = 1.0
    """Least seconds between the end of one response and the next request to the same host;
    robots.txt may ask for more (crawl-delay, request-rate) and then wins."""
    same_site: bool = False
    """Follow links only to the seeds' sites (host without a leading www.)."""
    depth: int = 2
    """Follow links this many steps from a seed (0: fetch the seeds only)."""
    timeout: float = 20.0
    """Seconds for connecting, for each read, and for the whole response."""
    max_bytes: int = 5_000_000
    """Largest page read, compressed and decompressed."""
    max_redirects: int = 5
    contact: str | None = None
    """An e-mail or URL for site owners, sent in the User-Agent."""
    shard_pages: int = 1000
    """Records per output shard."""
    progress: bool = True


@dataclass
class CrawlReport:
    fetched: int = 0
    """Page requests made (redirect hops counted, robots.txt not)."""
    written: int = 0
    bytes: int = 0
    """Body bytes received (after decompression)."""
    errors: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    shards: int = 0
    queued: int = 0
    seconds: float = 0.0

    def format(self) -> str:
        lines = [
            f"pages: {self.fetched:,} fetched, {self.written:,} written in {self.shards} "
            f"shard{'' if self.shards == 1 else 's'}"
            f" ({self.bytes / 1e6:.2f} MB received, {self.queued:,} URLs left in the queue,"
            f" {self.seconds:.1f}s)"
        ]
        for title, c in (("errors", self.errors), ("skipped", self.skipped)):
            if c:
                lines.append(f"{title}: " + ", ".join(f"{k}={v:,}" for k, v in sorted(c.items())))
        return "\n".join(lines)


class FetchError(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


@dataclass
class Response:
    url: str
    status: int
    content_type: str = ""
    charset: str | None = None
    body: bytes = b""
    location: str | None = None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS urls(
    id INTEGER PRIMARY KEY, url TEXT UNIQUE NOT NULL, depth INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0, outcome TEXT);
CREATE INDEX IF NOT EXISTS urls_todo ON urls(done, id);
CREATE TABLE IF NOT EXISTS hosts(
    origin TEXT PRIMARY KEY, robots TEXT, last_start REAL DEFAULT 0, last_end REAL DEFAULT 0);
CREATE TABLE IF NOT EXISTS texts(sha256 TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS pending(id INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, n INTEGER NOT NULL);
"""


def _fault(point: str) -> None:
    """Test hook: AZGPT_FAULT_CRAWL=<point> kills this process with SIGKILL at that point."""
    if os.environ.get("AZGPT_FAULT_CRAWL") == point:
        os.kill(os.getpid(), signal.SIGKILL)


class Crawler:
    def __init__(self, out: str | Path, opts: CrawlOptions):
        import urllib3

        self.out = Path(out)
        self.opts = opts
        self.ua = user_agent(opts.contact)
        self.db = self._open_db()
        self.http = urllib3.PoolManager(
            retries=False,
            timeout=urllib3.Timeout(connect=opts.timeout, read=opts.timeout),
            headers={
                "User-Agent": self.ua,
                "Accept": "text/html,application/xhtml+xml,text/plain;q=0.9,*/*;q=0.1",
                "Accept-Encoding": "gzip, deflate",
            },
        )
        self.robots: dict[str, object] = {}
        self.sites: set[str] = set()
        self.requests = 0  # page requests made by the current step (redirect hops included)

    # ------------------------------------------------------------------ state

    def _open_db(self) -> sqlite3.Connection:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.out / STATE, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed page survives a power loss too, so a sealed shard never holds a
            # page the state has forgotten (one fsync per page; pages are seconds apart anyway).
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise UserError(
                f"cannot keep the crawl state in {self.out / STATE} ({e}); choose another --out."
            ) from None
        return db

    def _count(self, name: str, n: int = 1) -> None:
        self.db.execute(
            "INSERT INTO counters(name, n) VALUES(?, ?) "
            "ON CONFLICT(name) DO UPDATE SET n = n + excluded.n",
            (name, n),
        )

    def counter(self, name: str) -> int:
        row = self.db.execute("SELECT n FROM counters WHERE name=?", (name,)).fetchone()
        return row[0] if row else 0

    def report(self) -> CrawlReport:
        r = CrawlReport()
        for name, n in self.db.execute("SELECT name, n FROM counters"):
            if name.startswith("error:"):
                r.errors[name[6:]] = n
            elif name.startswith("skip:"):
                r.skipped[name[5:]] = n
            elif name in ("fetched", "written", "bytes", "shards"):
                setattr(r, name, n)
        r.queued = self.db.execute("SELECT count(*) FROM urls WHERE done=0").fetchone()[0]
        return r

    def add_seeds(self, seeds: list[str]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            for u in seeds:
                self.db.execute("INSERT OR IGNORE INTO urls(url, depth) VALUES(?, 0)", (u,))
        self.sites = {site(u) for (u,) in self.db.execute("SELECT url FROM urls WHERE depth=0")}

    # ------------------------------------------------------------------ politeness

    def _host_delay(self, org: str) -> float:
        rp = self.robots.get(org)
        d = self.opts.delay
        if rp is not None:
            cd = rp.crawl_delay(UA_TOKEN)
            if cd:
                d = max(d, float(cd))
            rr = rp.request_rate(UA_TOKEN)
            if rr and rr.requests:
                d = max(d, rr.seconds / rr.requests)
        return d

    def _wait_for(self, org: str) -> None:
        row = self.db.execute(
            "SELECT last_start, last_end FROM hosts WHERE origin=?", (org,)
        ).fetchone()
        if row:
            ready = max(row) + self._host_delay(org)
            while (left := ready - time.time()) > 0:
                time.sleep(min(left, 1.0))

    def _robots_for(self, url: str):
        """The parsed robots.txt of the URL's origin, fetched once and kept in the state."""
        from protego import Protego

        org = origin(url)
        if org in self.robots:
            return self.robots[org]
        row = self.db.execute("SELECT robots FROM hosts WHERE origin=?", (org,)).fetchone()
        if row is None or row[0] is None:
            status, body = self._get_robots(org)
            # RFC 9309: a 4xx robots.txt means no rules; a server error or no answer means
            # "assume everything is disallowed".
            if 200 <= status < 300:
                text = body
            elif 400 <= status < 500:
                text = ""
            else:
                text = "User-agent: *\nDisallow: /\n"
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("INSERT OR IGNORE INTO hosts(origin) VALUES(?)", (org,))
                self.db.execute("UPDATE hosts SET robots=? WHERE origin=?", (text, org))
        else:
            text = row[0]
        self.robots[org] = Protego.parse(text)
        return self.robots[org]

    def _get_robots(self, org: str) -> tuple[int, str]:
        """(status, body) of the origin's robots.txt; redirects followed (RFC 9309: at least
        five), also to another origin (http -> https is common); 0 when there is no answer."""
        url = org + "/robots.txt"
        for _ in range(self.opts.max_redirects + 1):
            try:
                resp = self._request(url, ROBOTS_MAX_BYTES, robots=True)
            except FetchError:
                return 0, ""
            if resp.status not in (301, 302, 303, 307, 308):
                return resp.status, resp.body.decode("utf-8", errors="replace")
            url = normalize_url(resp.location or "", url)
            if url is None:
                return 0, ""
        return 0, ""

    def allowed(self, url: str) -> bool:
        return self._robots_for(url).can_fetch(url, UA_TOKEN)

    # ------------------------------------------------------------------ HTTP

    def _request(self, url: str, cap: int, robots: bool = False) -> Response:
        """One GET, after the host's delay; the body is read only for a 2xx text answer."""
        import urllib3

        org = origin(url)
        if not robots:
            self._robots_for(url)  # its crawl-delay sets the wait
            self.requests += 1
        self._wait_for(org)
        start = time.time()
        self.db.execute("INSERT OR IGNORE INTO hosts(origin) VALUES(?)", (org,))
        self.db.execute("UPDATE hosts SET last_start=? WHERE origin=?", (start, org))
        try:
            return self._read(url, cap, start, robots)
        except urllib3.exceptions.TimeoutError:
            raise FetchError("timeout") from None
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError):
            raise FetchError("connection") from None
        except ValueError:  # a URL urllib3 cannot use (bad port, host that is not IDNA)
            raise FetchError("bad_url") from None
        finally:
            self.db.execute("UPDATE hosts SET last_end=? WHERE origin=?", (time.time(), org))

    def _read(self, url: str, cap: int, start: float, robots: bool) -> Response:
        resp = self.http.request(
            "GET", url, preload_content=False, decode_content=False, redirect=False
        )
        try:
            ctype = resp.headers.get("Content-Type", "")
            mime = ctype.split(";")[0].strip().lower()
            charset = None
            for part in ctype.split(";")[1:]:
                k, _, v = part.partition("=")
                if k.strip().lower() == "charset":
                    charset = v.strip().strip("\"'") or None
            r = Response(url, resp.status, mime, charset, location=resp.headers.get("Location"))
            if not 200 <= resp.status < 300:
                return r
            if not robots and mime not in HTML_TYPES + TEXT_TYPES:
                raise FetchError("not_text")
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > cap:
                raise FetchError("too_large")
            r.body = self._body(resp, cap, start)
            return r
        finally:
            resp.release_conn() if resp.isclosed() else resp.close()

    def _body(self, resp, cap: int, start: float) -> bytes:
        enc = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if enc == "gzip" or enc == "x-gzip":
            dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            dec = zlib.decompressobj()
        elif enc in ("identity", ""):
            dec = None
        else:
            raise FetchError("unsupported_encoding")
        raw = 0
        parts: list[bytes] = []
        size = 0
        while True:
            if time.time() - start > self.opts.timeout:
                raise FetchError("timeout")
            chunk = resp.read1(65536)
            if not chunk:
                break
            raw += len(chunk)
            if raw > cap:
                raise FetchError("too_large")
            if dec is None:
                parts.append(chunk)
                size += len(chunk)
                continue
            # Never inflate more than the room left plus one byte: a gzip bomb stops at the cap.
            buf = chunk
            while buf:
                try:
                    piece = dec.decompress(buf, cap - size + 1)
                except zlib.error:
                    raise FetchError("bad_encoding") from None
                size += len(piece)
                parts.append(piece)
                if size > cap:
                    raise FetchError("too_large")
                buf = dec.unconsumed_tail
            if size > cap:
                raise FetchError("too_large")
        return b"".join(parts)

    def fetch(self, url: str) -> tuple[Response, list[str]]:
        """GET with redirects followed by hand (each hop checked against robots.txt and the
        site limit, loops caught). Returns the final response and the URLs of the chain."""
        chain = [url]
        cur = url
        for _ in range(self.opts.max_redirects + 1):
            if self.opts.same_site and site(cur) not in self.sites:
                raise FetchError("offsite")
            if not self.allowed(cur):
                raise FetchError("robots_disallowed")
            resp = self._request(cur, self.opts.max_bytes)
            if resp.status not in (301, 302, 303, 307, 308):
                return resp, chain
            nxt = normalize_url(resp.location or "", cur)
            if nxt is None:
                raise FetchError("bad_redirect")
            if nxt in chain:
                raise FetchError("redirect_loop")
            row = self.db.execute("SELECT done FROM urls WHERE url=?", (nxt,)).fetchone()
            if row and row[0]:
                raise FetchError("duplicate_url")
            chain.append(nxt)
            cur = nxt
        raise FetchError("too_many_redirects")

    # ------------------------------------------------------------------ pages

    def parse(self, resp: Response) -> tuple[dict | None, list[str], str | None]:
        """(record fields or None, outgoing links, skip kind) for a 2xx text response."""
        if b"\x00" in resp.body[:4096]:
            return None, [], "not_text"
        if resp.content_type in TEXT_TYPES:
            text = _decode(resp.body, resp.charset)
            return {"title": None, "date": None, "text": text.strip()}, [], None
        import trafilatura
        from trafilatura.utils import decode_file, load_html

        html = _decode(resp.body, resp.charset) if resp.charset else decode_file(resp.body)
        tree = load_html(html)
        if tree is None:
            return None, [], "no_text"
        meta = " ".join(tree.xpath('//meta[@name="robots" or @name="azgpt"]/@content')).lower()
        links: list[str] = []
        if "nofollow" not in meta and "none" not in meta:
            tree.make_links_absolute(resp.url, resolve_base_href=True, handle_failures="discard")
            for a in tree.iter("a"):
                href = a.get("href")
                if href and "nofollow" not in (a.get("rel") or "").lower():
                    u = normalize_url(href)
                    if u and u not in links:
                        links.append(u)
        if "noindex" in meta or "none" in meta:
            return None, links, "noindex"
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
        text = (doc.get("text") or doc.get("raw_text") or "").strip()
        return {"title": doc.get("title"), "date": doc.get("date"), "text": text}, links, None

    def step(self, uid: int, url: str, depth: int) -> None:
        """Fetch one queued URL and commit everything it produced in one transaction."""
        chain = [url]
        record = None
        links: list[str] = []
        nbytes = 0
        self.requests = 0
        try:
            resp, chain = self.fetch(url)
            if resp.status >= 400 or resp.status < 200:
                kind = f"http_{resp.status}"
            elif 300 <= resp.status < 400:
                kind = "bad_redirect"
            else:
                nbytes = len(resp.body)
                try:
                    fields, links, kind = self.parse(resp)
                except Exception:  # a page the HTML parser or the extractor chokes on
                    fields, links, kind = None, [], "extract_failed"
                if fields is not None and not fields["text"]:
                    kind = "no_text"
                elif fields is not None:
                    record = {"url": chain[-1], **fields}
        except FetchError as e:
            kind = e.kind
        sha = None
        if record is not None:
            sha = hashlib.sha256(record["text"].encode("utf-8")).hexdigest()
            if self.db.execute("SELECT 1 FROM texts WHERE sha256=?", (sha,)).fetchone():
                record, kind = None, "duplicate_text"
        with self.db:
            self.db.execute("BEGIN")
            for u in chain:
                self.db.execute("INSERT OR IGNORE INTO urls(url, depth) VALUES(?, ?)", (u, depth))
                self.db.execute("UPDATE urls SET done=1, outcome=? WHERE url=?", (kind or "ok", u))
            if self.requests:
                self._count("fetched", self.requests)
            if nbytes:
                self._count("bytes", nbytes)
            if kind:
                self._count(("skip:" if kind in SKIP_KINDS else "error:") + kind)
            if record is not None:
                record["fetched_at"] = datetime.now(UTC).isoformat(timespec="seconds")
                record["sha256"] = sha
                self.db.execute("INSERT INTO texts(sha256) VALUES(?)", (sha,))
                self.db.execute(
                    "INSERT INTO pending(record) VALUES(?)",
                    (json.dumps(record, ensure_ascii=False),),
                )
                self._count("written")
            if depth < self.opts.depth:
                for link in links:
                    if self.opts.same_site and site(link) not in self.sites:
                        continue
                    self.db.execute(
                        "INSERT OR IGNORE INTO urls(url, depth) VALUES(?, ?)", (link, depth + 1)
                    )
        _fault("after_page_commit")

    def seal(self, force: bool = False) -> None:
        """Write the pending records to the next shard once there are enough (or all, if force)."""
        rows = self.db.execute(
            "SELECT id, record FROM pending ORDER BY id LIMIT ?", (self.opts.shard_pages,)
        ).fetchall()
        if not rows or (len(rows) < self.opts.shard_pages and not force):
            return
        n = self.counter("shards")
        path = self.out / f"shard-{n:05d}.jsonl.gz"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as raw:
                # mtime=0 and no file name: the same records always give the same bytes.
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                    for _, rec in rows:
                        gz.write(rec.encode("utf-8") + b"\n")
                raw.flush()
                os.fsync(raw.fileno())
        fsync_dir(self.out)
        _fault("after_shard_rename")
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM pending WHERE id <= ?", (rows[-1][0],))
            self._count("shards")

    def next_url(self) -> tuple[int, str, int] | None:
        """The oldest queued URL (of the next 200) whose host may be asked now, else the one
        whose host is ready first: one slow host does not hold up the others."""
        rows = self.db.execute(
            "SELECT id, url, depth FROM urls WHERE done=0 ORDER BY id LIMIT 200"
        ).fetchall()
        if not rows:
            return None
        now = time.time()
        best, best_ready = rows[0], float("inf")
        for row in rows:
            org = origin(row[1])
            h = self.db.execute(
                "SELECT last_start, last_end FROM hosts WHERE origin=?", (org,)
            ).fetchone()
            ready = max(h) + self._host_delay(org) if org in self.robots and h else now
            if ready <= now:
                return row
            if ready < best_ready:
                best, best_ready = row, ready
        return best

    def close(self) -> None:
        self.http.clear()
        self.db.close()


def _decode(body: bytes, charset: str | None) -> str:
    try:
        return body.decode(charset or "utf-8", errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


def _lock(out: Path):
    import fcntl

    path = out / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(
            f"another crawl is already writing to {out}; wait for it or choose another --out."
        ) from None
    return fd


def run_crawl(urls_file: str | Path, out: str | Path, opts: CrawlOptions) -> CrawlReport:
    """Crawl from the seeds in `urls_file` into shards in `out`; rerun to resume."""
    need_crawl_libs()
    import logging

    # The extractor logs its doubts about single pages at WARNING; the summary counts outcomes.
    for name in ("trafilatura", "htmldate", "courlan"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, v, low in (
        ("--delay", opts.delay, 0.0),
        ("--timeout", opts.timeout, 1e-3),
        ("--max-bytes", opts.max_bytes, 1),
    ):
        if not v >= low:
            raise UserError(f"{name} must be at least {low}, got {v}.")
    if opts.depth < 0:
        raise UserError(f"--depth must be 0 or more, got {opts.depth}.")
    seeds = read_seeds(urls_file)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the shards.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create --out {out} ({e.strerror}); choose another folder."
        ) from None
    lock = _lock(out)
    t0 = time.perf_counter()
    crawler = Crawler(out, opts)
    bar = None
    try:
        crawler.add_seeds(seeds)
        if opts.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=opts.max_pages,
                initial=min(crawler.counter("fetched"), opts.max_pages),
                unit="page",
                desc="crawl",
            )
        while crawler.counter("fetched") < opts.max_pages:
            job = crawler.next_url()
            if job is None:
                break
            before = crawler.counter("fetched")
            crawler.step(*job)
            crawler.seal()
            if bar is not None:
                r = crawler.report()
                bar.update(r.fetched - before)
                errs = " ".join(f"{k}={v}" for k, v in sorted(r.errors.items()))
                bar.set_postfix_str(
                    f"written={r.written} {r.bytes / 1e6:.1f}MB"
                    + (f" errors: {errs}" if errs else ""),
                    refresh=False,
                )
        crawler.seal(force=True)
        report = crawler.report()
    finally:
        if bar is not None:
            bar.close()
        try:
            # An interrupted crawl (Ctrl-C) still leaves every committed page in a shard.
            crawler.seal(force=True)
        except Exception:
            pass
        crawler.close()
        os.close(lock)
    report.seconds = time.perf_counter() - t0
    return report
