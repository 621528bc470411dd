"""Token files -> batches: the loader, and the checks every consumer of token files makes.

Token files are plain `.npy` (np.save format, uint16, 1-D) so `np.load(path, mmap_mode="r")`
reads them without copying; documents are separated by the `<|endoftext|>` id. manifest.json
beside them (written by `azgpt prepare`, prepare.py) records where they came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from .errors import UserError
from .fsutil import sha256_file
from .tokenizer import tokenizer_path

NPY_HEADER_BYTES = 128
MANIFEST = "manifest.json"


def _chunked_max(arr: np.ndarray, chunk: int = 1 << 24) -> int:
    m = 0
    for i in range(0, len(arr), chunk):
        m = max(m, int(arr[i : i + chunk].max()))
    return m


# ----------------------------------------------------------------------------- loader


def read_manifest(data_dir: str | Path) -> dict:
    p = Path(data_dir) / MANIFEST
    if not p.is_file():
        raise UserError(
            f"{p} does not exist; run `azgpt prepare` to write the token files (data.dir={data_dir})."
        )
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{p} is not valid JSON; rerun `azgpt prepare`.") from None
    ok = (
        isinstance(m, dict)
        and all(isinstance(m.get(k), dict) for k in ("train", "val", "tokenizer"))
        and isinstance(m["tokenizer"].get("sha256"), str)
        and all(isinstance(m[k].get("tokens"), int) for k in ("train", "val"))
    )
    if not ok:
        raise UserError(
            f"{p} is not an azgpt manifest (train, val, tokenizer entries); rerun `azgpt prepare`."
        )
    return m


def load_tokens(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"token file {path} does not exist; run `azgpt prepare` first.")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(
            f"token file {path} is not a readable .npy file ({e}); rerun `azgpt prepare`."
        ) from None
    if arr.dtype != np.uint16 or arr.ndim != 1:
        raise UserError(
            f"token file {path} holds {arr.dtype} with shape {arr.shape}, expected 1-D uint16; rerun `azgpt prepare`."
        )
    return arr


class TokenData:
    """The train and val token files of one data folder, checked against its manifest, the
    tokenizer and the model's vocab size, and deterministic batches drawn from them."""

    def __init__(
        self,
        data_dir: str | Path,
        block_size: int,
        vocab_size: int,
        tokenizer: str | Path | None = None,
        check_ids: bool = True,
    ):
        self.dir = Path(data_dir)
        self.manifest = read_manifest(self.dir)
        self.block_size = block_size
        self.splits = {s: load_tokens(self.dir / f"{s}.npy") for s in ("train", "val")}
        for s, arr in self.splits.items():
            want = self.manifest.get(s, {}).get("tokens")
            if want != len(arr):
                raise UserError(
                    f"{self.dir / (s + '.npy')} holds {len(arr)} tokens but manifest.json says {want}; rerun `azgpt prepare`."
                )
        if tokenizer is not None:
            tp = tokenizer_path(tokenizer)
            if not tp.is_file():
                raise UserError(f"tokenizer file {tp} does not exist; fix data.tokenizer.")
            sha = sha256_file(tp)
            if sha != self.manifest["tokenizer"]["sha256"]:
                raise UserError(
                    f"tokenizer {tp} is not the one {self.dir} was prepared with (sha256 differs); "
                    "use the same tokenizer or rerun `azgpt prepare`."
                )
        if check_ids:
            for s, arr in self.splits.items():
                m = _chunked_max(arr) if len(arr) else 0
                if m >= vocab_size:
                    raise UserError(
                        f"{self.dir / (s + '.npy')} holds token id {m}, at or above the model's vocab size {vocab_size}; "
                        "raise model.vocab_size or prepare with a smaller tokenizer."
                    )
        for s, arr in self.splits.items():
            if len(arr) < block_size + 1:
                raise UserError(
                    f"the {s} split of {self.dir} has {len(arr)} tokens, fewer than model.block_size + 1 = {block_size + 1}; "
                    "lower model.block_size or prepare more data (or a larger --val-fraction)."
                )

    def _windows(self, split: str, starts: np.ndarray, device=None):
        """Inputs and targets of the windows at `starts`: one contiguous (2, B, T) int64 buffer
        (pinned on CUDA), moved to the device in one non-blocking copy that overlaps the
        previous step's compute; x and y are its two contiguous halves."""
        import torch

        data = self.splits[split]
        T = self.block_size
        win = np.stack([data[i : i + T + 1] for i in starts])  # (B, T + 1) uint16
        cuda = device is not None and device.type == "cuda"
        host = torch.empty((2, len(starts), T), dtype=torch.long, pin_memory=cuda)
        buf = host.numpy()
        buf[0] = win[:, :-1]
        buf[1] = win[:, 1:]
        if device is not None and device.type != "cpu":
            host = host.to(device, non_blocking=cuda)
        return host[0], host[1]

    def train_starts(self, seed: int, step: int, micro: int, global_batch: int) -> np.ndarray:
        """Window starts for one micro-step of the whole (all-process) batch. A pure function of
        (seed, step, micro), so a resumed run draws exactly the windows it would have drawn."""
        rng = np.random.default_rng([seed, step, micro])
        hi = len(self.splits["train"]) - self.block_size - 1  # last start whose window fits
        return rng.integers(0, hi + 1, size=global_batch)

    def get_batch(self, seed, step, micro, batch_size, rank=0, world=1, device=None):
        """This process's share of the global batch: rows [rank*B, (rank+1)*B)."""
        starts = self.train_starts(seed, step, micro, batch_size * world)
        return self._windows("train", starts[rank * batch_size : (rank + 1) * batch_size], device)

    def eval_batches(
        self, seed: int, n_batches: int, batch_size: int, rank=0, world=1, device=None
    ):
        """A fixed set of validation windows (the same every evaluation): `n_batches` global
        batches of `batch_size * world` windows, each split over the processes like a training
        batch. Every process runs `n_batches` forwards (under FSDP each one is a collective, so
        an uneven share would hang), and the set depends on the global batch only: 1 process x 8
        and 2 x 4 score the same windows."""
        rng = np.random.default_rng([seed, 0xE7A1])
        hi = len(self.splits["val"]) - self.block_size - 1
        g = batch_size * world
        starts = rng.integers(0, hi + 1, size=n_batches * g)
        for b in range(n_batches):
            lo = b * g + rank * batch_size
            yield self._windows("val", starts[lo : lo + batch_size], device)


