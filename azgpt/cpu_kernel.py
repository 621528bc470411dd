"""azgpt's CPU product for generation: `csrc/linear.c`, built for this machine on first use.

Decoding reads every weight once per step for a handful of rows, which neither of PyTorch's
CPU libraries does well on every CPU: measured on a 2-core AMD EPYC VM, the 49 products of
the 110M shape took oneDNN 21-23 ms whether for 1 row or 8 (weights streamed at ~20 GB/s),
where this kernel takes 10.8 ms for 1 row and 15.7 for 8 (float32), 3.9 and 11.6 with int8
weights (bench/generate.py, docs/results.md). Weights are laid out in panels of 32 outputs
(`panels`), read once per block of 8 rows; each output is a sum over the inputs in order, so
a row's result is the same bitwise whatever rows share its product.

`load()` compiles the C file with the machine's compiler (`$CC`, else cc or gcc;
`-O3 -march=native -fopenmp`) into `$AZGPT_CACHE_DIR` (default ~/.cache/azgpt) under a
name that hashes the source, the flags, the compiler and the CPU, once per machine (well
under a second), and loads it; None, with a warning, when there is no compiler or the build
fails (generation then runs oneDNN's products). Its threads are OpenMP's, from the runtime
PyTorch already loaded, `torch.get_num_threads()` of them.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["linear", "load", "panels"]

log = logging.getLogger("azgpt.cpu_kernel")

SOURCE = Path(__file__).with_name("csrc") / "linear.c"
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
PANEL = 32  # outputs per panel: azgpt_linear_panel() in the C file

_lib: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("AZGPT_CACHE_DIR") or Path.home() / ".cache" / "azgpt")


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return shutil.which("cc") or shutil.which("gcc")


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


def _build(cc: str, march: str = "native") -> Path:
    """The shared library for this CPU (`-march=native`; the tests also build older x86
    levels to run the AVX2 and plain-C paths), built once into the cache folder."""
    flags = [*FLAGS, f"-march={march}"]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    src = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([src, " ".join(flags).encode(), version.encode(), _cpu_id().encode()])
    ).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"linear-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run(
            [cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120
        )
        if r.returncode != 0:
            raise RuntimeError(" ".join((r.stderr or r.stdout).split())[:300])
        os.replace(tmp, out)  # another process building the same file meanwhile is harmless
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load() -> ctypes.CDLL | None:
    """The built kernel (built and loaded once per process), or None where it cannot be."""
    global _lib, _tried
    with _lock:  # a second thread waits for the first one's build
        if _tried:
            return _lib
        try:
            _lib = _load()
        finally:
            _tried = True
        return _lib


def _load() -> ctypes.CDLL | None:
    if os.environ.get("AZGPT_CPU_KERNEL", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler (cc, gcc or $CC): CPU generation uses oneDNN's products")
        return None
    try:
        return bind(ctypes.CDLL(str(_build(cc))))
    except Exception as e:  # a compiler without -fopenmp or -march=native, a full disk
        log.warning("could not build azgpt's CPU kernel (%s): using oneDNN's products", e)
        return None


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the built library's functions to ctypes (and check its panel width)."""
    if lib.azgpt_linear_panel() != PANEL:
        raise RuntimeError("the built kernel's panel width is not the one expected")
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.azgpt_linear_f32.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, i32]
    lib.azgpt_linear_i8.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr, i32]
    lib.azgpt_linear_f32.restype = lib.azgpt_linear_i8.restype = None
    return lib


def panels(w: torch.Tensor) -> torch.Tensor:
    """(N, K) weights as (ceil(N / 32), K, 32) panels, the last one padded with zeros."""
    n, k = w.shape
    count = -(-n // PANEL)
    padded = torch.zeros(count * PANEL, k, dtype=w.dtype)
    padded[:n] = w
    return padded.view(count, PANEL, k).transpose(1, 2).contiguous()


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    n: int,
) -> torch.Tensor:
    """x (M, K) float32 contiguous times the panels `w` (float32, or int8 with `scale`) of an
    (n, K) weight, plus `bias`: (M, n) float32. `load()` must have returned the kernel."""
    m, k = x.shape
    if x.dtype != torch.float32 or w.shape[1] != k or not x.is_contiguous() or x.is_cuda:
        raise ValueError(
            f"the kernel takes contiguous float32 rows of {w.shape[1]} on the CPU and its own "
            f"panels, not {tuple(x.shape)} {x.dtype} rows and {w.dtype} panels"
        )
    y = torch.empty(m, n, dtype=torch.float32)
    if m == 0:
        return y
    b = bias.data_ptr() if bias is not None else None
    threads = torch.get_num_threads()
    if scale is None:
        _lib.azgpt_linear_f32(x.data_ptr(), m, k, w.data_ptr(), n, b, y.data_ptr(), threads)
    else:
        _lib.azgpt_linear_i8(
            x.data_ptr(), m, k, w.data_ptr(), scale.data_ptr(), n, b, y.data_ptr(), threads
        )
    return y
