"""File-system helpers every output goes through: atomic writes under unpredictable names, no
following of links on write, special files (devices, pipes) written in place instead of renamed
over, folder syncs, and one sha256."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def check_writable(path: str | Path, option: str) -> None:
    """Fail early, before any work, when `path` cannot be created (a parent is a file, say)."""
    p = Path(path).absolute()
    if p.is_dir() and not p.is_symlink():
        raise UserError(f"cannot write {path}: it is a folder; give a file name for {option}.")
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


def is_special(path: str | Path) -> bool:
    """A device, pipe or socket (e.g. /dev/null): written in place, never renamed over."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


@contextmanager
def atomic_path(final: str | Path, suffix: str = ""):
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    A crash or an exception leaves `final` untouched (old content or absent) and removes the
    temporary file, so no half-written output is ever found under the final name. The temporary
    name is unpredictable and created exclusively (mkstemp), so a planted link is never followed.
    An existing special file (`--out /dev/null`) is written in place: replacing a device node
    with a regular file would break the system for everyone.
    """
    final = Path(final)
    if is_special(final):
        yield final
        return
    if final.is_dir() and not final.is_symlink():
        raise UserError(f"cannot write {final}: it is a folder; give a file name instead.")
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
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_no_follow(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """os.open that refuses to follow a symbolic link at `path` (O_NOFOLLOW)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if Path(path).is_symlink():
            raise UserError(
                f"{path} is a symbolic link; azgpt does not write through links. Remove it and rerun."
            ) from None
        raise UserError(f"cannot open {path} ({e.strerror}).") from None


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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in 1 MB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a library reports it as its own error type (safetensors)."""
    import errno

    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)
