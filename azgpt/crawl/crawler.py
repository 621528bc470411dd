"""The crawl: a queue per host in `DIR/state.sqlite`, politeness per server, robots.txt per
origin, one page per transaction, shards written whole.

Politeness: requests go one at a time; a server (the address a host resolves to, so
`127.0.0.1`, `127.1` and `localhost` are one server) is asked again only `delay` seconds after
its previous response ended, or the host's robots.txt crawl-delay / request-rate when longer. A
host whose crawl delay is over `max_crawl_delay` (5 minutes) is skipped and counted. The next
URL is the oldest queued URL of the host that may be asked soonest, so a slow host never holds
up the others; nor does a step sleep before its first page request (a host's first step reads
its robots.txt, learns a crawl delay of 20 s and leaves the page queued for its turn). 429 and
503 answers are asked again after their Retry-After (when it is within `max_crawl_delay`) or an
exponential backoff, at most `max_retries` times, then counted; the host's other URLs wait as
long.

Resumability: a page's record, its URL marked done and the links it adds are one transaction,
so a kill at any moment loses nothing committed and fetches nothing committed again (only the
request in flight at the kill is repeated). Shards are written whole under a temporary name and
renamed; a kill between the rename and the transaction that empties the pending records
rewrites the same shard on restart.
"""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import json
import os
import signal
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .. import __version__
from ..errors import UserError
from ..fsutil import atomic_path, fsync_dir
from . import extract
from .net import HTML_TYPES, TEXT_TYPES, Fetcher, FetchError, Response
from .robots import ROBOTS_MAX_BYTES, ROBOTS_TTL, UA_TOKEN, parse_robots, robots_text
from .urls import normalize_url, origin, read_seeds, site

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
    "mostly_links",
    "private_address",
    "crawl_delay_too_long",
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


@dataclass
class CrawlOptions:
    max_pages: int = 1000
    """Stop after this many page requests (redirect hops and retries counted, robots.txt not),
    over all runs on one DIR."""
    delay: float = 1.0
    """Least seconds between the end of one response and the next request to the same server;
    robots.txt may ask for more (crawl-delay, request-rate) and then wins."""
    same_site: bool = False
    """Follow links only to the seeds' sites (host without a leading www.)."""
    depth: int = 2
    """Follow links this many steps from a seed (0: fetch the seeds only)."""
    timeout: float = 20.0
    """Seconds for one response, wall clock: connecting, headers and body together."""
    max_bytes: int = 5_000_000
    """Largest page read, compressed and decompressed."""
    max_redirects: int = 5
    contact: str | None = None
    """An e-mail or URL for site owners, sent in the User-Agent."""
    shard_pages: int = 1000
    """Records per output shard."""
    progress: bool = True
    allow_private: bool = False
    """Also fetch from private, loopback and link-local addresses (a crawl of one's own
    network); off, such hosts are skipped, redirects to them too."""
    max_crawl_delay: float = 300.0
    """A host whose robots.txt asks for a longer crawl delay, or a 429/503 whose Retry-After is
    longer, is skipped and counted."""
    retry_base: float = 30.0
    """First wait after a 429/503 without Retry-After or an unreachable robots.txt; doubles per
    try."""
    max_retries: int = 4
    """Tries after the first, for a 429/503 page or an unreachable robots.txt."""
    max_links: int = extract.MAX_LINKS
    """Links kept per page."""


@dataclass
class CrawlReport:
    fetched: int = 0
    """Page requests made (redirect hops and retries counted, robots.txt not)."""
    written: int = 0
    bytes: int = 0
    """Body bytes received (after decompression)."""
    errors: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    retried: Counter = field(default_factory=Counter)
    """Requests put back in the queue for later (429, 503, robots.txt unreachable)."""
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
        for title, c in (
            ("errors", self.errors),
            ("skipped", self.skipped),
            ("retried", self.retried),
        ):
            if c:
                lines.append(f"{title}: " + ", ".join(f"{k}={v:,}" for k, v in sorted(c.items())))
        return "\n".join(lines)


class _NotYet(Exception):
    """The step's first request would have to wait for its server's delay (known only now, from a
    robots.txt just read, or a server not asked before): the URL stays queued and the scheduler
    picks what may be asked sooner, rather than the step sleeping while other hosts could go."""


class _Later(Exception):
    """The URL's host cannot be asked now (robots.txt unreachable, 429/503): back in the queue."""

    def __init__(self, kind: str, at: float, host_wide: bool = True):
        super().__init__(kind)
        self.kind, self.at, self.host_wide = kind, at, host_wide


