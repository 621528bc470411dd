"""Untrusted files, hostile paths, huge inputs and full disks: each test is a way a user could
lose data or a machine, and shows that azgpt does not let it happen."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from trainkit import SAMPLE, azgpt, make_data, tiny_config

from azgpt.errors import UserError
from azgpt.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("harddata"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    tok, d = data
    out = tmp_path_factory.mktemp("hardrun") / "run"
    train(tiny_config(tok, d, out, **{"train.max_iters": 4}))
    return out


def _one_sentence(r) -> str:
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if x.startswith("azgpt: error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def _copy_ckpt(run, tmp_path) -> Path:
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(run / "last", ck)
    return ck


# ----------------------------------------------------------------------------- untrusted checkpoints


def _peak_rss_of(code: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run `code` in a fresh interpreter; return it and its peak RSS in MB."""
    probe = (
        code
        + "\nimport resource, sys\n"
        + "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    peak = int(r.stderr.rsplit("PEAK", 1)[1].split()[0])
    return r, peak


def test_a_huge_config_json_is_refused_before_any_allocation(run, tmp_path):
    ck = _copy_ckpt(run, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(n_layer=100, n_embd=4096, n_head=32)  # 20B parameters: 80 GB
    (ck / "config.json").write_text(json.dumps(cfg))
    r = azgpt("sample", "--ckpt", str(ck), "--prompt", "Bakı")
    assert "more than azgpt's limit" in _one_sentence(r)


def test_a_config_that_disagrees_with_the_weights_allocates_nothing(run, tmp_path):
    """Within the size limit (750M parameters, 3 GB) but not what model.safetensors holds: the
    header is compared first, so the loader never builds the big model."""
    ck = _copy_ckpt(run, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(n_layer=60, n_embd=1024, n_head=16)
    (ck / "config.json").write_text(json.dumps(cfg))
    code = (
        "from azgpt.checkpoint import load_model\n"
        "from azgpt.errors import UserError\n"
        "try:\n"
        f"    load_model({str(ck)!r})\n"
        "except UserError as e:\n"
        "    print('REFUSED', e)\n"
    )
    r, peak_mb = _peak_rss_of(code)
    assert "REFUSED" in r.stdout and "does not match config.json" in r.stdout, r.stderr[-2000:]
    assert peak_mb < 1500, f"peak RSS {peak_mb} MB: the model was built before the check"


def test_a_weights_file_with_a_lying_header_is_refused(run, tmp_path):
    ck = _copy_ckpt(run, tmp_path)
    f = ck / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 10**12]  # points past the end of the file
    body = json.dumps(header).encode()
    f.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])
    r = azgpt("sample", "--ckpt", str(ck))
    assert "truncated or corrupt" in _one_sentence(r)


