"""Evaluation: loss, perplexity and bits per UTF-8 byte of text or token files, and the built-in
Azerbaijani probes.

Protocol for raw text (see docs/evaluation.md): documents are cleaned with `azgpt clean`'s repairs (no
filter), then every document is scored on its own, conditioned on a
leading `<|endoftext|>`; the tokens of the document are scored (not a closing end-of-text).
Documents longer than the context are scored in sliding windows: each window holds
`block_size` tokens, moves by `stride`, and scores only the tokens no earlier window scored, so
every token is scored once with at least `block_size - stride` tokens of context.
bits per byte = (sum of negative log-likelihoods in nats) / (ln 2 * UTF-8 bytes of the text).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .checkpoint import checkpoint_tokenizer, load_model, pick_device
from .corpus import continues, discover, iter_corpus
from .errors import UserError
from .model import GPT
from .text import clean_document
from .tokenizer import EOT, encode, token_byte_lengths


def windows(n_ids: int, block: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of n_ids tokens (ids[0] is the leading end-of-text).

    Returns (begin, end, first): the window's inputs are ids[begin:end], its targets
    ids[begin+1:end+1], and targets with index >= first are the ones this window scores.
    """
    n = n_ids - 1  # targets are ids[1..n]
    out = []
    b, scored = 0, 1
    while True:
        e = min(b + block, n)
        out.append((b, e, scored))
        scored = e + 1
        if e >= n:
            break
        b = min(b + stride, n - block)
    return out


@torch.no_grad()
def score_sequences(
    model: GPT, seqs: list[list[int]], stride: int, batch_size: int, device, progress=None
) -> tuple[float, int]:
    """Sum of NLL (nats) and count of scored tokens over all `seqs` (each starts with EOT)."""
    T = model.config.block_size
    jobs = []  # (inputs, targets, mask-from)
    for ids in seqs:
        if len(ids) < 2:
            continue
        for b, e, first in windows(len(ids), T, stride):
            jobs.append((ids[b:e], ids[b + 1 : e + 1], first - (b + 1)))
    # Longest first keeps padding low; order does not change the sums.
    jobs.sort(key=lambda j: -len(j[0]))
    nll, count = 0.0, 0
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        L = max(len(j[0]) for j in chunk)
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        y = torch.full((len(chunk), L), -1, dtype=torch.long)
        for r, (inp, tgt, skip) in enumerate(chunk):
            x[r, : len(inp)] = torch.tensor(inp)
            t = torch.tensor(tgt)
            t[:skip] = -1
            y[r, : len(tgt)] = t
        x, y = x.to(device), y.to(device)
        logits = model(x)
        losses = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            y.reshape(-1),
            ignore_index=-1,
            reduction="sum",
        )
        nll += float(losses)
        count += int((y >= 0).sum())
        if progress is not None:
            progress.update(len(chunk))
    return nll, count


def bits_per_byte(nll_nats: float, nbytes: float) -> float:
    """Summed negative log-likelihood in nats -> bits per UTF-8 byte of the text scored
    (comparable across tokenizers, unlike loss per token)."""
    return nll_nats / (math.log(2) * max(nbytes, 1))


def _summary(nll: float, tokens: int, nbytes: int, docs: int) -> dict:
    loss = nll / tokens
    return {
        "loss": round(loss, 6),
        "perplexity": round(math.exp(min(loss, 50)), 4),
        "bpb": round(bits_per_byte(nll, nbytes), 6),
        "tokens": tokens,
        "bytes": nbytes,
        "documents": docs,
    }


