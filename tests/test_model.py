import math

import pytest
import torch

from azgpt.config import load_config
from azgpt.generate import SamplingParams, sample
from azgpt.model import GPT, GPTConfig, KVCache


def small(**kw):
    cfg = dict(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg)).eval()


def test_causality_future_tokens_do_not_change_past_logits():
    m = small()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 97, (2, 6))
    a = m(x)
    b = m(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_initial_loss_is_near_uniform():
    m = small(vocab_size=1000)
    x = torch.randint(0, 1000, (8, 16))
    y = torch.randint(0, 1000, (8, 16))
    loss = m(x, y)
    assert abs(loss.item() - math.log(1000)) < 0.1


def test_tiny_model_overfits_one_batch():
    m = small().train()
    x = torch.randint(0, 97, (4, 16))
    y = torch.randint(0, 97, (4, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(150):
        loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2


def test_tied_lm_head_and_gpt2_init():
    m = small(n_layer=4)
    assert m.lm_head.weight is m.transformer.wte.weight
    std_proj = m.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = m.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.004
    assert abs(std_proj - 0.02 / math.sqrt(8)) < 0.002


@pytest.mark.parametrize("prompt_len,new", [(3, 10), (5, 25)])  # 25 runs past the 16-token context
def test_kv_cache_greedy_equals_no_cache(prompt_len, new):
    m = small()
    x = torch.randint(0, 97, (2, prompt_len))
    a = torch.cat(list(m.generate(x, new, temperature=0, use_cache=True)), dim=1)
    b = torch.cat(list(m.generate(x, new, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(a, b)


def test_generate_stops_at_eos_and_is_seeded():
    m = small()
    x = torch.randint(0, 97, (1, 4))
    greedy = [int(t) for t in m.generate(x, 10, temperature=0)]
    eos = greedy[2]
    stopped = [int(t) for t in m.generate(x, 10, temperature=0, eos_id=eos)]
    assert stopped == greedy[: greedy.index(eos) + 1]
    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    s1 = [int(t) for t in m.generate(x, 12, temperature=1.0, top_k=20, generator=g1)]
    s2 = [int(t) for t in m.generate(x, 12, temperature=1.0, top_k=20, generator=g2)]
    assert s1 == s2


def draw(logits, top_k=0, top_p=1.0, generator=None) -> int:
    """One id from the one sampler, at temperature 1 with only the given filter."""
    return sample(logits, [SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)], [generator])[
        0
    ]


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    assert draw(logits, top_k=1) == 0
    assert draw(logits, top_p=0.5) == 0  # token 0 alone holds > 0.5
    g = torch.Generator().manual_seed(0)
    draws = {draw(logits, top_k=2, generator=g) for _ in range(200)}
    assert draws == {0, 1}


def test_gpt100m_config_has_about_110m_parameters():
    cfg = load_config("configs/gpt100m.toml")
    m = GPT(cfg.model)
    n = m.num_params()
    print(f"gpt100m parameters: {n:,}")
    assert 105_000_000 < n < 115_000_000


def test_forward_contract_loss_alone_with_targets_logits_without():
    m = small()
    x = torch.randint(0, 97, (2, 8))
    loss = m(x, x)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    logits = m(x)
    assert logits.shape == (2, 8, 97)
    torch.testing.assert_close(m(x, last_only=True), logits[:, -1:])  # matmul blocking differs


def test_batched_cache_rows_at_different_lengths_match_single_sequences():
    """One cache holding two sequences of different lengths (as a server batches requests that
    started at different times) gives each row the logits it gets alone without a cache."""
    m = small()
    a = torch.randint(0, 97, (1, 5))
    b = torch.randint(0, 97, (1, 9))
    batch = KVCache(m.config, 2)
    for row, seq in enumerate([a, b]):
        alone = KVCache(m.config, 1)
        m(seq, cache=alone)
        batch.copy_row(alone, 0, row)
    assert batch.lengths.tolist() == [5, 9]
    nxt = torch.randint(0, 97, (2, 1))
    got = m(nxt, cache=batch)  # (2, 1, V), each row at its own position
    for row, seq in enumerate([a, b]):
        want = m(torch.cat([seq, nxt[row : row + 1]], dim=1))[:, -1]
        torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-5)
    assert batch.lengths.tolist() == [6, 10]
