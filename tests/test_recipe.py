"""The modern recipe: the llama branch of the model, Muon, exact resume, export."""

import math

import pytest
import torch
from trainkit import make_data, tiny_config

from azgpt.config import ConfigError, ModelConfig, load_config
from azgpt.model import GPT, GPTConfig, KVCache, apply_rotary, rotary
from azgpt.optim import MuonAdamW, make_optimizer, muon_matrices

LLAMA = dict(
    vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32, arch="llama", qk_norm=True
)


def llama(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**LLAMA, **kw})).eval()


def test_rotary_scores_depend_only_on_distance():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    pos = torch.arange(6)[None]

    def scores(shift):
        cos, sin = rotary(pos + shift, 8, 10000.0, torch.float32)
        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)

    torch.testing.assert_close(scores(0), scores(37), atol=1e-4, rtol=1e-4)
    # and the rotation is not the identity: the same vectors at other distances score otherwise
    cos, sin = rotary(pos, 8, 10000.0, torch.float32)
    assert not torch.allclose(
        apply_rotary(q, cos, sin) @ k.transpose(-1, -2), q @ k.transpose(-1, -2)
    )


def test_llama_has_no_biases_no_position_table_and_optional_parts():
    m = llama(n_kv_head=2, tie_embeddings=False)
    names = dict(m.named_parameters())
    assert not any(n.endswith(".bias") for n in names)
    assert "transformer.wpe.weight" not in names
    assert names["transformer.h.0.attn.c_k.weight"].shape == (2 * 8, 32)  # 2 kv heads of 8
    assert "transformer.h.0.attn.q_norm.weight" in names
    assert m.lm_head.weight is not m.transformer.wte.weight
    assert m.num_params() == m.config.num_params()
    tied = llama()
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert tied.num_params() == tied.config.num_params()


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2, "tie_embeddings": False}, {"n_kv_head": 1}])
def test_llama_init_loss_is_near_uniform(kw):
    m = llama(vocab_size=1000, **kw)
    x = torch.randint(0, 1000, (8, 16))
    assert abs(m(x, torch.randint(0, 1000, (8, 16))).item() - math.log(1000)) < 0.1


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}])
@pytest.mark.parametrize("prompt_len,new", [(3, 10), (5, 25)])  # 25 runs past the context
def test_llama_kv_cache_generation_equals_no_cache(kw, prompt_len, new):
    m = llama(**kw)
    x = torch.randint(0, 97, (2, prompt_len))
    a = torch.cat(list(m.generate(x, new, temperature=0, use_cache=True)), dim=1)
    b = torch.cat(list(m.generate(x, new, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(a, b)


def test_llama_batched_cache_rows_use_their_own_positions():
    m = llama(n_kv_head=2)
    a, b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 9))
    batch = KVCache(m.config, 2)
    for row, seq in enumerate([a, b]):
        alone = KVCache(m.config, 1)
        m(seq, cache=alone)
        batch.copy_row(alone, 0, row)
    nxt = torch.randint(0, 97, (2, 1))
    got = m(nxt, cache=batch)
    for row, seq in enumerate([a, b]):
        want = m(torch.cat([seq, nxt[row : row + 1]], dim=1))[:, -1]
        torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-5)


