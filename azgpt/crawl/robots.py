"""robots.txt (RFC 9309) and the page-level directives (`<meta name="robots">`, X-Robots-Tag).

What azgpt does with robots.txt, by the RFC's sections:
- 2.2.1: a group applies to azgpt when its user-agent's product token equals `azgpt`,
  case-insensitively (`User-agent: AzGPT/2.0` names azgpt: the version is dropped before
  matching); `az`, `azg` or `azgpt-news` do not. The `*` group applies only when no group names
  azgpt. Protego parses the file; the group is chosen here (Protego's own matching also takes a
  group whose name is a prefix of the crawler's, such as `az`).
- 2.3.1.2-4: 2xx: the rules; 4xx: no rules; 5xx or no answer: everything is disallowed while it
  lasts; the crawler asks again with backoff (crawler.py), its URLs stay queued.
- 2.4: a robots.txt is kept at most 24 hours, then fetched again.
- 2.5: the first 500 KiB are parsed; the rest is ignored (not a reason to disallow the host).
- A UTF-8 byte order mark at the start is not part of the first line.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

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


class Robots:
    """The rules of one robots.txt, asked for by product token."""

    def __init__(self, text: str):
        from protego import Protego

        self._parsed = Protego.parse(text)

    def _group(self, token: str):
        # Protego keeps one rule set per user-agent name, lower case (groups naming the same
        # crawler merged, as RFC 9309 2.2.1 asks); the names are product tokens already
        # (robots_text cuts the version).
        groups = self._parsed._user_agents
        rules = groups.get(token.lower())
        return rules if rules is not None else groups.get("*")

    def can_fetch(self, url: str, token: str = UA_TOKEN) -> bool:
        if urlsplit(url).path == "/robots.txt":
            return True
        rules = self._group(token)
        return True if rules is None else rules.can_fetch(url)

    def crawl_delay(self, token: str = UA_TOKEN) -> float | None:
        rules = self._group(token)
        return None if rules is None else rules.crawl_delay

    def request_rate(self, token: str = UA_TOKEN):
        rules = self._group(token)
        return None if rules is None else rules.request_rate


def parse_robots(text: str) -> Robots:
    return Robots(text)


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
