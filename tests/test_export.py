import pytest
import torch
from trainkit import azgpt, make_data, tiny_config

from azgpt.errors import UserError
from azgpt.train import train

transformers = pytest.importorskip("transformers")  # `make test` installs it (the dev extra)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    tok, d = make_data(base)
    train(tiny_config(tok, d, base / "run", **{"train.max_iters": 8}))
    return base / "run", tok


def test_exported_model_matches_azgpt(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from azgpt.checkpoint import load_model
    from azgpt.export import export_hf
    from azgpt.tokenizer import encode, load_tokenizer

    ck, tok_dir = run[0] / "last", run[1]
    out = export_hf(str(ck), str(tmp_path / "hf"))
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "README.md",
    ):
        assert (out / f).is_file()
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    hft = AutoTokenizer.from_pretrained(out)
    ours, _ = load_model(ck)
    ours.eval()
    tok = load_tokenizer(tok_dir)
    text = "Azərbaycanın paytaxtı Bakı şəhəridir. İlham, Ağdam, Gəncə — «Şəki» 2024!"
    ids = encode(tok, text)
    assert hft(text, add_special_tokens=False).input_ids == ids
    assert hft.eos_token == "<|endoftext|>" and hft.bos_token == "<|endoftext|>"
    x = torch.tensor([ids[:24]])  # within the 32-token context
    with torch.no_grad():
        a = hf(x).logits
        b = ours(x)
    assert (a - b).abs().max().item() < 1e-4
    g_hf = hf.generate(x[:, :5], max_new_tokens=12, do_sample=False, pad_token_id=hft.pad_token_id)[
        0, 5:
    ].tolist()
    g_ours = [int(t) for t in ours.generate(x[:, :5], 12, temperature=0)]
    assert g_hf[: len(g_ours)] == g_ours
    card = (out / "README.md").read_text()
    assert "tokens seen" in card and "validation loss" in card


def test_export_refuses_a_non_empty_folder_without_force(run, tmp_path):
    from azgpt.export import export_hf

    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="--force"):
        export_hf(str(run[0] / "last"), str(out))
    assert (out / "keep.txt").read_text() == "x"
    # --force replaces an earlier export only, never a folder holding other files
    r = azgpt("export", "--ckpt", str(run[0] / "last"), "--out", str(out), "--force")
    assert r.returncode == 2 and "azgpt did not write (keep.txt)" in r.stderr
    assert (out / "keep.txt").read_text() == "x" and not (out / "config.json").exists()
    (out / "keep.txt").unlink()
    assert azgpt("export", "--ckpt", str(run[0] / "last"), "--out", str(out)).returncode == 0
    r = azgpt("export", "--ckpt", str(run[0] / "last"), "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").is_file()


def test_eval_and_report_cli(run, tmp_path):
    import json

    import matplotlib.image as mpimg
    from trainkit import SAMPLE

    r = azgpt(
        "eval",
        "--ckpt",
        str(run[0] / "last"),
        "--text",
        str(SAMPLE / "history.txt"),
        "--probes",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["bpb"] > 0 and out["documents"] > 10 and 0 <= out["probes"]["overall"] <= 1
    r = azgpt("report", str(run[0]), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "validation" in md and "![loss](loss.png)" in md
    for png in ("loss.png", "lr.png", "throughput.png"):
        img = mpimg.imread(tmp_path / "rep" / png)
        assert img.shape[0] > 100 and img.shape[1] > 100


def test_eval_bad_input(run, tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("\u200b\n\n  \n", encoding="utf-8")
    for args, needle in [
        (["--ckpt", str(tmp_path / "nope"), "--probes"], "does not exist"),
        (["--ckpt", str(run[0] / "last"), "--text", str(empty)], "no text"),
    ]:
        r = azgpt("eval", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and needle in r.stderr, r.stderr
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((run[0] / "last" / "config.json").read_text())
    r = azgpt("eval", "--ckpt", str(partial), "--probes")
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr


def test_a_transformers_without_qwen3_is_one_sentence(monkeypatch):
    # transformers < 4.51 has no Qwen3ForCausalLM: exporting a QK-norm model says what to install.
    import sys
    import types

    from azgpt.config import ModelConfig
    from azgpt.export import _hf_llama

    monkeypatch.setitem(sys.modules, "transformers", types.ModuleType("transformers"))
    c = ModelConfig(arch="llama", qk_norm=True, n_layer=1, n_head=2, n_embd=32, vocab_size=300)
    with pytest.raises(UserError, match="transformers 4.51 or later"):
        _hf_llama(c, 0, 1)
