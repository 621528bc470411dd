"""`azgpt prepare`: corpus -> token files (train.npy, val.npy) + manifest.json.

Documents are streamed from the corpus, encoded in parallel worker processes (tiktoken built
from our merges when it gives identical ids, else HF tokenizers), split into train and val by a
seeded hash of the document index, and appended to .npy files written under temporary names;
the manifest is written last, so token files without one are never taken as complete.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .corpus import continues, discover, iter_corpus, ordered_map, worker_context
from .data import MANIFEST, _chunked_max
from .errors import UserError
from .fsutil import (
    _umask,
    atomic_path,
    fsync_dir,
    is_disk_full,
    remove_if_left_empty,
    sha256_file,
)
from .poolio import Spool, call_spooled, unspool
from .tokenizer import (
    PIECE_CHARS,
    eot_id,
    load_tokenizer,
    nfc,
    pieces,
    tiktoken_encoding,
    tokenizer_path,
)

NPY_HEADER_BYTES = 128


# ----------------------------------------------------------------------------- npy streaming


def _npy_header(n: int) -> bytes:
    """A version-1.0 .npy header for a 1-D uint16 array of n items, padded to a fixed size so it
    can be rewritten in place once the final length is known."""
    d = "{'descr': '<u2', 'fortran_order': False, 'shape': (%d,), }" % n
    body_len = NPY_HEADER_BYTES - 10
    d = d.ljust(body_len - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", body_len) + d.encode("latin1")


class NpyWriter:
    """Append uint16 tokens to a .npy file of unknown final length (header patched on close)."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.f.write(_npy_header(0))
        self.n = 0

    def write(self, arr: np.ndarray) -> None:
        self.f.write(arr.astype("<u2", copy=False).tobytes())
        self.n += len(arr)

    def move_last(self, k: int, dst: NpyWriter) -> None:
        """Move the last k tokens to `dst` (one document to val), in bounded chunks."""
        self.f.flush()
        pos = NPY_HEADER_BYTES + 2 * (self.n - k)
        with open(self.path, "rb") as r:
            r.seek(pos)
            for left in range(2 * k, 0, -(1 << 24)):
                dst.write(np.frombuffer(r.read(min(left, 1 << 24)), dtype="<u2"))
        self.f.truncate(pos)
        self.f.seek(pos)
        self.n -= k

    def close(self) -> None:
        self.f.seek(0)
        self.f.write(_npy_header(self.n))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


# ----------------------------------------------------------------------------- prepare

_WORKER: dict = {}


def _init_worker(tok_path: str, backend: str, tok=None) -> None:
    """Set up this process's encoder; `tok` is the already loaded tokenizer when prepare
    encodes in its own process (worker processes load their own)."""
    _WORKER.clear()  # an in-process run must never reuse the encoder of an earlier one
    tok = tok if tok is not None else load_tokenizer(tok_path)
    _WORKER["eot"] = eot_id(tok)
    if backend == "tiktoken":
        _WORKER["enc"] = tiktoken_encoding(tok, tok_path)
    else:
        _WORKER["tok"] = tok


def _is_val(seed: int, idx: np.ndarray, frac: float) -> np.ndarray:
    """Seeded, stateless document-level split: a hash of (seed, document index) against frac."""
    mix = np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose (splitmix64)
        x = idx.astype(np.uint64) + mix
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < frac


def _encode_batch(
    job: tuple[list[int], list[str], list[bool], int, float],
) -> tuple[bytes, bytes, int, int, list[tuple[int, bool]]]:
    """Encode one batch of documents or parts of long documents -> (train bytes, val bytes,
    train documents ended, val documents ended, (tokens, ends a document) of each train item).
    Every part of a document shares its index, so its split; the end-of-text token follows only
    a document's last part, and a part that continues takes the newline that joins it."""
    doc_idx, docs, more, seed, frac = job
    ids = _encode_docs([nfc(d) + "\n" if m else nfc(d) for d, m in zip(docs, more)])
    eot = _WORKER["eot"]
    val_mask = _is_val(seed, np.asarray(doc_idx, dtype=np.int64), frac)
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    ended = {False: 0, True: 0}
    train_items: list[tuple[int, bool]] = []
    for seq, m, v in zip(ids, more, val_mask.tolist()):
        a = np.empty(len(seq) + (not m), dtype=np.uint16)
        a[: len(seq)] = seq
        if not m:
            a[-1] = eot
        parts[v].append(a)
        ended[v] += not m
        if not v:
            train_items.append((len(a), not m))
    cat = {k: (np.concatenate(v).tobytes() if v else b"") for k, v in parts.items()}
    return cat[False], cat[True], ended[False], ended[True], train_items


GROUP_CHARS = 1 << 20  # characters per encoder call: bounds memory whatever the documents' sizes


