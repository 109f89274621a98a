"""Optimizer parameter groups: actor, critic and the S4 state-space parameters.

The S4 state-space parameters (Δ, A, B of every `S4DKernel`, named in
``S4DKernel.SSM_PARAMETERS``) get their own learning rate and no weight decay, as in the S4
reference training setup; critic parameters (qualified name starting with ``critic`` or
``value``, the convention of `rl_agnostic.nn.base.ActorCritic`) get the critic learning rate;
everything else is the actor.
"""

from __future__ import annotations

import torch
from torch import nn

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
