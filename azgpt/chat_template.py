"""azgpt's one chat template: how a conversation becomes token ids, defined once.

The format (ids, left to right):

    <|endoftext|>                               a document starts, as in pre-training
    <|system|> text "\\n"                        per system message
    <|user|> text "\\n"                          per user message
    <|assistant|> text <|endoftext|>            per assistant message (the end of its turn)
    <|assistant|>                               the generation prompt (when asked for)

The end of an assistant turn is `<|endoftext|>`, the token pre-training already ends every
document with: every tokenizer azgpt ever wrote has it, transformers, llama.cpp and Ollama stop
on it as their eos without extra registration, and a base model already predicts it (it has a
trained embedding, unlike the reserved slots).

Text that spells a special token (`<|user|>`, `<|endoftext|>`) inside a message is PARSED as
that token, on every path. transformers and llama.cpp tokenize a rendered chat string with
special-token parsing, and Ollama's Go templates have no string replacement to neutralise such
text, so parsing is the one behaviour all four runtimes can share. The chat data readers skip
training records whose text spells a special token, so no model is taught to emit one inside a
reply.

Every other path is derived from this module: the trainer's ids and loss mask
(`render_chat`), `azgpt serve` and `azgpt chat` (`encode_chat`), the transformers export
(`JINJA_TEMPLATE`), the GGUF (`JINJA_TEMPLATE`) and the Ollama Modelfile (`OLLAMA_TEMPLATE`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import UserError
from .tokenizer import EOT, SPECIAL_TOKENS

CHAT_FORMAT = "azgpt-chat-1"  # recorded in fine-tuned checkpoints' meta.json as chat_template
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {r: f"<|{r}|>" for r in ROLES}
END_OF_TURN = EOT

# Jinja for transformers (`chat_template`) and the GGUF (`tokenizer.chat_template`). Whitespace
# control on every tag, so transformers' trim_blocks/lstrip_blocks and llama.cpp's own Jinja
# engine render the same string; only `+` on strings, no filters (engines differ on those).
JINJA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('azgpt chat: role must be system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>' + message['content'] + eos_token -}}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)

# Ollama's Go template. No leading <|endoftext|>: Ollama adds the GGUF's BOS itself when it
# tokenizes the rendered prompt (add_bos_token is true in azgpt's GGUF).
OLLAMA_TEMPLATE = (
    '{{- range .Messages }}{{ if eq .Role "assistant" }}<|assistant|>{{ .Content }}<|endoftext|>'
    "{{ else }}<|{{ .Role }}|>{{ .Content }}\n{{ end }}{{ end }}<|assistant|>"
)


class ChatError(UserError, ValueError):
    """A conversation the template cannot render (unknown role, non-string content)."""


def _check(messages: Sequence[dict]) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ChatError("a conversation must be a list of {role, content} messages.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"message {i} is not an object with role and content.")
        if m.get("role") not in ROLES:
            raise ChatError(
                f"message {i} has role {m.get('role')!r}; use one of {', '.join(ROLES)}."
            )
        if not isinstance(m.get("content"), str):
            raise ChatError(f"message {i} ({m['role']}) has content that is not a string.")


def render_text(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The template as a string (what the Jinja template renders), for tests and debugging."""
    _check(messages)
    out = [EOT]
    for m in messages:
        if m["role"] == "assistant":
            out.append(ROLE_TOKENS["assistant"] + m["content"] + END_OF_TURN)
        else:
            out.append(ROLE_TOKENS[m["role"]] + m["content"] + "\n")
    if add_generation_prompt:
        out.append(ROLE_TOKENS["assistant"])
    return "".join(out)


def _special_ids(tok) -> dict[str, int]:
    ids = {}
    for s in SPECIAL_TOKENS:
        i = tok.token_to_id(s)
        if i is not None:
            ids[s] = i
    return ids


def check_chat_tokenizer(tok, where: str = "the tokenizer") -> None:
    """Refuse a tokenizer that lacks a token the template needs, in one sentence."""
    missing = [t for t in (EOT, *ROLE_TOKENS.values()) if tok.token_to_id(t) is None]
    if missing:
        raise UserError(
            f"{where} has no {', '.join(missing)} token, which azgpt's chat template needs; "
            "train a new tokenizer with `azgpt tokenizer train` (it reserves them) and a base on it."
        )


_SPLIT_CACHE: dict[tuple, re.Pattern] = {}


def _splitter(specials: dict[str, int]) -> re.Pattern:
    key = tuple(sorted(specials))
    pat = _SPLIT_CACHE.get(key)
    if pat is None:
        alts = sorted(specials, key=len, reverse=True)
        pat = _SPLIT_CACHE[key] = re.compile("(" + "|".join(re.escape(s) for s in alts) + ")")
    return pat


def encode_text(tok, text: str) -> list[int]:
    """Ids of `text` with special-token spellings parsed as those tokens, the way transformers
    and llama.cpp tokenize a rendered chat: cut at special tokens, encode each piece alone."""
    specials = _special_ids(tok)
    ids: list[int] = []
    for piece in _splitter(specials).split(text):
        if not piece:
            continue
        if piece in specials:
            ids.append(specials[piece])
        else:
            ids.extend(tok.encode(piece, add_special_tokens=False).ids)
    return ids


def render_chat(
    tok, messages: Sequence[dict], add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """The ids of a conversation and a loss mask of the same length: 1 on assistant text and
    the `<|endoftext|>` that ends each assistant turn (so the model learns to stop), 0 on the
    leading `<|endoftext|>`, role tokens, and system and user text.

    Each message is encoded on its own: every message starts with a special token and every
    system/user message ends its piece with "\\n", so the pieces are exactly the stretches a
    runtime tokenizes between special tokens, and the ids equal those of the whole string."""
    _check(messages)
    check_chat_tokenizer(tok)
    eot = tok.token_to_id(EOT)
    role = {r: tok.token_to_id(t) for r, t in ROLE_TOKENS.items()}
    ids, mask = [eot], [0]
    for m in messages:
        if m["role"] == "assistant":
            body = encode_text(tok, m["content"]) + [eot]
            ids += [role["assistant"], *body]
            mask += [0] + [1] * len(body)
        else:
            body = encode_text(tok, m["content"] + "\n")
            ids += [role[m["role"]], *body]
            mask += [0] * (1 + len(body))
    if add_generation_prompt:
        ids.append(role["assistant"])
        mask.append(0)
    return ids, mask


def encode_chat(tok, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The ids a model sees for `messages` ([{"role", "content"}]): starts with `<|endoftext|>`,
    ends with `<|assistant|>` when `add_generation_prompt`. Raises ChatError (a UserError and a
    ValueError) for an unknown role or non-string content."""
    return render_chat(tok, messages, add_generation_prompt)[0]


def end_of_turn_id(tok) -> int:
    """The token that ends an assistant turn; generation stops on it."""
    i = tok.token_to_id(END_OF_TURN)
    if i is None:
        raise UserError(
            f"the tokenizer has no {END_OF_TURN} token; retrain it with `azgpt tokenizer train`."
        )
    return i