def test_a_wrong_tokenizer_for_the_checkpoint_is_refused(run, data, tmp_path):
    from azgpt.tokenizer import save_tokenizer, train_tokenizer

    other = tmp_path / "other_tok"
    texts = [p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt"))][:2]
    save_tokenizer(train_tokenizer(texts, vocab_size=400), other)
    doc = tmp_path / "d.txt"
    doc.write_text("Bakı Azərbaycanın paytaxtıdır.\n", encoding="utf-8")
    for cmd in (
        ["sample", "--ckpt", str(run / "last"), "--tokenizer", str(other)],
        ["eval", "--ckpt", str(run / "last"), "--tokenizer", str(other), "--text", str(doc)],
        [
            "export",
            "--ckpt",
            str(run / "last"),
            "--tokenizer",
            str(other),
            "--out",
            str(tmp_path / "hf"),
        ],
    ):
        line = _one_sentence(azgpt(*cmd))
        assert "is not the one" in line and "omit --tokenizer" in line, line
    assert not (tmp_path / "hf").exists()


def test_a_changed_tokenizer_inside_the_checkpoint_does_not_blame_an_option_never_given(
    run, tmp_path
):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(run / "last", ck)
    tj = ck / "tokenizer.json"
    tj.write_text(tj.read_text(encoding="utf-8") + "\n", encoding="utf-8")  # same JSON, new sha256
    line = _one_sentence(azgpt("sample", "--ckpt", str(ck)))
    assert "is not the one" in line and "tokenizer.json was changed" in line, line
    assert "--tokenizer" not in line, line


def test_an_untrusted_tokenizer_regex_is_refused(run, tmp_path):
    from azgpt.tokenizer import load_tokenizer

    spec = json.loads((run / "last" / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(a+)+$"  # backtracks
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(spec))
    with pytest.raises(UserError, match="pre-tokenizer azgpt does not know"):
        load_tokenizer(bad)
    spec["model"]["type"] = "WordPiece"
    bad.write_text(json.dumps(spec))
    with pytest.raises(UserError, match="WordPiece model, not a byte-level BPE"):
        load_tokenizer(bad)


def test_deeply_nested_json_is_a_clear_error(run, tmp_path):
    ck = _copy_ckpt(run, tmp_path)
    (ck / "meta.json").write_text("[" * 100_000 + "]" * 100_000)
    line = _one_sentence(azgpt("sample", "--ckpt", str(ck)))
    assert "meta.json" in line


# ----------------------------------------------------------------------------- links and special files


def test_a_lock_file_that_is_a_link_is_never_written_through(data, tmp_path):
    tok, d = data
    victim = tmp_path / "precious.txt"
    victim.write_text("do not touch\n")
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(victim, out / ".lock")
    with pytest.raises(UserError, match="symbolic link"):
        train(tiny_config(tok, d, out))
    assert victim.read_text() == "do not touch\n"
    (out / ".lock").unlink()
    os.link(victim, out / ".lock")  # a hard link: same file, two names
    with pytest.raises(UserError, match="not a plain lock file"):
        train(tiny_config(tok, d, out))
    assert victim.read_text() == "do not touch\n"


def test_prepare_never_writes_through_a_planted_manifest_link(data, tmp_path):
    from azgpt.prepare import run_prepare

    tok, _ = data
    victim = tmp_path / "precious.txt"
    victim.write_text("do not touch\n")
    out = tmp_path / "data"
    out.mkdir()
    os.symlink(victim, out / "manifest.json")
    run_prepare([str(SAMPLE)], str(tok), str(out), val_fraction=0.1, workers=1)
    assert victim.read_text() == "do not touch\n"
    assert not (out / "manifest.json").is_symlink()
    assert json.loads((out / "manifest.json").read_text())["train"]["tokens"] > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_out_onto_a_device_node_writes_into_it_and_keeps_it(tmp_path):
    node = tmp_path / "null"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null
    report = tmp_path / "report.json"
    r = azgpt("clean", str(SAMPLE), "--out", str(node), "--report", str(report))
    assert r.returncode == 0, r.stderr[-2000:]
    assert stat.S_ISCHR(os.stat(node).st_mode), "the device node was replaced by a file"
    assert json.loads(report.read_text())["documents_out"] > 0


def test_outputs_follow_the_umask(run):
    for f in ("model.safetensors", "tokenizer.json", "meta.json"):
        assert os.stat(run / "last" / f).st_mode & 0o044, f  # readable by group/others (umask 022)
    assert os.stat((run / "last").resolve()).st_mode & 0o055


def test_a_refused_train_creates_nothing(data, tmp_path):
    tok, d = data
    out = tmp_path / "never"
    r = azgpt("train", *[f"--{k}" for k in ()], "--config", str(Path(__file__).parents[1] / "configs/tiny.toml"),
              f"--data.dir={tmp_path / 'missing'}", f"--data.tokenizer={tok}", f"--train.out_dir={out}",
              "--train.device=cpu")  # fmt: skip
    _one_sentence(r)
    assert not out.exists(), list(out.rglob("*"))


# ----------------------------------------------------------------------------- huge inputs


@pytest.mark.parametrize("pretok", ["gpt4", "az", "gpt2"])
def test_long_documents_encode_in_pieces_with_identical_ids(pretok, monkeypatch):
    """A document with no blank lines is one document however long; it is encoded in bounded
    pieces, cut where every pre-tokenizer cuts anyway, and gives exactly the ids of the whole."""
    import azgpt.tokenizer as T

    texts = [p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt"))]
    tok = T.train_tokenizer(texts, vocab_size=600, pretokenizer=pretok)
    one_line = " ".join(t.replace("\n", " ") for t in texts)  # no newline at all
    lines = "\n".join(texts).replace("\n\n", "\n")
    for text in (one_line, lines, "ə" * 5000 + " " + "ş" * 5000):
        whole = tok.encode(text, add_special_tokens=False).ids
        monkeypatch.setattr(T, "PIECE_CHARS", 997)
        assert len(T.pieces(text, 997)) > 3
        assert T.encode(tok, text) == whole
        monkeypatch.undo()


def _long_document(tmp_path) -> Path:
    """A folder with one file of one long document (no blank line) and a file of a short one."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt"))]
    big = tmp_path / "in" / "big.txt"
    big.parent.mkdir()
    big.write_text("\n".join(texts).replace("\n\n", "\n"), encoding="utf-8")
    (big.parent / "small.txt").write_text("Bakı gözəl şəhərdir.\n", encoding="utf-8")
    return big


def test_a_long_document_is_read_in_parts_cut_between_lines(tmp_path, monkeypatch):
    """Memory holds a part, not the document: the parts are bounded, cut before a line that
    starts with a letter, and joined by newlines they are the document."""
    from collections import Counter

    import azgpt.corpus as C

    big = _long_document(tmp_path)
    (whole,) = C.iter_corpus([big], Counter())
    assert not C.continues(whole) and len(whole) > 20_000
    monkeypatch.setattr(C, "PART_CHARS", 3000)
    parts = list(C.iter_corpus([big], Counter()))
    assert len(parts) > 5
    assert all(C.continues(p) for p in parts[:-1]) and not C.continues(parts[-1])
    assert "\n".join(parts) == whole
    longest_line = max(len(x) for x in whole.split("\n"))
    assert max(len(p) for p in parts) <= 3000 + longest_line + 1
    assert all(not p[0].isspace() for p in parts)


def test_prepare_of_one_long_document_gives_the_ids_of_the_whole(data, tmp_path, monkeypatch):
    """The long document comes in parts (cut between lines) and each part in pieces; its ids
    are those of the whole, one end-of-text after its last part, all in one split, also when
    it is the train document moved to val."""
    import numpy as np

    import azgpt.corpus as C
    import azgpt.prepare as P
    import azgpt.tokenizer as T
    from azgpt.tokenizer import load_tokenizer

    tok_dir, _ = data
    big = _long_document(tmp_path)
    from collections import Counter

    (doc,) = C.iter_corpus([big], Counter())  # the one document, whole
    tok = load_tokenizer(tok_dir)
    want = tok.encode(T.nfc(doc), add_special_tokens=False).ids
    eot = tok.token_to_id("<|endoftext|>")
    monkeypatch.setattr(C, "PART_CHARS", 3000)
    monkeypatch.setattr(P, "PIECE_CHARS", 1000)
    monkeypatch.setattr(T, "PIECE_CHARS", 1000)
    monkeypatch.setattr(P, "GROUP_CHARS", 5000)
    for frac, batch in ((0.4, 4000), (0.001, 4000), (0.001, 1 << 20)):
        out = tmp_path / f"d{frac}-{batch}"
        res = P.run_prepare([str(big.parent)], str(tok_dir), str(out), val_fraction=frac,
                            workers=1, backend="tokenizers", batch_bytes=batch)  # fmt: skip
        split = {s: np.load(out / f"{s}.npy").tolist() for s in ("train", "val")}
        docs = []
        for s in ("train", "val"):
            cur: list[int] = []
            for t in split[s]:
                if t == eot:
                    docs.append(cur)
                    cur = []
                else:
                    cur.append(t)
            assert cur == []  # every split ends at a document's end
        assert want in docs, (frac, batch)
        assert res.manifest["train"]["documents"] + res.manifest["val"]["documents"] == 2
        assert res.manifest["val"]["documents"] >= 1


def test_clean_of_a_long_document_in_parts_equals_clean_of_the_whole(tmp_path, monkeypatch):
    import azgpt.corpus as C
    from azgpt.clean import run_clean

    big = _long_document(tmp_path)
    for kw in ({}, {"filter": False}):
        whole = run_clean([str(big.parent)], str(tmp_path / "whole.txt"), **kw)
        with monkeypatch.context() as m:
            m.setattr(C, "PART_CHARS", 3000)
            parts = run_clean([str(big.parent)], str(tmp_path / "parts.txt"), **kw)
        text = (tmp_path / "whole.txt").read_text(encoding="utf-8")
        assert (tmp_path / "parts.txt").read_text(encoding="utf-8") == text, kw
        assert len(text) > 20_000 and text.count("\n\n") == 1
        assert (parts.documents_in, parts.documents_out) == (whole.documents_in, 2)
        assert parts.bytes_in == whole.bytes_in and parts.bytes_out == whole.bytes_out


def test_eval_text_scores_a_long_document_in_parts_as_one(run, tmp_path, monkeypatch):
    import azgpt.corpus as C
    import azgpt.evaluate as E
    from azgpt.checkpoint import load_model
    from azgpt.tokenizer import load_tokenizer

    big = _long_document(tmp_path)
    model, _ = load_model(run / "last")
    tok = load_tokenizer(run / "last")
    files = [str(big.parent)]
    whole = E.eval_texts(model, tok, files)
    monkeypatch.setattr(C, "PART_CHARS", 3000)
    parts = E.eval_texts(model, tok, files)
    assert parts == whole  # one group: the parts extend one sequence, exactly the whole's
    monkeypatch.setattr(E, "GROUP_TOKENS", 500)  # scored between parts: context restarts there
    flushed = E.eval_texts(model, tok, files)
    for k in ("tokens", "bytes", "documents"):
        assert flushed[k] == whole[k], k
    assert whole["documents"] == 2
    assert abs(flushed["bpb"] - whole["bpb"]) < 0.05 * whole["bpb"]


# ----------------------------------------------------------------------------- full disks (a real one)


@pytest.fixture
def small_disk(tmp_path):
    """A real 900 KB file system (tmpfs), where the machine lets us mount one."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:80]})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_disk_filling_up_mid_checkpoint_is_one_sentence_and_leaves_no_temp(data, small_disk):
    tok, d = data
    from trainkit import train_cli

    out = small_disk / "run"
    r = train_cli(
        tok, d, out, **{"train.max_iters": 40, "train.eval_interval": 4, "train.keep_last": 50}
    )
    line = _one_sentence(r)
    assert "disk filled up" in line and "previous checkpoint is intact" in line, line
    assert not list(out.glob(".tmp-step-*"))
    last = out / "last"
    assert last.exists() and (last / "model.safetensors").is_file()


def test_full_disks_in_clean_and_prepare_are_one_sentence(data, small_disk, tmp_path):
    tok, _ = data
    big = tmp_path / "big.txt"
    body = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt")))
    big.write_text((body + "\n\n") * 15, encoding="utf-8")  # ~1.2 MB, more than the disk
    r = azgpt("clean", str(big), "--out", str(small_disk / "clean.txt"), "--no-filter")
    assert "disk is full" in _one_sentence(r)
    assert not (small_disk / "clean.txt").exists()
    assert not [p for p in small_disk.iterdir() if p.name.startswith(".")], list(
        small_disk.iterdir()
    )
    (small_disk / "clean.txt").unlink(missing_ok=True)
    big.write_text((body + "\n\n") * 40, encoding="utf-8")  # token files larger than the disk
    r = azgpt("prepare", str(big), "--tokenizer", str(tok), "--out", str(small_disk / "data"))
    line = _one_sentence(r)
    assert "free" in line and "space" in line, line
    left = list((small_disk / "data").glob("*")) + list((small_disk / "data").glob(".*"))
    assert not left, left


def test_report_onto_the_output_or_an_input_is_refused(tmp_path):
    out = tmp_path / "clean.txt"
    line = _one_sentence(azgpt("clean", str(SAMPLE), "--out", str(out), "--report", str(out)))
    assert "same file" in line and not out.exists()
    src = tmp_path / "src.txt"
    src.write_text("Bakı Azərbaycanın paytaxtıdır.\n", encoding="utf-8")
    line = _one_sentence(azgpt("clean", str(src), "--out", str(out), "--report", str(src)))
    assert "one of the inputs" in line
    assert src.read_text(encoding="utf-8") == "Bakı Azərbaycanın paytaxtıdır.\n"


def test_a_file_truncated_while_prepare_reads_it_is_refused(data, tmp_path, monkeypatch):
    import azgpt.prepare as P

    tok, _ = data
    src = tmp_path / "in.txt"
    body = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt")))
    src.write_text(body, encoding="utf-8")
    real = P.iter_corpus

    def truncating(files, *a, **k):
        for i, d in enumerate(real(files, *a, **k)):
            if i == 3:
                src.write_text("", encoding="utf-8")  # another program empties the file
            yield d

    monkeypatch.setattr(P, "iter_corpus", truncating)
    with pytest.raises(UserError, match="changed while prepare was reading it"):
        P.run_prepare([str(src)], str(tok), str(tmp_path / "d"), workers=1, backend="tokenizers")
    assert not (tmp_path / "d" / "manifest.json").exists()


# ----------------------------------------------------------------------------- corpus files


def test_legacy_code_pages_are_decoded_not_stripped(tmp_path):
    from collections import Counter

    from azgpt.corpus import discover, iter_corpus

    latin = "Azärbaycan Respublikası Qafqazın şärqindä yerläşir. Bakı şähäri, İçäri Şähär."
    cyr = "Бакы Азербайджанын пайтахтыдыр, шэхэр Хәзәр дәнизинин сахилинде йерлешир."
    (tmp_path / "lat.txt").write_bytes(latin.encode("cp1254"))
    (tmp_path / "cyr.txt").write_bytes(cyr.replace("ә", "э").encode("cp1251"))
    (tmp_path / "utf.txt").write_bytes("Gəncə şəhəri".encode() + b"\xff" + " böyükdür.".encode())
    stats = Counter()
    docs = list(iter_corpus(discover([tmp_path]), stats))
    assert docs[1] == latin  # cyr.txt, lat.txt, utf.txt in sorted order
    assert docs[0] == cyr.replace("ә", "э")
    assert docs[2] == "Gəncə şəhəri böyükdür."  # UTF-8 with one stray byte: the byte goes
    assert stats["cp1254_lines_decoded"] == 1 and stats["cp1251_lines_decoded"] == 1


def test_deeply_nested_jsonl_lines_are_skipped_and_counted(tmp_path):
    from collections import Counter

    from azgpt.corpus import discover, iter_corpus

    f = tmp_path / "c.jsonl"
    deep = "[" * 100_000 + "]" * 100_000
    f.write_text(deep + "\n" + json.dumps({"text": "Bakı gözəldir."}) + "\n", encoding="utf-8")
    stats = Counter()
    assert list(iter_corpus(discover([f]), stats)) == ["Bakı gözəldir."]
    assert stats["bad_json_lines"] == 1


def test_a_corrupt_gzip_is_one_sentence(tmp_path):
    import gzip

    raw = gzip.compress(("Bakı Azərbaycanın paytaxtıdır.\n" * 5000).encode())
    bad = bytearray(raw)
    for i in range(200, 400):
        bad[i] ^= 0x5A  # flip bits in the deflate stream (not truncated: corrupt)
    f = tmp_path / "c.txt.gz"
    f.write_bytes(bytes(bad))
    line = _one_sentence(azgpt("clean", str(f), "--out", str(tmp_path / "o.txt")))
    assert "corrupt" in line or "cannot read" in line
    assert not (tmp_path / "o.txt").exists()


def test_links_inside_a_folder_are_skipped_and_named_links_are_read(tmp_path):
    """One rule for files and folders alike: a link found inside a folder is not followed (a
    link planted in a shared folder cannot pull a private file into the corpus); a path named on
    the command line is read, link or not."""
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.txt").write_text("Gizli parol: Xəzər-1234 məxfidir.\n", encoding="utf-8")
    shared = tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    (shared / "sub" / "a.txt").write_text("Bakı Azərbaycanın paytaxtıdır.\n", encoding="utf-8")
    (shared / "link.txt").symlink_to(private / "secret.txt")
    (shared / "linkdir").symlink_to(private)
    out = tmp_path / "o.txt"
    r = azgpt("clean", str(shared), "--out", str(out), "--no-filter")
    assert r.returncode == 0, r.stderr
    text = out.read_text(encoding="utf-8")
    assert "paytaxt" in text and "Gizli" not in text
    warn = [x for x in r.stderr.splitlines() if x.startswith("azgpt: warning:")]
    assert len(warn) == 1 and "skipped 2 symbolic link(s)" in warn[0], r.stderr
    assert "link.txt" in warn[0] and "linkdir" in warn[0]
    r = azgpt("clean", str(shared / "link.txt"), "--out", str(out), "--no-filter")
    assert r.returncode == 0, r.stderr
    assert "Gizli" in out.read_text(encoding="utf-8")
    # A folder that holds nothing but links is a folder without corpus files.
    only = tmp_path / "only"
    only.mkdir()
    (only / "l.txt").symlink_to(private / "secret.txt")
    assert "holds no" in _one_sentence(azgpt("clean", str(only), "--out", str(out)))


def test_a_panic_inside_the_tokenizers_library_is_one_sentence(data, tmp_path, monkeypatch, capsys):
    """A Rust panic (PanicException is not an Exception) from a tokenizer that slipped past the
    up-front checks is one sentence and exit code 2, not a traceback."""
    from tokenizers import Regex, pre_tokenizers

    import azgpt.tokenizer as T
    from azgpt.cli import main

    tok_dir, _ = data
    real = T.load_tokenizer

    def hostile(path):
        tok = real(path)
        # A backtracking regex that makes the regex engine give up, which panics in Rust.
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("(a|a)+$"), "isolated")
        return tok

    monkeypatch.setattr(T, "load_tokenizer", hostile)
    f = tmp_path / "a.txt"
    f.write_text("a" * 40_000 + "b\n", encoding="utf-8")
    rc = main(["tokenizer", "stats", "--tokenizer", str(tok_dir), str(f)])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [x for x in err.splitlines() if x.startswith("azgpt: error:")]
    assert len(lines) == 1 and "tokenizers library stopped" in lines[0], err
    assert "Traceback" not in err


def _pool_workers(pid: int) -> list[int]:
    """PIDs of the spawned pool workers whose parent is `pid`."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and f"PPid:\t{pid}\n" in (d / "status").read_text():
                if b"spawn_main" in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
        except OSError:
            continue
    return found


def _kill_a_pool_worker(p: subprocess.Popen) -> subprocess.CompletedProcess:
    """SIGKILL one pool worker of the running command `p`; its end, stderr captured."""
    victims = _pool_workers(p.pid)
    assert victims, "no worker process appeared"
    os.kill(victims[0], signal.SIGKILL)
    _, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, "", err)


def test_a_prepare_workers_reply_fits_one_atomic_pipe_write(data, tmp_path):
    """A pool worker's reply is a few numbers and a file name, far under PIPE_BUF (4,096
    bytes), so the kernel writes it whole or not at all: a worker killed while replying cannot
    leave half a message for the pool to wait on forever (prepare hung so, 30 minutes, when a
    worker carried a megabyte of token ids back). The spool file holds the same ids."""
    import pickle

    import azgpt.prepare as P
    from azgpt.poolio import call_spooled, unspool

    tok_dir, _ = data
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt")))
    docs = [text] * 40
    job = (list(range(40)), docs, [False] * 40, 0, 0.1)
    P._init_worker(str(tok_dir), "tokenizers")
    want = P._encode_batch(job)
    reply = call_spooled((P._encode_batch, job, str(tmp_path)))
    assert len(pickle.dumps(reply)) < 512 < len(want[0])
    assert unspool(reply) == want and not list(tmp_path.iterdir())


def test_a_prepare_worker_killed_mid_run_is_one_sentence(data, tmp_path):
    """A worker killed (the kernel's out-of-memory killer, a user) is one sentence naming the
    cause and the fix; no token file is left behind."""
    import time

    tok_dir, _ = data
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt")))
    big = tmp_path / "big.txt"
    with open(big, "w", encoding="utf-8") as f:
        for _ in range(60_000_000 // len(text.encode())):  # ~60 MB: far longer than the kill takes
            f.write(text + "\n\n")
    out = tmp_path / "d"
    p = subprocess.Popen(
        [sys.executable, "-m", "azgpt", "prepare", str(big), "--tokenizer", str(tok_dir),
         "--out", str(out), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def started() -> bool:  # both workers up and token data written: the pool is at work
        try:
            tmp = list(out.glob(".train.npy.*.tmp")) if out.is_dir() else []
            return len(_pool_workers(p.pid)) == 2 and any(t.stat().st_size > 1 << 16 for t in tmp)
        except OSError:
            return False

    deadline = time.monotonic() + 120
    while not started() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    r = _kill_a_pool_worker(p)
    assert "worker process died" in _one_sentence(r)
    assert not (out / "train.npy").exists() and not list(out.glob(".*.tmp"))


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--temperature", "nan"], "--temperature must be a number"),
        (["--top-k", "-3"], "--top-k must be >= 0"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--seed", str(2**70)], "--seed must be in"),
        (["--device", "meta"], "--device 'meta' is not supported"),
    ],
)
def test_sample_options_without_meaning_are_one_sentence(run, flags, needle):
    from azgpt.sample import run_sample

    opts = {"--temperature": "temperature", "--top-k": "top_k", "--top-p": "top_p",
            "--seed": "seed", "--device": "device"}  # fmt: skip
    value = float(flags[1]) if flags[0] in ("--temperature", "--top-p") else flags[1]
    if flags[0] in ("--top-k", "--seed"):
        value = int(flags[1])
    with pytest.raises(UserError) as e:
        run_sample(str(run / "last"), "Bakı", max_new_tokens=2, **{opts[flags[0]]: value})
    assert needle in str(e.value)


def test_sample_into_a_closed_pipe_is_not_an_error(run):
    """`azgpt sample | head -c 1`: the reader leaves early; no traceback."""
    p = subprocess.run(
        f"{sys.executable} -m azgpt sample --ckpt {run / 'last'} --prompt Bakı --max-new-tokens 200 "
        "--num-samples 5 | head -c 1",
        shell=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "Traceback" not in p.stderr, p.stderr[-2000:]


def test_a_clean_worker_killed_mid_run_is_one_sentence(tmp_path):
    """`clean --workers 2` with a worker killed while the pool is at work: one sentence naming
    the cause and the fix, exit 2, no output file; the workers' replies travel through spool
    files whose names (a few dozen bytes) the kernel writes whole, so the pool cannot hang on
    half a reply."""
    import time

    from azgpt.poolio import call_spooled, unspool

    spool = tmp_path / "spool"
    spool.mkdir()
    big_reply = ["Bakı " * 50_000] * 20  # ~5 MB pickled
    path = call_spooled((_identity, big_reply, str(spool)))
    assert len(path.encode()) < 512 and unspool(path) == big_reply and not list(spool.iterdir())

    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt")))
    src = tmp_path / "big.txt"
    with open(src, "w", encoding="utf-8") as f:
        for i in range(20_000_000 // len(text.encode())):  # ~20 MB of distinct documents
            f.write(f"{i}. {text}\n\n")
    out = tmp_path / "clean.txt"
    p = subprocess.Popen(
        [sys.executable, "-m", "azgpt", "clean", str(src), "--out", str(out), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    deadline = time.monotonic() + 120
    while len(_pool_workers(p.pid)) < 2 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the pool has batches in flight
    r = _kill_a_pool_worker(p)
    assert "clean worker process died" in _one_sentence(r)
    assert not out.exists()


def _identity(x):
    return x
