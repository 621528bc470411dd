"""robots.txt (RFC 9309) and the page-level directives (`<meta name="robots">`, X-Robots-Tag).

What azgpt does with robots.txt, by the RFC's sections:
- 2.2.1: groups are matched by product token, case-insensitively: `User-agent: azgpt/0.1`
  names azgpt (the version is dropped before matching).
- 2.3.1.2-4: 2xx: the rules; 4xx: no rules; 5xx or no answer: everything is disallowed while it
  lasts; the crawler asks again with backoff (crawler.py), its URLs stay queued.
- 2.4: a robots.txt is kept at most 24 hours, then fetched again.
- 2.5: the first 500 KiB are parsed; the rest is ignored (not a reason to disallow the host).
- A UTF-8 byte order mark at the start is not part of the first line.
"""

from __future__ import annotations

import re

UA_TOKEN = "azgpt"
ROBOTS_MAX_BYTES = 500 * 1024
ROBOTS_TTL = 24 * 3600.0

_UA_LINE = re.compile(r"(?im)^([ \t]*user-agent[ \t]*:[ \t]*)([^\s/#]+)[^\n#]*")
# Directives whose values follow a colon; any other "word:" before the directives names a
# crawler the directives are for ("googlebot: noindex").
_VALUED = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
_SCOPE = re.compile(r"^\s*([A-Za-z][\w.-]*)\s*:(.*)$", re.S)


def robots_text(body: bytes) -> str:
    """The part of a robots.txt body azgpt parses: the first 500 KiB, decoded as UTF-8, without
    a byte order mark, user-agent lines cut to their product token."""
    text = body[:ROBOTS_MAX_BYTES].decode("utf-8", errors="replace").lstrip("\ufeff")
    return _UA_LINE.sub(lambda m: m.group(1) + m.group(2), text)


def parse_robots(text: str):
    from protego import Protego

    return Protego.parse(text)


def directives(values: list[str], token: str = UA_TOKEN) -> set[str]:
    """Directives of X-Robots-Tag headers or robots meta tags, lower case: comma-separated
    words, where `none` means noindex and nofollow; a value scoped to another crawler's name is
    ignored."""
    out: set[str] = set()
    for v in values:
        m = _SCOPE.match(v)
        if m and m.group(1).lower() not in _VALUED:
            if m.group(1).lower() != token:
                continue
            v = m.group(2)
        for d in v.split(","):
            name = d.split(":", 1)[0].strip().lower()
            if name:
                out.add(name)
    if "none" in out:
        out |= {"noindex", "nofollow"}
    return out
