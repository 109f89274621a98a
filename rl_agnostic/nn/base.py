"""The interface every actor-critic network in this package implements (agnostic and baselines)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rl_agnostic.envs.spec import EnvSpec
from rl_agnostic.nn import distributions as D
from rl_agnostic.nn.config import NetworkConfig


class ActorCritic(nn.Module):
    """Policy and value function over any registered environment.

    ``actor`` returns the action-distribution inputs: logits (B, n) for a discrete space, or
    [mean | log_std] (B, 2d) for a continuous one. Parameters whose name starts with ``critic``
    or ``value`` belong to the critic (own learning rate in `rl_agnostic.nn.optim`).
    """

    kind: str = ""
    adds_layers_per_env: bool = False

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.specs: dict[str, EnvSpec] = {}

    def add_env(self, spec: EnvSpec) -> None:
        """Make ``spec`` usable. The agnostic network adds no parameters; baselines may."""
        known = self.specs.get(spec.env_id)
        if known is not None and known != spec:
            raise ValueError(f"{spec.env_id} is already registered with other spaces: {known}")
        self.specs[spec.env_id] = spec

    def actor(self, obs: Tensor, spec: EnvSpec) -> Tensor:
        raise NotImplementedError

    def value(self, obs: Tensor, spec: EnvSpec) -> Tensor:
        raise NotImplementedError

    def actor_critic(self, obs: Tensor, spec: EnvSpec) -> tuple[Tensor, Tensor]:
        """(dist inputs, values) — what a PPO loss needs, in one call."""
        return self.actor(obs, spec), self.value(obs, spec)

    def actor_critic_many(self, items: Sequence[tuple[Tensor, EnvSpec]]
                          ) -> list[tuple[Tensor, Tensor]]:
        """`actor_critic` of several env types' batches, ``[(obs, spec), …]`` → ``[(dist
        inputs, values), …]`` in the same order. Networks that can run them together override
        this (the agnostic one packs them into few passes); here one call each."""
        return [self.actor_critic(obs, spec) for obs, spec in items]

    def value_many(self, items: Sequence[tuple[Tensor, EnvSpec]]) -> list[Tensor]:
        """`value` of several env types' batches (packed where the network can)."""
        return [self.value(obs, spec) for obs, spec in items]

    @staticmethod
    def log_prob(spec: EnvSpec, dist_inputs: Tensor, actions: Tensor) -> Tensor:
        return D.log_prob(spec.is_discrete, dist_inputs, actions)

    @staticmethod
    def entropy(spec: EnvSpec, dist_inputs: Tensor) -> Tensor:
        return D.entropy(spec.is_discrete, dist_inputs)

    @staticmethod
    def sample(spec: EnvSpec, dist_inputs: Tensor, deterministic: bool = False) -> Tensor:
        return D.sample(spec.is_discrete, dist_inputs, deterministic)

    def _check_obs(self, obs: Tensor, spec: EnvSpec) -> None:
        if obs.dim() != 2 or obs.shape[1] != spec.obs_dim:
            raise ValueError(
                f"{spec.env_id}: expected observations of shape (batch, {spec.obs_dim}), "
                f"got {tuple(obs.shape)}"
            )


def action_features(actions: Tensor, spec: EnvSpec) -> Tensor:
    """Actions as a float vector: one-hot for discrete (B,) → (B, n), continuous (B, d) as is."""
    if spec.is_discrete:
        return nn.functional.one_hot(actions.long(), spec.action_dim).to(torch.float32)
    return actions.to(torch.float32)


class TwinQ(nn.Module):
    """Two independent Q networks of one kind (clipped double-Q, as in IQL): (Q₁, Q₂)."""

    def __init__(self, q1: nn.Module, q2: nn.Module) -> None:
        super().__init__()
        self.q1 = q1
        self.q2 = q2

    @property
    def adds_layers_per_env(self) -> bool:
        return self.q1.adds_layers_per_env

    def add_env(self, spec: EnvSpec) -> None:
        self.q1.add_env(spec)
        self.q2.add_env(spec)

    def forward(self, obs: Tensor, actions: Tensor, spec: EnvSpec) -> tuple[Tensor, Tensor]:
        return self.q1(obs, actions, spec), self.q2(obs, actions, spec)

    def forward_many(self, items: Sequence[tuple[Tensor, Tensor, EnvSpec]]
                     ) -> list[tuple[Tensor, Tensor]]:
        """(Q₁, Q₂) of several env types' (obs, actions) batches; one call each here."""
        return [self(obs, actions, spec) for obs, actions, spec in items]
