"""Chat data: conversations read from files or folders in the forms people publish them, cleaned,
rendered with azgpt's one chat template, checked, and reported.

Accepted files: `.jsonl`, `.jsonl.gz` (one record per line), `.json` (a list of records) and
`.parquet` (one record per row). Accepted records (the first form that matches wins):

- `messages`: a list of `{"role", "content"}`, or a JSON string of that list;
- ShareGPT `conversations`: a list of `{"from", "value"}` (from: system, human/user, gpt/assistant);
- Alpaca `instruction`, optional `input`, `output` (instruction and input joined by a blank line);
- `prompt`, `completion` (strings).

Every message's text is cleaned as `azgpt clean` cleans documents (mojibake repair, invisible
characters, NFC, look-alike letters; never lowercasing), without joining or dropping lines, and
stripped at both ends. A record that cannot be used is skipped and counted by kind, with the
first places it happened (file:line), in a report:

    bad_json, unknown_format, unknown_role, non_string_content, no_assistant_turn,
    empty_assistant_text, spells_special_token, too_long

Truncation rule (documented in docs/finetune.md): a conversation longer than the context
(block_size + 1 tokens, one training row) keeps its longest prefix that ends with an assistant
message and fits; a conversation whose first assistant reply does not fit is `too_long`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .chat_template import ROLES, check_chat_tokenizer, render_chat
from .corpus import _check_file, _need, _open_binary
from .errors import UserError
from .text import repair_letters
from .tokenizer import SPECIAL_TOKENS

CHAT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
SKIP_KINDS = (
    "bad_json",
    "unknown_format",
    "unknown_role",
    "non_string_content",
    "no_assistant_turn",
    "empty_assistant_text",
    "spells_special_token",
    "too_long",
)
FIRST_PLACES = 5  # places listed per skip kind in the report
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}


class Skip(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


@dataclass
class Conversation:
    messages: list[dict]
    ids: list[int]
    mask: list[int]
    where: str  # file:line


@dataclass
class ChatReport:
    files: list[str] = field(default_factory=list)
    records: int = 0
    conversations: int = 0
    truncated: int = 0
    tokens: int = 0
    assistant_tokens: int = 0
    skipped: dict = field(default_factory=dict)  # kind -> {"count", "first"}
    cleaning: Counter = field(default_factory=Counter)

    def skip(self, kind: str, where: str) -> None:
        s = self.skipped.setdefault(kind, {"count": 0, "first": []})
        s["count"] += 1
        if len(s["first"]) < FIRST_PLACES:
            s["first"].append(where)

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "records": self.records,
            "conversations": self.conversations,
            "truncated": self.truncated,
            "tokens": self.tokens,
            "assistant_tokens": self.assistant_tokens,
            "skipped": {k: self.skipped[k] for k in SKIP_KINDS if k in self.skipped},
            "cleaning": dict(sorted(self.cleaning.items())),
        }


# ----------------------------------------------------------------------------- files


def discover_chat(paths) -> list[Path]:
    """Files named, or chat files found recursively in folders named (links inside skipped)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"chat data {p} does not exist; check --data.")
        if p.is_dir():
            found = sorted(
                q
                for q in p.rglob("*")
                if q.is_file() and not q.is_symlink() and q.name.endswith(CHAT_SUFFIXES)
            )
            if not found:
                raise UserError(
                    f"folder {p} holds no .jsonl, .jsonl.gz, .json or .parquet chat files; "
                    "point --data at chat files."
                )
            out.extend(found)
        elif p.name.endswith(CHAT_SUFFIXES):
            out.append(p)
        else:
            raise UserError(
                f"chat data {p} is not a .jsonl, .jsonl.gz, .json or .parquet file; "
                "convert it to JSONL with one conversation per line."
            )
    for p in out:
        _check_file(p)
    return out


