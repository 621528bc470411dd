"""`azgpt crawl`: polite, resumable fetching of web pages into gzipped JSONL shards.

crawler.py: the queue, politeness, retries, state and shards; robots.py: robots.txt (RFC 9309)
and page directives; net.py: one bounded HTTP GET and the address rule; extract.py: character
set, main text, links; urls.py: URL normalisation and seeds. docs/gathering.md has the table of
what the crawler promises.
"""

from .crawler import Crawler, CrawlOptions, CrawlReport, need_crawl_libs, run_crawl, user_agent
from .net import FetchError
from .urls import normalize_url, origin, read_seeds, site

__all__ = [
    "CrawlOptions",
    "CrawlReport",
    "Crawler",
    "FetchError",
    "need_crawl_libs",
    "normalize_url",
    "origin",
    "read_seeds",
    "run_crawl",
    "site",
    "user_agent",
]
