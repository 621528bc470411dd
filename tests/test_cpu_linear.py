"""azgpt.cpu_linear and azgpt.cpu_kernel: generation's Linears on a CPU, azgpt's own kernel
(float32 and int8 weights) and oneDNN where the kernel cannot be built.

Each test checks the path it means ran (the modules were replaced, the kernels were called),
then that the numbers are the unpacked model's within float rounding."""

from __future__ import annotations

import copy
import ctypes
import logging
import platform
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from trainkit import one_thread  # noqa: F401  (autouse)

import azgpt.cpu_kernel as CK
import azgpt.cpu_linear as CL
from azgpt.config import ModelConfig
from azgpt.errors import UserError
from azgpt.generate import SamplingParams, cast_model, stream_text
from azgpt.model import GPT, KVCache

pytestmark = pytest.mark.skipif(not CL.available(), reason="this torch build has no oneDNN")

ARCHS = [{}, {"arch": "llama", "n_kv_head": 1, "bias": False, "tie_embeddings": False}]


def small(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=48)
    return GPT(ModelConfig(**(cfg | kw))).eval()


def decode_logits(model: GPT, prompt: torch.Tensor, steps: int = 6) -> list[torch.Tensor]:
    """Prefill `prompt` (rows, T) then feed the greedy token `steps` times; every step's last
    logits."""
    cache = KVCache(model.config, prompt.shape[0], 64)
    out = []
    with torch.inference_mode():
        x = prompt
        for _ in range(steps):
            logits = model(x, cache=cache, last_only=True)[:, -1]
            out.append(logits.clone())
            x = logits.argmax(-1, keepdim=True)
    return out


def linears(model) -> tuple[int, list[CL.PackedLinear]]:
    plain = sum(type(m) is nn.Linear for m in model.modules())
    return plain, [m for m in model.modules() if isinstance(m, CL.PackedLinear)]


@pytest.mark.parametrize("kw", ARCHS, ids=["gpt2", "llama"])
def test_packed_linears_compute_the_same_logits(kw):
    ref = small(**kw)
    n_linear = sum(type(m) is nn.Linear for m in ref.modules())
    model = cast_model(copy.deepcopy(ref), "float32", torch.device("cpu"))
    assert model.linear_backend == "kernel"
    plain, packed = linears(model)
    assert plain == 0 and len(packed) == n_linear
    assert model.num_params() == ref.num_params()  # /health and the startup line report it
    prompt = torch.randint(0, 300, (3, 9))
    for a, b in zip(decode_logits(ref, prompt), decode_logits(model, prompt)):
        assert (a - b).abs().max().item() < 1e-4
    assert all(m.kind == "kernel" and m.calls > 0 for m in packed)
    # A row decoded in a batch of three or alone gives the same logits within rounding.
    alone = decode_logits(model, prompt[1:2])
    batched = decode_logits(model, prompt)
    for a, b in zip(alone, batched):
        assert (a[0] - b[1]).abs().max().item() < 1e-4


def test_generation_with_packed_linears_matches_the_plain_model():
    """`azgpt sample`'s path (stream_text) with a seeded sampler: the same text whether the
    model's Linears are packed or not (logits differ in the last bits only)."""
    from trainkit import make_data

    from azgpt.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as d:
        tok = load_tokenizer(make_data(Path(d))[0])
    ref = small(vocab_size=tok.get_vocab_size())
    model = cast_model(copy.deepcopy(ref), "float32", torch.device("cpu"))
    ids = [tok.token_to_id("<|endoftext|>"), *tok.encode("Bakı şəhəri").ids]
    p = SamplingParams(max_tokens=24, temperature=0.8, seed=11, ignore_eos=True)
    assert "".join(stream_text(model, tok, ids, p)) == "".join(stream_text(ref, tok, ids, p))


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_the_kernel_gives_a_row_the_same_bits_alone_or_in_any_batch(int8):
    """azgpt's CPU kernel on awkward shapes (outputs not a multiple of its 32-wide panels,
    odd inputs, batches across its 8-row blocks, with and without bias): each row's outputs
    are bitwise the same whatever rows share the call, and torch's product of the weights it
    holds within float rounding."""
    check_rows_alone_and_in_batches(int8)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 levels")