_SCHEMA = """
CREATE TABLE IF NOT EXISTS urls(
    id INTEGER PRIMARY KEY, url TEXT UNIQUE NOT NULL, depth INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0, outcome TEXT);
CREATE TABLE IF NOT EXISTS hosts(
    origin TEXT PRIMARY KEY, robots TEXT, last_start REAL DEFAULT 0, last_end REAL DEFAULT 0);
CREATE TABLE IF NOT EXISTS servers(
    addr TEXT PRIMARY KEY, last_start REAL DEFAULT 0, last_end REAL DEFAULT 0);
CREATE TABLE IF NOT EXISTS texts(sha256 TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS pending(id INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, n INTEGER NOT NULL);
"""
# Columns added since the first state format; a crawl folder of that format is upgraded in place.
_COLUMNS = {
    "urls": (
        ("host", "TEXT"),
        ("not_before", "REAL NOT NULL DEFAULT 0"),
        ("tries", "INTEGER NOT NULL DEFAULT 0"),
    ),
    "hosts": (
        ("robots_fetched_at", "REAL"),
        ("robots_tries", "INTEGER NOT NULL DEFAULT 0"),
        ("robots_retry_at", "REAL NOT NULL DEFAULT 0"),
    ),
}


def _fault(point: str) -> None:
    """Test hook: AZGPT_FAULT_CRAWL=<point> kills this process with SIGKILL at that point."""
    if os.environ.get("AZGPT_FAULT_CRAWL") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date); None if absent or
    unreadable."""
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return float(v)
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


class Crawler:
    def __init__(self, out: str | Path, opts: CrawlOptions):
        self.out = Path(out)
        self.opts = opts
        self.ua = user_agent(opts.contact)
        self.db = self._open_db()
        self.net = Fetcher(self.ua, opts.timeout, opts.allow_private)
        self.robots: dict[str, tuple[float, object]] = {}  # origin -> (fetched_at, rules)
        self.addrs: dict[str, str] = {}  # origin -> the server of its last request
        self.server_delay: dict[str, float] = {}  # server -> the longest delay asked for it
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
            for table, cols in _COLUMNS.items():
                have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                for name, decl in cols:
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            rows = db.execute("SELECT id, url FROM urls WHERE host IS NULL").fetchall()
            if rows:
                with db:
                    db.execute("BEGIN")
                    db.executemany(
                        "UPDATE urls SET host=? WHERE id=?", [(origin(u), i) for i, u in rows]
                    )
            db.execute("CREATE INDEX IF NOT EXISTS urls_queue ON urls(done, host, id)")
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
            elif name.startswith("retry:"):
                r.retried[name[6:]] = n
            elif name in ("fetched", "written", "bytes", "shards"):
                setattr(r, name, n)
        r.queued = self.db.execute("SELECT count(*) FROM urls WHERE done=0").fetchone()[0]
        return r

    def _enqueue(self, url: str, depth: int) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO urls(url, depth, host) VALUES(?, ?, ?)",
            (url, depth, origin(url)),
        )

    def add_seeds(self, seeds: list[str]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            for u in seeds:
                self._enqueue(u, 0)
        self.sites = {site(u) for (u,) in self.db.execute("SELECT url FROM urls WHERE depth=0")}

    # ------------------------------------------------------------------ politeness

    def _host_delay(self, org: str) -> float:
        d = self.opts.delay
        cached = self.robots.get(org)
        if cached is not None:
            rp = cached[1]
            cd = rp.crawl_delay(UA_TOKEN)
            if cd:
                d = max(d, float(cd))
            rr = rp.request_rate(UA_TOKEN)
            if rr and rr.requests:
                d = max(d, rr.seconds / rr.requests)
        return d

    def _server_ready(self, addr: str, delay: float) -> float:
        row = self.db.execute(
            "SELECT last_start, last_end FROM servers WHERE addr=?", (addr,)
        ).fetchone()
        return max(row) + delay if row else 0.0

    def _wait_for(self, addr: str, delay: float) -> None:
        ready = self._server_ready(addr, delay)
        while (left := ready - time.time()) > 0:
            time.sleep(min(left, 1.0))

    def _robots_for(self, url: str):
        """The parsed robots.txt of the URL's origin: kept in the state, fetched again after 24
        hours. Raises _Later while it cannot be fetched (5xx, no answer), FetchError once that
        has lasted `max_retries` tries."""
        org = origin(url)
        now = time.time()
        cached = self.robots.get(org)
        if cached is not None and now - cached[0] < ROBOTS_TTL:
            return cached[1]
        row = self.db.execute(
            "SELECT robots, robots_fetched_at, robots_tries, robots_retry_at FROM hosts "
            "WHERE origin=?",
            (org,),
        ).fetchone()
        if row is not None and row[0] is not None and now - (row[1] or 0) < ROBOTS_TTL:
            self.robots[org] = (row[1], parse_robots(row[0]))
            return self.robots[org][1]
        tries = row[2] if row is not None else 0
        if tries > self.opts.max_retries:
            raise FetchError("robots_unreachable")
        if row is not None and row[3] > now:
            raise _Later("robots_unavailable", row[3])
        status, body = self._get_robots(org)
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT OR IGNORE INTO hosts(origin) VALUES(?)", (org,))
            if 200 <= status < 300 or 400 <= status < 500:
                # RFC 9309 2.3.1.3: a 4xx robots.txt means no rules.
                text = robots_text(body) if status < 300 else ""
                self.db.execute(
                    "UPDATE hosts SET robots=?, robots_fetched_at=?, robots_tries=0, "
                    "robots_retry_at=0 WHERE origin=?",
                    (text, now, org),
                )
            else:
                # RFC 9309 2.3.1.4: a server error or no answer: all disallowed while it lasts.
                tries += 1
                # The backoff counts from the failed answer, not from when it was asked for.
                wait = min(self.opts.retry_base * 2 ** (tries - 1), self.opts.max_crawl_delay)
                at = time.time() + wait
                self.db.execute(
                    "UPDATE hosts SET robots=NULL, robots_tries=?, robots_retry_at=? "
                    "WHERE origin=?",
                    (tries, at, org),
                )
        if not (200 <= status < 300 or 400 <= status < 500):
            if tries > self.opts.max_retries:
                raise FetchError("robots_unreachable")
            raise _Later("robots_unavailable", at)
        self.robots[org] = (now, parse_robots(text))
        return self.robots[org][1]

    def _get_robots(self, org: str) -> tuple[int, bytes]:
        """(status, body) of the origin's robots.txt; redirects followed (RFC 9309: at least
        five), also to another origin (http -> https is common); 0 when there is no answer."""
        url = org + "/robots.txt"
        for hop in range(self.opts.max_redirects + 1):
            try:
                resp = self._request(
                    url, ROBOTS_MAX_BYTES, robots=True, may_defer=hop == 0 and self.requests == 0
                )
            except FetchError as e:
                if e.kind in ("private_address", "bad_url"):
                    raise
                return 0, b""
            if resp.status not in (301, 302, 303, 307, 308):
                return resp.status, resp.body
            url = normalize_url(resp.location or "", url)
            if url is None:
                return 0, b""
        return 0, b""

    def allowed(self, url: str) -> bool:
        return self._robots_for(url).can_fetch(url, UA_TOKEN)

    # ------------------------------------------------------------------ HTTP

    def _request(
        self, url: str, cap: int, robots: bool = False, may_defer: bool = False
    ) -> Response:
        """One GET, after the server's delay; the body is read only for a 2xx text answer (any
        2xx answer for robots.txt, cut at `cap`). With `may_defer` (no page of the step asked
        yet), a server that is not ready raises _NotYet instead of sleeping; later hops of a
        redirect chain wait here, since starting the chain again would never get further."""
        org = origin(url)
        # The server is the address and port connected to: virtual hosts on one server share
        # its delay, as do 127.0.0.1, 127.1 and localhost.
        addr = self.net.address(url)  # FetchError for private addresses, before any wait
        self.addrs[org] = addr
        delay = self.opts.delay if robots else self._host_delay(org)
        if delay > self.opts.max_crawl_delay:
            raise FetchError("crawl_delay_too_long")
        # The longest delay any of the server's hosts asks for holds for all of them, and for
        # the robots.txt of a host not seen before.
        delay = self.server_delay[addr] = max(delay, self.server_delay.get(addr, 0.0))
        if may_defer and self._server_ready(addr, delay) > time.time():
            raise _NotYet()
        if not robots:
            self.requests += 1
        self._wait_for(addr, delay)
        self.db.execute("INSERT OR IGNORE INTO servers(addr) VALUES(?)", (addr,))
        self.db.execute("UPDATE servers SET last_start=? WHERE addr=?", (time.time(), addr))

        def want_body(r: Response) -> bool:
            if not 200 <= r.status < 300:
                return False
            if not robots and r.content_type not in HTML_TYPES + TEXT_TYPES:
                raise FetchError("not_text")
            return True

        try:
            return self.net.get(url, addr, cap, want_body, truncate=robots)
        finally:
            self.db.execute("UPDATE servers SET last_end=? WHERE addr=?", (time.time(), addr))

    def fetch(self, url: str) -> tuple[Response, list[str]]:
        """GET with redirects followed by hand (each hop checked against robots.txt, the site
        limit and the address rule, loops caught). Returns the final response and the chain."""
        chain = [url]
        cur = url
        for _ in range(self.opts.max_redirects + 1):
            if self.opts.same_site and site(cur) not in self.sites:
                raise FetchError("offsite")
            if not self.allowed(cur):
                raise FetchError("robots_disallowed")
            resp = self._request(cur, self.opts.max_bytes, may_defer=self.requests == 0)
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

    def _retry(self, uid: int, resp: Response) -> None:
        """A 429/503: _Later with its Retry-After or the backoff, or FetchError when the tries
        are used up or the server asks for longer than max_crawl_delay."""
        tries = self.db.execute("SELECT tries FROM urls WHERE id=?", (uid,)).fetchone()[0] + 1
        now = time.time()
        asked = retry_after_seconds(resp.retry_after, now)
        if asked is not None and asked > self.opts.max_crawl_delay:
            raise FetchError("retry_after_too_long")
        if tries > self.opts.max_retries:
            raise FetchError(f"http_{resp.status}")
        wait = max(asked or 0.0, self.opts.retry_base * 2 ** (tries - 1))
        raise _Later(f"http_{resp.status}", now + min(wait, self.opts.max_crawl_delay))

    # ------------------------------------------------------------------ pages

    def parse(self, resp: Response):
        return extract.parse(resp, self.opts.max_links)

    def step(self, uid: int, url: str, depth: int) -> None:
        """Fetch one queued URL and commit everything it produced in one transaction."""
        chain = [url]
        record = None
        links: list[str] = []
        nbytes = 0
        later = None
        self.requests = 0
        try:
            resp, chain = self.fetch(url)
            if resp.status in (429, 503):
                self._retry(uid, resp)
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
        except _Later as e:
            kind, later = None, e
        except _NotYet:
            return  # nothing asked: the URL waits in the queue for its server's turn
        sha = None
        if record is not None:
            sha = hashlib.sha256(record["text"].encode("utf-8")).hexdigest()
            if self.db.execute("SELECT 1 FROM texts WHERE sha256=?", (sha,)).fetchone():
                record, kind = None, "duplicate_text"
        with self.db:
            self.db.execute("BEGIN")
            if self.requests:
                self._count("fetched", self.requests)
            if later is not None:
                # Back in the queue; the host's other URLs wait as long (the server is busy, or
                # robots.txt cannot be read, which means all is disallowed until it can).
                self._count("retry:" + later.kind)
                self.db.execute("UPDATE urls SET tries=tries+1 WHERE id=?", (uid,))
                self.db.execute(
                    "UPDATE urls SET not_before=max(not_before, ?) WHERE host=? AND done=0",
                    (later.at, origin(url)),
                )
                return
            for u in chain:
                self._enqueue(u, depth)
                self.db.execute("UPDATE urls SET done=1, outcome=? WHERE url=?", (kind or "ok", u))
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
                    self._enqueue(link, depth + 1)
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

    def next_url(self) -> tuple[int, str, int] | float | None:
        """The oldest queued URL of the host that may be asked soonest (one row per host, so a
        slow host never holds up the others); the time until one may be asked, when none may
        be asked now (every queued URL waits for a retry, or every host for its delay); None
        when the queue is empty."""
        now = time.time()
        rows = self.db.execute(
            "SELECT host, min(id) FROM urls WHERE done=0 AND not_before <= ? GROUP BY host",
            (now,),
        ).fetchall()
        if not rows:
            row = self.db.execute("SELECT min(not_before) FROM urls WHERE done=0").fetchone()
            return None if row[0] is None else row[0]
        best, best_ready = None, float("inf")
        for host, uid in rows:
            addr = self.addrs.get(host)
            host_delay = self._host_delay(host)
            if addr and host_delay <= self.opts.max_crawl_delay:
                delay = max(host_delay, self.server_delay.get(addr, 0.0))
                ready = self._server_ready(addr, delay)
            else:
                ready = 0.0  # not asked yet, or skipped at once (crawl_delay_too_long)
            if ready < best_ready or (ready == best_ready and uid < best[0]):
                best, best_ready = (uid, host), ready
        if best_ready > now:
            return best_ready
        uid = best[0]
        return self.db.execute("SELECT id, url, depth FROM urls WHERE id=?", (uid,)).fetchone()

    def close(self) -> None:
        self.net.close()
        self.db.close()


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
        ("--max-crawl-delay", opts.max_crawl_delay, 0.0),
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
            if isinstance(job, float):  # every queued URL waits for a retry or for its delay
                time.sleep(min(max(job - time.time(), 0.0), 1.0))
                continue
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
