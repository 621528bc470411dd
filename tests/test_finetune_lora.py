"""`azgpt finetune --lora`: peft adapters train alone; checkpoints hold merged weights and the
adapter; merged logits equal base + adapter; resume is exact; another base is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from chatkit import CHAT
from trainkit import azgpt, losses

from azgpt.checkpoint import load_model, load_tensors
from azgpt.finetune import SFTConfig
from azgpt.lora import PREFIX, inject

peft = pytest.importorskip("peft")  # the dev extra installs it

GREET = str(CHAT / "greetings.jsonl")


@pytest.fixture(scope="module")
def lora_run(chat_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    r = azgpt(
        "finetune", "--ckpt", str(chat_base), "--data", str(CHAT), "--out", str(out),
        "--lora", "--sft.lora_r=4", "--sft.epochs=2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def test_only_the_adapters_train_and_the_count_is_printed(chat_base, lora_run):
    out, stdout = lora_run
    base, _ = load_model(chat_base)
    tuned, meta = load_model(out / "best")  # an ordinary checkpoint: the merged weights
    n = inject(base, SFTConfig(lora_r=4))
    assert f"LoRA: {n:,} trainable parameters" in stdout
    base_sd, tuned_sd = load_model(chat_base)[0].state_dict(), tuned.state_dict()
    changed = {k for k in base_sd if not torch.equal(base_sd[k], tuned_sd[k])}
    assert changed and all(
        k.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")) for k in changed
    )
    assert "transformer.wte.weight" not in changed
    info = meta["lora"]
    assert info["r"] == 4 and info["base"] == str(Path(chat_base).resolve())


def test_merged_logits_equal_base_plus_adapter(chat_base, lora_run):
    out, _ = lora_run
    merged, _ = load_model(out / "best")
    base, _ = load_model(chat_base)
    inject(base, SFTConfig(lora_r=4))
    tensors = load_tensors(out / "best" / "optimizer.safetensors")
    adapter = {k[len(PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    assert adapter
    missing = peft.set_peft_model_state_dict(base, adapter)
    assert not getattr(missing, "unexpected_keys", [])
    x = torch.randint(0, 500, (2, 64))
    with torch.no_grad():
        a, b = merged.eval()(x), base.eval()(x)
    assert (a - b).abs().max().item() < 1e-5
    # and the adapter is not zero: the fine-tuned logits differ from the base's
    plain, _ = load_model(chat_base)
    with torch.no_grad():
        assert (plain.eval()(x) - a).abs().max().item() > 1e-3


def test_lora_resume_is_exact(chat_base, tmp_path):
    from azgpt.cli import main  # in-process: three runs without three interpreter starts

    args = ["finetune", "--ckpt", str(chat_base), "--data", GREET, "--lora", "--sft.lora_r=4"]
    common = ["--train.batch_size=2", "--train.max_iters=8", "--train.eval_interval=4"]
    assert main([*args, *common, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, *common, "--out", str(tmp_path / "b"), "--train.stop_at=4"]) == 0
    assert main([*args, *common, "--out", str(tmp_path / "b"), "--resume"]) == 0

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert set(a) == set(b) and all(a[s] == pytest.approx(b[s], rel=1e-5) for s in a)


def test_an_adapter_with_another_base_is_one_sentence(chat_base, tmp_path, capsys):
    from azgpt.cli import main

    base = tmp_path / "base"
    shutil.copytree(Path(chat_base).resolve(), base)
    args = [
        "finetune",
        "--ckpt",
        str(base),
        "--data",
        GREET,
        "--lora",
        "--out",
        str(tmp_path / "r"),
    ]
    common = ["--train.batch_size=2", "--train.max_iters=4", "--train.eval_interval=2"]
    assert main([*args, *common, "--train.stop_at=2"]) == 0
    m, _ = load_model(base)  # the base changes under the run
    with torch.no_grad():
        m.transformer.wte.weight.add_(0.01)
    from azgpt.checkpoint import save_model_files

    save_model_files(m, base)
    capsys.readouterr()
    assert main([*args, *common, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "trained on another base" in err and "Traceback" not in err


def test_a_lora_checkpoint_exports_merged(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _ = lora_run
    r = azgpt("export", "--ckpt", str(out / "best"), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load_model(out / "best")
    x = torch.randint(0, 500, (1, 32))
    with torch.no_grad():
        assert (hf(x).logits - ours.eval()(x)).abs().max().item() < 1e-4


def test_lora_on_a_muon_llama_base_trains_with_adamw(tmp_path, capsys):
    from trainkit import make_data, tiny_config

    from azgpt.cli import main
    from azgpt.train import train

    tok, data = make_data(tmp_path)
    over = {"model.arch": "llama", "model.qk_norm": True, "train.optimizer": "muon"}
    train(tiny_config(tok, data, tmp_path / "base", **over, **{"train.max_iters": 4}))
    args = ["finetune", "--ckpt", str(tmp_path / "base" / "last"), "--data", GREET, "--lora"]
    short = ["--train.max_iters=2", "--train.eval_interval=2", "--train.batch_size=2"]
    assert main([*args, *short, "--out", str(tmp_path / "r")]) == 0
    meta = json.loads((tmp_path / "r" / "last" / "meta.json").read_text())
    assert meta["config"]["train"]["optimizer"] == "adamw" and meta["lora"]["r"] == 16
    load_model(tmp_path / "r" / "last")  # the merged llama weights load as a plain model
    capsys.readouterr()
    assert main([*args, *short, "--out", str(tmp_path / "m"), "--train.optimizer=muon"]) == 2
    assert "trains its adapters with AdamW" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
