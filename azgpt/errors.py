"""The one exception type users see: bad input or usage, reported as one sentence, exit code 2."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """Bad input or usage. The message is one sentence naming the file or option and the fix."""

    exit_code = 2


def check_writable(path: str | Path, option: str) -> None:
    """Fail early, before any work, when `path` cannot be created (a parent is a file, say)."""
    p = Path(path).absolute()
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(
                    f"cannot write {path}: {parent} is a file, not a folder; choose another {option}."
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(
                    f"cannot write {path}: {parent} is not writable; choose another {option}."
                )
            return


@contextmanager
def atomic_path(final: str | Path, suffix: str = ""):
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    A crash or an exception leaves `final` untouched (old content or absent) and removes the
    temporary file, so no half-written output is ever found under the final name.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent
        )
    except OSError as e:
        raise UserError(
            f"cannot write {final} ({e.strerror}); choose an output location you can write to."
        ) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry (after a rename) so the rename survives a power loss."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def remove_if_left_empty(folder: Path):
    """On failure, remove `folder` if this block created it and left it empty."""
    created = not folder.exists()
    try:
        yield
    except BaseException:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
