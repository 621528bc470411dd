"""Edge cases of training, evaluation, sampling and reporting: each test states the contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from trainkit import azgpt, break_compile, inject_nan, losses, make_data, tiny_config, train_cli

from azgpt.errors import UserError
from azgpt.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("edgedata"))


def _clean_error(r) -> str:
    assert "Traceback" not in r.stderr, (
        "a traceback instead of one clear sentence:\n" + r.stderr[-1500:]
    )
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    lines = [x for x in r.stderr.splitlines() if x.startswith("azgpt: error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


# ----------------------------------------------------------------------------- train.py


def test_compile_fallback_with_grad_accum_matches_eager(data, tmp_path, monkeypatch):
    """A failed torch.compile falls back to eager without disturbing gradient accumulation: the run equals an eager run."""
    tok, d = data
    over = {"train.grad_accum": 2, "train.max_iters": 4}
    train(tiny_config(tok, d, tmp_path / "plain", **over))

    break_compile(monkeypatch)
    with pytest.warns(UserWarning, match="torch.compile failed.*training uncompiled"):
        train(tiny_config(tok, d, tmp_path / "fb", **over, **{"train.compile": "on"}))
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "fb")
    assert a == b, (
        f"after a failed compile with grad_accum=2 the losses differ from the eager run: {a} vs {b} "
        "(the failed micro-step advanced Accelerate's accumulation counter)"
    )
    wa = load_file(str(tmp_path / "plain" / "last" / "model.safetensors"))
    wb = load_file(str(tmp_path / "fb" / "last" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ from the eager run"


def test_throughput_after_an_eval_excludes_eval_and_checkpoint_time(data, tmp_path, monkeypatch):
    """Throughput after an evaluation counts training steps only, not evaluation, checkpoint or
    plot time. A fake clock makes this exact: each step takes 1 s, each plot 1000 s."""
    import azgpt.report
    import azgpt.train as tr

    clock = {"t": 0.0}
    monkeypatch.setattr(tr.Logger, "clock", staticmethod(lambda: clock["t"]))
    real_step, real_plot = tr.train_step, azgpt.report.plot_losses

    def step_1s(*a, **k):
        clock["t"] += 1.0
        return real_step(*a, **k)

    def plot_1000s(*a, **k):  # stands in for a slow eval / checkpoint / plot
        clock["t"] += 1000.0
        return real_plot(*a, **k)

    monkeypatch.setattr(tr, "train_step", step_1s)
    monkeypatch.setattr(azgpt.report, "plot_losses", plot_1000s)
    run = tmp_path / "tps"
    tok, d = data
    over = {"train.max_iters": 8, "train.eval_interval": 4, "train.log_interval": 2}
    train(tiny_config(tok, d, run, **over))
    rows = {
        r["step"]: r
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "event" not in r
    }
    per_step = 4 * 32  # batch 4 x context 32, one process
    assert [rows[s]["tok_per_s"] for s in (1, 3, 5, 7)] == [per_step] * 4, rows


def test_nan_stop_still_logs_the_finite_steps_before_it(data, tmp_path, monkeypatch):
    """When a non-finite loss stops training, the finite losses read back with it are still logged."""
    inject_nan(monkeypatch, lambda n: n >= 6)
    tok, d = data
    run = tmp_path / "nan"
    res = train(tiny_config(tok, d, run, **{"train.log_interval": 4, "train.eval_interval": 4}))
    assert not res.ok
    ls = losses(run)
    assert 5 in ls, (
        f"step 5 had a finite loss (the NaN starts at step 6) but metrics.jsonl only has steps {sorted(ls)}"
    )


def test_negative_seed_is_a_clear_error(data, tmp_path):
    """A seed outside [0, 2**32) is a clear configuration error, not a numpy traceback."""
    tok, d = data
    r = train_cli(tok, d, tmp_path / "s", **{"train.seed": -1})
    assert "train.seed" in _clean_error(r)


def test_out_dir_that_is_a_file_is_a_clear_error(data, tmp_path):
    """A train.out_dir that is a file (or cannot be created) is a clear error."""
    tok, d = data
    f = tmp_path / "afile"
    f.write_text("x")
    r = train_cli(tok, d, f)
    assert "afile" in _clean_error(r)


# ----------------------------------------------------------------------------- report.py


def test_report_out_that_is_a_file_is_a_clear_error(tmp_path):
    """`azgpt report RUN --out FILE` where FILE is a regular file is a clear error."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "tokens": 128, "loss": 6.0, "lr": 1e-3, "tok_per_s": 1000.0}) + "\n"
    )
    f = tmp_path / "afile"
    f.write_text("x")
    r = azgpt("report", str(run), "--out", str(f))
    assert "afile" in _clean_error(r)


