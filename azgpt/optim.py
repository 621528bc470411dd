"""Optimizers (AdamW, or Muon for the block matrices beside AdamW) and the learning-rate
schedule (a pure function of the step)."""

from __future__ import annotations

import inspect
import math

import torch

from .errors import UserError


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


def muon_matrices(model: torch.nn.Module) -> list[str]:
    """Names of the parameters Muon trains: the 2-D weight matrices inside the transformer
    blocks. Embeddings and the head (lookups and the output layer, whose rows are per-token) stay
    with AdamW, as do the 1-D norm weights and biases Muon cannot orthogonalise."""
    return [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and p.dim() == 2 and name.startswith("transformer.h.")
    ]


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon for the block matrices and AdamW for everything else, as one optimizer.

    Both inner optimizers share this object's `param_groups` (Muon's groups first) and `state`,
    so `state_dict()` is the ordinary one, keyed by parameter, and the checkpoint code (which
    saves optimizer state by parameter name) and Accelerate see a single optimizer. Each Muon
    group holds `lr_scale` = muon_lr / lr: the training loop multiplies the scheduled lr by it.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__([*muon.param_groups, *adamw.param_groups], defaults={})
        self._relink()

    def _relink(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups = self.param_groups[:n]
        self.adamw.param_groups = self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces param_groups and state: share them again
        self._relink()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.muon.param_groups
        if all(g.get("adjust_lr_fn") in (None, "original") for g in groups) and any(
            p.device.type == "cpu" for g in groups for p in g["params"]
        ):
            self._muon_step_fp32()
        else:
            self.muon.step()
        self.adamw.step()
        return loss

    def _muon_step_fp32(self) -> None:
        """torch.optim.Muon's update with its Newton-Schulz iteration in float32 instead of
        bfloat16: a CPU without bf16 matrix units runs the bf16 products ~11x slower (a
        1024 x 256 matrix: 0.22 s against 0.02 s on a 2-core x86-64 VM), which made Muon cost
        ~8x the step time of AdamW there. The same state (`momentum_buffer`) and hyperparameters,
        so a checkpoint resumes on either path."""
        for group in self.muon.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            a, b, c = group["ns_coefficients"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        grad, memory_format=torch.preserve_format
                    )
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - mom)
                update = grad.lerp(buf, mom) if group["nesterov"] else buf
                x = update.float()
                tall = x.size(0) > x.size(1)
                if tall:
                    x = x.T
                x = x / x.norm().clamp(min=group["eps"])
                for _ in range(group["ns_steps"]):
                    gram = x @ x.T
                    x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
                if tall:
                    x = x.T
                rows, cols = p.shape[:2]
                scale = math.sqrt(max(1, rows / cols))  # adjust_lr_fn "original", as configured
                p.mul_(1 - lr * wd)
                p.add_(x.to(p.dtype), alpha=-lr * scale)


def make_optimizer(
    model,
    *,
    lr,
    weight_decay,
    betas,
    device_type: str,
    optimizer: str = "adamw",
    muon_lr: float = 0.02,
) -> torch.optim.Optimizer:
    """AdamW over `param_groups`, or (optimizer='muon') `MuonAdamW`."""
    kwargs = {}
    # Fused AdamW (one kernel for all parameters) on CUDA.
    if device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    if optimizer == "adamw":
        return torch.optim.AdamW(
            param_groups(model, weight_decay), lr=lr, betas=betas, eps=1e-8, **kwargs
        )
    muon_cls = getattr(torch.optim, "Muon", None)
    if muon_cls is None:
        raise UserError(
            f"train.optimizer = 'muon' needs torch.optim.Muon (torch 2.9 or newer; this is torch "
            f"{torch.__version__}); upgrade torch or set train.optimizer = 'adamw'."
        )
    names = set(muon_matrices(model))
    params = dict(model.named_parameters())
    matrices = [params[n] for n in params if n in names]
    ids = {id(p) for p in matrices}
    rest_groups = [  # the remaining parameters, grouped as for plain AdamW
        {**g, "params": [p for p in g["params"] if id(p) not in ids]}
        for g in param_groups(model, weight_decay)
    ]
    # Nesterov momentum 0.95 and 5 Newton-Schulz steps: torch's (and the speedrun's) defaults;
    # lr is scaled by sqrt(max(1, rows/cols)) per matrix ("original", Keller Jordan's Muon).
    muon = muon_cls(
        [{"params": matrices, "lr_scale": muon_lr / lr}],
        lr=muon_lr,
        weight_decay=weight_decay,
        momentum=0.95,
        nesterov=True,
    )
    adamw = torch.optim.AdamW(
        [g for g in rest_groups if g["params"]], lr=lr, betas=betas, eps=1e-8, **kwargs
    )
    return MuonAdamW(muon, adamw)