def test_llama_is_causal_and_learns():
    m = llama().train()
    x = torch.randint(0, 97, (4, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 97, (4, 6))
    with torch.no_grad():
        torch.testing.assert_close(m(x)[:, :10], m(y)[:, :10])
    opt = make_optimizer(
        m,
        lr=1e-2,
        weight_decay=0.0,
        betas=(0.9, 0.95),
        device_type="cpu",
        optimizer="muon",
        muon_lr=0.05,
    )
    for _ in range(100):
        loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


def test_config_checks():
    with pytest.raises(ConfigError, match="model.arch"):
        ModelConfig(arch="mamba").validate()
    with pytest.raises(ConfigError, match="llama"):
        ModelConfig(qk_norm=True).validate()  # gpt2 has no QK-norm
    with pytest.raises(ConfigError, match="n_kv_head"):
        ModelConfig(arch="llama", n_head=12, n_kv_head=5).validate()
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(None, ["--train.optimizer=sgd"])
    for name in ("gpt100m", "small_cpu"):
        old = load_config(f"configs/{name}.toml").model.num_params()
        new = load_config(f"configs/{name}_modern.toml").model.num_params()
        assert abs(new - old) / old < 0.02, (name, old, new)  # the same parameter budget


def test_muon_orthogonalises_matrices_and_leaves_vectors_to_adamw():
    m = llama(n_layer=1)
    lr, muon_lr = 1e-3, 0.02
    opt = make_optimizer(
        m,
        lr=lr,
        weight_decay=0.0,
        betas=(0.9, 0.95),
        device_type="cpu",
        optimizer="muon",
        muon_lr=muon_lr,
    )
    assert isinstance(opt, MuonAdamW)
    names = set(muon_matrices(m))
    assert (
        "transformer.h.0.attn.c_q.weight" in names and "transformer.h.0.mlp.c_gate.weight" in names
    )
    assert "transformer.wte.weight" not in names and "transformer.h.0.ln_1.weight" not in names
    params = dict(m.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    torch.manual_seed(1)
    for p in m.parameters():
        # a badly conditioned gradient: singular values spread over 2 orders of magnitude
        g = torch.randn_like(p)
        if p.dim() == 2:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            s = torch.logspace(0, -2, u.shape[1])
            g = (u * s) @ vh
        p.grad = g
    opt.step()
    for n in ("transformer.h.0.attn.c_q.weight", "transformer.h.0.mlp.c_fc.weight"):
        rows, cols = params[n].shape
        step = (before[n] - params[n].detach()) / (muon_lr * math.sqrt(max(1, rows / cols)))
        sv = torch.linalg.svdvals(step)
        # Newton-Schulz maps every singular value into roughly [0.5, 1.2]; the gradient's own
        # ratio max/min is 100
        assert sv.max() / sv.min() < 4 and 0.6 < sv.median() < 1.25, sv
    # vectors (norm weights) and the embedding take AdamW's first step: lr * sign(grad)
    for n in ("transformer.h.0.ln_1.weight", "transformer.h.0.attn.q_norm.weight"):
        step = before[n] - params[n].detach()
        torch.testing.assert_close(step, lr * params[n].grad.sign(), atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize("ns", [torch.float32, torch.bfloat16])
def test_muon_stacked_by_shape_is_torchs_update(ns, monkeypatch):
    """azgpt's Muon step (same-shape matrices stacked, one batched Newton-Schulz per shape, in
    float32 where bf16 is not native) is torch.optim.Muon's update up to bf16 rounding, with
    the same state."""
    import copy

    import azgpt.optim

    monkeypatch.setattr(azgpt.optim, "ns_dtype", lambda device: ns)

    def opt_for(m):
        return make_optimizer(m, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                              device_type="cpu", optimizer="muon", muon_lr=0.02)  # fmt: skip

    ours_m = llama(n_layer=1)
    torch_m = copy.deepcopy(ours_m)
    ours, theirs = opt_for(ours_m), opt_for(torch_m)
    names = muon_matrices(ours_m)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        before = {n: p.detach().clone() for n, p in ours_m.named_parameters()}
        for a, b in zip(ours_m.parameters(), torch_m.parameters()):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        ours.step()
        theirs.muon.step()  # torch's own Muon (bf16 Newton-Schulz)
        theirs.adamw.step()
        pa, pb = dict(ours_m.named_parameters()), dict(torch_m.named_parameters())
        for n in names:
            da, db = before[n] - pa[n].detach(), before[n] - pb[n].detach()
            assert (da - db).norm() / db.norm() < 0.03, n  # bf16 rounding, not another update
            torch.testing.assert_close(
                ours.state[pa[n]]["momentum_buffer"], theirs.state[pb[n]]["momentum_buffer"],
                rtol=1e-5, atol=1e-6,
            )  # fmt: skip
        for a, b in zip(ours_m.parameters(), torch_m.parameters()):
            a.data.copy_(b.data)  # the next step starts both from the same weights


def test_muon_missing_from_torch_is_one_sentence(monkeypatch):
    from azgpt.errors import UserError

    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(UserError, match="torch 2.9"):
        make_optimizer(
            llama(),
            lr=1e-3,
            weight_decay=0.1,
            betas=(0.9, 0.95),
            device_type="cpu",
            optimizer="muon",
        )


@pytest.mark.parametrize(
    "over",
    [
        {"model.arch": "llama", "model.qk_norm": "true", "model.n_kv_head": "1"},
        {"model.arch": "llama", "train.optimizer": "muon", "model.tie_embeddings": "false"},
        {"train.optimizer": "muon"},
    ],
)
def test_resume_is_bitwise_on_cpu(tmp_path, over):
    """8 steps straight == 4 steps, stop, resume, 4 more: same weights bit for bit."""
    from safetensors.torch import load_file

    from azgpt.train import train

    tok, d = make_data(tmp_path)
    kw = {"train.max_iters": 8, "train.eval_interval": 4, **over}
    train(tiny_config(tok, d, tmp_path / "straight", **kw))
    train(tiny_config(tok, d, tmp_path / "split", **kw, **{"train.stop_at": 4}))
    train(tiny_config(tok, d, tmp_path / "split", **kw), resume=True)
    a = load_file(tmp_path / "straight" / "last" / "model.safetensors")
    b = load_file(tmp_path / "split" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "kw,cls",
    [
        ({"qk_norm": False, "n_kv_head": 2, "tie_embeddings": False}, "LlamaForCausalLM"),
        ({"qk_norm": True}, "Qwen3ForCausalLM"),
    ],
)
def test_llama_export_logits_equal(kw, cls):
    pytest.importorskip("transformers")
    from azgpt.export import to_hf_model

    m = llama(**kw)
    with torch.no_grad():  # move the norm weights off 1.0 so a wrong map would show
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf = to_hf_model(m, 0, 1)
    assert type(hf).__name__ == cls
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        a, b = hf(x).logits, m(x)
    assert (a - b).abs().max().item() < 1e-4
    g_hf = hf.generate(x[:1, :4], max_new_tokens=8, do_sample=False)[0, 4:].tolist()
    g_ours = [int(t) for t in m.generate(x[:1, :4], 8, temperature=0)]
    assert g_hf == g_ours


def test_llama_checkpoint_exports_through_the_cli(tmp_path):
    pytest.importorskip("transformers")
    from trainkit import azgpt
    from transformers import AutoModelForCausalLM

    from azgpt.checkpoint import load_model
    from azgpt.train import train

    tok, d = make_data(tmp_path)
    over = {"model.arch": "llama", "train.optimizer": "muon", "train.max_iters": 4}
    train(tiny_config(tok, d, tmp_path / "run", **over))
    r = azgpt("export", "--ckpt", str(tmp_path / "run" / "last"), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ours, _ = load_model(tmp_path / "run" / "last")
    x = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        assert (hf(x).logits - ours.eval()(x)).abs().max().item() < 1e-4
    assert "Llama-architecture" in (tmp_path / "hf" / "README.md").read_text()
