"""Networks: the shape-agnostic actor-critic and Q networks (paper §3.1) and the baselines."""

from __future__ import annotations

from collections.abc import Iterable

from rl_agnostic.envs.spec import EnvSpec
from rl_agnostic.nn.agnostic import AgnosticActorCritic, AgnosticQ, AgnosticTwinQ
from rl_agnostic.nn.base import ActorCritic, TwinQ
from rl_agnostic.nn.baselines import (
    PaddedActorCritic,
    SingleEnvActorCritic,
    SingleEnvQ,
    SpecificActorCritic,
    SpecificQ,
)
from rl_agnostic.nn.config import ConfigError, NetworkConfig
from rl_agnostic.nn.native import keep_freed_memory

# Every process that builds these networks (driver, learners, env runners, Ray Train workers)
# trains or acts with them: reuse freed activation memory instead of faulting in fresh pages.
keep_freed_memory()

KINDS = ("agnostic", "specific", "padded", "single")


def build_actor_critic(kind: str, cfg: NetworkConfig, specs: Iterable[EnvSpec]) -> ActorCritic:
    """The actor-critic of ``kind`` over ``specs``:

    - ``agnostic``: `AgnosticActorCritic` (Multi-Env Agnostic Agent; any env, no per-env layer)
    - ``specific``: `SpecificActorCritic` (Multi-Env Specific Agent; per-env encoder/decoder)
    - ``padded``: `PaddedActorCritic` (zero-padding to the largest env, masked heads)
    - ``single``: `SingleEnvActorCritic` (Single-Env Agent; exactly one spec)
    """
    specs = list(specs)
    if kind == "agnostic":
        return AgnosticActorCritic(cfg, specs)
    if kind == "specific":
        return SpecificActorCritic(cfg, specs)
    if kind == "padded":
        return PaddedActorCritic(cfg, specs)
    if kind == "single":
        if len(specs) != 1:
            raise ValueError(
                f"kind 'single' needs exactly one EnvSpec, got {len(specs)}: "
                f"{[s.env_id for s in specs]}"
            )
        return SingleEnvActorCritic(cfg, specs[0])
    raise ValueError(f"unknown actor-critic kind {kind!r}; choose one of {list(KINDS)}")


Q_KINDS = ("agnostic", "specific", "single")


def build_twin_q(kind: str, cfg: NetworkConfig, specs: Iterable[EnvSpec]) -> TwinQ:
    """Two independent Q(s, a) networks of ``kind`` (``agnostic``, ``specific`` or ``single``)
    over ``specs``, for the clipped double-Q of IQL."""
    specs = list(specs)
    if kind == "agnostic":
        return AgnosticTwinQ(cfg)
    if kind == "specific":
        return TwinQ(SpecificQ(cfg, specs), SpecificQ(cfg, specs))
    if kind == "single":
        if len(specs) != 1:
            raise ValueError(f"kind 'single' needs exactly one EnvSpec, got {len(specs)}")
        return TwinQ(SingleEnvQ(cfg, specs[0]), SingleEnvQ(cfg, specs[0]))
    raise ValueError(f"unknown Q network kind {kind!r}; choose one of {list(Q_KINDS)}")


__all__ = [
    "KINDS",
    "Q_KINDS",
    "ActorCritic",
    "AgnosticActorCritic",
    "AgnosticQ",
    "AgnosticTwinQ",
    "ConfigError",
    "EnvSpec",
    "NetworkConfig",
    "PaddedActorCritic",
    "SingleEnvActorCritic",
    "SingleEnvQ",
    "SpecificActorCritic",
    "SpecificQ",
    "TwinQ",
    "build_actor_critic",
    "build_twin_q",
]
