"""The data commands through `azgpt.cli.main(argv)`: clean, tokenizer train/stats, prepare, and
how each reports bad input (exit 2, one `azgpt: error:` line naming the file or option, no
traceback, no output left behind)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import read_docs, read_output_docs

from azgpt import __version__
from azgpt.cli import main
from azgpt.tokenizer import fertility, load_tokenizer

AZ_DOCS = [
    "Azərbaycanın paytaxtı Bakı şəhəridir. Xəzər dənizinin sahilində yerləşir.",
    "Gəncə ölkənin ikinci böyük şəhəridir.\nNizami Gəncəvi burada doğulub.",
    "Şəki öz xan sarayı və şirniyyatı ilə məşhurdur. Qonaqlar buranı çox sevir.",
    "Quba alması bütün ölkədə tanınır; xalçaları da qiymətlidir.",
]
TURKISH = (
    "Türkiye'nin başkenti Ankara'dır. İstanbul ise ülkenin en kalabalık şehridir ve tarihi "
    "yapılarıyla ünlüdür."
)
ENGLISH = [
    "This is a short paragraph written in plain English about the weather in the morning.",
    "Another English paragraph: the children went to the park and played there all day long.",
]


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def run_ok(capsys, argv: list[str]) -> tuple[str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err
    return out, err


def user_error(capsys, argv: list[str], *mentions: str) -> str:
    """Run argv, expect exit 2 with exactly one 'azgpt: error:' line mentioning `mentions`."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("azgpt: error: "), line
    for m in mentions:
        assert str(m) in line, (m, line)
    return line


def assert_nothing_written(path: Path) -> None:
    """No output file under `path` (a file path, or a folder that may exist but is empty)."""
    if path.is_dir():
        left = list(path.rglob("*"))
        assert not left, f"left behind: {left}"
    else:
        assert not path.exists(), f"{path} was created"
    siblings = [p for p in path.parent.glob(f".{path.name}*")] if path.parent.is_dir() else []
    assert not siblings, f"temporary files left behind: {siblings}"


# ----------------------------------------------------------------------------- clean


def test_clean_no_filter_one_doc_per_input(capsys, tmp_path):
    inputs = [
        AZ_DOCS[0],
        AZ_DOCS[1].encode("utf-8").decode("latin-1"),
        TURKISH,
        AZ_DOCS[0],
        ENGLISH[0],
        "Bu   gün\u200b hava  gözəldir.",
    ]
    src = write_txt(tmp_path / "in.txt", inputs)
    out = tmp_path / "out.txt"
    stdout, _ = run_ok(capsys, ["clean", src, "--out", out, "--no-filter", "--workers", "1"])
    assert read_output_docs(out) == [
        AZ_DOCS[0],
        AZ_DOCS[1],
        TURKISH,
        AZ_DOCS[0],
        ENGLISH[0],
        "Bu gün hava gözəldir.",
    ]
    assert "6 in, 6 out" in stdout
    assert f"wrote {out}" in stdout


def test_clean_sample_with_two_workers_is_identity(capsys, tmp_path, sample_dir, sample_docs):
    out = tmp_path / "clean.txt"
    run_ok(capsys, ["clean", sample_dir, "--out", out, "--workers", "2"])
    assert read_output_docs(out) == sample_docs


def test_clean_dedup_filter_and_report(capsys, tmp_path):
    inputs = [AZ_DOCS[0], TURKISH, AZ_DOCS[1], AZ_DOCS[0], ENGLISH[0], AZ_DOCS[2]]
    src = write_txt(tmp_path / "in.txt", inputs)
    out = tmp_path / "out" / "clean.txt"
    report = tmp_path / "reports" / "clean.json"
    stdout, _ = run_ok(capsys, ["clean", src, "--out", out, "--report", report, "--workers", "1"])
    assert read_output_docs(out) == [AZ_DOCS[0], AZ_DOCS[1], AZ_DOCS[2]]
    r = json.loads(report.read_text(encoding="utf-8"))
    assert r["documents_in"] == 6
    assert r["documents_out"] == 3
    assert r["dropped"] == {"duplicate": 1, "not_azerbaijani": 2}
    assert isinstance(r["repairs"], dict)
    assert "dropped: duplicate=1, not_azerbaijani=2" in stdout
    assert f"report: {report}" in stdout


