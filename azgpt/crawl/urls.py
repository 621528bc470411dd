"""URLs: normalising (one spelling per page), origins, sites, and the seed file."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

from ..errors import UserError


def normalize_url(url: str, base: str | None = None) -> str | None:
    """Absolute http(s) URL with lower-case scheme and host, no default port, sorted query without
    tracking parameters, no fragment; None for anything else (mailto:, javascript:, garbage, a
    port that is not a number from 0 to 65535)."""
    from courlan import normalize_url as courlan_normalize

    try:
        if base is not None:
            url = urljoin(base, url.strip())
        url = urldefrag(url.strip())[0]
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            return None
        _ = parts.port  # ValueError for a port out of range or not a number
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
            raise UserError(
                f"{p} line {i}: {s!r} is not a valid http(s) URL; fix or remove that line."
            )
        if u not in seeds:
            seeds.append(u)
    if not seeds:
        raise UserError(f"URL file {p} holds no URLs; put one http(s) URL per line.")
    return seeds
