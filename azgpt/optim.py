"""Optimizer parameter groups and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import inspect
import math

import torch


def lr_at(step: int, *, lr: float, min_lr: float, warmup_iters: int, max_iters: int) -> float:
    """Linear warmup from lr/warmup to lr over `warmup_iters` steps, then cosine decay to `min_lr`
    at `max_iters`; `min_lr` after that. `step` counts optimizer steps from 0. A warmup longer
    than the run is cut to the run (a short smoke run of a long config still reaches the peak)."""
    warmup_iters = min(warmup_iters, max_iters)
    if warmup_iters > 0 and step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if step >= max_iters:
        return min_lr
    span = max(1, max_iters - warmup_iters)
    progress = (step - warmup_iters) / span
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + coeff * (lr - min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (Linear and embedding weights, dim >= 2) only; biases and
    LayerNorm parameters (dim < 2) are not decayed. Tied weights appear once."""
    decay, no_decay = [], []
    seen = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model, *, lr, weight_decay, betas, device_type: str) -> torch.optim.AdamW:
    kwargs = {}
    # Fused AdamW (one kernel for all parameters) on CUDA.
    if device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=betas, eps=1e-8, **kwargs
    )
