"""The command line: the only module that reads argv. One small function per subcommand.

Exit codes: 0 ok, 1 failure (a training run stopped on a non-finite loss, say), 2 bad usage or
input (one sentence on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one sentence, exit 2 (argparse's default prints usage too)
        raise UserError(f"{message}; see `{self.prog} --help`.")


def _positive_int(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects an integer, got {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {v}")
        return v

    return parse


# ----------------------------------------------------------------------------- data commands


def cmd_clean(a) -> int:
    from .clean import run_clean, write_report
    from .corpus import default_workers
    from .fsutil import check_writable

    check_writable(a.out, "--out")
    if a.report:
        check_writable(a.report, "--report")
        if Path(a.report).resolve() == Path(a.out).resolve() and not Path(a.out).is_char_device():
            raise UserError("--report and --out name the same file; give the report its own name.")
        inputs = {Path(p).resolve() for p in a.inputs}
        if Path(a.report).resolve() in inputs:
            raise UserError(
                f"--report {a.report} is one of the inputs; give the report its own name."
            )
    report = run_clean(
        a.inputs,
        a.out,
        text_field=a.text_field,
        cyrillic_to_latin=a.cyrillic_to_latin,
        filter=not a.no_filter,
        min_az_share=a.min_az_share,
        dedup=not a.no_dedup,
        near_dedup=not a.no_near_dedup,
        near_dup_threshold=a.near_dup_threshold,
        line_filter=not a.no_line_filter,
        workers=a.workers or default_workers(),
        quality=a.quality,
    )
    print(report.format())
    print(f"wrote {a.out}")
    if a.report:
        write_report(report, a.report)
        print(f"report: {a.report}")
    return 0


def cmd_crawl(a) -> int:
    from .crawl import CrawlOptions, run_crawl

    opts = CrawlOptions(
        max_pages=a.max_pages,
        delay=a.delay,
        same_site=a.same_site,
        depth=a.depth,
        timeout=a.timeout,
        max_bytes=a.max_bytes,
        contact=a.contact,
        shard_pages=a.shard_pages,
        allow_private=a.allow_private,
        max_crawl_delay=a.max_crawl_delay,
    )
    report = run_crawl(a.urls, a.out, opts)
    print(report.format())
    print(f"shards in {a.out} (rerun the same command to resume)")
    return 0


def cmd_tokenizer_train(a) -> int:
    import time
    from collections import Counter

    from .corpus import discover, iter_corpus
    from .tokenizer import save_tokenizer, train_tokenizer

    files = discover(a.inputs)
    stats: Counter = Counter()
    t0 = time.perf_counter()
    tok = train_tokenizer(
        iter_corpus(files, stats, a.text_field),  # the tokenizer normalises to NFC itself
        vocab_size=a.vocab_size,
        pretokenizer=a.pretokenizer,
        min_frequency=a.min_frequency,
    )
    secs = time.perf_counter() - t0
    path = save_tokenizer(
        tok,
        a.out,
        {
            "pretokenizer": a.pretokenizer,
            "inputs": [str(p) for p in files],
            "train_seconds": round(secs, 2),
        },
    )
    print(
        f"trained a {tok.get_vocab_size()}-id byte-level BPE ({a.pretokenizer} pre-tokenizer) in {secs:.1f}s -> {path}"
    )
    return 0


def cmd_tokenizer_stats(a) -> int:
    from collections import Counter

    from .corpus import discover, iter_corpus
    from .tokenizer import fertility, load_tokenizer

    tok = load_tokenizer(a.tokenizer)
    files = discover(a.inputs)
    stats = fertility(tok, iter_corpus(files, Counter(), a.text_field))
    stats["vocab_size"] = tok.get_vocab_size()
    if a.json:
        print(json.dumps(stats))
    else:
        for k, v in stats.items():
            print(f"{k:>26}: {v}")
    return 0


def cmd_prepare(a) -> int:
    from .prepare import run_prepare

    res = run_prepare(
        a.inputs,
        a.tokenizer,
        a.out,
        val_fraction=a.val_fraction,
        seed=a.seed,
        text_field=a.text_field,
        workers=a.workers,
        backend=a.backend,
    )
    m = res.manifest
    mbps = res.bytes_in / 1e6 / res.seconds if res.seconds else 0.0
    print(
        f"train: {m['train']['tokens']:,} tokens in {m['train']['documents']:,} documents; "
        f"val: {m['val']['tokens']:,} tokens in {m['val']['documents']:,} documents "
        f"({res.seconds:.1f}s, {mbps:.2f} MB/s, {m['encoder_backend']})"
    )
    print(
        f"wrote {Path(a.out) / 'train.npy'}, {Path(a.out) / 'val.npy'}, {Path(a.out) / 'manifest.json'}"
    )
    return 0


# ----------------------------------------------------------------------------- model commands


def cmd_train(a, overrides: list[str]) -> int:
    from .config import ConfigError, load_config
    from .train import train

    try:
        cfg = load_config(a.config, overrides)
    except ConfigError as e:
        raise UserError(str(e)) from None
    result = train(cfg, resume=a.resume)
    return 0 if result.ok else 1


def cmd_finetune(a, overrides: list[str]) -> int:
    from .finetune import finetune

    result = finetune(a.ckpt, a.data, a.out, a.config, overrides, resume=a.resume, lora=a.lora)
    return 0 if result.ok else 1


def cmd_sample(a) -> int:
    from .sample import run_sample

    run_sample(
        a.ckpt,
        a.prompt,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        seed=a.seed,
        num_samples=a.num_samples,
        tokenizer=a.tokenizer,
        device=a.device,
        ctx=a.ctx,
        dtype=a.dtype,
        compile=a.compile,
    )
    return 0


def cmd_chat(a) -> int:
    from .chat import run_chat
    from .sample import sampling_params

    params = sampling_params(
        max_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        seed=a.seed,
    )
    return run_chat(
        a.ckpt,
        system=a.system,
        tokenizer=a.tokenizer,
        device=a.device,
        ctx=a.ctx,
        dtype=a.dtype,
        compile=a.compile,
        params=params,
    )


def cmd_eval(a) -> int:
    from .evaluate import run_eval

    out = run_eval(
        a.ckpt,
        texts=a.text,
        tokens=a.tokens,
        probes=a.probes,
        line_docs=a.line_docs,
        tokenizer=a.tokenizer,
        batch_size=a.batch_size,
        device=a.device,
        stride=a.stride,
        chat=a.chat,
    )
    if a.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        for k, v in out.items():
            print(f"{k:>14}: {v}")
    return 0


def cmd_export(a) -> int:
    if a.format == "gguf":
        from .export_gguf import export_gguf

        path, mf = export_gguf(
            a.ckpt,
            a.out,
            quant=a.quant or "f16",
            tokenizer=a.tokenizer,
            modelfile=a.modelfile,
            force=a.force,
            system=a.system,
        )
        print(f"exported a {a.quant or 'f16'} GGUF for llama.cpp to {path}; Ollama: {mf}")
        return 0
    if a.quant or a.modelfile or a.system is not None:
        raise UserError(
            "--quant, --modelfile and --system apply to --format gguf only; add --format gguf."
        )
    from .export import export_hf

    path = export_hf(a.ckpt, a.out, tokenizer=a.tokenizer, force=a.force)
    print(f"exported a transformers GPT-2 model to {path}")
    return 0


def cmd_report(a) -> int:
    from .report import write_report

    path = write_report(a.run_dir, a.out)
    print(f"wrote {path}")
    return 0


def cmd_serve(a) -> int:
    try:
        from .serve.app import Limits, serve
    except ModuleNotFoundError as e:
        raise UserError(
            f"azgpt serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'azgpt[serve]'."
        ) from None
    if not 0 <= a.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {a.port}.")
    limits = Limits(
        max_tokens=a.max_tokens,
        max_prompt_chars=a.max_prompt_chars,
        max_messages=a.max_messages,
        max_body_bytes=a.max_body_bytes,
    )
    serve(
        a.ckpt,
        host=a.host,
        port=a.port,
        api_key=a.api_key,
        name=a.name,
        tokenizer=a.tokenizer,
        device=a.device,
        dtype=a.dtype,
        compile=a.compile,
        ctx=a.ctx,
        max_batch=a.max_batch,
        max_queue=a.max_queue,
        limits=limits,
        prefill_chunk=a.prefill_chunk,
        stall_ms=float(a.stall_ms),
        origins=[o.strip() for o in (a.origins or "").split(",") if o.strip()],
        max_connections=a.max_connections,
        header_timeout=a.header_timeout,
        body_timeout=a.body_timeout,
    )
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="azgpt", description="Train a GPT language model for Azerbaijani from scratch."
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"azgpt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("clean", help="repair and filter raw Azerbaijani text")
    c.add_argument(
        "inputs",
        nargs="+",
        help="files or folders of .txt(.gz), .jsonl(.gz), .parquet, MediaWiki .xml(.bz2) dumps",
    )
    c.add_argument(
        "--out", required=True, help="output text file (documents separated by blank lines)"
    )
    c.add_argument(
        "--text-field", default="text", help="JSONL field holding the text (default: text)"
    )
    c.add_argument(
        "--cyrillic-to-latin", action="store_true", help="transliterate Cyrillic-script Azerbaijani"
    )
    c.add_argument(
        "--no-filter",
        action="store_true",
        help="keep every document (no language filter, no dedup)",
    )
    c.add_argument(
        "--no-dedup", action="store_true", help="keep duplicate documents (exact and near)"
    )
    c.add_argument(
        "--no-near-dedup", action="store_true", help="remove exact duplicates only (no MinHash)"
    )
    c.add_argument(
        "--near-dup-threshold",
        type=float,
        default=0.8,
        help="Jaccard similarity of word 5-grams from which a document is a near-duplicate (0.8)",
    )
    c.add_argument(
        "--no-line-filter",
        action="store_true",
        help="keep lines repeated across many documents of one site (JSONL/Parquet with url)",
    )
    c.add_argument(
        "--min-az-share",
        type=float,
        default=0.03,
        help="language filter: least share of ə/q/x among letters (default 0.03)",
    )
    c.add_argument(
        "--quality",
        choices=("web", "all", "off"),
        default="web",
        help="web-quality rules (menus, hub pages, link lists; docs/cleaning.md) for records "
        "with a url (web, the default), for every document (all), or none (off)",
    )
    c.add_argument("--report", help="also write the report as JSON to this file")
    c.add_argument(
        "--workers",
        type=_positive_int("--workers"),
        default=None,
        help="processes (default: all cores)",
    )
    c.set_defaults(fn=cmd_clean)

    cr = sub.add_parser("crawl", help="fetch web pages politely into JSONL shards for clean")
    cr.add_argument("urls", help="text file with one seed URL per line")
    cr.add_argument("--out", required=True, help="folder for the shards and the crawl state")
    cr.add_argument("--max-pages", type=_positive_int("--max-pages"), default=1000)
    cr.add_argument(
        "--delay", type=float, default=1.0, help="seconds between requests to one host (default 1)"
    )
    cr.add_argument("--same-site", action="store_true", help="follow links only on seed sites")
    cr.add_argument("--depth", type=int, default=2, help="link steps from a seed (default 2)")
    cr.add_argument(
        "--timeout",
        type=float,
        default=20.0,
        help="seconds per response, wall clock: connect, headers and body (default 20)",
    )
    cr.add_argument(
        "--allow-private",
        action="store_true",
        help="also fetch from private, loopback and link-local addresses (refused by default)",
    )
    cr.add_argument(
        "--max-crawl-delay",
        type=float,
        default=300.0,
        help="skip hosts whose robots.txt crawl delay or Retry-After is longer (default 300 s)",
    )
    cr.add_argument(
        "--max-bytes", type=_positive_int("--max-bytes"), default=5_000_000, help="page size cap"
    )
    cr.add_argument("--contact", help="e-mail or URL for site owners, sent in the User-Agent")
    cr.add_argument("--shard-pages", type=_positive_int("--shard-pages"), default=1000)
    cr.set_defaults(fn=cmd_crawl)

    t = sub.add_parser("tokenizer", help="train or inspect the BPE tokenizer")
    tsub = t.add_subparsers(dest="tcommand", required=True, parser_class=_Parser)
    tt = tsub.add_parser("train", help="train a byte-level BPE tokenizer")
    tt.add_argument("inputs", nargs="+")
    tt.add_argument("--out", required=True, help="output folder for tokenizer.json")
    tt.add_argument("--vocab-size", type=_positive_int("--vocab-size"), default=32000)
    tt.add_argument(
        "--pretokenizer",
        default="gpt4",
        help="gpt4 (default; llama.cpp's llama-bpe, needed for GGUF export), az or gpt2",
    )
    tt.add_argument("--min-frequency", type=_positive_int("--min-frequency"), default=2)
    tt.add_argument("--text-field", default="text")
    tt.set_defaults(fn=cmd_tokenizer_train)
    ts = tsub.add_parser("stats", help="tokens per word, bytes per token, words split in 3+ pieces")
    ts.add_argument("inputs", nargs="+")
    ts.add_argument("--tokenizer", required=True, help="tokenizer folder or tokenizer.json")
    ts.add_argument("--text-field", default="text")
    ts.add_argument("--json", action="store_true", help="print one JSON object")
    ts.set_defaults(fn=cmd_tokenizer_stats)

    pr = sub.add_parser("prepare", help="encode a corpus into train.npy / val.npy")
    pr.add_argument("inputs", nargs="+")
    pr.add_argument("--tokenizer", required=True)
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--val-fraction", type=float, default=0.005)
    pr.add_argument("--seed", type=int, default=1234)
    pr.add_argument("--text-field", default="text")
    pr.add_argument(
        "--workers",
        type=_positive_int("--workers"),
        default=None,
        help="processes (default: all cores)",
    )
    pr.add_argument(
        "--backend", default="auto", help="auto (tiktoken when identical), tiktoken or tokenizers"
    )
    pr.set_defaults(fn=cmd_prepare)

    tr = sub.add_parser("train", help="train a GPT (add --section.key=value overrides)")
    tr.add_argument("--config", required=True, help="TOML run file, e.g. configs/tiny.toml")
    tr.add_argument(
        "--resume", action="store_true", help="continue from the latest complete checkpoint"
    )
    tr.set_defaults(fn=cmd_train, takes_overrides=True)

    ft = sub.add_parser(
        "finetune",
        help="fine-tune a checkpoint on conversations (add --section.key=value overrides)",
    )
    ft.add_argument("--ckpt", required=True, help="the base checkpoint (e.g. runs/tiny/best)")
    ft.add_argument(
        "--data", required=True, nargs="+", help="chat files or folders (.jsonl, .json, .parquet)"
    )
    ft.add_argument("--out", help="the run folder (default runs/BASE-sft)")
    ft.add_argument("--config", help="TOML file with [sft] and [train] settings (configs/sft.toml)")
    ft.add_argument(
        "--lora", action="store_true", help="train LoRA adapters only (peft; sft.lora_* settings)"
    )
    ft.add_argument(
        "--resume", action="store_true", help="continue from the latest complete checkpoint"
    )
    ft.set_defaults(fn=cmd_finetune, takes_overrides=True)

    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("--ckpt", required=True, help="checkpoint folder (e.g. runs/tiny/last)")
    s.add_argument("--prompt", default="", help="prompt text")
    from .sample import SAMPLING

    s.add_argument(
        "--max-new-tokens",
        type=_positive_int("--max-new-tokens"),
        default=SAMPLING["max_new_tokens"],
    )
    s.add_argument("--temperature", type=float, default=SAMPLING["temperature"])
    s.add_argument("--top-k", type=int, default=SAMPLING["top_k"])
    s.add_argument("--top-p", type=float, default=SAMPLING["top_p"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-samples", type=_positive_int("--num-samples"), default=1)
    s.add_argument(
        "--tokenizer", help="tokenizer folder (default: the one recorded in the checkpoint)"
    )
    s.add_argument("--device", default="auto")
    _add_ctx_dtype(s)
    s.set_defaults(fn=cmd_sample)

    ch = sub.add_parser("chat", help="a terminal chatbot (one turn per line when piped)")
    ch.add_argument("--ckpt", required=True, help="checkpoint folder (e.g. runs/tiny-sft/best)")
    ch.add_argument("--system", help="a system prompt that sets the assistant's manner")
    ch.add_argument(
        "--max-new-tokens",
        type=_positive_int("--max-new-tokens"),
        default=SAMPLING["max_new_tokens"],
    )
    ch.add_argument("--temperature", type=float, default=SAMPLING["temperature"])
    ch.add_argument("--top-k", type=int, default=SAMPLING["top_k"])
    ch.add_argument("--top-p", type=float, default=SAMPLING["top_p"])
    ch.add_argument("--seed", type=int, default=0, help="the same seed gives the same replies")
    ch.add_argument(
        "--tokenizer", help="tokenizer folder (default: the one recorded in the checkpoint)"
    )
    ch.add_argument("--device", default="auto")
    _add_ctx_dtype(ch)
    ch.set_defaults(fn=cmd_chat)

    e = sub.add_parser("eval", help="loss, perplexity, bits per byte, probes")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--text", nargs="+", help="text files, documents separated by blank lines")
    e.add_argument("--tokens", help="a token file (.npy) written by `azgpt prepare`")
    e.add_argument("--probes", action="store_true", help="score the built-in Azerbaijani probes")
    e.add_argument(
        "--chat",
        nargs="+",
        help="chat files or folders: assistant loss, bits per byte, stop rate (docs/chat.md)",
    )
    e.add_argument("--line-docs", action="store_true", help="one document per line")
    e.add_argument(
        "--tokenizer", help="tokenizer folder (default: the one recorded in the checkpoint)"
    )
    e.add_argument("--batch-size", type=_positive_int("--batch-size"), default=8)
    e.add_argument(
        "--stride", type=int, default=None, help="sliding-window stride (default: half the context)"
    )
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser(
        "export", help="export to a transformers folder or a GGUF file (llama.cpp, Ollama)"
    )
    x.add_argument("--ckpt", required=True)
    x.add_argument("--out", required=True, help="folder (hf) or file such as model.gguf (gguf)")
    x.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf (default) or gguf")
    x.add_argument(
        "--quant",
        choices=("f32", "f16", "q8_0", "q4_0", "q4_k_m"),
        help="GGUF weight type (default f16; q4_k_m needs llama-cpp-python)",
    )
    x.add_argument(
        "--modelfile",
        help="Ollama Modelfile to write (default: Modelfile beside --out, or NAME.Modelfile "
        "when that one serves another GGUF)",
    )
    x.add_argument("--system", help="the Modelfile's SYSTEM prompt (chat models only)")
    x.add_argument(
        "--tokenizer", help="tokenizer folder (default: the one recorded in the checkpoint)"
    )
    x.add_argument(
        "--force", action="store_true", help="replace an earlier azgpt export (never other files)"
    )
    x.set_defaults(fn=cmd_export)

    r = sub.add_parser("report", help="a markdown report with plots from a run folder")
    r.add_argument("run_dir")
    r.add_argument("--out", help="output folder (default: RUN_DIR/report)")
    r.set_defaults(fn=cmd_report)

    sv = sub.add_parser("serve", help="an Ollama- and OpenAI-compatible HTTP API and a playground")
    sv.add_argument("--ckpt", required=True, help="checkpoint folder (e.g. runs/tiny/best)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    sv.add_argument(
        "--api-key",
        default=os.environ.get("AZGPT_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but the page (or AZGPT_API_KEY)",
    )
    sv.add_argument("--name", default="azgpt", help="the model name /api/tags and /v1/models list")
    sv.add_argument(
        "--tokenizer", help="tokenizer folder (default: the one recorded in the checkpoint)"
    )
    sv.add_argument("--device", default="auto")
    _add_ctx_dtype(sv)
    sv.add_argument(
        "--origins",
        default=os.environ.get("AZGPT_ORIGINS"),
        help="web page origins allowed besides the server's own, comma-separated, e.g. "
        "http://localhost:3000 (or AZGPT_ORIGINS); other pages get 403",
    )
    for flag, default, what in (
        ("--max-batch", 8, "sequences decoded together in one forward pass"),
        ("--max-queue", 64, "requests that may wait for a slot; more get 503"),
        ("--max-tokens", 1024, "the most tokens one request may ask for"),
        ("--max-prompt-chars", 100_000, "the longest prompt (all messages together) in characters"),
        ("--max-messages", 256, "chat messages kept per request; older ones are dropped"),
        ("--max-body-bytes", 1_000_000, "the largest request body; larger ones get 413"),
        ("--max-connections", 256, "open connections; a new one closes the longest idle"),
        ("--header-timeout", 10, "seconds a connection may wait without a complete request"),
        ("--body-timeout", 30, "seconds a client may take to send a request body"),
    ):
        sv.add_argument(
            flag, type=_positive_int(flag), default=default, help=f"{what} (default {default})"
        )
    sv.add_argument(
        "--prefill-chunk",
        type=_auto_or(_positive_int("--prefill-chunk")),
        default=None,
        help="prompt tokens prefilled between two decoding steps (default auto: as many as fit "
        "--stall-ms beside the decoding step, measured as the server runs)",
    )
    sv.add_argument(
        "--stall-ms",
        type=_positive_int("--stall-ms"),
        default=75,
        help="the time one iteration (a decoding step and a prompt chunk) aims at, so a long "
        "prompt never stalls running streams much longer (default 75)",
    )
    sv.set_defaults(fn=cmd_serve)
    return p


def _auto_or(parse):
    return lambda s: None if s == "auto" else parse(s)


def _add_ctx_dtype(p) -> None:
    p.add_argument(
        "--ctx",
        type=_positive_int("--ctx"),
        default=None,
        help="context in tokens (default: the smaller of the model's and 4096)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (bfloat16 on a GPU that has it, float32 on CPU), float32, bfloat16, float16 "
        "or int8 (CPU: weights rounded to int8 per output row)",
    )
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="compile the decoding step: auto (on a CPU for models over 64 MB of Linear "
        "weights; about a minute at the first start, seconds later), on (also small models "
        "and CUDA GPUs), off (start at once, decode eagerly)",
    )


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"azgpt: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import warnings

    warnings.formatwarning = _format_warning  # one line for the user, not a source location
    try:
        parser = build_parser()
        a, rest = parser.parse_known_args(argv)
        if getattr(a, "takes_overrides", False):
            return a.fn(a, rest)
        if rest:
            raise UserError(
                f"unrecognised arguments: {' '.join(rest)}; see `azgpt {a.command} --help`."
            )
        return a.fn(a)
    except UserError as e:
        print(f"azgpt: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `azgpt sample | head`: the reader left; not an error. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        from .fsutil import is_disk_full

        if not is_disk_full(e):
            raise
        where = f" while writing {e.filename}" if getattr(e, "filename", None) else ""
        print(
            f"azgpt: error: the disk is full{where}; nothing was left half-written, free some "
            "space and rerun.",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("azgpt: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:
        # The tokenizers library turns a Rust panic (a hostile or damaged tokenizer.json, a
        # regex that gives up) into PanicException, which is not an Exception.
        if type(e).__name__ != "PanicException":
            raise
        why = (str(e).strip().splitlines() or ["no message"])[0][:200]
        print(
            f"azgpt: error: the tokenizers library stopped on this input ({why}); the tokenizer "
            "is damaged or hostile: use one made by `azgpt tokenizer train`.",
            file=sys.stderr,
        )
        return 2
