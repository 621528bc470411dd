"""Linear layers laid out for generation on a CPU.

`pack_linears(model)` swaps every CPU `nn.Linear` of a model that will only run inference
for a `PackedLinear`, whose product is one of:

- "kernel" (float32): azgpt's own product (`azgpt.cpu_kernel`, built for this machine on
  first use), its weights in panels read once per block of 8 rows. The same kernel serves a
  lone stream's decoding step, `serve`'s batched steps and a prompt's prefill, and each
  output row is a plain sum in input order: a row's logits are the same bitwise whether it
  is decoded alone or batched (tests/test_cpu_linear.py).
- "int8" (`--dtype int8`): every weight first rounded to int8 with one float32 scale per
  output row (`quantize_rows`: symmetric, the row's largest magnitude at 127), kept as int8
  panels, converted to float32 in registers by the same kernel and scaled once per output:
  a quarter of float32's bytes to stream per token, and a quarter of its memory (1 byte per
  weight and a scale per row). Activations stay float32.
- "onednn" (bfloat16 models, or float32 where the kernel cannot be built): oneDNN's product
  on its reordered layout (PyTorch ships it; on some CPUs 2-5x faster than PyTorch's default
  BLAS for these shapes).

The arithmetic is the same product in another summation order: logits agree with the
unpacked model within float rounding (tests/test_cpu_linear.py). Measured speeds:
`azgpt.cpu_kernel`, docs/results.md.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import cpu_kernel

__all__ = ["PackedLinear", "available", "pack_linears", "quantize_rows"]

log = logging.getLogger("azgpt.cpu_linear")

PACKABLE = (torch.float32, torch.bfloat16)


def available() -> bool:
    """oneDNN's linear ops are in this PyTorch build."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights, float32 scale per output row): w ~ q * scale[:, None], the row's largest
    magnitude mapped to 127 (an all-zero row gets scale 1)."""
    w = w.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(
            "a Linear's weights hold NaN or infinity, which int8 cannot round (a damaged "
            "checkpoint?); --dtype float32 runs them as they are"
        )
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _product(x, weight, scale, bias, out_features: int) -> torch.Tensor:
    """x (M, K) float32 (bfloat16 for a bfloat16 oneDNN weight), contiguous."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return cpu_kernel.linear(x, weight, scale, bias, out_features)


@torch.library.custom_op("azgpt::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """A PackedLinear's product as an operator a compiled graph calls as it is (inductor
    cannot trace into the kernel, nor lower oneDNN's op for weights it did not reorder)."""
    return _product(x, weight, scale, bias, out_features)


@packed_linear.register_fake
def _(x, weight, scale, bias, out_features):
    return x.new_empty((x.shape[0], out_features))


class PackedLinear(nn.Module):
    """y = x W^T + b with W laid out for `kind`'s product ("kernel", "int8" or "onednn", see
    the module's docstring); inference only (no autograd through it). `calls` counts the
    products run outside a compiled graph."""

    def __init__(self, lin: nn.Linear, kind: str, tied: bool = False):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        # What the Linear's Parameters were (GPT.num_params counts them); 0 when its weight
        # is another module's too (a head tied to the embedding is counted there).
        self.n_params = 0 if tied else sum(p.numel() for p in lin.parameters())
        w = lin.weight.detach()
        self.kind, scale = kind, None
        if kind in ("int8", "kernel"):
            if lin.in_features == 0 or cpu_kernel.load() is None:
                raise ValueError(f"azgpt's CPU kernel cannot run this Linear ({lin})")
            w = w.float()  # the kernel multiplies float32 (or int8 rounded from it)
        if kind == "int8":
            q, scale = quantize_rows(w)
            weight = cpu_kernel.panels(q)
        elif kind == "kernel":
            weight = cpu_kernel.panels(w)
        else:
            weight = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)
        # What the product reads: float32 rows for the kernel, the weight's dtype for oneDNN.
        self.compute_dtype = w.dtype if kind == "onednn" else torch.float32
        bias = None if lin.bias is None else lin.bias.detach().to(self.compute_dtype).contiguous()
        # Buffers (not saved): a compiled step takes their sizes as fixed, where plain tensor
        # attributes would each bring symbolic sizes for the graph to pass at every call.
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()
        args = (x2, self.weight, self.scale, self.bias, self.out_features)
        if torch.compiler.is_compiling():  # traced into a compiled step (azgpt.decode_graph)
            y = packed_linear(*args)
        else:
            self.calls += 1
            y = _product(*args)
        return y.view(*lead, self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The (out, in) weight this module multiplies by, as float32 (int8 times scale)."""
        if self.kind == "onednn":
            raise ValueError("oneDNN's layout is opaque; keep the Linear's weight instead")
        k = self.in_features
        w = self.weight.transpose(1, 2).reshape(-1, k)[: self.out_features].float()
        return w * self.scale[:, None] if self.scale is not None else w

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


def pack_linears(model: nn.Module, int8: bool = False, kernel: bool = True) -> str:
    """Replace the CPU `nn.Linear`s (float32 or bfloat16) of `model` in place; returns the
    product they now run: "kernel", "int8", "onednn", or "torch" (nothing replaced: nothing
    on the CPU, or neither product available). `int8` rounds the weights (float32 Linears
    only) and needs the kernel; `kernel=False` keeps float32 on oneDNN (a comparison)."""
    todo = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
        and child.weight.device.type == "cpu"
        and child.weight.dtype in PACKABLE
        and child.in_features > 0
    ]
    if not todo:
        return "torch"
    fp32 = all(c.weight.dtype == torch.float32 for _, _, c in todo)
    if int8 and not fp32:
        raise ValueError("int8 rounding takes float32 Linears; cast the model to float32 first")
    lib = cpu_kernel.load() if (kernel or int8) and fp32 else None
    if int8 and lib is None:
        raise RuntimeError("int8 needs azgpt's CPU kernel, which could not be built here")
    kind = ("int8" if int8 else "kernel") if lib is not None else "onednn"
    if kind == "onednn" and not available():
        return "torch"
    uses: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    for parent, name, child in todo:
        setattr(parent, name, PackedLinear(child, kind, tied=uses[id(child.weight)] > 1))
    return kind
