"""What the hardware decides: data-sheet peaks of CUDA cards (for MFU), the precision a run
computes in, and whether it is compiled."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch

from .config import RunConfig
from .errors import UserError

# Dense tensor-core peaks (FLOP/s) from vendor data sheets, per compute dtype: (bf16, fp16, tf32).
# MFU in the progress bar and metrics.jsonl is measured against the peak of the dtype the run
# computes in ("no" mixed precision runs TF32 matmuls on CUDA). bench/gpu.py also measures the
# card's real bf16 matmul peak and reports MFU against both.
PEAK_FLOPS = {
    "H200": (989e12, 989e12, 494e12),
    "H100 SXM": (989e12, 989e12, 494e12),
    "H100 NVL": (835e12, 835e12, 418e12),
    "H100 PCIe": (756e12, 756e12, 378e12),
    "H100": (989e12, 989e12, 494e12),
    "GH200": (989e12, 989e12, 494e12),
    "B200": (2250e12, 2250e12, 1100e12),
    "A100": (312e12, 312e12, 156e12),
    "A800": (312e12, 312e12, 156e12),
    "L40S": (362e12, 362e12, 183e12),
    "L40": (181e12, 181e12, 90e12),
    "L4": (121e12, 121e12, 60e12),
    "A10G": (70e12, 70e12, 35e12),
    "A10": (125e12, 125e12, 62e12),
    "A6000": (155e12, 155e12, 77e12),
    "RTX 4090": (165e12, 165e12, 83e12),
    "RTX 3090": (71e12, 71e12, 36e12),
    # Pre-Ampere: no bf16 tensor cores (bf16 is emulated), fp16 tensor cores, no TF32.
    "V100": (None, 125e12, 15.7e12),
    "T4": (None, 65e12, 8.1e12),
}
_DTYPE_COLUMN = {"bf16": 0, "fp16": 1, "no": 2}


def peak_flops(card: str, precision: str) -> float | None:
    """The data-sheet peak of `card` (a CUDA device name) for mixed precision `precision`."""
    for key, peaks in PEAK_FLOPS.items():  # ordered: specific names before generic ones
        if key in card:
            return peaks[_DTYPE_COLUMN[precision]]
    return None


def choose_mixed_precision(setting: str, device_type: str, capability: tuple[int, int] | None):
    """The precision a run computes in. `auto`: bf16 only where the card has bf16 tensor cores
    (compute capability 8.0+, Ampere and later); `torch.cuda.is_bf16_supported()` also says yes
    on a T4 or V100, where bf16 is emulated at a fraction of fp16's speed, so older cards get
    fp16 with loss scaling. CPU runs in fp32."""
    if device_type != "cuda":
        if setting == "fp16":
            raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU.")
        return "no" if setting == "auto" else setting
    native_bf16 = capability is not None and capability >= (8, 0)
    if setting == "auto":
        return "bf16" if native_bf16 else "fp16"
    if setting == "bf16" and not native_bf16:
        warnings.warn(
            f"train.mixed_precision=bf16 on a card of compute capability {capability} is emulated "
            "and slow; fp16 (or auto) uses its tensor cores",
            stacklevel=2,
        )
    return setting


def compile_mode(cfg: RunConfig, device_type: str) -> str | None:
    c = cfg.train.compile
    if c == "off" or (c == "auto" and device_type != "cuda"):
        return None
    return "default" if c in ("auto", "on") else c


@contextmanager
def eager(model: torch.nn.Module):
    """Run `model` (compiled in place with `Module.compile`) uncompiled inside the block.
    Evaluation (no_grad, eval mode) and sampling (a KV cache, growing lengths) would each make
    dynamo compile new graphs beside the training one: 14 recompiles at a tiny CPU run's first
    evaluation. A few dozen forwards per evaluation are not worth them."""
    saved = [(m, m._compiled_call_impl) for m in model.modules() if m._compiled_call_impl]
    for m, _ in saved:
        m._compiled_call_impl = None
    try:
        yield model
    finally:
        for m, f in saved:
            m._compiled_call_impl = f
