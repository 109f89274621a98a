"""The two collectives the shared-network trainers need (online PPO learners, offline DD-IQL
workers), instead of per-module DDP wrappers: workers whose batches touch different parts of
the network (a discrete-only worker never uses the Gaussian decoders) must still make the same
calls in the same order."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def broadcast_from_rank0(module: nn.Module) -> None:
    """Every weight and buffer of ``module`` set to rank 0's."""
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def all_reduce_gradients(params: Sequence[Tensor], mean: bool) -> None:
    """Sum (``mean``: average) every parameter's gradient over the process group with ONE
    all-reduce of one flat buffer; a parameter without a gradient contributes zeros. Each
    ``p.grad`` becomes its slice of the reduced buffer."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])
    dist.all_reduce(flat)
    if mean:
        flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p)
        offset += n


def init_ray() -> None:
    """Connect to the cluster ``RAY_ADDRESS`` names (set by ``ray job submit`` or the user), or
    start a local Ray for this process; nothing when Ray is already up."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=None,
                 log_to_driver=True, configure_logging=True, logging_level="WARNING")