def test_clean_no_dedup_keeps_duplicates(capsys, tmp_path):
    src = write_txt(tmp_path / "in.txt", [AZ_DOCS[0], AZ_DOCS[0]])
    out = tmp_path / "out.txt"
    run_ok(capsys, ["clean", src, "--out", out, "--no-dedup", "--workers", "1"])
    assert read_output_docs(out) == [AZ_DOCS[0], AZ_DOCS[0]]


def test_clean_repairs_counted_in_report(capsys, tmp_path):
    src = write_txt(
        tmp_path / "in.txt",
        [AZ_DOCS[0].encode("utf-8").decode("latin-1"), "Azər\u200bbaycan m\u01ddktəbi"],
    )
    out = tmp_path / "out.txt"
    report = tmp_path / "r.json"
    run_ok(capsys, ["clean", src, "--out", out, "--report", report, "--workers", "1"])
    assert read_output_docs(out) == [AZ_DOCS[0], "Azərbaycan məktəbi"]
    repairs = json.loads(report.read_text(encoding="utf-8"))["repairs"]
    assert repairs["mojibake_ftfy"] >= 1
    assert repairs["invisible_removed"] == 1
    assert repairs["lookalike_schwa"] == 1


def test_clean_cyrillic_to_latin_flag(capsys, tmp_path):
    src = write_txt(tmp_path / "in.txt", ["Ҝәнҹә вә Шәки ҝөзәл шәһәрләрдир."])
    out = tmp_path / "out.txt"
    run_ok(capsys, ["clean", src, "--out", out, "--cyrillic-to-latin", "--workers", "1"])
    assert read_output_docs(out) == ["Gəncə və Şəki gözəl şəhərlərdir."]


