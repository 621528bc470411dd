"""GGUF export checked by llama.cpp on a real model: token ids, bits per byte per quantization,
file sizes, and CPU generation speed next to azgpt's own.

.venv/bin/python bench/gguf.py --ckpt runs/gguf_small/best \
    [--eval ../shared/eval/flores200_azj_Latn.dev.txt] [--corpus out/gguf/clean.txt]

Needs `pip install azgpt[gguf]` (llama-cpp-python). Prints one JSON object and markdown rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# sys.path[0] is bench/, where this file would shadow the `gguf` package: put the repo there.
sys.path[0] = str(ROOT)

QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")


def llama(path, n_ctx, threads, **kw):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
        n_threads_batch=threads, verbose=False, **kw,
    )  # fmt: skip


def nll_llama(llm, ids):
    """Summed negative log-likelihood (nats) of ids[1:] given the prefix, by llama.cpp."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    z = np.array(llm.scores[: len(ids)], dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -float(sum(z[i, ids[i + 1]] for i in range(len(ids) - 1)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="runs/gguf_small/best")
    ap.add_argument("--eval", default=str(ROOT.parent / "shared/eval/flores200_azj_Latn.dev.txt"))
    ap.add_argument("--corpus", default="out/gguf/clean.txt", help="cleaned text for the id check")
    ap.add_argument("--corpus-docs", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for the GGUF files (default: a temp dir)")
    a = ap.parse_args()

    import numpy as np
    import torch

    from azgpt.checkpoint import checkpoint_tokenizer, load_model
    from azgpt.export_gguf import export_gguf
    from azgpt.tokenizer import EOT, encode

    torch.set_num_threads(a.threads)
    model, meta = load_model(a.ckpt, "cpu")
    model.eval()
    tok, _, _ = checkpoint_tokenizer(a.ckpt, meta)
    eot = tok.token_to_id(EOT)
    block = model.config.block_size
    out = Path(a.out or tempfile.mkdtemp(prefix="azgpt-gguf-"))
    res: dict = {
        "ckpt": a.ckpt,
        "params": model.num_params(),
        "tokens_seen": meta.get("tokens_seen"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {a.threads} threads",
        "date": time.strftime("%Y-%m-%d"),
        "quants": {},
    }

    files = {}
    for q in QUANTS:
        t0 = time.perf_counter()
        files[q], _ = export_gguf(
            a.ckpt, str(out / f"model-{q}.gguf"), quant=q, modelfile=str(out / f"Modelfile-{q}"),
            force=True,
        )  # fmt: skip
        res["quants"][q] = {
            "export_s": round(time.perf_counter() - t0, 2),
            "bytes": files[q].stat().st_size,
        }

    # 1. token ids: held-out sentences, corpus documents and their lines
    vocab = llama(files["f32"], block, a.threads, vocab_only=True)
    eval_lines = [ln for ln in Path(a.eval).read_text(encoding="utf-8").splitlines() if ln.strip()]
    texts = list(eval_lines)
    if Path(a.corpus).is_file():
        docs = Path(a.corpus).read_text(encoding="utf-8").split("\n\n")[: a.corpus_docs]
        texts += docs + [ln for d in docs for ln in d.splitlines()]
    bad = [
        t
        for t in texts
        if vocab.tokenize(t.encode("utf-8"), add_bos=False, special=False) != encode(tok, t)
    ]
    res["token_ids"] = {"texts": len(texts), "differ": len(bad), "examples": bad[:3]}
    del vocab

    # 2. bits per byte on held-out text: azgpt (torch) and llama.cpp per quantization
    seqs = [([eot] + encode(tok, ln))[:block] for ln in eval_lines]
    nbytes = sum(len(tok.decode(s[1:]).encode("utf-8")) for s in seqs)
    with torch.no_grad():
        nll = 0.0
        for s in seqs:
            logits = model(torch.tensor([s]))
            logits = logits[0] if isinstance(logits, tuple) else logits
            lp = torch.log_softmax(logits[0].double(), -1)
            nll -= float(lp[torch.arange(len(s) - 1), torch.tensor(s[1:])].sum())
    res["azgpt_bpb"] = nll / (math.log(2) * nbytes)
    prompts = seqs[:4]
    for q in QUANTS:
        llm = llama(files[q], block, a.threads, logits_all=True)
        t0 = time.perf_counter()
        bpb = sum(nll_llama(llm, s) for s in seqs) / (math.log(2) * nbytes)
        r = res["quants"][q]
        r["bpb"] = bpb
        r["score_s"] = round(time.perf_counter() - t0, 1)
        if q == "f32":
            rel = []
            for s in prompts:
                llm.reset()
                llm.eval(s)
                theirs = np.array(llm.scores[: len(s)], dtype=np.float64)
                with torch.no_grad():
                    o = model(torch.tensor([s]))
                ours = (o[0] if isinstance(o, tuple) else o)[0].double().numpy()
                rel.append(float((np.abs(theirs - ours).max(1) / np.abs(ours).max(1)).max()))
            res["f32_logit_max_rel_diff"] = max(rel)
            ids = prompts[0][:8]
            with torch.no_grad():
                ours_g = [int(t) for t in model.generate(torch.tensor([ids]), 64, temperature=0)]
            llm.reset()
            llm.eval(ids)
            theirs_g = []
            for _ in range(64):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                theirs_g.append(nxt)
                llm.eval([nxt])
            res["f32_greedy_64_identical"] = ours_g == theirs_g
        del llm
    base = res["quants"]["f32"]["bpb"]
    for q in QUANTS:
        res["quants"][q]["bpb_vs_f32_pct"] = 100 * (res["quants"][q]["bpb"] / base - 1)

    # 3. generation speed: new tokens per second after a short prompt, sampling as azgpt sample
    prompt = [eot] + encode(tok, "Azərbaycanın paytaxtı")
    n = min(a.new_tokens, block - len(prompt))

    def azgpt_tps():
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        k = 0
        for _ in model.generate(torch.tensor([prompt]), n, 0.8, 50, 0.95, None, g):
            k += 1
        return k / (time.perf_counter() - t0)

    res["azgpt_generate_tok_s"] = statistics.median(azgpt_tps() for _ in range(a.repeats))

    def llama_tps(llm):
        t0 = time.perf_counter()
        k = 0
        for _ in llm.generate(prompt, top_k=50, top_p=0.95, temp=0.8, reset=True):
            k += 1
            if k == n:
                break
        return k / (time.perf_counter() - t0)

    for q in QUANTS:
        llm = llama(files[q], block, a.threads, seed=0)
        res["quants"][q]["llama_tok_s"] = statistics.median(
            llama_tps(llm) for _ in range(a.repeats)
        )
        del llm

    print(json.dumps(res, indent=2, ensure_ascii=False))
    print()
    print("| quant | file size | bits per byte | vs f32 | llama.cpp tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for q in QUANTS:
        r = res["quants"][q]
        print(
            f"| {q} | {r['bytes'] / 1e6:.2f} MB | {r['bpb']:.4f} | {r['bpb_vs_f32_pct']:+.2f}% "
            f"| {r['llama_tok_s']:.0f} |"
        )
    print(
        f"| azgpt (torch, fp32) | | {res['azgpt_bpb']:.4f} | | {res['azgpt_generate_tok_s']:.0f} |"
    )


if __name__ == "__main__":
    main()
