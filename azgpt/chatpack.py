"""Conversations packed into training rows, and the batch source the training loop draws from.

A conversation of L ids (L <= block_size + 1) becomes L - 1 (input, target) pairs: inputs
ids[:-1], targets ids[1:] where the loss mask is 1, else -1 (ignored). Conversations are packed
best-fit decreasing into rows of block_size pairs; what is left of a row is padding (input
<|endoftext|>, target -1). Every pair carries its conversation's segment id, and the model's
forward (`segments=`) restarts positions at each conversation and attends only within it, so a
packed conversation computes exactly what it computes alone (tests/test_finetune.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .chat_template import CHAT_FORMAT
from .chatdata import Conversation
from .data import Batch


def pack(convs: list[Conversation], block_size: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows of packed conversations: {"x", "y", "seg"} arrays (rows, block_size) int64.
    Segment ids are unique per conversation within a row; padding gets its own id."""
    order = sorted(range(len(convs)), key=lambda i: (-len(convs[i].ids), i))
    rows: list[list[int]] = []  # conversation indices per row
    free: list[int] = []
    for i in order:
        n = len(convs[i].ids) - 1
        if n > block_size:
            raise ValueError(f"conversation {convs[i].where} has {n + 1} ids, more than a row")
        best = -1
        for r, f in enumerate(free):  # best fit: the fullest row that still has room
            if f >= n and (best < 0 or f < free[best]):
                best = r
        if best < 0:
            rows.append([])
            free.append(block_size)
            best = len(rows) - 1
        rows[best].append(i)
        free[best] -= n
    x = np.full((len(rows), block_size), pad_id, dtype=np.int64)
    y = np.full((len(rows), block_size), -1, dtype=np.int64)
    seg = np.zeros((len(rows), block_size), dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            ids = np.asarray(convs[i].ids, dtype=np.int64)
            mask = np.asarray(convs[i].mask[1:], dtype=bool)
            n = len(ids) - 1
            x[r, at : at + n] = ids[:-1]
            y[r, at : at + n] = np.where(mask, ids[1:], -1)
            seg[r, at : at + n] = s
            at += n
        seg[r, at:] = len(members)  # padding: its own segment
    return {"x": x, "y": y, "seg": seg}


class ChatBatches:
    """The training loop's batch source (`data.BatchSource`) for fine-tuning: packed train and
    held-out rows of conversations, with segment ids as the forward's `segments`.

    `train_batch` is a pure function of (step, micro) and the seed: an epoch is one pass over
    the train rows in an order drawn from (seed, epoch), so a resumed run draws exactly the rows
    it would have drawn. `val_batches` covers the held-out rows in order, padding with rows of
    ignored targets where a process runs out (`val_iters` batches cover them all)."""

    def __init__(
        self,
        train: list[Conversation],
        val: list[Conversation],
        block_size: int,
        pad_id: int,
        *,
        seed: int,
        grad_accum: int,
        tokenizer_sha256: str,
        dir: Path,
    ):
        self.block_size, self.pad_id = block_size, pad_id
        self.seed, self.grad_accum = seed, grad_accum
        self.tokenizer_sha256, self.dir = tokenizer_sha256, Path(dir)
        self.rows = {"train": pack(train, block_size, pad_id)}
        self.rows["val"] = pack(val, block_size, pad_id) if val else None
        self.n_train = len(self.rows["train"]["x"])
        self.n_val = len(self.rows["val"]["x"]) if val else 0
        # Goes into every checkpoint's meta.json: exports and `serve` know the model chats.
        self.meta = {"chat_template": CHAT_FORMAT}

    def _take(self, split: str, idx: np.ndarray, device, pad_to: int = 0) -> Batch:
        import torch

        r = self.rows[split]
        x, y, seg = (r[k][idx] for k in ("x", "y", "seg"))
        if pad_to > len(idx):  # rows of padding whose targets are all ignored
            extra = pad_to - len(idx)
            x = np.concatenate([x, np.full((extra, self.block_size), self.pad_id)])
            y = np.concatenate([y, np.full((extra, self.block_size), -1)])
            seg = np.concatenate([seg, np.zeros((extra, self.block_size), dtype=np.int64)])
        x, y, seg = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (x, y, seg))
        return Batch(x, y, {"segments": seg})

    def train_rows(self, step: int, micro: int, global_batch: int) -> np.ndarray:
        first = (step * self.grad_accum + micro) * global_batch
        out = []
        for k in range(first, first + global_batch):
            epoch, j = divmod(k, self.n_train)
            perm = np.random.default_rng([self.seed, 0xC4A7, epoch]).permutation(self.n_train)
            out.append(perm[j])
        return np.asarray(out, dtype=np.int64)

    def train_batch(self, step, micro, batch_size, rank=0, world=1, device=None) -> Batch:
        rows = self.train_rows(step, micro, batch_size * world)
        return self._take("train", rows[rank * batch_size : (rank + 1) * batch_size], device)

    def val_iters(self, batch_size: int, world: int) -> int:
        """Batches per process that cover every held-out row."""
        return -(-self.n_val // (batch_size * world))

    def val_batches(self, n_batches, batch_size, rank=0, world=1, device=None):
        if not self.n_val:
            return
        g = batch_size * world
        for b in range(n_batches):
            lo = b * g + rank * batch_size
            idx = np.arange(lo, min(lo + batch_size, self.n_val), dtype=np.int64)
            yield self._take("val", idx, device, pad_to=batch_size)

    def steps_per_epoch(self, batch_size: int, grad_accum: int, world: int) -> float:
        return self.n_train / (batch_size * grad_accum * world)
