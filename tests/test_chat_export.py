"""One chat template in every runtime: the transformers export (apply_chat_template), the GGUF's
own template as llama-cpp-python runs it, the Ollama Modelfile's Go template (rendered by a
small interpreter of the constructs it uses: Ollama itself cannot be installed here), and the
same greedy reply from azgpt, transformers and llama.cpp. Also `export --force` and names with
line breaks."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from test_chat_template import hostile_conversations
from trainkit import azgpt

from azgpt.chat_template import JINJA_TEMPLATE, OLLAMA_TEMPLATE, encode_chat, render_text
from azgpt.checkpoint import checkpoint_tokenizer, load_model
from azgpt.errors import UserError
from azgpt.export import export_hf
from azgpt.export_gguf import export_gguf
from azgpt.generate import Finished, SamplingParams, generate_events
from azgpt.tokenizer import EOT, SPECIAL_TOKENS

CONVS = hostile_conversations(200, seed=3)
REPLY_TOKENS = 16


@pytest.fixture(scope="module")
def ckpt(chat_sft):
    return chat_sft / "best"


@pytest.fixture(scope="module")
def azgpt_model(ckpt):
    model, meta = load_model(ckpt)
    tok, _, _ = checkpoint_tokenizer(ckpt, meta)
    return model.eval(), tok


@pytest.fixture(scope="module")
def hf_dir(ckpt, tmp_path_factory):
    return export_hf(str(ckpt), str(tmp_path_factory.mktemp("hf") / "hf"))


@pytest.fixture(scope="module")
def gguf_dir(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    for q in ("f32", "q8_0"):
        export_gguf(str(ckpt), str(d / f"m-{q}.gguf"), quant=q, system="Qısa cavab ver.")
    return d


def llama(path, **kw):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=128, n_batch=128, n_threads=1, verbose=False, **kw)


# ----------------------------------------------------------------------------- transformers


def test_transformers_apply_chat_template_gives_azgpt_ids(hf_dir, azgpt_model):
    from transformers import AutoTokenizer

    _, tok = azgpt_model
    hft = AutoTokenizer.from_pretrained(hf_dir)
    for msgs in CONVS:
        ids = hft.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert ids == encode_chat(tok, msgs)


def test_transformers_files_bos_and_end_of_turn(hf_dir, azgpt_model):
    from transformers import AutoTokenizer, GenerationConfig

    _, tok = azgpt_model
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["chat_template"] == JINJA_TEMPLATE  # older transformers read only this field
    assert (hf_dir / "chat_template.jinja").read_text(encoding="utf-8") == JINJA_TEMPLATE
    hft = AutoTokenizer.from_pretrained(hf_dir)
    eot = tok.token_to_id(EOT)
    assert hft("Bakı").input_ids == [eot, *tok.encode("Bakı").ids]  # as every azgpt path
    assert GenerationConfig.from_pretrained(hf_dir).eos_token_id == eot


# ----------------------------------------------------------------------------- llama.cpp


def test_gguf_own_template_as_llama_cpp_python_runs_it_gives_azgpt_ids(gguf_dir, azgpt_model):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    _, tok = azgpt_model
    llm = llama(gguf_dir / "m-f32.gguf", vocab_only=True)
    assert llm.chat_format == "chat_template.default"  # the GGUF's own template, no fallback
    template = llm.metadata["tokenizer.chat_template"]
    assert template == JINJA_TEMPLATE
    eos = llm._model.token_get_text(llm.token_eos())
    bos = llm._model.token_get_text(llm.token_bos())
    fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
    for msgs in CONVS:
        r = fmt(messages=msgs)
        ids = llm.tokenize(r.prompt.encode("utf-8"), add_bos=not r.added_special, special=True)
        assert ids == encode_chat(tok, msgs)


def test_gguf_registers_the_end_of_turn(gguf_dir, azgpt_model):
    import gguf

    _, tok = azgpt_model
    f = gguf.GGUFReader(gguf_dir / "m-q8_0.gguf").fields
    eot = tok.token_to_id(EOT)
    assert int(f["tokenizer.ggml.eot_token_id"].parts[-1][0]) == eot
    assert int(f["tokenizer.ggml.eos_token_id"].parts[-1][0]) == eot


# ----------------------------------------------------------------------------- one greedy reply


def _azgpt_reply(model, tok, ids):
    p = SamplingParams(max_tokens=REPLY_TOKENS, temperature=0.0)
    events = list(generate_events(model, tok, ids, p))
    fin = events[-1]
    assert isinstance(fin, Finished)
    return fin.context[len(ids) :], fin.reason


def _until_special(ids, specials):
    out = []
    for i in ids:
        if i in specials:
            return out, True
        out.append(i)
    return out, False


def test_greedy_reply_is_the_same_in_azgpt_transformers_and_llama_cpp(
    hf_dir, gguf_dir, azgpt_model
):
    from transformers import AutoModelForCausalLM

    model, tok = azgpt_model
    specials = {tok.token_to_id(s) for s in SPECIAL_TOKENS}
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    llm = llama(gguf_dir / "m-f32.gguf", logits_all=True)
    fit = [c for c in CONVS if len(encode_chat(tok, c)) + REPLY_TOKENS <= 128]
    # Replies that end with the end of turn and replies cut at the length, four of each where
    # the model gives them (which conversations the tiny fine-tuned model ends differs with
    # the CPU's float rounding during training).
    replies = [(c, *_azgpt_reply(model, tok, encode_chat(tok, c))) for c in fit]
    ended = [r for r in replies if r[2] == "stop"][:4]
    convs = ended + [r for r in replies if r[2] != "stop"][: 8 - len(ended)]
    assert len(convs) == 8 and ended, f"{len(ended)} of {len(fit)} replies ended"
    stopped = 0
    for msgs, ours, reason in convs:
        ids = encode_chat(tok, msgs)
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]), max_new_tokens=REPLY_TOKENS, do_sample=False, pad_token_id=0
            )[0, len(ids) :].tolist()
        theirs, hit = _until_special(out, specials)
        assert theirs == ours[: len(theirs)] and (hit or len(theirs) == REPLY_TOKENS)
        assert hit == (reason == "stop")
        # llama.cpp, greedy from the same ids
        llm.reset()
        seq = list(ids)
        gen = []
        for _ in range(REPLY_TOKENS):
            llm.reset()
            llm.eval(seq)
            nxt = int(llm.scores[llm.n_tokens - 1].argmax())
            if nxt in specials:
                break
            gen.append(nxt)
            seq.append(nxt)
        assert gen == ours
        stopped += hit
    assert stopped == len(ended)  # transformers ended exactly the replies azgpt ended


# ----------------------------------------------------------------------------- Ollama


def render_go(template: str, messages: list[dict]) -> str:
    """Ollama's Go text/template for the constructs OLLAMA_TEMPLATE uses: range .Messages,
    if eq .Role "...", else, end, .Role, .Content, and {{- / -}} whitespace trimming."""
    parts = re.split(r"({{-?\s*.*?\s*-?}})", template)
    toks = []  # ("text", s) or ("act", body)
    for p in parts:
        if p.startswith("{{"):
            toks.append(("act", p.strip("{}-").strip(), p.startswith("{{-"), p.endswith("-}}")))
        else:
            toks.append(("text", p))
    for i, t in enumerate(toks):  # trimming markers eat the whitespace next to them
        if t[0] == "act" and t[2] and i and toks[i - 1][0] == "text":
            toks[i - 1] = ("text", toks[i - 1][1].rstrip())
        if t[0] == "act" and t[3] and i + 1 < len(toks) and toks[i + 1][0] == "text":
            toks[i + 1] = ("text", toks[i + 1][1].lstrip())

    def run(i, msg, out, until=("end",)):
        while i < len(toks):
            t = toks[i]
            if t[0] == "text":
                out.append(t[1])
                i += 1
                continue
            body = t[1]
            if body in until or body == "else":
                return i
            if body == "range .Messages":
                start = i + 1
                for m in messages:
                    end = run(start, m, out)
                i = end + 1 if messages else skip(start) + 1
            elif body.startswith("if eq .Role "):
                want = json.loads(body.split(None, 3)[3])
                j = run(i + 1, msg, out if msg["role"] == want else [])
                if toks[j][1] == "else":
                    j = run(j + 1, msg, [] if msg["role"] == want else out)
                i = j + 1
            elif body in (".Role", ".Content"):
                out.append(msg[body[1:].lower()])
                i += 1
            else:
                raise AssertionError(f"construct not interpreted: {body}")
        return i

    def skip(i):
        depth = 0
        while True:
            t = toks[i]
            if t[0] == "act" and (t[1].startswith(("range", "if"))):
                depth += 1
            elif t[0] == "act" and t[1] == "end":
                if depth == 0:
                    return i
                depth -= 1
            i += 1

    out: list[str] = []
    run(0, None, out)
    return "".join(out)


def test_modelfile_template_renders_azgpt_text_after_the_bos_ollama_adds():
    for msgs in CONVS:
        # Ollama tokenizes the rendered text with special tokens parsed and prepends the BOS
        # (<|endoftext|>, add_bos_token); the template itself must not emit it.
        assert EOT + render_go(OLLAMA_TEMPLATE, msgs) == render_text(msgs)


def test_modelfile_of_a_chat_model(gguf_dir):
    text = (gguf_dir / "Modelfile").read_text(encoding="utf-8")
    assert f'TEMPLATE """{OLLAMA_TEMPLATE}"""' in text
    assert 'SYSTEM """Qısa cavab ver."""' in text and "PARAMETER system" not in text
    for s in (EOT, "<|user|>", "<|system|>", "<|assistant|>"):
        assert f'PARAMETER stop "{s}"' in text
    # two quantizations in one folder: one Modelfile each
    assert "FROM ./m-f32.gguf" in text
    assert "FROM ./m-q8_0.gguf" in (gguf_dir / "m-q8_0.Modelfile").read_text(encoding="utf-8")


def test_system_is_refused_for_a_base_model(chat_base, tmp_path):
    with pytest.raises(UserError, match="--system applies to chat models"):
        export_gguf(str(chat_base), str(tmp_path / "b.gguf"), system="Salam")
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- --force, names


def test_force_replaces_only_what_azgpt_wrote(ckpt, hf_dir, gguf_dir, tmp_path):
    # an earlier export is replaced
    again = tmp_path / "hf"
    shutil.copytree(hf_dir, again)
    r = azgpt("export", "--ckpt", str(ckpt), "--out", str(again), "--force")
    assert r.returncode == 0, r.stderr
    # a folder holding anything else is not
    (again / "notes.txt").write_text("mine", encoding="utf-8")
    r = azgpt("export", "--ckpt", str(ckpt), "--out", str(again), "--force")
    assert r.returncode == 2 and "azgpt did not write (notes.txt)" in r.stderr
    assert (again / "notes.txt").read_text(encoding="utf-8") == "mine"
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="did not write"):
        export_hf(str(ckpt), str(home), force=True)
    assert (home / "thesis.tex").exists()
    # GGUF: an azgpt GGUF is replaced, another file of that name is not
    g = tmp_path / "g"
    shutil.copytree(gguf_dir, g)
    export_gguf(str(ckpt), str(g / "m-q8_0.gguf"), quant="q8_0", force=True)
    (g / "other.gguf").write_bytes(b"GGUF not ours")
    with pytest.raises(UserError, match="not written by azgpt"):
        export_gguf(str(ckpt), str(g / "other.gguf"), force=True)
    assert (g / "other.gguf").read_bytes() == b"GGUF not ours"
    (g / "Hand.Modelfile").write_text("FROM x\n", encoding="utf-8")
    with pytest.raises(UserError, match="not written by azgpt"):
        export_gguf(str(ckpt), str(g / "n.gguf"), modelfile=str(g / "Hand.Modelfile"), force=True)
    assert not (g / "n.gguf").exists() and (g / "Hand.Modelfile").read_text() == "FROM x\n"


def test_a_newline_in_the_run_name_or_out_cannot_add_modelfile_lines(ckpt, tmp_path):
    run = tmp_path / "evil\nPARAMETER temperature 9"
    run.mkdir()
    shutil.copytree(ckpt.resolve(), run / "step-000001")
    p, mf = export_gguf(str(run / "step-000001"), str(tmp_path / "m.gguf"), quant="q8_0")
    lines = mf.read_text(encoding="utf-8").splitlines()
    assert not any(ln.startswith("PARAMETER temperature 9") for ln in lines)
    assert [ln for ln in lines if ln.startswith("PARAMETER temperature")] == [
        "PARAMETER temperature 0.8"
    ]
    r = azgpt(
        "export", "--ckpt", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "a\nFROM b.gguf")
    )
    assert r.returncode == 2 and "newline or control character" in r.stderr
    r = azgpt(
        "export", "--ckpt", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "c.gguf"),
        "--system", 'x"""\nPARAMETER stop "a"',
    )  # fmt: skip
    assert r.returncode == 2 and '--system must not hold """' in r.stderr
    assert not (tmp_path / "c.gguf").exists()
