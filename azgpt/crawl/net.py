"""One HTTP GET, bounded: which addresses may be reached, a wall-clock deadline over connect,
headers and body, a size cap checked against Content-Length, while reading and while
decompressing.

The deadline: urllib3's read timeout bounds each wait for bytes, not the response, so a server
that drips one header byte at a time never trips it. A timer shuts the request's socket down
at the deadline instead, wherever the client is blocked (headers or body).

Addresses: the host is resolved once per request, every address is checked (private, loopback,
link-local, reserved and multicast ones are refused unless allowed) and the connection is made
to the address that was checked, so a DNS answer that changes between the check and the connect
cannot lead the crawler to 169.254.169.254. Redirect hops are requests too and pass the same
check.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

HTML_TYPES = ("text/html", "application/xhtml+xml")
TEXT_TYPES = ("text/plain",)

_local = threading.local()  # the request in flight: its pinned address and its deadline


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
    robots_tag: list[str] = field(default_factory=list)
    retry_after: str | None = None


def is_public(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int) -> list[str]:
    """The host's addresses (IPv4 first), or FetchError('dns')."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        raise FetchError("dns") from None
    addrs = sorted({i[4][0] for i in infos}, key=lambda a: (":" in a, a))
    if not addrs:
        raise FetchError("dns")
    return addrs


class _Deadline:
    """Shuts down the socket of the request in flight when the deadline passes."""

    def __init__(self, at: float):
        self.at = at
        self.sock: socket.socket | None = None
        self.fired = False
        self.timer = threading.Timer(max(0.0, at - time.monotonic()), self._fire)
        self.timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def watch(self, sock) -> None:
        self.sock = sock
        if self.fired:
            self._fire()


def _pinned_classes():
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
    from urllib3.util.connection import create_connection

    class Pinned:
        def _new_conn(self):
            addr = getattr(_local, "addr", None)
            if addr is None:
                sock = super()._new_conn()
            else:
                # Connect to the address that was checked; the Host header and TLS's server
                # name stay the host's.
                try:
                    sock = create_connection(
                        (addr, self.port),
                        self.timeout,
                        source_address=self.source_address,
                        socket_options=self.socket_options,
                    )
                except TimeoutError as e:
                    raise ConnectTimeoutError(self, f"connecting to {addr} timed out") from e
                except OSError as e:
                    raise NewConnectionError(self, f"cannot connect to {addr}: {e}") from e
            d = getattr(_local, "deadline", None)
            if d is not None:
                d.watch(sock)
            return sock

        def getresponse(self, *a, **kw):
            d = getattr(_local, "deadline", None)
            if d is not None and self.sock is not None:
                d.watch(self.sock)
            return super().getresponse(*a, **kw)

    class PinnedHTTP(Pinned, HTTPConnection):
        pass

    class PinnedHTTPS(Pinned, HTTPSConnection):
        pass

    class HTTPPool(HTTPConnectionPool):
        ConnectionCls = PinnedHTTP

    class HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = PinnedHTTPS

    return {"http": HTTPPool, "https": HTTPSPool}


class Fetcher:
    def __init__(self, user_agent: str, timeout: float, allow_private: bool):
        import urllib3

        self.timeout = timeout
        self.allow_private = allow_private
        # One connection per request (no keep-alive): each request is checked and pinned to
        # its address on its own; pages to one server are seconds apart anyway.
        self.http = urllib3.PoolManager(
            retries=False,
            maxsize=1,
            headers={
                "User-Agent": user_agent,
                "Accept": "text/html,application/xhtml+xml,text/plain;q=0.9,*/*;q=0.1",
                "Accept-Encoding": "gzip, deflate",
                "Connection": "close",
            },
        )
        self.http.pool_classes_by_scheme = _pinned_classes()

    def address(self, url: str) -> str:
        """The server (address:port) a request for `url` connects to; FetchError
        ('private_address') for a host that resolves to a non-public address when those are not
        allowed."""
        p = urlsplit(url)
        try:
            port = p.port or (443 if p.scheme == "https" else 80)
        except ValueError:
            raise FetchError("bad_url") from None
        addrs = resolve(p.hostname or "", port)
        if not self.allow_private and not all(is_public(a) for a in addrs):
            raise FetchError("private_address")
        return f"[{addrs[0]}]:{port}" if ":" in addrs[0] else f"{addrs[0]}:{port}"

    def get(self, url: str, server: str, cap: int, want_body, truncate: bool = False) -> Response:
        """GET `url` from `server` (address:port, from `address`); the body is read when
        `want_body(response)` says so (2xx text), within `cap` bytes (with `truncate`, the first
        `cap` bytes) and the deadline."""
        import urllib3

        start = time.monotonic()
        deadline = _Deadline(start + self.timeout)
        _local.addr, _local.deadline = server.rsplit(":", 1)[0].strip("[]"), deadline
        deadline.timer.start()
        try:
            resp = self.http.request(
                "GET",
                url,
                preload_content=False,
                decode_content=False,
                redirect=False,
                timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout),
            )
            try:
                if deadline.fired:  # headers cut off at the deadline read as a short answer
                    raise FetchError("timeout")
                r = self._head(url, resp)
                if want_body(r):
                    length = resp.headers.get("Content-Length", "")
                    if length.isdigit() and int(length) > cap and not truncate:
                        raise FetchError("too_large")
                    r.body = self._body(resp, cap, deadline, truncate)
                return r
            finally:
                resp.close()
        except FetchError:
            raise
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as e:
            if deadline.fired or isinstance(e, urllib3.exceptions.TimeoutError):
                raise FetchError("timeout") from None
            raise FetchError("connection") from None
        except ValueError:  # a URL urllib3 cannot use (bad port, host that is not IDNA)
            raise FetchError("bad_url") from None
        finally:
            deadline.timer.cancel()
            _local.addr = _local.deadline = None

    @staticmethod
    def _head(url: str, resp) -> Response:
        ctype = resp.headers.get("Content-Type", "")
        mime = ctype.split(";")[0].strip().lower()
        charset = None
        for part in ctype.split(";")[1:]:
            k, _, v = part.partition("=")
            if k.strip().lower() == "charset":
                charset = v.strip().strip("\"'") or None
        return Response(
            url,
            resp.status,
            mime,
            charset,
            location=resp.headers.get("Location"),
            robots_tag=resp.headers.getlist("X-Robots-Tag"),
            retry_after=resp.headers.get("Retry-After"),
        )

    @staticmethod
    def _body(resp, cap: int, deadline: _Deadline, truncate: bool = False) -> bytes:
        enc = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if enc in ("gzip", "x-gzip"):
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
            if deadline.fired or time.monotonic() > deadline.at:
                raise FetchError("timeout")
            chunk = resp.read1(65536)
            if not chunk:
                if deadline.fired:
                    raise FetchError("timeout")
                break
            raw += len(chunk)
            if raw > cap and truncate and dec is None:
                parts.append(chunk[: len(chunk) - (raw - cap)])
                break
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
        return b"".join(parts)

    def close(self) -> None:
        self.http.clear()
