r"""Task context: how an environment tells the shared network which task it is in.

The context vector of an environment is made from its `EnvSpec` alone, with no learned per-env
parameter, so a new environment gets one without adding a layer:

    c(env) = [ identity code (identity_dim) | discrete | continuous | log(1+|A|) | log(1+|S|) |
               log(mean half-range of continuous actions) ]

The identity code is a fixed ±1/sqrt(k) vector drawn from a generator seeded by a stable hash
(BLAKE2b) of the environment name without its backend prefix, so ``envpool:CartPole-v1`` and
``CartPole-v1`` share it and every process, checkpoint and machine sees the same code. Each
network projects c(env) with one Linear(context_dim → H) — the task embedding summed with the
encoder output before the middle residual MLP (paper §3.1).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from rl_agnostic.envs.spec import EnvSpec

N_SPACE_FEATURES = 5


def context_dim(identity_dim: int) -> int:
    return identity_dim + N_SPACE_FEATURES


def canonical_env_name(env_id: str) -> str:
    """``envpool:HalfCheetah-v4`` → ``HalfCheetah-v4``."""
    return env_id.split(":", 1)[-1]


def identity_code(env_id: str, identity_dim: int) -> Tensor:
    digest = hashlib.blake2b(canonical_env_name(env_id).encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    signs = torch.randint(0, 2, (identity_dim,), generator=gen).float() * 2 - 1
    return signs / math.sqrt(identity_dim)


def context_features(spec: EnvSpec, identity_dim: int) -> Tensor:
    """The (context_dim,) vector c(env) described in the module docstring."""
    half_range = 0.0
    if not spec.is_discrete and spec.action_low is not None and spec.action_high is not None:
        spans = [(h - l) / 2 for l, h in zip(spec.action_low, spec.action_high)
                 if math.isfinite(h - l) and h > l]
        half_range = math.log(sum(spans) / len(spans)) if spans else 0.0
    space = torch.tensor([
        float(spec.is_discrete),
        float(not spec.is_discrete),
        math.log1p(spec.action_dim),
        math.log1p(spec.obs_dim),
        half_range,
    ])
    return torch.cat([identity_code(spec.env_id, identity_dim), space])