def test_clean_gz_jsonl_inputs_with_text_field(capsys, tmp_path):
    a = tmp_path / "a.txt.gz"
    with gzip.open(a, "wt", encoding="utf-8") as f:
        f.write(AZ_DOCS[0] + "\n\n" + AZ_DOCS[1] + "\n")
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"body": AZ_DOCS[2]}, ensure_ascii=False) + "\n", encoding="utf-8")
    c = tmp_path / "c.jsonl.gz"
    with gzip.open(c, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": AZ_DOCS[3], "url": "https://example.az"}) + "\n")
    out = tmp_path / "out.txt"
    # --quality off: the one-sentence record with a url would be judged a web page and dropped.
    argv = ["clean", a, b, c, "--text-field", "body", "--out", out, "--workers", "1"]
    run_ok(capsys, argv + ["--quality", "off"])
    assert read_output_docs(out) == AZ_DOCS


def test_clean_jsonl_bad_lines_are_counted_not_fatal(capsys, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "\n".join(
            [
                json.dumps({"text": AZ_DOCS[0]}, ensure_ascii=False),
                "{this is not json",
                json.dumps({"text": AZ_DOCS[1]}, ensure_ascii=False),
                '{"text": "unterminated',
                json.dumps({"title": "no text"}),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.txt"
    report = tmp_path / "r.json"
    stdout, _ = run_ok(capsys, ["clean", src, "--out", out, "--report", report, "--workers", "1"])
    assert read_output_docs(out) == AZ_DOCS[:2]
    r = json.loads(report.read_text(encoding="utf-8"))
    assert r["input"]["bad_json_lines"] == 2
    assert r["input"]["missing_text_field"] == 1
    assert "bad_json_lines=2" in stdout


def test_clean_invalid_utf8_is_counted(capsys, tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(
        AZ_DOCS[0].encode() + b"\n\n" + b"Bak\xc4 \xff\xfe" + " şəhəri gözəldir.".encode() + b"\n"
    )
    out = tmp_path / "out.txt"
    report = tmp_path / "r.json"
    run_ok(capsys, ["clean", src, "--out", out, "--report", report, "--workers", "1"])
    r = json.loads(report.read_text(encoding="utf-8"))
    assert r["input"]["invalid_utf8_lines"] == 1
    docs = read_output_docs(out)
    assert docs[0] == AZ_DOCS[0]
    assert "\ufffd" not in docs[1] and docs[1].endswith("şəhəri gözəldir.")


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_train_and_stats_json(capsys, tmp_path, sample_dir, sample_docs):
    tok_dir = tmp_path / "tok"
    stdout, _ = run_ok(
        capsys, ["tokenizer", "train", sample_dir, "--vocab-size", "600", "--out", tok_dir]
    )
    assert (tok_dir / "tokenizer.json").is_file()
    info = json.loads((tok_dir / "tokenizer_info.json").read_text(encoding="utf-8"))
    assert info["vocab_size"] == 600
    assert info["pretokenizer"] == "gpt4"  # the default: llama.cpp's llama-bpe
    assert len(info["inputs"]) == 5
    assert "tokenizer.json" in stdout

    stdout, _ = run_ok(capsys, ["tokenizer", "stats", sample_dir, "--tokenizer", tok_dir, "--json"])
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    stats = json.loads(lines[0])
    assert isinstance(stats, dict)
    want = fertility(load_tokenizer(tok_dir), sample_docs)
    for k, v in want.items():
        assert stats[k] == v, k
    assert stats["vocab_size"] == 600
    for k in (
        "tokens_per_word",
        "bytes_per_token",
        "share_words_3plus_tokens",
        "words",
        "tokens",
        "bytes",
    ):
        assert k in stats


def test_tokenizer_stats_text(capsys, tokenizer_dir, sample_files):
    stdout, _ = run_ok(
        capsys, ["tokenizer", "stats", sample_files[0], "--tokenizer", tokenizer_dir]
    )
    assert "tokens_per_word:" in stdout
    assert "vocab_size: 1000" in stdout


def test_tokenizer_train_pretokenizer_choice(capsys, tmp_path, sample_files):
    out = tmp_path / "tok"
    run_ok(
        capsys,
        [
            "tokenizer",
            "train",
            sample_files[0],
            "--vocab-size",
            "300",
            "--pretokenizer",
            "gpt2",
            "--out",
            out,
        ],
    )
    spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert "'s|'t" in spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]


# ----------------------------------------------------------------------------- prepare


def test_prepare_cli(capsys, tmp_path, sample_dir, tokenizer_dir, prepared_dir):
    out = tmp_path / "data"
    stdout, _ = run_ok(
        capsys,
        [
            "prepare", sample_dir, "--tokenizer", tokenizer_dir, "--out", out,
            "--val-fraction", "0.1", "--seed", "1234", "--workers", "1", "--backend", "tokenizers",
        ],
    )  # fmt: skip
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert (
        f"train: {m['train']['tokens']:,} tokens in {m['train']['documents']:,} documents" in stdout
    )
    assert "train.npy" in stdout and "manifest.json" in stdout
    for s in ("train", "val"):
        assert (out / f"{s}.npy").read_bytes() == (prepared_dir / f"{s}.npy").read_bytes()
        assert np.load(out / f"{s}.npy", mmap_mode="r").dtype == np.uint16
    assert m["azgpt_version"] == __version__


def test_prepare_outputs_follow_the_umask(capsys, tmp_path, sample_dir, tokenizer_dir):
    import os

    old = os.umask(0o022)
    try:
        out = tmp_path / "data"
        argv = ["prepare", sample_dir, "--tokenizer", tokenizer_dir, "--out", out, "--workers", "1"]
        run_ok(capsys, argv)
    finally:
        os.umask(old)
    for name in ("train.npy", "val.npy", "manifest.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_prepare_cli_auto_backend_from_clean_output(
    capsys, tmp_path, sample_dir, tokenizer_dir, tok
):
    clean = tmp_path / "clean.txt"
    run_ok(capsys, ["clean", sample_dir, "--out", clean, "--workers", "1"])
    out = tmp_path / "data"
    run_ok(
        capsys,
        [
            "prepare",
            clean,
            "--tokenizer",
            tokenizer_dir / "tokenizer.json",
            "--out",
            out,
            "--val-fraction",
            "0.05",
        ],
    )
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    n_docs = len(read_docs(clean))
    assert m["train"]["documents"] + m["val"]["documents"] == n_docs
    assert m["encoder_backend"] in ("tiktoken", "tokenizers")


# ----------------------------------------------------------------------------- usage


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"azgpt {__version__}"


def test_unknown_option_is_one_line_error(capsys, tmp_path, sample_files):
    out = tmp_path / "out.txt"
    user_error(capsys, ["clean", sample_files[0], "--out", out, "--bogus"], "--bogus")
    assert_nothing_written(out)


def test_missing_required_option(capsys, sample_files):
    user_error(capsys, ["clean", sample_files[0]], "--out")


def test_bad_workers_value(capsys, tmp_path, sample_files):
    user_error(
        capsys,
        ["clean", sample_files[0], "--out", tmp_path / "o.txt", "--workers", "0"],
        "--workers",
    )


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def bad(tmp_path) -> dict[str, Path]:
    d = tmp_path / "bad"
    d.mkdir()
    files = {
        "missing": d / "does_not_exist.txt",
        "empty": d / "empty.txt",
        "blank": d / "blank.txt",
        "binary": d / "binary.txt",
        "nofield": d / "nofield.jsonl",
        "notgzip": d / "notgzip.txt.gz",
        "english": d / "english.txt",
        "regular_file": d / "regular_file",
        "corrupt_tok": d / "corrupt_tok",
        "missing_tok": d / "missing_tok",
    }
    files["empty"].write_bytes(b"")
    files["blank"].write_bytes(b"\n \n\t\n")
    files["binary"].write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)) * 4)
    files["nofield"].write_text('{"body": "Azərbaycan"}\n{"content": "Bakı"}\n', encoding="utf-8")
    files["notgzip"].write_bytes(b"this is not gzip data at all")
    write_txt(files["english"], ENGLISH)
    files["regular_file"].write_text("I am a file, not a folder.\n", encoding="utf-8")
    files["corrupt_tok"].mkdir()
    (files["corrupt_tok"] / "tokenizer.json").write_text(
        '{"version": "1.0", garbage', encoding="utf-8"
    )
    files["missing_tok"].mkdir()
    return files


def _out_for(cmd: str, tmp_path: Path) -> Path:
    return tmp_path / ("out.txt" if cmd == "clean" else "out")


def _argv(cmd: str, inputs: list, out: Path, tokenizer) -> list:
    if cmd == "clean":
        return ["clean", *inputs, "--out", out, "--workers", "1"]
    if cmd == "train":
        return ["tokenizer", "train", *inputs, "--vocab-size", "300", "--out", out]
    if cmd == "prepare":
        return ["prepare", *inputs, "--tokenizer", tokenizer, "--out", out, "--workers", "1"]
    raise AssertionError(cmd)


@pytest.mark.parametrize("cmd", ["clean", "train", "prepare"])
@pytest.mark.parametrize(
    "kind, mention",
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("blank", "is empty"),
        ("binary", "binary"),
        ("nofield", "'text'"),
        ("notgzip", "cannot read"),
    ],
)
def test_bad_input_file(capsys, tmp_path, bad, tokenizer_dir, cmd, kind, mention):
    out = _out_for(cmd, tmp_path)
    user_error(capsys, _argv(cmd, [bad[kind]], out, tokenizer_dir), bad[kind], mention)
    assert_nothing_written(out)


