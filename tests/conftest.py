"""Shared fixtures for the data-pipeline tests: the embedded sample corpus, a small tokenizer
trained on it, and a folder of token files prepared from it. Everything is built once per test
session under pytest's temporary directory; nothing is read from outside the repository."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

import azgpt.prepare
from azgpt.corpus import discover, iter_corpus
from azgpt.prepare import run_prepare
from azgpt.tokenizer import (
    DEFAULT_PRETOKENIZER,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "data" / "sample"
TOKENIZER_VOCAB = 1000
PREPARE_VAL_FRACTION = 0.1
PREPARE_SEED = 1234


def read_docs(path: str | Path) -> list[str]:
    """The documents of a file or folder, as the corpus reader yields them."""
    return list(iter_corpus(discover([path]), Counter()))


def read_output_docs(path: str | Path) -> list[str]:
    """The documents of a file written by `azgpt clean` (blank-line separated, final newline)."""
    text = Path(path).read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n\n")


@pytest.fixture(autouse=True)
def fresh_prepare_worker_state(monkeypatch):
    """Give every test its own copy of azgpt.prepare's per-process encoder state.

    run_prepare keeps the encoder in the module-global dict azgpt.prepare._WORKER and never clears
    it, so one run leaks its encoder into the next run in the same process (see
    test_data.py::test_prepare_does_not_reuse_encoder_of_previous_run). Resetting it here keeps
    the other tests independent of their order.
    """
    monkeypatch.setattr(azgpt.prepare, "_WORKER", {})
    # azgpt.cli.main sets TOKENIZERS_PARALLELISM=true for the whole process; with it set, a
    # forked prepare worker deadlocks once this process has used tokenizers' thread pool (see
    # test_data.py::test_prepare_workers_after_in_process_encoding_do_not_hang). Undo it after
    # every test so in-process `main(...)` calls do not change the tests that follow.
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    assert SAMPLE_DIR.is_dir(), f"{SAMPLE_DIR} is missing"
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def sample_files(sample_dir) -> list[Path]:
    files = sorted(sample_dir.glob("*.txt"))
    assert files
    return files


@pytest.fixture(scope="session")
def sample_docs(sample_dir) -> list[str]:
    docs = read_docs(sample_dir)
    assert len(docs) > 50
    return docs


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, sample_dir) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    files = discover([sample_dir])
    tok = train_tokenizer(iter_corpus(files, Counter()), vocab_size=TOKENIZER_VOCAB)
    save_tokenizer(tok, out, {"pretokenizer": DEFAULT_PRETOKENIZER})
    return out


@pytest.fixture(scope="session")
def tokenizer_file(tokenizer_dir) -> Path:
    return tokenizer_dir / "tokenizer.json"


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, sample_dir, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    saved = azgpt.prepare._WORKER
    azgpt.prepare._WORKER = {}
    try:
        _run_prepare_sample(sample_dir, tokenizer_dir, out)
    finally:
        azgpt.prepare._WORKER = saved
    return out


def _run_prepare_sample(sample_dir, tokenizer_dir, out) -> None:
    run_prepare(
        [str(sample_dir)],
        str(tokenizer_dir),
        str(out),
        val_fraction=PREPARE_VAL_FRACTION,
        seed=PREPARE_SEED,
        workers=1,
        backend="tokenizers",
    )


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory) -> Path:
    """A tiny base model trained on the embedded sample (tests/chatkit.py)."""
    from chatkit import build_base

    return build_base(tmp_path_factory.mktemp("chat_base"))


@pytest.fixture(scope="session")
def chat_sft(tmp_path_factory, chat_base) -> Path:
    """That base fine-tuned on data/chat (the run folder)."""
    from chatkit import build_sft

    return build_sft(tmp_path_factory.mktemp("chat_sft"), chat_base)
