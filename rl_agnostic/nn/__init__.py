"""Networks: the shape-agnostic actor-critic and Q networks (paper §3.1) and the baselines."""

from __future__ import annotations

from collections.abc import Iterable

from rl_agnostic.envs.spec import EnvSpec
from rl_agnostic.nn.agnostic import AgnosticActorCritic, AgnosticQ, AgnosticTwinQ
from rl_agnostic.nn.base import ActorCritic
from rl_agnostic.nn.baselines import PaddedActorCritic, SingleEnvActorCritic, SpecificActorCritic
from rl_agnostic.nn.config import ConfigError, NetworkConfig

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


__all__ = [
    "KINDS",
    "ActorCritic",
    "AgnosticActorCritic",
    "AgnosticQ",
    "AgnosticTwinQ",
    "ConfigError",
    "EnvSpec",
    "NetworkConfig",
    "PaddedActorCritic",
    "SingleEnvActorCritic",
    "SpecificActorCritic",
    "build_actor_critic",
]
