"""What every connection and request of `azgpt serve` passes before a route runs.

`Gate`: the Host check (loopback names and the bound address: a DNS-rebinding page cannot
reach the server), the Origin check (the server's own origin and `--origins`: another web
page cannot drive it) and `Content-Type: application/json` on POST (a cross-site form or
`text/plain` POST is refused).

`ConnectionGuard`, below HTTP: uvicorn's h11 protocol with deadlines and a
cap on open connections.

uvicorn bounds neither how long a client may take to send its headers or body nor how many
connections may sit idle: about 20,000 idle connections locked every client out of an
unguarded server. Here a connection waiting for a request (headers not complete, or idle
between requests) is closed after `header_timeout` seconds; one sending a body after
`body_timeout`. At `max_connections`, a new connection closes the one that has waited longest
without a request in flight, so a flood of slow connections cannot keep a health probe or a
real client out; when every connection is busy, the new one gets 503.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Sequence

import h11
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from .schemas import error_body

_BUSY_BODY = b'{"error": "the server has too many open connections; retry in a moment."}'
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


def _waiting(p: H11Protocol) -> bool:
    """No request in flight: the client has yet to finish sending headers (or is idle)."""
    return p.conn.their_state is h11.IDLE and p.conn.our_state is h11.IDLE


class ConnectionGuard:
    def __init__(self, max_connections=256, header_timeout=10.0, body_timeout=30.0):
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.conns: dict[H11Protocol, list] = {}  # protocol -> [state, since]
        self.closed_slow = 0
        self.evicted = 0
        self._sweeper: asyncio.Task | None = None

    def protocol(self) -> type[H11Protocol]:
        guard = self

        class GuardedH11Protocol(H11Protocol):
            def connection_made(self, transport):
                super().connection_made(transport)
                guard.opened(self)

            def connection_lost(self, exc):
                guard.conns.pop(self, None)
                super().connection_lost(exc)

        return GuardedH11Protocol

    def _state(self, p: H11Protocol):
        return (p.conn.their_state, p.conn.our_state)

    def opened(self, p: H11Protocol) -> None:
        now = time.monotonic()
        if len(self.conns) >= self.max_connections:
            idle = [(rec[1], q) for q, rec in self.conns.items() if _waiting(q)]
            if idle:
                _, oldest = min(idle, key=lambda t: t[0])
                self.conns.pop(oldest, None)
                oldest.transport.close()
                self.evicted += 1
            else:
                p.transport.write(BUSY)
                p.transport.close()
                return
        self.conns[p] = [self._state(p), now]
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = p.loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        step = max(0.05, min(self.header_timeout, self.body_timeout) / 4)
        while self.conns:
            await asyncio.sleep(step)
            now = time.monotonic()
            for p, rec in list(self.conns.items()):
                st = self._state(p)
                if st != rec[0]:
                    rec[0], rec[1] = st, now
                    continue
                if _waiting(p):
                    limit = self.header_timeout
                elif p.conn.their_state is h11.SEND_BODY:
                    limit = self.body_timeout
                else:
                    continue  # a request being answered: generation may take long
                if now - rec[1] > limit:
                    self.conns.pop(p, None)
                    self.closed_slow += 1
                    p.transport.close()


WILDCARDS = {"0.0.0.0", "::", ""}


def _split_host(value: str) -> str:
    if value.startswith("["):  # [::1]:8000
        return value[1:].split("]", 1)[0].lower()
    return (value.rsplit(":", 1)[0] if value.count(":") == 1 else value).lower().rstrip(".")


class Gate:
    """ASGI middleware: the Host, Origin and Content-Type checks, before any route runs."""

    def __init__(self, app, *, bound: str, origins: Sequence[str] = ()):
        self.app = app
        self.bound = bound.strip("[]").lower()
        self.origins = {o.rstrip("/").lower() for o in origins}
        self.hosts = {_split_host(o.split("://", 1)[-1]) for o in self.origins if o != "*"}
        if self.bound in WILDCARDS:
            self.hosts |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        else:
            self.hosts.add(self.bound)

    def host_ok(self, host: str) -> bool:
        h = _split_host(host)
        if h == "localhost" or h.endswith(".localhost") or h in self.hosts:
            return True
        try:
            ip = ipaddress.ip_address(h)
        except ValueError:
            return False  # a name: only the ones above (a rebinding name resolves anywhere)
        return ip.is_loopback or self.bound in WILDCARDS

    def refuse(self, scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "")
        if host and not self.host_ok(host):
            return 403, (
                f"Host '{host}' is not an address of this server; use the address azgpt serve "
                "listens on (names other than localhost are refused against DNS rebinding)."
            )
        origin = headers.get("origin")
        if origin is not None:
            o = origin.rstrip("/").lower()
            same = host and o == f"{scope.get('scheme', 'http')}://{host}".lower()
            if not (same or o in self.origins or "*" in self.origins):
                return 403, (
                    f"requests from the web page {origin} are refused; start azgpt serve with "
                    f"--origins {origin} to allow that page."
                )
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return 415, (
                    "send the request body as JSON with the header 'Content-Type: "
                    f"application/json' (got '{ctype or 'none'}')."
                )
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            bad = self.refuse(scope, headers)
            if bad:
                status, msg = bad
                await JSONResponse(error_body(scope["path"], status, msg), status)(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)