@pytest.mark.parametrize("march,isa", [("x86-64-v3", 256), ("x86-64", 0)])
def test_the_kernel_built_for_older_x86_cpus_computes_the_same(march, isa, tmp_path, monkeypatch):
    """The AVX2 and plain-C int8 conversions, which `-march=native` does not build on a machine
    with AVX-512, built for those x86 levels and asserted to be the path that ran: the same
    checks as the native build."""
    monkeypatch.setenv("AZGPT_CACHE_DIR", str(tmp_path))
    lib = CK.bind(ctypes.CDLL(str(CK._build(CK._compiler(), march))))
    assert lib.azgpt_linear_isa() == isa
    monkeypatch.setattr(CK, "_lib", lib)
    for int8 in (False, True):
        check_rows_alone_and_in_batches(int8)


def check_rows_alone_and_in_batches(int8: bool) -> None:
    torch.manual_seed(0)
    for n, k, bias in ((45, 37, True), (32, 64, False), (100, 200, True)):
        lin = nn.Linear(k, n, bias=bias)
        packed = CL.PackedLinear(lin, "int8" if int8 else "kernel")
        w = packed.dequantized()
        if int8:
            assert packed.weight.dtype == torch.int8
            assert (w - lin.weight).abs().max() <= packed.scale.max() / 2 * (1 + 1e-5)
        else:
            assert torch.equal(w, lin.weight.detach())
        x = torch.randn(21, k)
        with torch.inference_mode():
            full = packed(x)
            want = x @ w.T + (lin.bias if bias else 0)
            assert (full - want).abs().max().item() < 1e-4
            for rows in (slice(0, 1), slice(3, 4), slice(0, 8), slice(5, 14), slice(20, 21)):
                assert torch.equal(packed(x[rows]), full[rows])
        assert packed.calls == 6


def test_the_kernel_is_built_once_per_machine_and_shares_torchs_threads(tmp_path, monkeypatch):
    """The C file is compiled into the cache folder once (a second load reuses the file), the
    library loaded into the process is the cached one, and it brings no OpenMP runtime of its
    own: one libgomp in the process, PyTorch's (two would fight over the cores)."""
    monkeypatch.setenv("AZGPT_CACHE_DIR", str(tmp_path))
    cc = CK._compiler()
    assert cc is not None
    built = CK._build(cc)
    assert built.parent == tmp_path / "kernels" and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    assert CK._build(cc) == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary left
    lib = CK.load()
    assert lib is not None and lib.azgpt_linear_panel() == CK.PANEL
    maps = Path("/proc/self/maps").read_text().splitlines()
    gomp = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(gomp) == 1, gomp


def test_without_a_c_compiler_float32_runs_onednn_and_int8_says_what_to_install(
    monkeypatch, caplog
):
    monkeypatch.setattr(CK, "_lib", None)
    monkeypatch.setattr(CK, "_tried", False)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    ref = small()
    model = copy.deepcopy(ref)
    with caplog.at_level(logging.WARNING, logger="azgpt.cpu_kernel"):
        assert CL.pack_linears(model) == "onednn"
    assert "could not build azgpt's CPU kernel" in caplog.text
    _, packed = linears(model)
    assert packed and all(m.kind == "onednn" and m.weight.is_mkldnn for m in packed)
    prompt = torch.randint(0, 300, (1, 5))
    for a, b in zip(decode_logits(ref, prompt), decode_logits(model, prompt)):
        assert (a - b).abs().max().item() < 1e-4
    assert all(m.calls == 6 for m in packed)
    with pytest.raises(UserError, match="C compiler.*--dtype float32"):
        cast_model(copy.deepcopy(ref), "int8", torch.device("cpu"))


def test_int8_rounding_keeps_each_weight_within_half_a_step():
    """`quantize_rows`: int8 in [-127, 127], each row's largest magnitude at 127, every weight
    within half its row's step of the original; a row of zeros stays zeros."""
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    w[2] *= 1000  # rows of very different ranges get their own scale
    w[4] = 0
    q, scale = CL.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (6,) and scale.dtype == torch.float32
    assert q.abs().max().item() == 127 and q[4].abs().max().item() == 0 and scale[4] == 1
    assert all(q[r].abs().max().item() == 127 for r in (0, 1, 2, 3, 5))
    err = (w - q.float() * scale[:, None]).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("kw", ARCHS, ids=["gpt2", "llama"])