# ----------------------------------------------------------------------------- batch sources


class Batch(NamedTuple):
    """One micro-batch: inputs and targets (B, T) int64 on the device, and extra keyword
    arguments for the model's forward (empty for plain token windows)."""

    x: object
    y: object
    kwargs: dict = {}


class BatchSource(Protocol):
    """Where the training loop (azgpt/train.py) reads its batches from.

    `train_batch(step, micro, batch_size, rank, world, device)` returns this process's
    `batch_size` rows of micro-batch `micro` of optimizer step `step`: a `Batch`, or a plain
    `(x, y)` tuple. x and y are (B, T) int64 tensors on `device`; a target of -1 is ignored by the
    loss (padding, prompt tokens), and `Batch.kwargs` go to `model(x, y, **kwargs)` as they are.
    It must be a pure function of its arguments (and the source's own seed): a resumed run
    redraws exactly the batches it would have drawn.

    `val_batches(n_batches, batch_size, rank, world, device)` yields the fixed validation set,
    the same at every evaluation, and exactly `n_batches` batches on every process (under FSDP
    each forward is a collective): where a process runs out of real rows, it pads with rows
    whose targets are all -1, which the evaluation leaves out of every sum.

    `tokenizer_sha256` is the sha256 of the tokenizer.json the ids come from (checked against
    `data.tokenizer`, a resumed checkpoint and `train.init_from`), and `dir` names the data in
    each checkpoint's meta.json. `TokenBatches` (token files from `azgpt prepare`) is the
    default; pass another source as `train(cfg, batches=...)`."""

    dir: Path
    tokenizer_sha256: str

    def train_batch(
        self, step: int, micro: int, batch_size: int, rank: int, world: int, device
    ): ...

    def val_batches(self, n_batches: int, batch_size: int, rank: int, world: int, device): ...


class TokenBatches:
    """The default `BatchSource`: random windows of the token files (`TokenData`), drawn from
    (seed, step, micro), and the fixed validation windows of `TokenData.eval_batches`."""

    def __init__(self, data: TokenData, seed: int):
        self.data, self.seed = data, seed
        self.dir = data.dir
        self.tokenizer_sha256 = data.manifest["tokenizer"]["sha256"]

    def train_batch(self, step, micro, batch_size, rank=0, world=1, device=None) -> Batch:
        return Batch(*self.data.get_batch(self.seed, step, micro, batch_size, rank, world, device))

    def val_batches(self, n_batches, batch_size, rank=0, world=1, device=None):
        for x, y in self.data.eval_batches(self.seed, n_batches, batch_size, rank, world, device):
            yield Batch(x, y)


def as_batch(b) -> Batch:
    """A source's batch as a `Batch` (sources may return plain (x, y) tuples)."""
    return b if isinstance(b, Batch) else Batch(*b)