def eval_texts(
    model, tok, files: list[str], *, line_docs=False, stride=None, batch_size=8, device="cpu"
) -> dict:
    """Score every document of `files`, streaming: documents are cleaned, encoded (in bounded
    pieces) and scored in groups of about GROUP_TOKENS tokens, so memory does not grow with
    the input."""
    from tqdm.auto import tqdm

    paths = discover(files)
    eot = tok.token_to_id(EOT)
    T = model.config.block_size
    stride = max(1, T // 2) if stride is None else stride
    if not 0 < stride <= T:
        raise UserError(f"--stride must be in [1, {T}] (the model's context), got {stride}.")
    nll, count, nbytes, docs = 0.0, 0, 0, 0
    group: list[list[int]] = []
    size = 0
    with tqdm(desc="eval", unit="doc", leave=False) as bar:

        def score():
            nonlocal nll, count
            a, b = score_sequences(model, group, stride, batch_size, device)
            nll, count = nll + a, count + b
            bar.update(len(group))

        # The parts of a long document (corpus.Continued) are scored as one text: a part extends
        # the sequence before it, or, once that has been scored, starts from its last token.
        prev_more, last = False, eot
        for d in iter_corpus(paths, Counter(), line_docs=line_docs):
            more = continues(d)
            d, _ = clean_document(d)  # the same repairs the training text went through
            docs += prev_more and not more and not d  # an empty last part ends its document
            if not d:
                prev_more = prev_more and more
                continue
            if more:
                d += "\n"
            ids = encode(tok, d)
            if prev_more and group:
                group[-1] += ids
            else:
                group.append([last if prev_more else eot] + ids)
            last = ids[-1] if ids else last
            size += len(ids) + 1
            nbytes += len(d.encode("utf-8"))
            docs += not more
            prev_more = more
            if size >= GROUP_TOKENS:
                score()
                group, size = [], 0
        if group:
            score()
    if not docs:
        raise UserError(
            f"{', '.join(files)} holds no text to score after cleaning; give files with documents."
        )
    return _summary(nll, count, nbytes, docs)


GROUP_TOKENS = 1 << 18  # tokens encoded and held at once by `eval --text`


def eval_tokens(
    model, tok, path: str, *, batch_size=8, device="cpu", tok_sha: str | None = None
) -> dict:
    from .data import _chunked_max, load_tokens, read_manifest

    arr = load_tokens(Path(path))
    T = model.config.block_size
    if len(arr) < 2:
        raise UserError(f"token file {path} holds fewer than two tokens; nothing to score.")
    top = int(_chunked_max(arr))
    if top >= min(model.config.vocab_size, tok.get_vocab_size()):
        raise UserError(
            f"token file {path} holds id {top}, beyond this tokenizer ({tok.get_vocab_size()} ids) or model "
            f"({model.config.vocab_size}); evaluate token files prepared with the checkpoint's tokenizer."
        )
    man = Path(path).parent / "manifest.json"
    want = read_manifest(man.parent)["tokenizer"]["sha256"] if man.is_file() else None
    if want is None:
        import warnings

        warnings.warn(
            f"{path} has no manifest.json beside it: its tokenizer cannot be checked against the "
            "checkpoint's; the numbers are right only if it was encoded with that tokenizer",
            stacklevel=2,
        )
    elif tok_sha is not None and tok_sha != want:
        raise UserError(
            f"token file {path} was prepared with another tokenizer than the checkpoint's (sha256 differs); "
            "prepare it again with the checkpoint's tokenizer."
        )
    from tqdm.auto import tqdm

    lens = token_byte_lengths(tok)
    starts = range(0, len(arr) - 1, T)  # consecutive windows of T targets, overlapping by one
    nll, count, group = 0.0, 0, 64 * batch_size
    with tqdm(total=len(starts), desc="eval", unit="win", leave=False) as bar:
        for g in range(0, len(starts), group):  # a bounded number of windows in memory at a time
            seqs = [arr[i : i + T + 1].astype(np.int64).tolist() for i in starts[g : g + group]]
            a, b = score_sequences(model, seqs, T, batch_size, device, bar)
            nll, count = nll + a, count + b
    eot, nbytes, docs = tok.token_to_id(EOT), 0, 0
    for i in range(0, len(arr), 1 << 22):  # in chunks: no full-size copies of a large file
        chunk = np.asarray(arr[i : i + (1 << 22)], dtype=np.int64)
        docs += int((chunk == eot).sum())
        lo = max(1, i) - i  # the first token is context, not scored
        nbytes += int(lens[chunk[lo : max(lo, 1 + count - i)]].sum())
    return _summary(nll, count, max(nbytes, 1), docs)


@torch.no_grad()
def continuation_logprob(model: GPT, prefix: list[int], cont: list[int], device) -> float:
    ids = (prefix + cont)[-(model.config.block_size + 1) :]
    x = torch.tensor([ids[:-1]], device=device)
    y = torch.tensor(ids[1:], device=device)
    logits = model(x)
    lp = F.log_softmax(logits[0].float(), dim=-1)
    k = len(cont)
    return float(lp[-k:].gather(1, y[-k:, None]).sum())


def eval_probes(model, tok, device="cpu") -> dict:
    from .probe_items import PROBES

    eot = tok.token_to_id(EOT)
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for group, prompt, cands, answer in PROBES:
        prefix = [eot] + encode(tok, prompt)
        scores = [continuation_logprob(model, prefix, encode(tok, c), device) for c in cands]
        total[group] += 1
        right[group] += int(int(np.argmax(scores)) == answer)
    out = {g: round(right[g] / total[g], 4) for g in total}
    out["overall"] = round(sum(right.values()) / sum(total.values()), 4)
    out["items"] = sum(total.values())
    return out


def run_eval(
    ckpt,
    *,
    texts=None,
    tokens=None,
    probes=False,
    line_docs=False,
    tokenizer=None,
    batch_size=8,
    device="auto",
    stride=None,
    chat=None,
) -> dict:
    if not texts and not tokens and not probes and not chat:
        raise UserError(
            "give something to evaluate: --text FILE..., --tokens FILE, --probes or --chat FILE..."
        )
    dev = pick_device(device)
    model, meta = load_model(ckpt, dev)
    model.eval()
    tok, tok_sha, _ = checkpoint_tokenizer(ckpt, meta, tokenizer)
    out: dict = {}
    if texts:
        out.update(
            eval_texts(
                model,
                tok,
                texts,
                line_docs=line_docs,
                stride=stride,
                batch_size=batch_size,
                device=dev,
            )
        )
    if tokens:
        res = eval_tokens(model, tok, tokens, batch_size=batch_size, device=dev, tok_sha=tok_sha)
        out.update(res if not texts else {f"tokens_{k}": v for k, v in res.items()})
    if probes:
        out["probes"] = eval_probes(model, tok, dev)
    if chat:
        from .chat_template import check_chat_tokenizer
        from .chateval import eval_chat

        check_chat_tokenizer(tok, f"the tokenizer of {ckpt}")
        out.update(eval_chat(model, tok, chat, dev))
    return out
