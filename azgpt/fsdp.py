"""Fully sharded data parallel (FSDP2): each block's parameters, gradients and optimizer state
split over the processes with torch's `fully_shard`, on GPUs and in CPU (gloo) processes alike.

azgpt shards the model itself rather than through `accelerator.prepare`: Accelerate switches to
FSDP only on GPUs (on CPU it starts an FSDP config as plain DDP), so its path could never be
tested before a GPU run. A run asks for sharding the way Accelerate's launcher says it,
`ACCELERATE_USE_FSDP=true` (set by `accelerate launch` with a `distributed_type: FSDP` config),
or with `AZGPT_FSDP=1` under `torchrun`.

Parameters become DTensors sharded on their first dimension (`Shard(0)`); `numel()` and `shape`
stay those of the whole tensor, `to_local()` is this process's piece. The checkpoint code gathers
full weights and the full optimizer state (`torch.distributed.checkpoint.state_dict`), so a
sharded checkpoint is an ordinary one.
"""

from __future__ import annotations

import os

import torch

ENV_VARS = ("ACCELERATE_USE_FSDP", "AZGPT_FSDP")


def requested() -> bool:
    """Whether the launcher asked for FSDP; clears Accelerate's switch so that Accelerate does not
    also wrap the model (azgpt shards it, the same way on every device)."""
    want = any(os.environ.get(v, "").lower() in ("1", "true") for v in ENV_VARS)
    os.environ.pop("ACCELERATE_USE_FSDP", None)
    return want


def shard(model: torch.nn.Module, device_type: str, world: int) -> None:
    """Shard each transformer block as one unit (gathered for its forward and backward, then
    freed), and the rest (embeddings, final norm, head) as the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def shard_report(model: torch.nn.Module) -> dict:
    """What this process holds: how many parameters are DTensors, and its local share of the
    elements (1/world of the whole, up to the padding of uneven first dimensions)."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return {
        "params": len(params),
        "dtensor_params": sum(isinstance(p, DTensor) for p in params),
        "numel": sum(p.numel() for p in params),
        "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
    }


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip gradients (DTensors) to a global norm; returns the norm as a plain tensor, the same
    on every process."""
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    params = [p for p in parameters if p.grad is not None]
    norm = get_total_norm([p.grad for p in params], 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm != float("inf"):
        clip_grads_with_norm_(params, max_norm, norm)
    return norm
