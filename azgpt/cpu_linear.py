"""Linear layers laid out for the CPU's kernels, for generation on a CPU.

PyTorch's CPU `Linear` calls the BLAS it was built with (MKL in the PyPI wheels). On CPUs where
that BLAS takes a slow path (measured on a 2-core AMD EPYC VM: a (1, 768) x (768, 128,000)
product streamed 10 GB/s, a batch of 8 rows reached 18 GFLOP/s), oneDNN, which PyTorch also
ships, runs the same products 2x (one row) to 5x (8 rows) faster once the weight is reordered
into its blocked layout. One row at a time (a lone stream decoding) is bound by how fast the
weights stream from memory: there a reduction kernel that torch's inductor compiler generates
for each weight shape streamed 35 GB/s where oneDNN reached 20 (bench/generate.py,
docs/results.md).

`pack_linears(model)` swaps every `nn.Linear` of a model that will only run inference for a
`PackedLinear`: oneDNN's layout for batches, and, for models whose weights outgrow the CPU's
caches (`GEMV_MIN_BYTES`) when a C++ compiler is at hand, the compiled one-row kernel beside
it. An `lm_head` tied to the embedding gets its own copy. The arithmetic is the same product in
another summation order: logits agree with the unpacked model within float rounding
(tests/test_cpu_linear.py).

`pack_linears(model, int8=True)` (`--dtype int8`) first rounds every weight to int8 with one
float32 scale per output row (symmetric, the row's largest magnitude at 127). A lone row's
product then streams the int8 weights (a quarter of float32's bytes: measured 2.0-3.6x faster
for the 110M shape) and multiplies by the scale once per output; batches run oneDNN's float32
product on the same rounded weights (int8 times scale), so a row gets the same logits batched
as alone within float rounding. Both copies are kept (5 bytes per weight): int8 buys speed,
not memory, and only where the one-row kernel is compiled (large models, or `--compile on`).
int8 takes float32 models only.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

__all__ = ["PackedLinear", "available", "pack_linears", "quantize_rows"]

log = logging.getLogger("azgpt.cpu_linear")

PACKABLE = (torch.float32, torch.bfloat16)
# Linear weights of at least this many bytes in all stream from memory at every decoding step
# (a CPU's last-level cache holds 8-64 MB): only then does the compiled one-row kernel pay for
# its compile time (seconds, cached on disk by torch for later runs).
GEMV_MIN_BYTES = 64 << 20


def available() -> bool:
    """oneDNN's linear ops are in this PyTorch build."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x[:, None, :] * w[None]).sum(-1)


def _gemv_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x[:, None, :] * w[None].to(x.dtype)).sum(-1) * scale


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights, float32 scale per output row): w ~ q * scale[:, None], the row's largest
    magnitude mapped to 127 (an all-zero row gets scale 1)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