def _encode_docs(docs: list[str]) -> list[np.ndarray]:
    """Ids of each document, encoded as bounded pieces (identical ids, see tokenizer.pieces) in
    groups of about GROUP_CHARS characters, so one 30 MB document costs no more memory than many
    small ones."""
    # Each piece's ids become uint16 at once: a Python list of ints costs ~36 bytes per token.
    out: list[list[np.ndarray]] = [[] for _ in docs]
    group: list[tuple[int, str]] = []
    size = 0

    def flush():
        texts = [p for _, p in group]
        if "enc" in _WORKER:
            encoded = _WORKER["enc"].encode_ordinary_batch(texts, num_threads=1)
        else:
            encoded = [e.ids for e in _WORKER["tok"].encode_batch(texts, add_special_tokens=False)]
        for (j, _), ids in zip(group, encoded):
            out[j].append(np.asarray(ids, dtype=np.uint16))

    for j, d in enumerate(docs):
        for p in pieces(d):
            group.append((j, p))
            size += len(p)
            if size >= GROUP_CHARS:
                flush()
                group, size = [], 0
    if group:
        flush()
    empty = np.empty(0, dtype=np.uint16)
    return [np.concatenate(parts) if parts else empty for parts in out]


def choose_backend(tok, tok_path: Path, sample: list[str]) -> str:
    """tiktoken when it gives identical ids on `sample` (at most ~1 MB of it), else HF
    tokenizers."""
    enc = tiktoken_encoding(tok, tok_path)
    if enc is None:
        return "tokenizers"
    budget = GROUP_CHARS
    for d in sample:
        if budget <= 0:
            break
        limit = min(PIECE_CHARS, budget)
        if len(d) > limit:  # the first safe piece of the document's start only
            d = pieces(d[: 2 * limit], limit)[0]
        d = nfc(d)
        budget -= len(d)
        if enc.encode_ordinary(d) != tok.encode(d, add_special_tokens=False).ids:
            return "tokenizers"
    return "tiktoken"


def remove_stale_temps(out_dir: Path) -> None:
    """Remove temporary token files left by a prepare that was killed (its PID is gone); those
    of a prepare still running into the same folder are left alone."""
    for p in out_dir.glob(".*.npy.*.tmp"):
        parts = p.name.split(".")
        pid = int(parts[3]) if len(parts) > 4 and parts[3].isdigit() else None
        if pid is not None and pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # alive, another user's
        p.unlink(missing_ok=True)


@dataclass
class PrepareResult:
    manifest: dict
    seconds: float
    bytes_in: int


