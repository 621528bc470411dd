"""Optimizers (AdamW, or Muon for the block matrices beside AdamW) and the learning-rate
schedule (a pure function of the step)."""

from __future__ import annotations

import inspect
import math
import os

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
    """Muon for the block matrices and AdamW for everything else, as one optimizer.

    Muon's hyperparameters and state are torch.optim.Muon's (its param groups are built by it);
    the update is computed here, stacked by shape and valid on FSDP shards (`_muon_group`).

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
        for group in self.muon.param_groups:
            if group.get("adjust_lr_fn") not in (None, "original"):
                raise ValueError("MuonAdamW applies adjust_lr_fn 'original' only")
            self._muon_group(group)
        self.adamw.step()
        return loss

    def _muon_group(self, group: dict) -> None:
        """torch.optim.Muon's update (Nesterov momentum, Newton-Schulz orthogonalisation, the
        'original' lr scale sqrt(max(1, rows/cols)), decoupled weight decay), with the same state
        (`momentum_buffer`), computed per shape group: same-shape matrices are stacked and
        orthogonalised in one batched Newton-Schulz, so a step issues a few dozen ops instead of
        ~30 per matrix (bench/optim.py measures both). Newton-Schulz needs whole matrices: under
        FSDP each process orthogonalises the matrices it owns and hands back everyone's rows
        (`_orthogonalise_owned`); shards of another layout are gathered whole on every process."""
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        shapes: dict[tuple, list] = {}
        for p in group["params"]:
            if p.grad is not None:
                shapes.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
        for (shape, _, device), ps in shapes.items():
            grads = [_local(p.grad) for p in ps]
            bufs = []
            for p in ps:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p.grad)
                bufs.append(_local(st["momentum_buffer"]))
            torch._foreach_lerp_(bufs, grads, 1 - mom)
            upd = torch._foreach_lerp(grads, bufs, mom) if group["nesterov"] else bufs
            ns = (group["ns_coefficients"], group["ns_steps"], group["eps"], ns_dtype(device))
            group_ = _row_sharded_group(ps)
            if group_ is not None:  # FSDP: each process orthogonalises the matrices it owns
                news = _orthogonalise_owned(torch.stack(upd), shape, group_, ns)
            else:
                full = torch.stack([_gather(u, p) for u, p in zip(upd, ps)])  # (G, rows, cols)
                news = [_scatter(o, p) for o, p in zip(newton_schulz(full, *ns).unbind(0), ps)]
            rows, cols = shape[:2]
            scale = math.sqrt(max(1, rows / cols))
            locals_ = [_local(p) for p in ps]
            torch._foreach_mul_(locals_, 1 - lr * wd)
            news = [n.to(p.dtype) for n, p in zip(news, locals_)]
            torch._foreach_add_(locals_, news, alpha=-lr * scale)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local piece (an FSDP shard), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _row_sharded_group(ps: list):
    """The process group when every matrix of `ps` is an FSDP shard of whole rows split evenly
    (one mesh dimension, `Shard(0)`, rows divisible by the process count), else None."""
    from torch.distributed.tensor import Shard

    p = ps[0]
    if not hasattr(p, "device_mesh") or p.device_mesh.ndim != 1:
        return None
    world = p.device_mesh.size()
    if world == 1 or p.shape[0] % world:
        return None
    if any(tuple(q.placements) != (Shard(0),) for q in ps):
        return None
    return p.device_mesh.get_group()


def _orthogonalise_owned(local: torch.Tensor, shape, group, ns) -> list[torch.Tensor]:
    """Newton-Schulz of G row-sharded matrices with the work split over the W processes:
    matrix i belongs to process i // per (per = ceil(G / W)). One all-to-all brings each owner
    the W row shards of its matrices, it orthogonalises them whole, a second all-to-all returns
    each process its rows of every result. Each process computes 1/W of the Newton-Schulz FLOPs
    (gathering every matrix everywhere computes all of them on every process), for the same
    traffic as one all-gather. `local`: (G, rows / W, cols), this process's rows."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    g, rows, cols = local.shape[0], shape[0], shape[1]
    per = -(-g // world)
    if per * world > g:  # pad to whole owners with zero matrices (orthogonalised to zero)
        local = torch.cat([local, local.new_zeros(per * world - g, *local.shape[1:])])
    recv = torch.empty_like(local)
    dist.all_to_all_single(recv, local.contiguous(), group=group)
    # recv[s * per + k] is process s's rows of my matrix k: stack the rows in process order
    mine = recv.view(world, per, rows // world, cols).transpose(0, 1).reshape(per, rows, cols)
    ortho = newton_schulz(mine, *ns).to(local.dtype)
    send = ortho.view(per, world, rows // world, cols).transpose(0, 1).contiguous()
    back = torch.empty_like(send)
    dist.all_to_all_single(back, send, group=group)
    return list(back.view(per * world, rows // world, cols)[:g].unbind(0))


def _gather(u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The whole matrix of a sharded parameter's local piece `u` (a collective under FSDP)."""
    if not hasattr(p, "device_mesh"):
        return u
    from torch.distributed.tensor import DTensor

    d = DTensor.from_local(u, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return d.full_tensor()


def _scatter(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This process's piece of a whole-matrix update, laid out as `p`'s local shard."""
    if not hasattr(p, "device_mesh"):
        return full.to(p.dtype)
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every process holds the same `full`, so each slices its own (no comms)
    d = distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
    return d.to_local()


def ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 Newton-Schulz where the hardware multiplies bf16 natively, float32 elsewhere. CUDA:
    compute capability 8.0+ (older cards emulate bf16). CPU: AMX tiles (Sapphire Rapids and
    later), where 5 steps on 4 x 256 x 704 took 12 ms in bf16 against 81 ms in float32 (one
    thread); without them bf16 products ran ~11x slower than float32 (a 1024 x 256 matrix: 0.22 s
    against 0.02 s on a 2-core x86-64 VM without bf16 units)."""
    if os.environ.get("AZGPT_MUON_FP32") == "1":  # exact comparisons across process counts
        return torch.float32
    if device.type == "cuda":
        return (
            torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float32
        )
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if device.type == "cpu" and amx is not None and amx():
        return torch.bfloat16
    return torch.float32


def _newton_schulz(x: torch.Tensor, a: float, b: float, c: float, steps: int, eps: float):
    """The quintic Newton-Schulz iteration of Muon on a stack (G, rows, cols), rows <= cols."""
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


_compiled: dict = {}


def newton_schulz(stack: torch.Tensor, coefficients, steps: int, eps: float, dtype) -> torch.Tensor:
    """Orthogonalise each matrix of `stack` (G, rows, cols) in `dtype`; on CUDA one compiled,
    fused graph per shape group (compiled on first use; CPU runs it eagerly)."""
    a, b, c = coefficients
    x = stack.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    fn = _newton_schulz
    if x.device.type == "cuda":
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(_newton_schulz, dynamic=False)
        fn = _compiled["fn"]
    x = fn(x, a, b, c, steps, eps)
    return x.mT if tall else x


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