@torch.library.custom_op("azgpt::onednn_linear", mutates_args=())
def onednn_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """oneDNN's product with a reordered weight, as an operator a compiled graph calls as it is
    (inductor lowers oneDNN's own op only for weights it reordered itself)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@onednn_linear.register_fake
def _(x, packed, bias, out_features):
    return x.new_empty((x.shape[0], out_features))


def _compiled_gemv(k: int, n: int, dtype: torch.dtype, int8: bool = False):
    """A one-row product compiled by inductor for one weight shape, called without
    torch.compile's guards (about 20 us per call less; 49 calls per token for the 110M
    shape): PackedLinear only calls it with a contiguous (1, k) row of `dtype` and its own
    (n, k) weight (with `int8`, int8 weights and their (n,) float32 scales), the shapes it was
    compiled for."""
    import torch._inductor

    x = torch.zeros(1, k, dtype=dtype)
    if int8:
        example = [x, torch.zeros(n, k, dtype=torch.int8), torch.ones(n)]
        return torch._inductor.compile(torch.fx.symbolic_trace(_gemv_int8), example)
    example = [x, torch.zeros(n, k, dtype=dtype)]
    return torch._inductor.compile(torch.fx.symbolic_trace(_gemv), example)


class PackedLinear(nn.Module):
    """y = x W^T + b with W in oneDNN's layout (and, with `keep_rows`, row-major beside it for
    the compiled one-row kernel); inference only (no autograd through it). With `int8`, W is
    first rounded to int8 per output row (`quantize_rows`): the rows kept are the int8 ones
    (with `scale`), oneDNN's copy is their float value."""

    def __init__(
        self, lin: nn.Linear, keep_rows: bool = False, tied: bool = False, int8: bool = False
    ):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        # What the Linear's Parameters were (GPT.num_params counts them); 0 when its weight
        # is another module's too (a head tied to the embedding is counted there).
        self.n_params = 0 if tied else sum(p.numel() for p in lin.parameters())
        w = lin.weight.detach()
        self.int8, self.scale, rows = int8, None, None
        if int8:
            rows, self.scale = quantize_rows(w)
            w = (rows.float() * self.scale[:, None]).to(w.dtype)
        elif keep_rows:
            rows = w.contiguous().clone()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)
        self.bias = None if lin.bias is None else lin.bias.detach().to(w.dtype).contiguous()
        self.dtype = w.dtype
        self.gemv = None  # set by pack_linears once compiled
        self.weight_rows = rows if keep_rows else None
        self.calls = {"onednn": 0, "gemv": 0}

    def _one_row(self, x2: torch.Tensor, fn) -> torch.Tensor:
        y = fn(x2, self.weight_rows, self.scale) if self.int8 else fn(x2, self.weight_rows)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if torch.compiler.is_compiling():
            # Traced into a whole compiled step (azgpt.decode_graph): the one-row product as
            # the reduction the compiled kernel is, so the compiler emits it in the step.
            if self.weight_rows is not None and x2.shape[0] == 1:
                y = self._one_row(x2, _gemv_int8 if self.int8 else _gemv)
            else:
                y = onednn_linear(x2.contiguous(), self.packed, self.bias, self.out_features)
            return y.view(*lead, self.out_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if self.gemv is not None and x2.shape[0] == 1 and x2.dtype == self.dtype:
            self.calls["gemv"] += 1
            y = self._one_row(x2, self.gemv)
        else:
            self.calls["onednn"] += 1
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        kind = ("int8" if self.int8 else "onednn") + ("+gemv" if self.gemv is not None else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


def pack_linears(model: nn.Module, gemv: bool | None = None, int8: bool = False) -> str:
    """Replace the CPU `nn.Linear`s (fp32 or bf16) of `model` in place; returns the kernels
    they now run: "onednn+gemv", "onednn", or "torch" (nothing replaced: oneDNN missing or
    nothing on the CPU); with `int8` (weights rounded to int8 per output row), "int8+gemv" or
    "int8". `gemv`: compile the one-row kernel (None: when the weights total GEMV_MIN_BYTES or
    more); a compile that fails falls back to oneDNN alone, with a warning."""
    if not available():
        return "torch"
    todo = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
        and child.weight.device.type == "cpu"
        and child.weight.dtype in PACKABLE
    ]
    if not todo:
        return "torch"
    if int8 and any(c.weight.dtype != torch.float32 for _, _, c in todo):
        raise ValueError("int8 rounding takes float32 Linears; cast the model to float32 first")
    if gemv is None:
        total = sum(c.weight.numel() * c.weight.element_size() for _, _, c in todo)
        gemv = total >= GEMV_MIN_BYTES
    uses: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    mods = []
    for parent, name, child in todo:
        tied = uses[id(child.weight)] > 1
        mods.append(PackedLinear(child, keep_rows=gemv, tied=tied, int8=int8))
        setattr(parent, name, mods[-1])
    kind = "int8" if int8 else "onednn"
    if gemv and _compile_all(mods):
        return kind + "+gemv"
    for m in mods:
        m.gemv, m.weight_rows = None, None
    return kind


def _compile_all(mods: list[PackedLinear]) -> bool:
    """Compile the one-row kernel of every weight shape and run it once on the real weights,
    under inference mode as decoding runs (so the first request does not recompile); False
    when this machine cannot compile."""
    t0 = time.perf_counter()
    kernels: dict = {}
    try:
        with torch.inference_mode():
            for m in mods:
                key = (m.in_features, m.out_features, m.dtype, m.int8)
                if key not in kernels:
                    kernels[key] = _compiled_gemv(*key)
                    m._one_row(torch.zeros(1, m.in_features, dtype=m.dtype), kernels[key])
                m.gemv = kernels[key]
    except Exception as e:  # no C++ compiler, an inductor bug: oneDNN alone still works
        log.warning(
            "could not compile the one-row CPU kernels (%s); decoding one stream uses oneDNN",
            " ".join(str(e).split())[:160],
        )
        return False
    log.info("compiled %d one-row CPU kernels in %.1f s", len(kernels), time.perf_counter() - t0)
    return True
