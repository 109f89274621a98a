"""What the networks need to know about an environment: its id and the shapes of its spaces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np

ActionKind = Literal["discrete", "continuous"]


@dataclass(frozen=True)
class EnvSpec:
    """Shape description of one environment type, as seen by every network in `rl_agnostic.nn`.

    The agnostic network takes only these numbers (plus the id for its task context); it has no
    layer whose size depends on them.
    """

    env_id: str
    """Registered id, e.g. ``CartPole-v1`` or ``envpool:HalfCheetah-v4``."""
    obs_dim: int
    """Length of the flat observation vector."""
    action_kind: ActionKind
    """``discrete`` (Categorical policy) or ``continuous`` (diagonal Gaussian policy)."""
    action_dim: int
    """Number of discrete actions, or length of the continuous action vector."""
    action_low: tuple[float, ...] | None = None
    """Lower bounds of a continuous action space (None for discrete)."""
    action_high: tuple[float, ...] | None = None
    """Upper bounds of a continuous action space (None for discrete)."""

    def __post_init__(self) -> None:
        if not self.env_id:
            raise ValueError("EnvSpec.env_id must be a non-empty string")
        if self.obs_dim < 1:
            raise ValueError(f"EnvSpec.obs_dim must be >= 1, got {self.obs_dim} for {self.env_id}")
        if self.action_kind not in ("discrete", "continuous"):
            raise ValueError(
                f"EnvSpec.action_kind must be 'discrete' or 'continuous', got {self.action_kind!r}"
            )
        if self.action_dim < 1:
            raise ValueError(
                f"EnvSpec.action_dim must be >= 1, got {self.action_dim} for {self.env_id}"
            )
        if self.action_kind == "discrete" and self.action_dim < 2:
            raise ValueError(f"a discrete action space needs >= 2 actions ({self.env_id})")

    @property
    def is_discrete(self) -> bool:
        return self.action_kind == "discrete"

    @classmethod
    def from_spaces(
        cls, env_id: str, observation_space: gym.Space, action_space: gym.Space
    ) -> EnvSpec:
        """Build a spec from gymnasium spaces; only flat Box observations are accepted."""
        if not isinstance(observation_space, gym.spaces.Box):
            raise TypeError(
                f"{env_id}: observation space must be a Box, got {type(observation_space).__name__}"
            )
        obs_dim = int(np.prod(observation_space.shape))
        if isinstance(action_space, gym.spaces.Discrete):
            return cls(env_id, obs_dim, "discrete", int(action_space.n))
        if isinstance(action_space, gym.spaces.Box):
            return cls(
                env_id,
                obs_dim,
                "continuous",
                int(np.prod(action_space.shape)),
                tuple(float(v) for v in np.asarray(action_space.low).ravel()),
                tuple(float(v) for v in np.asarray(action_space.high).ravel()),
            )
        raise TypeError(
            f"{env_id}: action space must be Discrete or Box, got {type(action_space).__name__}"
        )