def run_prepare(
    inputs: list[str],
    tokenizer: str,
    out: str,
    *,
    val_fraction: float = 0.005,
    seed: int = 1234,
    text_field: str = "text",
    workers: int | None = None,
    backend: str = "auto",
    batch_bytes: int = 1 << 20,
) -> PrepareResult:
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}.")
    if backend not in ("auto", "tiktoken", "tokenizers"):
        raise UserError(f"--backend must be auto, tiktoken or tokenizers, got {backend!r}.")
    files = discover(inputs)
    tok_path = tokenizer_path(tokenizer)
    tok = load_tokenizer(tok_path)
    vocab = tok.get_vocab_size()
    if vocab > 65536:
        raise UserError(
            f"tokenizer {tok_path} has {vocab} ids, which do not fit uint16 token files; retrain it with --vocab-size 65536 or less."
        )
    out_dir = Path(out)
    with remove_if_left_empty(out_dir):
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            probe = out_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(
                f"cannot write to output folder {out_dir} ({e.strerror}); choose a writable --out."
            ) from None
        remove_stale_temps(out_dir)

        stats: Counter = Counter()
        workers = workers or (os.cpu_count() or 1)
        if backend == "auto":
            # The first documents, at most 200 and about GROUP_CHARS characters (the check reads
            # no more): parts of one huge document would otherwise pile up here.
            sample, size = [], 0
            for d in iter_corpus(files[:1], Counter(), text_field):
                sample.append(d)
                size += len(d)
                if len(sample) >= 200 or size >= GROUP_CHARS:
                    break
            backend = choose_backend(tok, tok_path, sample)

        t0 = time.perf_counter()
        # Unpredictable names, created exclusively (never through a planted link); the PID in
        # the name lets a later prepare remove what a killed one left, and only that.
        tmp = {}
        for s in ("train", "val"):
            fd, name = tempfile.mkstemp(
                prefix=f".{s}.npy.{os.getpid()}.", suffix=".tmp", dir=out_dir
            )
            os.close(fd)
            os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask
            tmp[s] = Path(name)
        writers = {s: NpyWriter(p) for s, p in tmp.items()}
        n_docs = {"train": 0, "val": 0}
        bytes_in = 0
        last_train_len = 0
        try:

            def jobs():
                nonlocal bytes_in
                idx = 0  # the document's index, shared by the parts of a long one
                idxs: list[int] = []
                batch: list[str] = []
                more: list[bool] = []
                size = 0
                for d in iter_corpus(files, stats, text_field):
                    if not d.strip():  # never a part: every part holds a non-blank line
                        continue
                    m = continues(d)
                    idxs.append(idx)
                    batch.append(str(d))
                    more.append(m)
                    idx += not m
                    size += len(d)
                    bytes_in += len(d.encode("utf-8")) + m
                    if size >= batch_bytes:
                        yield (idxs, batch, more, seed, val_fraction)
                        idxs, batch, more, size = [], [], [], 0
                if batch:
                    yield (idxs, batch, more, seed, val_fraction)

            spool = None
            if workers > 1:
                pool = ProcessPoolExecutor(
                    workers,
                    mp_context=worker_context(),
                    initializer=_init_worker,
                    initargs=(str(tok_path), backend),
                )
                # Replies through files (azgpt.poolio): a worker killed mid-reply cannot leave
                # half a message for the pool to wait on forever.
                spool = Spool("azgpt-prepare-")
                tasks = ((_encode_batch, j, spool.path) for j in jobs())
                results = map(unspool, ordered_map(call_spooled, tasks, pool, window=2 * workers))
            else:
                pool = None
                _init_worker(str(tok_path), backend, tok)
                results = ordered_map(_encode_batch, jobs(), None, window=1)
            try:
                sizes = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in files}
                open_len = 0  # tokens of the train document whose parts are being written
                for tr, va, ntr, nva, items in results:
                    writers["train"].write(np.frombuffer(tr, dtype=np.uint16))
                    writers["val"].write(np.frombuffer(va, dtype=np.uint16))
                    n_docs["train"] += ntr
                    n_docs["val"] += nva
                    for n, ends in items:
                        open_len += n
                        if ends:
                            last_train_len, open_len = open_len, 0
            except (BrokenProcessPool, OSError, ValueError, RuntimeError) as e:
                # A worker killed while the pool starts another can also surface as an OSError
                # or ValueError from multiprocessing; the pool knows it is broken either way.
                broken = getattr(pool, "_broken", False)
                if not (isinstance(e, BrokenProcessPool) or broken):
                    raise
                raise UserError(
                    "a prepare worker process died (out of memory, or killed); rerun, with fewer "
                    "--workers if memory is short."
                ) from None
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
                if spool is not None:
                    spool.remove()
            for p, was in sizes.items():
                if (p.stat().st_size, p.stat().st_mtime_ns) != was:
                    raise UserError(
                        f"{p} changed while prepare was reading it; rerun when nothing writes to it."
                    )
            if n_docs["train"] + n_docs["val"] == 0:
                raise UserError(
                    f"no documents found in {', '.join(map(str, inputs))}; give files that hold text."
                )
            if n_docs["val"] == 0:
                # Too few documents for the fraction: move the last train document to val.
                writers["train"].move_last(last_train_len, writers["val"])
                n_docs["train"] -= 1
                n_docs["val"] += 1
            if n_docs["train"] == 0:
                if n_docs["val"] < 2:
                    raise UserError(
                        f"only {n_docs['val']} document(s) in the input: at least two are needed for a train/val split."
                    )
                raise UserError(
                    f"every one of the {n_docs['val']} documents was drawn into val; lower --val-fraction "
                    f"(now {val_fraction}) or give more documents."
                )
            for w in writers.values():
                w.close()
            tok_sha = sha256_file(tok_path)
            max_ids = {}
            for s in ("train", "val"):
                arr = np.load(tmp[s], mmap_mode="r")
                max_ids[s] = int(_chunked_max(arr))
            manifest = {
                "azgpt_version": __version__,
                "tokenizer": {"path": str(tok_path), "sha256": tok_sha, "vocab_size": vocab},
                "encoder_backend": backend,
                "split": {"seed": seed, "val_fraction": val_fraction},
                "train": {
                    "tokens": writers["train"].n,
                    "documents": n_docs["train"],
                    "max_token_id": max_ids["train"],
                },
                "val": {
                    "tokens": writers["val"].n,
                    "documents": n_docs["val"],
                    "max_token_id": max_ids["val"],
                },
                "inputs": [
                    {"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                    for p in files
                ],
                "input_problems": dict(stats),
                "eot_id": eot_id(tok),
            }
            # Old manifest goes first: token files without a manifest are never taken as complete.
            (out_dir / MANIFEST).unlink(missing_ok=True)
            for s in ("train", "val"):
                os.replace(tmp[s], out_dir / f"{s}.npy")
            with atomic_path(out_dir / MANIFEST) as mtmp:
                mtmp.write_text(
                    json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
                )
            fsync_dir(out_dir)
        except OSError as e:
            why = "the disk is full" if is_disk_full(e) else e.strerror
            raise UserError(
                f"cannot write token files in {out_dir} ({why}); free space or choose another --out."
            ) from None
        finally:
            for w in writers.values():
                if not w.f.closed:
                    try:
                        w.f.close()  # flushes: fails again on a full disk; the file goes anyway
                    except OSError:
                        pass
            for p in tmp.values():
                p.unlink(missing_ok=True)
        return PrepareResult(manifest, time.perf_counter() - t0, bytes_in)
