"""The optimizer step alone: azgpt's Muon (stacked by shape) against torch.optim.Muon (a loop over
matrices) and AdamW (foreach, fused), with the model's gradients already in place.

Two measurements per optimizer:
- at a model shape on the `meta` device (no data, no arithmetic): the aten ops one step issues
  and the host time to issue them, which is what the host spends per step on a GPU, where
  kernels run asynchronously (default: configs/gpt100m_modern.toml, 84 Muon matrices);
- on a real device at a shape that fits it (default on CPU: configs/small_cpu_modern.toml): the
  whole step's time, median of several.

    python bench/optim.py                                  # CPU: both measurements, a table
    python bench/optim.py --device cuda --real-config configs/gpt100m_modern.toml
    python bench/optim.py --steps 2 --real-config configs/tiny.toml --meta-config configs/tiny.toml  # smoke
    python bench/optim.py --append                         # also append the table to docs/results.md
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(config: str, device):
    import torch

    from azgpt.config import load_config
    from azgpt.model import GPT

    cfg = load_config(ROOT / config)
    with torch.device(device):
        torch.manual_seed(0)
        model = GPT(cfg.model)
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.device.type != "meta" else torch.empty_like(p)
    return model


def optimizers(model, device_type: str):
    """name -> a function doing one step (each on its own copy of the model)."""
    import torch

    from azgpt.optim import make_optimizer

    kw = dict(lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), muon_lr=0.02)
    out = {}

    def fresh():
        m = copy.deepcopy(model)
        for p, q in zip(m.parameters(), model.parameters()):
            p.grad = q.grad.clone()
        return m

    ours = make_optimizer(fresh(), device_type="cpu", optimizer="muon", **kw)
    theirs = make_optimizer(fresh(), device_type="cpu", optimizer="muon", **kw)

    # The Muon matrices alone (the AdamW rest of a Muon step is the same in both).
    def stacked():
        with torch.no_grad():
            ours._muon_group(ours.muon.param_groups[0])

    out["muon matrices: azgpt (stacked by shape)"] = stacked
    out["muon matrices: torch.optim.Muon (per matrix)"] = theirs.muon.step
    from azgpt.optim import param_groups

    m = fresh()
    out["adamw foreach (all parameters)"] = torch.optim.AdamW(
        param_groups(m, 0.1), lr=6e-4, foreach=True
    ).step
    if device_type != "meta":
        m = fresh()
        out["adamw fused (all parameters)"] = torch.optim.AdamW(
            param_groups(m, 0.1), lr=6e-4, fused=True
        ).step
    return out


def count_ops(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    fn()  # the first step allocates state: count a steady-state one
    with Count():
        fn()
    return Count.n


def timed(fn, steps: int, sync, stat=statistics.median) -> float:
    fn()  # warm-up: state allocation (and compiles on CUDA)
    sync()
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return stat(ts)


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meta-config", default="configs/gpt100m_modern.toml")
    ap.add_argument("--real-config", default="configs/small_cpu_modern.toml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--append", action="store_true", help="append the table to docs/results.md")
    ap.add_argument("--json", help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    meta_model = build(a.meta_config, "meta")
    n_muon = sum(1 for n, p in meta_model.named_parameters() if p.dim() == 2 and ".h." in n)
    rows = {}
    for name, fn in optimizers(meta_model, "meta").items():
        ops = count_ops(fn)
        host = timed(fn, a.steps, lambda: None, min)  # the least disturbed by other load
        rows[name] = {"ops": ops, "host_ms": 1e3 * host}
    real_model = build(a.real_config, dev)
    for name, fn in optimizers(real_model, dev.type).items():
        rows.setdefault(name, {})["step_ms"] = 1e3 * timed(fn, a.steps, sync)

    ref = rows["adamw foreach (all parameters)"]["step_ms"]
    head = (
        f"{a.meta_config} on meta ({n_muon} block matrices): ops and host time per step; "
        f"{a.real_config} on {dev.type}: step time"
    )
    lines = [
        head,
        "",
        "| optimizer step | aten ops | host issue (ms) | step (ms) | step / adamw foreach |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        host = f"{r['host_ms']:.1f}" if "host_ms" in r else "-"
        ops = str(r["ops"]) if "ops" in r else "-"
        lines.append(
            f"| {name} | {ops} | {host} | {r['step_ms']:.1f} | {r['step_ms'] / ref:.2f}x |"
        )
    print("\n".join(lines))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    if a.append:
        when = time.strftime("%Y-%m-%d")
        card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
        cmd = "python bench/optim.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(ROOT / "docs" / "results.md", "a", encoding="utf-8") as f:
            f.write(
                f"\n### Optimizer step ({when}, {card or dev.type}, torch {torch.__version__})\n\n"
                f"`{cmd.strip()}`\n\n" + "\n".join(lines) + "\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
