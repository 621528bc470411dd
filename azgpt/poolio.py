"""Replies of pool workers through files, for `clean` (and any pool whose replies are large).

A worker of a ProcessPoolExecutor sends its reply through a pipe. A reply larger than the
pipe's atomic size (PIPE_BUF, 4 KB on Linux) is written in several pieces; a worker killed
between two pieces (the out-of-memory killer, a user) leaves the pool's reader waiting for
the rest forever, and the run hangs instead of failing. Here the worker pickles its reply into
a file in a spool folder and sends only the file's name, which is written whole or not at all;
the parent reads the file back and deletes it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def call_spooled(task: tuple[Callable, object, str]) -> str:
    """In the worker: run fn(arg), pickle the result into the spool folder, return its path."""
    fn, arg, spool = task
    result = fn(arg)
    fd, path = tempfile.mkstemp(suffix=".pkl", dir=spool)
    with os.fdopen(fd, "wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def unspool(path: str):
    """In the parent: the result a worker spooled (its file removed)."""
    p = Path(path)
    with open(p, "rb") as f:
        result = pickle.load(f)
    p.unlink()
    return result


class Spool:
    """A private temporary folder for the replies, removed with everything in it on exit."""

    def __init__(self, prefix: str = "azgpt-spool-"):
        self.path = tempfile.mkdtemp(prefix=prefix)

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
