"""The data pipeline as library calls: corpus reading, `run_clean`, `run_prepare` and the token
files it writes, and `TokenData` reading them back."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import PREPARE_SEED, PREPARE_VAL_FRACTION, TOKENIZER_VOCAB, read_output_docs

import azgpt
import azgpt.prepare
from azgpt.clean import run_clean, write_report
from azgpt.corpus import discover, iter_corpus
from azgpt.data import MANIFEST, TokenData
from azgpt.errors import UserError
from azgpt.fsutil import sha256_file
from azgpt.prepare import run_prepare
from azgpt.text import clean_document
from azgpt.tokenizer import decode, encode, eot_id

AZ_DOCS = [
    "Azərbaycanın paytaxtı Bakı şəhəridir. Xəzər dənizinin sahilində yerləşir.",
    "Gəncə ölkənin ikinci böyük şəhəridir.\nNizami Gəncəvi burada doğulub.",
    "Şəki öz xan sarayı və şirniyyatı ilə məşhurdur. Qonaqlar buranı çox sevir.",
    "Quba alması bütün ölkədə tanınır; xalçaları da qiymətlidir.",
    "Lənkəranın çayı və sitrus meyvələri məşhurdur, qışı isə mülayim keçir.",
]
TURKISH = (
    "Türkiye'nin başkenti Ankara'dır. İstanbul ise ülkenin en kalabalık şehridir ve tarihi "
    "yapılarıyla ünlüdür."
)
RUSSIAN = "Баку — столица Азербайджана. Это крупный город на берегу Каспийского моря."


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def mojibake(text: str) -> str:
    return text.encode("utf-8").decode("latin-1")


def npy_bytes(d: Path) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in ("train.npy", "val.npy")}


def split_docs(arr: np.ndarray, eot: int) -> list[list[int]]:
    """Token ids of each document in a token file (every document ends with eot)."""
    arr = np.asarray(arr)
    assert len(arr) == 0 or arr[-1] == eot
    ends = np.flatnonzero(arr == eot)
    out, start = [], 0
    for e in ends:
        out.append(arr[start:e].tolist())
        start = e + 1
    return out


# ----------------------------------------------------------------------------- corpus reading


def test_discover_expands_folders_sorted(sample_dir, sample_files):
    assert discover([sample_dir]) == sample_files


def test_txt_documents_split_on_blank_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("Birinci\nsətir\n\n\n\nİkinci\r\n\r\n   \nÜçüncü".encode())
    assert list(iter_corpus([p], Counter())) == ["Birinci\nsətir", "İkinci", "Üçüncü"]


# ----------------------------------------------------------------------------- run_clean


def test_clean_no_filter_one_output_per_input_in_order(tmp_path):
    inputs = [
        AZ_DOCS[0],
        mojibake(AZ_DOCS[1]),
        TURKISH,
        AZ_DOCS[0],  # duplicate: kept without the filter
        "  Bu   gün\u200b hava  gözəldir.  ",
        RUSSIAN,
        AZ_DOCS[2],
    ]
    src = write_txt(tmp_path / "in.txt", inputs)
    out = tmp_path / "out.txt"
    rep = run_clean([str(src)], str(out), filter=False)
    got = read_output_docs(out)
    assert got == [clean_document(d)[0] for d in inputs]
    assert got[1] == AZ_DOCS[1]
    assert got[4] == "Bu gün hava gözəldir."
    assert rep.documents_in == rep.documents_out == len(inputs)
    assert not rep.dropped


def test_clean_no_filter_order_kept_with_workers_and_small_batches(tmp_path):
    inputs = [f"Sənəd nömrəsi {i}: Azərbaycan dili çox gözəldir." for i in range(60)]
    src = write_txt(tmp_path / "in.txt", inputs)
    out = tmp_path / "out.txt"
    run_clean([str(src)], str(out), filter=False, workers=2, batch_docs=7)
    assert read_output_docs(out) == inputs


def test_clean_sample_corpus_is_identity(sample_dir, sample_docs, tmp_path):
    out = tmp_path / "clean.txt"
    rep = run_clean([str(sample_dir)], str(out))
    assert read_output_docs(out) == sample_docs
    assert rep.documents_in == rep.documents_out == len(sample_docs)
    assert not rep.repairs and not rep.dropped and not rep.input


def test_clean_dedup(tmp_path):
    # The third document is the first one as mojibake: a duplicate once repaired.
    inputs = [AZ_DOCS[0], AZ_DOCS[1], mojibake(AZ_DOCS[0]), AZ_DOCS[1], AZ_DOCS[2]]
    src = write_txt(tmp_path / "in.txt", inputs)
    out = tmp_path / "out.txt"
    rep = run_clean([str(src)], str(out))
    assert read_output_docs(out) == AZ_DOCS[:3]
    assert rep.dropped == Counter({"duplicate": 2})
    assert (rep.documents_in, rep.documents_out) == (5, 3)

    rep2 = run_clean([str(src)], str(tmp_path / "out2.txt"), dedup=False)
    assert rep2.documents_out == 5
    assert "duplicate" not in rep2.dropped


def test_clean_language_filter(tmp_path):
    inputs = [AZ_DOCS[0], TURKISH, AZ_DOCS[1], RUSSIAN, "12345 678", AZ_DOCS[2]]
    src = write_txt(tmp_path / "in.txt", inputs)
    out = tmp_path / "out.txt"
    rep = run_clean([str(src)], str(out))
    assert read_output_docs(out) == AZ_DOCS[:3]
    assert rep.dropped == Counter({"not_azerbaijani": 1, "not_latin_script": 1, "no_letters": 1})


def test_clean_min_az_share_out_of_range(tmp_path):
    src = write_txt(tmp_path / "in.txt", AZ_DOCS)
    with pytest.raises(UserError, match="--min-az-share"):
        run_clean([str(src)], str(tmp_path / "o.txt"), min_az_share=1.5)


def test_clean_gz_and_jsonl_inputs(tmp_path):
    txt_gz = tmp_path / "a.txt.gz"
    with gzip.open(txt_gz, "wt", encoding="utf-8") as f:
        f.write("\n\n".join(AZ_DOCS[:2]) + "\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps({"id": i, "content": d}, ensure_ascii=False)
            for i, d in enumerate(AZ_DOCS[2:4])
        )
        + "\n",
        encoding="utf-8",
    )
    jsonl_gz = tmp_path / "c.jsonl.gz"
    with gzip.open(jsonl_gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"content": mojibake(AZ_DOCS[4])}) + "\n")
    out = tmp_path / "out.txt"
    rep = run_clean([str(txt_gz), str(jsonl), str(jsonl_gz)], str(out), text_field="content")
    assert read_output_docs(out) == AZ_DOCS
    assert rep.documents_in == 5


def test_clean_folder_mixes_formats(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    write_txt(d / "a.txt", AZ_DOCS[:1])
    (d / "sub" / "b.jsonl").write_text(json.dumps({"text": AZ_DOCS[1]}) + "\n", encoding="utf-8")
    (d / "ignored.md").write_text("# not a corpus file", encoding="utf-8")
    out = tmp_path / "out.txt"
    run_clean([str(d)], str(out))
    assert read_output_docs(out) == AZ_DOCS[:2]


def test_clean_jsonl_bad_lines_counted(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"text": AZ_DOCS[0]}, ensure_ascii=False),
        "{not json",
        json.dumps({"body": "no text field"}),
        "",
        json.dumps({"text": AZ_DOCS[1]}, ensure_ascii=False),
        "[1, 2",
        json.dumps(["a", "list"]),
        json.dumps({"text": 5}),
        json.dumps({"text": AZ_DOCS[2]}, ensure_ascii=False),
    ]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    rep = run_clean([str(src)], str(out))
    assert read_output_docs(out) == AZ_DOCS[:3]
    assert rep.input["bad_json_lines"] == 2
    assert rep.input["missing_text_field"] == 3
    assert rep.documents_in == 3


def test_clean_invalid_utf8_counted(tmp_path):
    src = tmp_path / "in.txt"
    raw = (
        AZ_DOCS[0].encode()
        + b"\n\n"
        + "Gəncə ölkənin ikinci".encode()
        + b"\xff\xfe"
        + " böyük şəhəridir.".encode()
        + b"\n\n"
        + AZ_DOCS[2].encode()
        + b"\xc3\n"
    )
    src.write_bytes(raw)
    out = tmp_path / "out.txt"
    rep = run_clean([str(src)], str(out))
    assert read_output_docs(out) == [
        AZ_DOCS[0],
        "Gəncə ölkənin ikinci böyük şəhəridir.",
        AZ_DOCS[2],
    ]
    assert rep.input["invalid_utf8_lines"] == 2


def test_clean_report_json(tmp_path):
    inputs = [AZ_DOCS[0], mojibake(AZ_DOCS[1]), TURKISH, AZ_DOCS[0]]
    src = write_txt(tmp_path / "in.txt", inputs)
    out = tmp_path / "out.txt"
    rep = run_clean([str(src)], str(out))
    rp = tmp_path / "reports" / "report.json"
    write_report(rep, rp)
    d = json.loads(rp.read_text(encoding="utf-8"))
    assert d["documents_in"] == 4
    assert d["documents_out"] == 2
    assert d["dropped"] == {"duplicate": 1, "not_azerbaijani": 1}
    assert d["repairs"].get("mojibake_ftfy", 0) + d["repairs"].get("mojibake_residual", 0) >= 1
    assert d["bytes_out"] == len(out.read_text(encoding="utf-8").encode()) - 1
    assert d["bytes_in"] == sum(len(x.encode()) for x in inputs)
    for key in ("seconds", "mb_per_s", "input"):
        assert key in d


def test_clean_nothing_left_is_user_error_and_writes_nothing(tmp_path):
    src = write_txt(tmp_path / "in.txt", [TURKISH, RUSSIAN])
    out = tmp_path / "out.txt"
    with pytest.raises(UserError, match="no documents are left"):
        run_clean([str(src)], str(out))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [src]  # no temporary file left behind


# ----------------------------------------------------------------------------- run_prepare


def load(d: Path, split: str) -> np.ndarray:
    return np.load(d / f"{split}.npy", mmap_mode="r")


def manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_text(encoding="utf-8"))


def test_prepared_files_are_uint16_npy(prepared_dir):
    for split in ("train", "val"):
        arr = load(prepared_dir, split)
        assert isinstance(arr, np.memmap)
        assert arr.dtype == np.uint16
        assert arr.ndim == 1
        assert len(arr) > 0
        assert int(arr.max()) < TOKENIZER_VOCAB


def test_prepared_documents_end_with_eot(prepared_dir, tok):
    m = manifest(prepared_dir)
    eot = eot_id(tok)
    assert m["eot_id"] == eot
    total = 0
    for split in ("train", "val"):
        arr = np.asarray(load(prepared_dir, split))
        assert arr[-1] == eot
        n = int((arr == eot).sum())
        assert n == m[split]["documents"]
        assert len(arr) == m[split]["tokens"]
        total += n
    assert total == m["train"]["documents"] + m["val"]["documents"]


def test_prepared_documents_decode_to_input(prepared_dir, tok, sample_docs):
    eot = eot_id(tok)
    decoded = []
    for split in ("train", "val"):
        for ids in split_docs(load(prepared_dir, split), eot):
            assert ids, "empty document"
            decoded.append(decode(tok, ids))
    assert Counter(decoded) == Counter(sample_docs)


def test_prepared_tokens_match_direct_encoding(prepared_dir, tok, sample_docs):
    eot = eot_id(tok)
    want = {tuple(encode(tok, d)) for d in sample_docs}
    for split in ("train", "val"):
        for ids in split_docs(load(prepared_dir, split), eot):
            assert tuple(ids) in want


def test_manifest_contents(prepared_dir, tokenizer_file, sample_files):
    m = manifest(prepared_dir)
    assert m["azgpt_version"] == azgpt.__version__
    assert m["tokenizer"]["sha256"] == sha256_file(tokenizer_file)
    assert m["tokenizer"]["vocab_size"] == TOKENIZER_VOCAB
    assert m["split"] == {"seed": PREPARE_SEED, "val_fraction": PREPARE_VAL_FRACTION}
    assert m["encoder_backend"] == "tokenizers"
    for split in ("train", "val"):
        assert m[split]["tokens"] == len(load(prepared_dir, split))
        assert m[split]["documents"] > 0
        assert m[split]["max_token_id"] == int(load(prepared_dir, split).max())
    assert m["train"]["documents"] > m["val"]["documents"]
    assert [Path(i["path"]).name for i in m["inputs"]] == [p.name for p in sample_files]
    for entry, p in zip(m["inputs"], sample_files):
        assert entry["bytes"] == p.stat().st_size
        assert entry["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert m["input_problems"] == {}


def test_prepare_no_temporary_files_left(prepared_dir):
    assert sorted(p.name for p in prepared_dir.iterdir()) == [MANIFEST, "train.npy", "val.npy"]


def _prepare(sample_dir, tokenizer_dir, out, **kw):
    kw = {"val_fraction": 0.1, "seed": 1234, "workers": 1, "backend": "tokenizers", **kw}
    return run_prepare([str(sample_dir)], str(tokenizer_dir), str(out), **kw)


def test_split_is_deterministic(sample_dir, tokenizer_dir, tmp_path, prepared_dir):
    _prepare(sample_dir, tokenizer_dir, tmp_path / "a")
    assert npy_bytes(tmp_path / "a") == npy_bytes(prepared_dir)
    # Rerunning into the same folder replaces the files with identical ones.
    _prepare(sample_dir, tokenizer_dir, tmp_path / "a")
    assert npy_bytes(tmp_path / "a") == npy_bytes(prepared_dir)


def test_split_depends_on_seed(sample_dir, tokenizer_dir, tmp_path, prepared_dir, tok):
    r = _prepare(sample_dir, tokenizer_dir, tmp_path / "b", seed=PREPARE_SEED + 1)
    assert npy_bytes(tmp_path / "b") != npy_bytes(prepared_dir)
    assert r.manifest["split"]["seed"] == PREPARE_SEED + 1
    # Same documents in total, differently divided.
    eot = eot_id(tok)
    val_a = {tuple(x) for x in split_docs(load(prepared_dir, "val"), eot)}
    val_b = {tuple(x) for x in split_docs(load(tmp_path / "b", "val"), eot)}
    assert val_a != val_b
    m = manifest(prepared_dir)
    total = m["train"]["documents"] + m["val"]["documents"]
    assert r.manifest["train"]["documents"] + r.manifest["val"]["documents"] == total


@pytest.mark.parametrize("batch_bytes", [1 << 20, 3000])
def test_tiny_val_fraction_still_gives_one_val_doc(
    sample_dir, tokenizer_dir, tmp_path, sample_docs, batch_bytes
):
    r = _prepare(
        sample_dir, tokenizer_dir, tmp_path / "c", val_fraction=1e-9, batch_bytes=batch_bytes
    )
    m = r.manifest
    assert m["val"]["documents"] == 1
    assert m["train"]["documents"] == len(sample_docs) - 1
    assert m["val"]["tokens"] == len(load(tmp_path / "c", "val")) > 1
    assert m["train"]["tokens"] == len(load(tmp_path / "c", "train"))
    # The moved document is the last one of the corpus.
    tok_ids = np.asarray(load(tmp_path / "c", "val"))
    assert tok_ids[-1] == m["eot_id"]
    assert (
        int((np.asarray(load(tmp_path / "c", "train")) == m["eot_id"]).sum())
        == len(sample_docs) - 1
    )


def test_backends_give_identical_files(sample_dir, tokenizer_dir, tmp_path, prepared_dir):
    pytest.importorskip("tiktoken")
    r = _prepare(sample_dir, tokenizer_dir, tmp_path / "tt", backend="tiktoken")
    assert r.manifest["encoder_backend"] == "tiktoken"
    assert npy_bytes(tmp_path / "tt") == npy_bytes(prepared_dir)
    r = _prepare(sample_dir, tokenizer_dir, tmp_path / "auto", backend="auto")
    assert r.manifest["encoder_backend"] == "tiktoken"  # identical ids on the sample
    assert npy_bytes(tmp_path / "auto") == npy_bytes(prepared_dir)


@pytest.mark.parametrize("backend", ["tokenizers", "tiktoken"])
def test_workers_give_identical_files(sample_dir, tokenizer_dir, tmp_path, backend):
    if backend == "tiktoken":
        pytest.importorskip("tiktoken")
    _prepare(sample_dir, tokenizer_dir, tmp_path / "w1", backend=backend, batch_bytes=4000)
    _prepare(
        sample_dir, tokenizer_dir, tmp_path / "w2", backend=backend, batch_bytes=4000, workers=2
    )
    assert npy_bytes(tmp_path / "w1") == npy_bytes(tmp_path / "w2")


def test_batch_size_does_not_change_files(sample_dir, tokenizer_dir, tmp_path, prepared_dir):
    _prepare(sample_dir, tokenizer_dir, tmp_path / "small", batch_bytes=1000)
    assert npy_bytes(tmp_path / "small") == npy_bytes(prepared_dir)


def test_prepare_jsonl_input(tmp_path, tokenizer_dir, tok):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "\n".join(json.dumps({"t": d}, ensure_ascii=False) for d in AZ_DOCS) + "\n{bad\n",
        encoding="utf-8",
    )
    r = run_prepare(
        [str(src)],
        str(tokenizer_dir),
        str(tmp_path / "o"),
        text_field="t",
        val_fraction=0.3,
        workers=1,
    )
    assert r.manifest["train"]["documents"] + r.manifest["val"]["documents"] == len(AZ_DOCS)
    assert r.manifest["input_problems"] == {"bad_json_lines": 1}
    eot = eot_id(tok)
    docs = [
        decode(tok, ids)
        for s in ("train", "val")
        for ids in split_docs(load(tmp_path / "o", s), eot)
    ]
    assert Counter(docs) == Counter(AZ_DOCS)


def test_prepare_literal_special_token_text(tmp_path, tokenizer_dir, tok, monkeypatch):
    # Web text can hold the literal string "<|endoftext|>". It is text, not a document boundary:
    # the tiktoken backend (encode_ordinary) encodes it as ordinary bytes, but the "tokenizers"
    # backend (Tokenizer.encode_batch, like tokenizer.encode) matches added special tokens in the
    # text and emits the EOT id, so the two backends write different files and the token files
    # hold more EOT ids than documents (a fake document boundary).
    docs = [
        AZ_DOCS[0],
        "Bu sənəddə <|endoftext|> yazısı və <|pad|> var, amma bu sadəcə mətndir.",
        AZ_DOCS[1],
        AZ_DOCS[2],
    ]
    pytest.importorskip("tiktoken")
    src = write_txt(tmp_path / "in.txt", docs)
    results = {}
    for backend in ("tiktoken", "tokenizers"):
        # A fresh encoder state per run (see test_prepare_does_not_reuse_encoder_of_previous_run).
        monkeypatch.setattr(azgpt.prepare, "_WORKER", {})
        out = tmp_path / backend
        r = run_prepare(
            [str(src)], str(tokenizer_dir), str(out), val_fraction=0.3, workers=1, backend=backend
        )
        m = r.manifest
        arr = np.concatenate([np.asarray(load(out, "train")), np.asarray(load(out, "val"))])
        n_eot = int((arr == eot_id(tok)).sum())
        results[backend] = (npy_bytes(out), n_eot)
        assert n_eot == m["train"]["documents"] + m["val"]["documents"] == len(docs), (
            f"backend {backend}: {n_eot} EOT ids for {len(docs)} documents"
        )
    assert results["tokenizers"][0] == results["tiktoken"][0]


def test_prepare_does_not_reuse_encoder_of_previous_run(
    tmp_path, sample_dir, tokenizer_dir, sample_docs, tok
):
    # With workers=1 run_prepare sets up its encoder in this process (azgpt.prepare._init_worker
    # fills the module-global dict _WORKER) and never clears it. _encode_batch prefers
    # _WORKER["enc"] whenever it is present, so after one tiktoken run every later run in the
    # same process -- whatever its --tokenizer or --backend -- silently encodes with the FIRST
    # run's tiktoken encoding, while its manifest records the new tokenizer's sha256 and
    # backend "tokenizers". (Forked pool workers inherit the same stale dict.)
    pytest.importorskip("tiktoken")
    from azgpt.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    small_dir = tmp_path / "small_tok"
    save_tokenizer(train_tokenizer(sample_docs, vocab_size=300), small_dir)
    small = load_tokenizer(small_dir)

    _prepare(sample_dir, tokenizer_dir, tmp_path / "first", backend="tiktoken")
    r = _prepare(sample_dir, small_dir, tmp_path / "second", backend="tokenizers")
    assert r.manifest["tokenizer"]["vocab_size"] == 300
    train = np.asarray(load(tmp_path / "second", "train"))
    assert int(train.max()) < 300, (
        f"token file of a 300-id tokenizer holds id {int(train.max())}: encoded with the previous run's tokenizer"
    )
    eot = eot_id(small)
    decoded = [
        decode(small, ids)
        for s in ("train", "val")
        for ids in split_docs(load(tmp_path / "second", s), eot)
    ]
    assert Counter(decoded) == Counter(sample_docs)


_HANG_SCRIPT = """
import os, sys
os.environ["TOKENIZERS_PARALLELISM"] = "true"  # what azgpt.cli.main sets for the process
from azgpt.prepare import run_prepare
sample, tok, out = sys.argv[1:4]
kw = dict(val_fraction=0.1, backend="tokenizers", batch_bytes=4000)
run_prepare([sample], tok, out + "/w1", workers=1, **kw)  # encodes in this process
run_prepare([sample], tok, out + "/w2", workers=2, **kw)  # then forks encoder processes
print("done")
"""


def test_prepare_workers_after_in_process_encoding_do_not_hang(tmp_path, sample_dir, tokenizer_dir):
    # run_prepare forks its ProcessPoolExecutor workers. When TOKENIZERS_PARALLELISM=true (set by
    # azgpt.cli.main via os.environ.setdefault) and the process has already run
    # Tokenizer.encode_batch (here: an earlier run_prepare with workers=1), the forked workers
    # call encode_batch on a Rayon thread pool whose threads did not survive the fork and hang
    # forever; run_prepare never returns. (Without the variable, tokenizers notices the fork
    # and turns parallelism off in the child.) Run in a subprocess so a hang cannot stall the
    # suite.
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", _HANG_SCRIPT, str(sample_dir), str(tokenizer_dir), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session holds the forked workers too
        proc.communicate()
        pytest.fail(
            "run_prepare(workers=2) hung after an in-process run with TOKENIZERS_PARALLELISM=true"
        )
    assert proc.returncode == 0, err
    assert out.strip() == "done"
    assert npy_bytes(tmp_path / "w1") == npy_bytes(tmp_path / "w2")


def test_prepare_nfc_normalises_documents(tmp_path, tokenizer_dir, tok):
    import unicodedata

    docs = [unicodedata.normalize("NFD", d) for d in AZ_DOCS]
    src = write_txt(tmp_path / "in.txt", docs)
    run_prepare([str(src)], str(tokenizer_dir), str(tmp_path / "o"), val_fraction=0.3, workers=1)
    eot = eot_id(tok)
    out = [
        decode(tok, ids)
        for s in ("train", "val")
        for ids in split_docs(load(tmp_path / "o", s), eot)
    ]
    assert Counter(out) == Counter(AZ_DOCS)


def test_prepare_single_document_is_user_error(tmp_path, tokenizer_dir):
    src = write_txt(tmp_path / "in.txt", AZ_DOCS[:1])
    out = tmp_path / "o"
    with pytest.raises(UserError, match="at least two"):
        run_prepare([str(src)], str(tokenizer_dir), str(out), workers=1)
    assert not out.exists()  # a failed prepare leaves nothing behind, not even the folder


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_prepare_bad_val_fraction(tmp_path, tokenizer_dir, sample_dir, frac):
    with pytest.raises(UserError, match="--val-fraction"):
        run_prepare([str(sample_dir)], str(tokenizer_dir), str(tmp_path / "o"), val_fraction=frac)
    assert not (tmp_path / "o").exists()


def test_prepare_bad_backend(tmp_path, tokenizer_dir, sample_dir):
    with pytest.raises(UserError, match="--backend"):
        run_prepare(
            [str(sample_dir)], str(tokenizer_dir), str(tmp_path / "o"), backend="sentencepiece"
        )


# ----------------------------------------------------------------------------- TokenData


def test_token_data_loads_prepared_folder(prepared_dir, tokenizer_dir):
    td = TokenData(prepared_dir, block_size=16, vocab_size=TOKENIZER_VOCAB, tokenizer=tokenizer_dir)
    assert td.manifest == manifest(prepared_dir)
    x, y = td.get_batch(seed=0, step=3, micro=0, batch_size=4)
    assert tuple(x.shape) == tuple(y.shape) == (4, 16)
    assert (x[:, 1:] == y[:, :-1]).all()
    x2, y2 = td.get_batch(seed=0, step=3, micro=0, batch_size=4)
    assert (x == x2).all() and (y == y2).all()
    # Rows of a two-process batch are the halves of the one-process batch.
    x_all, _ = td.get_batch(seed=0, step=3, micro=0, batch_size=4, world=2, rank=0)
    x_r1, _ = td.get_batch(seed=0, step=3, micro=0, batch_size=4, world=2, rank=1)
    x_one, _ = td.get_batch(seed=0, step=3, micro=0, batch_size=8)
    assert (x_one[:4] == x_all).all() and (x_one[4:] == x_r1).all()
    batches = list(td.eval_batches(seed=0, n_batches=3, batch_size=2))
    assert len(batches) == 3
    assert all(tuple(b[0].shape) == (2, 16) for b in batches)


def test_validation_set_is_a_function_of_the_global_batch(prepared_dir, tokenizer_dir):
    """Every process runs the same number of validation batches (under FSDP each forward is a
    collective: an uneven share hangs), and 2 processes x 2 rows score exactly the windows 1
    process x 4 rows does, with an odd number of batches."""
    from azgpt.data import TokenBatches

    td = TokenData(prepared_dir, block_size=16, vocab_size=TOKENIZER_VOCAB, tokenizer=tokenizer_dir)
    src = TokenBatches(td, seed=5)
    one = [b.x for b in src.val_batches(3, 4, rank=0, world=1)]
    r0 = [b.x for b in src.val_batches(3, 2, rank=0, world=2)]
    r1 = [b.x for b in src.val_batches(3, 2, rank=1, world=2)]
    assert len(one) == len(r0) == len(r1) == 3
    for a, b, c in zip(one, r0, r1):
        assert (a[:2] == b).all() and (a[2:] == c).all()
    assert src.tokenizer_sha256 == td.manifest["tokenizer"]["sha256"]


def test_token_data_rejects_other_tokenizer(prepared_dir, tmp_path, sample_docs):
    from azgpt.tokenizer import save_tokenizer, train_tokenizer

    other = tmp_path / "other"
    save_tokenizer(train_tokenizer(sample_docs[:30], vocab_size=300), other)
    with pytest.raises(UserError, match="sha256"):
        TokenData(prepared_dir, block_size=16, vocab_size=TOKENIZER_VOCAB, tokenizer=other)


def test_token_data_rejects_small_vocab(prepared_dir):
    with pytest.raises(UserError, match="vocab size"):
        TokenData(prepared_dir, block_size=16, vocab_size=500)


def test_token_data_rejects_too_long_context(prepared_dir):
    with pytest.raises(UserError, match="block_size"):
        TokenData(prepared_dir, block_size=1 << 20, vocab_size=TOKENIZER_VOCAB)


def test_token_data_rejects_truncated_file(prepared_dir, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(prepared_dir, d)
    arr = np.load(d / "val.npy")
    np.save(d / "val.npy", arr[:-5])
    with pytest.raises(UserError, match="manifest.json says"):
        TokenData(d, block_size=16, vocab_size=TOKENIZER_VOCAB)


def test_token_data_missing_manifest(tmp_path):
    with pytest.raises(UserError, match="azgpt prepare"):
        TokenData(tmp_path, block_size=16, vocab_size=TOKENIZER_VOCAB)