def test_int8_linears_hold_int8_weights_and_compute_their_float_value(kw):
    """`--dtype int8`: every Linear holds int8 weights (each row's largest at 127) and a scale
    per row, 1 byte per weight; its logits are those of the float32 model whose weights are
    the rounded ones, within float rounding, and within 2% of the unrounded model's; a row
    gets the same logits batched as alone."""
    ref = small(**kw)
    model = copy.deepcopy(ref)
    assert CL.pack_linears(model, int8=True) == "int8"
    _, packed = linears(model)
    assert all(m.kind == "int8" and m.weight.dtype == torch.int8 for m in packed)
    assert all(m.weight.abs().max().item() == 127 for m in packed)
    assert all(m.weight.numel() < m.in_features * (m.out_features + 32) for m in packed)
    rounded = copy.deepcopy(ref)
    for name, m in model.named_modules():
        if isinstance(m, CL.PackedLinear):
            rounded.get_submodule(name).weight = nn.Parameter(m.dequantized())
    prompt = torch.randint(0, 300, (1, 7))
    lone, base, full = (decode_logits(m, prompt) for m in (model, rounded, ref))
    assert all(m.calls >= 6 for m in packed)
    for a, b, c in zip(lone, base, full):
        assert (a - b).abs().max().item() < 1e-4
        assert ((a - c).abs().max() / c.abs().max()).item() < 0.02
    batch = torch.cat([prompt, torch.randint(0, 300, (2, 7))])
    for a, b in zip(lone, decode_logits(model, batch)):
        assert (a[0] - b[0]).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="float32"):  # a bf16 model is cast first
        CL.pack_linears(small(**kw).to(torch.bfloat16), int8=True)


def test_weights_int8_cannot_round_are_refused_in_one_sentence():
    """A NaN or infinite weight would give its row a meaningless scale (its other weights
    rounded to zero): `--dtype int8` refuses the model, naming float32 as the way to run it."""
    for bad in (float("nan"), float("inf")):
        w = torch.randn(4, 8)
        w[1, 3] = bad
        with pytest.raises(ValueError, match="NaN or infinity"):
            CL.quantize_rows(w)
    model = small()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="--dtype int8: .*NaN or infinity.*--dtype float32"):
        cast_model(model, "int8", torch.device("cpu"))


def test_the_kernel_takes_any_float_input_and_returns_its_dtype():
    """Inputs other than float32 rows reach the kernel as float32 (it reads float32 only) and
    come back in their own dtype, like nn.Linear's; a Linear with no inputs is left to torch;
    the kernel itself refuses rows it cannot read rather than reading past them."""
    torch.manual_seed(0)
    lin = nn.Linear(40, 45)
    for kind in ("kernel", "int8"):
        packed = CL.PackedLinear(lin, kind)
        want = packed(torch.randn(3, 40))
        for dtype in (torch.float64, torch.bfloat16, torch.float16):
            x = torch.randn(2, 3, 40).to(dtype)
            y = packed(x)
            assert y.dtype == dtype and y.shape == (2, 3, 45)
            ref = packed(x.float())
            tol = {torch.float64: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
            assert (y.float() - ref).abs().max().item() <= tol * ref.abs().max().item()
        assert want.dtype == torch.float32
    half = nn.Linear(40, 45).bfloat16()
    assert CL.PackedLinear(half, "kernel").weight.dtype == torch.float32
    model = nn.Sequential(nn.Linear(0, 5), nn.Linear(5, 5))
    assert CL.pack_linears(model) == "kernel"
    assert type(model[0]) is nn.Linear and isinstance(model[1], CL.PackedLinear)
    with pytest.raises(ValueError, match="contiguous float32 rows of 40"):
        CK.linear(
            torch.randn(1, 40, dtype=torch.float64), CK.panels(torch.randn(45, 40)), None, None, 45
        )
    with pytest.raises(ValueError, match="contiguous float32 rows of 40"):
        CK.linear(torch.randn(1, 39), CK.panels(torch.randn(45, 40)), None, None, 45)


def test_threads_loading_the_kernel_at_once_all_get_it(tmp_path, monkeypatch):
    """The build is slow (a compiler run): a thread asking for the kernel meanwhile waits for
    it instead of getting None (which would quietly fall back to oneDNN)."""
    monkeypatch.setenv("AZGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(CK, "_lib", None)
    monkeypatch.setattr(CK, "_tried", False)
    build = CK._build

    def slow_build(cc, march="native"):
        time.sleep(0.3)
        return build(cc, march)

    monkeypatch.setattr(CK, "_build", slow_build)
    got = []
    threads = [threading.Thread(target=lambda: got.append(CK.load())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3 and got[0] is not None and all(g is got[0] for g in got)