@pytest.mark.parametrize("cmd", ["clean", "train", "prepare"])
def test_bad_input_among_good_inputs(capsys, tmp_path, bad, tokenizer_dir, sample_files, cmd):
    # A bad file after good ones: still one error, and no output.
    out = _out_for(cmd, tmp_path)
    argv = _argv(cmd, [*sample_files, bad["binary"]], out, tokenizer_dir)
    user_error(capsys, argv, bad["binary"])
    assert_nothing_written(out)


def test_empty_folder_input(capsys, tmp_path):
    d = tmp_path / "emptydir"
    d.mkdir()
    (d / "notes.md").write_text("not a corpus file", encoding="utf-8")
    out = tmp_path / "out.txt"
    user_error(capsys, ["clean", d, "--out", out, "--workers", "1"], d)
    assert_nothing_written(out)


@pytest.mark.parametrize("cmd", ["prepare", "stats"])
@pytest.mark.parametrize(
    "which, mention", [("missing_tok", "does not exist"), ("corrupt_tok", "corrupt")]
)
def test_bad_tokenizer(capsys, tmp_path, bad, sample_files, cmd, which, mention):
    tok_json = bad[which] / "tokenizer.json"
    out = tmp_path / "out"
    if cmd == "prepare":
        argv = [
            "prepare",
            sample_files[0],
            "--tokenizer",
            bad[which],
            "--out",
            out,
            "--workers",
            "1",
        ]
    else:
        argv = ["tokenizer", "stats", sample_files[0], "--tokenizer", bad[which]]
    user_error(
        capsys, argv, tok_json, mention, "--tokenizer" if which == "missing_tok" else "retrain"
    )
    assert_nothing_written(out)


def test_corrupt_tokenizer_file_given_directly(capsys, tmp_path, sample_files):
    p = tmp_path / "garbage.json"
    p.write_text("[[[ not a tokenizer", encoding="utf-8")
    out = tmp_path / "out"
    user_error(
        capsys,
        ["prepare", sample_files[0], "--tokenizer", p, "--out", out, "--workers", "1"],
        p,
        "corrupt",
    )
    assert_nothing_written(out)


