"""Optimizer parameter groups (actor, critic and the S4 state-space parameters), and the
gradient-norm clip folded into the optimizer step.

The S4 state-space parameters (Δ, A, B of every `S4DKernel`, named in
``S4DKernel.SSM_PARAMETERS``) get their own learning rate and no weight decay, as in the S4
reference training setup; critic parameters (qualified name starting with ``critic`` or
``value``, the convention of `rl_agnostic.nn.base.ActorCritic`) get the critic learning rate;
everything else is the actor.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rl_agnostic.nn.native import kernels
from rl_agnostic.nn.s4 import S4DKernel

CRITIC_PREFIXES = ("critic", "value")


def param_groups(
    model: nn.Module,
    actor_lr: float = 3e-4,
    critic_lr: float = 5e-4,
    ssm_lr: float = 1e-3,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Groups ``actor``, ``critic`` and ``ssm`` (empty ones omitted); every parameter of
    ``model`` lands in exactly one group, shared parameters once under their first name."""
    ssm_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, S4DKernel):
            for name in S4DKernel.SSM_PARAMETERS:
                param = getattr(module, name, None)
                if isinstance(param, nn.Parameter):
                    ssm_ids.add(id(param))
    actor, critic, ssm = [], [], []
    for name, param in model.named_parameters():  # deduplicated: shared tensors appear once
        if id(param) in ssm_ids:
            ssm.append(param)
        elif name.startswith(CRITIC_PREFIXES):
            critic.append(param)
        else:
            actor.append(param)
    groups = [
        {"name": "actor", "params": actor, "lr": actor_lr, "weight_decay": weight_decay},
        {"name": "critic", "params": critic, "lr": critic_lr, "weight_decay": weight_decay},
        {"name": "ssm", "params": ssm, "lr": ssm_lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def adam(groups: list[dict], fused: bool | None = None, **adam_kwargs) -> torch.optim.Adam:
    """Adam over parameter ``groups``. ``fused=None`` tries the fused kernel (CPU and CUDA in
    torch ≥ 2.4) and falls back to the default implementation where it is unsupported."""
    if fused is False:
        return torch.optim.Adam(groups, **adam_kwargs)
    try:
        # Adam fills its defaults (fused=True among them) into the group dicts it is given before
        # it checks the kernel: a failed attempt must not leave them in the fallback's groups.
        return torch.optim.Adam([dict(g) for g in groups], fused=True, **adam_kwargs)
    except (RuntimeError, TypeError, ValueError):
        if fused:  # explicitly requested: do not hide that it is unavailable
            raise
        return torch.optim.Adam(groups, **adam_kwargs)


def make_optimizer(
    model: nn.Module,
    actor_lr: float = 3e-4,
    critic_lr: float = 5e-4,
    ssm_lr: float = 1e-3,
    weight_decay: float = 0.0,
    fused: bool | None = None,
    **adam_kwargs,
) -> torch.optim.Adam:
    """`adam` over `param_groups` of ``model``."""
    return adam(param_groups(model, actor_lr, critic_lr, ssm_lr, weight_decay), fused,
                **adam_kwargs)


def grad_norm(grads: Sequence[Tensor]) -> Tensor:
    """The global L2 norm of ``grads`` (a 0-dim float32 tensor; NaN or inf if any element is).

    CPU float32 contiguous tensors are summed in one parallel pass by the compiled kernel
    (`rla_sum_squares`): torch's foreach norm has no CPU kernel and runs one op per tensor,
    ~200 per step of the agnostic network. Elsewhere torch's per-tensor norms."""
    grads = [g for g in grads if g is not None]
    if not grads:
        return torch.zeros(())
    lib = kernels()
    if lib is not None and all(g.device.type == "cpu" and g.dtype == torch.float32
                               and g.is_contiguous() for g in grads):
        ptrs = (ctypes.c_void_p * len(grads))(*(g.data_ptr() for g in grads))
        sizes = (ctypes.c_int64 * len(grads))(*(g.numel() for g in grads))
        return torch.tensor(math.sqrt(lib.rla_sum_squares(ptrs, sizes, len(grads))))
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def clip_divisor(total_norm: Tensor, max_norm: float) -> Tensor:
    """What the gradients are divided by to clip them to ``max_norm`` as
    `torch.nn.utils.clip_grad_norm_` does (which multiplies by max_norm / (norm + 1e-6) when that
    is below 1): max(1, (norm + 1e-6) / max_norm)."""
    return torch.clamp((total_norm.float() + 1e-6) / max_norm, min=1.0)


def takes_grad_divisor(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is torch's fused Adam/AdamW, whose kernel divides each gradient by
    ``optimizer.grad_scale`` (the AMP hook) as it reads it, and writes the divided gradient back."""
    return (type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)
            and all(group.get("fused") for group in optimizer.param_groups))


def optimizer_grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The gradients of ``optimizer``'s parameters that have one."""
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def step_with_divided_grads(optimizer: torch.optim.Optimizer, divisor: Tensor) -> None:
    """``optimizer.step()`` on its gradients divided by ``divisor``: inside fused Adam's kernel
    (no separate pass over the gradients), else by an in-place foreach divide first."""
    if takes_grad_divisor(optimizer):
        grads_device = next((p.device for g in optimizer.param_groups for p in g["params"]),
                            divisor.device)
        optimizer.grad_scale = divisor.to(grads_device)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
        return
    grads = optimizer_grads(optimizer)
    if grads:
        torch._foreach_div_(grads, divisor.to(grads[0].device))
    optimizer.step()


def clipped_step(optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
    """``clip_grad_norm_(params, max_norm)`` then ``optimizer.step()`` over the optimizer's
    parameters, in two passes over the gradients instead of three and without an op per tensor
    on CPU (`grad_norm`, `step_with_divided_grads`); the same update up to float rounding.
    Returns the gradients' total norm before clipping."""
    total = grad_norm(optimizer_grads(optimizer))
    step_with_divided_grads(optimizer, clip_divisor(total, max_norm))
    return total