def _utf8(raw: bytes, p: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(
            f"chat file {p} is not UTF-8 (line {line}); convert it, e.g. "
            f"`iconv -f cp1254 -t utf-8 {p.name}` for Windows Turkish/Azerbaijani text."
        ) from None


def iter_records(p: Path):
    """(where, record or None for a line that is not JSON) for every record of one file."""
    if p.name.endswith(".parquet"):
        pq = _need("pyarrow.parquet")
        try:
            pf = pq.ParquetFile(p)
            n = 0
            for batch in pf.iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    n += 1
                    yield f"{p}:{n}", row
        except UserError:
            raise
        except Exception as e:  # pyarrow raises its own error types for damaged files
            raise UserError(
                f"cannot read Parquet file {p} ({str(e)[:80]}); check the file."
            ) from None
        return
    if p.name.endswith(".json"):
        raw = p.read_bytes()
        try:
            data = json.loads(_utf8(raw, p, 1))
        except json.JSONDecodeError as e:
            raise UserError(
                f"chat file {p} is not valid JSON (line {e.lineno}); give a JSON list of records or JSONL."
            ) from None
        if not isinstance(data, list):
            raise UserError(f"chat file {p} holds no JSON list of records; give a list or JSONL.")
        for i, rec in enumerate(data, 1):
            yield f"{p}:record {i}", rec
        return
    try:
        with _open_binary(p) as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(_utf8(raw, p, n))
                except (json.JSONDecodeError, RecursionError):
                    rec = None
                yield f"{p}:{n}", rec
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read chat file {p} ({str(e)[:80]}); copy it again.") from None


# ----------------------------------------------------------------------------- records


def clean_text(text: str, stats: Counter) -> str:
    """`azgpt clean`'s repairs for one message, keeping its lines and blank lines."""
    return repair_letters(text, stats).strip()


def _message(role, content) -> dict:
    if not isinstance(role, str) or role not in ROLES:
        raise Skip("unknown_role")
    if not isinstance(content, str):
        raise Skip("non_string_content")
    return {"role": role, "content": content}


def to_messages(rec) -> list[dict]:
    """The messages of one record in any accepted form (uncleaned); raises Skip."""
    if not isinstance(rec, dict):
        raise Skip("unknown_format")
    if "messages" in rec:
        msgs = rec["messages"]
        if isinstance(msgs, str):
            try:
                msgs = json.loads(msgs)
            except (json.JSONDecodeError, RecursionError):
                raise Skip("bad_json") from None
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise Skip("unknown_format")
        return [_message(m.get("role"), m.get("content")) for m in msgs]
    if "conversations" in rec:
        conv = rec["conversations"]
        if not isinstance(conv, list) or not all(isinstance(m, dict) for m in conv):
            raise Skip("unknown_format")
        out = []
        for m in conv:
            who = m.get("from")
            role = SHAREGPT_ROLES.get(who.lower()) if isinstance(who, str) else None
            out.append(_message(role, m.get("value")))
        return out
    if "instruction" in rec and "output" in rec:
        ins, inp, outp = rec["instruction"], rec.get("input") or "", rec["output"]
        if not all(isinstance(x, str) for x in (ins, inp, outp)):
            raise Skip("non_string_content")
        user = ins.strip() + ("\n\n" + inp.strip() if inp.strip() else "")
        return [_message("user", user), _message("assistant", outp)]
    if "prompt" in rec and "completion" in rec:
        return [_message("user", rec["prompt"]), _message("assistant", rec["completion"])]
    raise Skip("unknown_format")


def check_messages(msgs: list[dict]) -> None:
    if not any(m["role"] == "assistant" for m in msgs):
        raise Skip("no_assistant_turn")
    if any(m["role"] == "assistant" and not m["content"] for m in msgs):
        raise Skip("empty_assistant_text")
    if any(s in m["content"] for m in msgs for s in SPECIAL_TOKENS):
        raise Skip("spells_special_token")


def fit(tok, msgs: list[dict], max_tokens: int) -> tuple[list[dict], list[int], list[int], bool]:
    """The conversation under the truncation rule: whole if it fits, else its longest prefix
    that ends with an assistant message and fits; raises Skip("too_long")."""
    ids, mask = render_chat(tok, msgs)
    if len(ids) <= max_tokens:
        return msgs, ids, mask, False
    ends = [i + 1 for i, m in enumerate(msgs) if m["role"] == "assistant"]
    for end in reversed(ends):
        ids, mask = render_chat(tok, msgs[:end])
        if len(ids) <= max_tokens:
            return msgs[:end], ids, mask, True
    raise Skip("too_long")


def load_chats(paths, tok, max_tokens: int) -> tuple[list[Conversation], ChatReport]:
    """Read, clean, render and check every conversation of `paths`; a conversation may hold at
    most `max_tokens` ids (one training row: block_size + 1). Nothing usable: a UserError."""
    check_chat_tokenizer(tok)
    files = discover_chat(paths)
    rep = ChatReport(files=[str(p) for p in files])
    out: list[Conversation] = []
    for p in files:
        for where, rec in iter_records(p):
            rep.records += 1
            try:
                if rec is None:
                    raise Skip("bad_json")
                msgs = [
                    {"role": m["role"], "content": clean_text(m["content"], rep.cleaning)}
                    for m in to_messages(rec)
                ]
                check_messages(msgs)
                msgs, ids, mask, cut = fit(tok, msgs, max_tokens)
            except Skip as s:
                rep.skip(s.kind, where)
                continue
            rep.truncated += cut
            rep.tokens += len(ids)
            rep.assistant_tokens += sum(mask)
            out.append(Conversation(msgs, ids, mask, where))
    rep.conversations = len(out)
    if not out:
        kinds = ", ".join(f"{k} {v['count']}" for k, v in rep.skipped.items()) or "no records"
        raise UserError(
            f"no usable conversation in {', '.join(rep.files)} ({kinds}); give records with "
            "`messages` ({role, content} with an assistant turn), ShareGPT `conversations`, "
            "Alpaca `instruction`/`output` or `prompt`/`completion`."
        )
    return out, rep


def split_val(
    convs: list[Conversation], val_fraction: float
) -> tuple[list[Conversation], list[Conversation]]:
    """A held-out share chosen by a hash of each conversation's ids: the same conversation
    lands on the same side whatever the file order, and at least one goes each way when there
    are two or more."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"sft.val_fraction must be in [0, 1), got {val_fraction}.")

    def h(c: Conversation) -> float:
        d = hashlib.sha256(json.dumps(c.ids).encode()).digest()
        return int.from_bytes(d[:8], "big") / 2**64

    order = sorted(convs, key=h)
    n_val = round(len(convs) * val_fraction)
    if val_fraction > 0 and len(convs) >= 2:
        n_val = min(max(n_val, 1), len(convs) - 1)
    val = set(id(c) for c in order[:n_val])
    return [c for c in convs if id(c) not in val], [c for c in convs if id(c) in val]