# ----------------------------------------------------------------------------- model.py


def test_top_p_keeps_the_smallest_set_that_reaches_top_p():
    """Top-p keeps the smallest set of tokens whose probability mass reaches top_p (transformers' rule)."""
    g = torch.Generator().manual_seed(0)
    from azgpt.generate import SamplingParams, sample

    def sample_next(logits, top_p, generator):
        return sample(logits, [SamplingParams(temperature=1.0, top_k=0, top_p=top_p)], [generator])[
            0
        ]

    four = torch.zeros(1, 4)  # four tokens of probability 0.25 each: two reach top_p=0.5
    draws = {sample_next(four, 0.5, g) for _ in range(400)}
    assert len(draws) == 2, (
        f"top_p=0.5 over four equal tokens sampled from {sorted(draws)}, want 2 tokens"
    )
    two = torch.zeros(1, 2)  # one token (0.5) already reaches top_p=0.5
    draws = {sample_next(two, 0.5, g) for _ in range(200)}
    assert len(draws) == 1, (
        f"top_p=0.5 over two equal tokens sampled from {sorted(draws)}, want 1 token"
    )


# ----------------------------------------------------------------------------- evaluate.py


def test_eval_tokens_with_ids_beyond_the_tokenizer_is_a_clear_error(data, tmp_path):
    """`eval --tokens` refuses ids the checkpoint's tokenizer does not have (bits per byte would be wrong)."""
    from azgpt.evaluate import eval_tokens
    from azgpt.model import GPT, GPTConfig
    from azgpt.tokenizer import load_tokenizer

    tok = load_tokenizer(data[0])
    assert tok.get_vocab_size() == 512
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=1024, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    f = tmp_path / "other.npy"
    np.save(f, np.array([0, 5, 700, 6, 7, 800, 9, 0] * 4, dtype=np.uint16))
    try:
        eval_tokens(m, tok, str(f), batch_size=2)
    except UserError:
        pass
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"eval_tokens crashed with {type(e).__name__}: {e} instead of a UserError")
    else:
        pytest.fail("eval_tokens scored ids the tokenizer does not have (bytes would be wrong)")


# ----------------------------------------------------------------------------- data.py


def test_prepare_with_every_document_drawn_into_val_gives_a_true_message(data, tmp_path):
    """When the split draws every document into val, the message says so (not that there are too few documents)."""
    from azgpt.prepare import _is_val, run_prepare

    assert _is_val(1234, np.arange(3), 0.5).all()  # the premise: all three drawn into val
    src = tmp_path / "few.txt"
    src.write_text(
        "Bakı Azərbaycanın paytaxtıdır.\n\nGəncə böyük şəhərdir.\n\nŞəki qədim şəhərdir.\n",
        encoding="utf-8",
    )
    try:
        res = run_prepare(
            [str(src)], str(data[0]), str(tmp_path / "out"), val_fraction=0.5, seed=1234, workers=1
        )
    except UserError as e:
        assert "only 3 document" not in str(e), f"false error for a 3-document corpus: {e}"
    else:
        m = res.manifest
        assert m["train"]["documents"] >= 1 and m["val"]["documents"] >= 1


def test_manifest_without_tokenizer_entry_is_a_clear_error(data, tmp_path):
    """A manifest.json that is not an azgpt manifest is a clear error telling to rerun `azgpt prepare`."""
    import shutil

    from azgpt.data import TokenData

    tok, d = data
    for name, change in [("nokey", lambda m: m.pop("tokenizer")), ("list", None)]:
        bad = tmp_path / name
        shutil.copytree(d, bad)
        m = json.loads((d / "manifest.json").read_text())
        if change is None:
            m = [m]
        else:
            change(m)
        (bad / "manifest.json").write_text(json.dumps(m))
        try:
            TokenData(bad, 32, 512, tokenizer=tok)
        except UserError:
            pass
        except Exception as e:  # noqa: BLE001
            pytest.fail(
                f"{name}: TokenData crashed with {type(e).__name__}: {e} instead of a UserError"
            )