@pytest.mark.parametrize("vocab", ["70000", "65537"])
def test_vocab_too_large_for_uint16(capsys, tmp_path, sample_files, vocab):
    out = tmp_path / "tok"
    user_error(
        capsys,
        ["tokenizer", "train", sample_files[0], "--vocab-size", vocab, "--out", out],
        "--vocab-size",
        "uint16",
    )
    assert_nothing_written(out)


def test_vocab_too_small(capsys, tmp_path, sample_files):
    out = tmp_path / "tok"
    user_error(
        capsys,
        ["tokenizer", "train", sample_files[0], "--vocab-size", "100", "--out", out],
        "--vocab-size",
    )
    assert_nothing_written(out)


@pytest.mark.parametrize("frac", ["0", "1.5", "1", "-0.2"])
def test_bad_val_fraction(capsys, tmp_path, sample_files, tokenizer_dir, frac):
    out = tmp_path / "out"
    user_error(
        capsys,
        [
            "prepare",
            sample_files[0],
            "--tokenizer",
            tokenizer_dir,
            "--out",
            out,
            "--val-fraction",
            frac,
        ],
        "--val-fraction",
    )
    assert_nothing_written(out)


def test_bad_backend(capsys, tmp_path, sample_files, tokenizer_dir):
    out = tmp_path / "out"
    user_error(
        capsys,
        [
            "prepare",
            sample_files[0],
            "--tokenizer",
            tokenizer_dir,
            "--out",
            out,
            "--backend",
            "fastest",
        ],
        "--backend",
    )
    assert_nothing_written(out)


@pytest.mark.parametrize("cmd", ["clean", "train", "prepare"])
def test_output_under_a_regular_file(capsys, bad, sample_files, tokenizer_dir, cmd):
    out = bad["regular_file"] / "sub"
    if cmd == "clean":
        out = out / "clean.txt"
    argv = _argv(cmd, [sample_files[0]], out, tokenizer_dir)
    line = user_error(capsys, argv, "cannot write", bad["regular_file"])
    assert "out" in line  # names the output (the path or the --out option)
    assert bad["regular_file"].read_text(encoding="utf-8") == "I am a file, not a folder.\n"


def test_clean_nothing_left(capsys, tmp_path, bad):
    out = tmp_path / "out.txt"
    user_error(
        capsys,
        ["clean", bad["english"], "--out", out, "--workers", "1"],
        bad["english"],
        "no documents",
    )
    assert_nothing_written(out)


def test_clean_nothing_left_keeps_previous_output(capsys, tmp_path, bad):
    out = tmp_path / "out.txt"
    out.write_text("old content\n", encoding="utf-8")
    user_error(capsys, ["clean", bad["english"], "--out", out, "--workers", "1"], "no documents")
    assert out.read_text(encoding="utf-8") == "old content\n"


def test_clean_bad_min_az_share(capsys, tmp_path, sample_files):
    out = tmp_path / "out.txt"
    user_error(
        capsys, ["clean", sample_files[0], "--out", out, "--min-az-share", "2"], "--min-az-share"
    )
    assert_nothing_written(out)


def test_prepare_single_document(capsys, tmp_path, tokenizer_dir):
    src = write_txt(tmp_path / "one.txt", AZ_DOCS[:1])
    out = tmp_path / "out"
    user_error(
        capsys,
        ["prepare", src, "--tokenizer", tokenizer_dir, "--out", out, "--workers", "1"],
        "at least two",
    )
    assert_nothing_written(out)


def test_prepare_only_blank_jsonl_documents(capsys, tmp_path, tokenizer_dir):
    src = tmp_path / "blank.jsonl"
    src.write_text('{"text": "   "}\n{"text": "\\n\\t"}\n', encoding="utf-8")
    out = tmp_path / "out"
    user_error(
        capsys,
        ["prepare", src, "--tokenizer", tokenizer_dir, "--out", out, "--workers", "1"],
        src,
        "no documents",
    )
    assert_nothing_written(out)


def test_tokenizer_stats_without_words(capsys, tmp_path, tokenizer_dir):
    src = tmp_path / "blank.jsonl"
    src.write_text('{"text": "   "}\n', encoding="utf-8")
    user_error(capsys, ["tokenizer", "stats", src, "--tokenizer", tokenizer_dir], "no words")
