"""Per-env running normalization of observations and rewards (paper §3.2), as RLlib connectors.

Observation and reward scales differ by orders of magnitude across env types, so each env type
(= agent id = module id) keeps its own running mean/std.

- `PerEnvObsNormalizer` (env-to-module connector on every EnvRunner): normalizes each new
  observation, in the episode itself, so the learner trains on what the policy saw. RLlib's
  ``MeanStdFilter(multi_agent=True)`` cannot do this here: its ``merge_states`` asserts that all
  agents share one shape, and it assumes every runner knows every agent. Here each runner keeps
  the merged statistics of the last sync (``base``) plus what it saw since (``delta``);
  ``merge_states`` (called by RLlib's ``sync_env_runner_states``) combines every runner's delta
  into the base with Chan's parallel mean/variance formula, so counts are never double-counted,
  and the result is broadcast back and saved in checkpoints with the EnvRunner state.
- `PerEnvRewardScaler` (learner connector, just before GAE): divides each env type's rewards by
  the running std of its discounted return (the scaling of Engstrom et al. 2020 / CleanRL's
  ``NormalizeReward``), computed from the training batch's episodes, so values of all env types
  have comparable magnitude. Its statistics are part of the Learner state (checkpointed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns


class RunningMeanStd:
    """Mean and variance of a stream of vectors (float64, Chan et al. parallel update)."""

    def __init__(self, shape: tuple[int, ...] = (), count: float = 0.0,
                 mean: np.ndarray | None = None, m2: np.ndarray | None = None) -> None:
        self.count = float(count)
        self.mean = np.zeros(shape, np.float64) if mean is None else np.asarray(mean, np.float64)
        self.m2 = np.zeros(shape, np.float64) if m2 is None else np.asarray(m2, np.float64)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, *self.mean.shape)
        if len(x):
            self.combine(RunningMeanStd(self.mean.shape, len(x), x.mean(0),
                                        ((x - x.mean(0)) ** 2).sum(0)))

    def combine(self, other: RunningMeanStd) -> None:
        n = self.count + other.count
        if other.count == 0:
            return
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / n)
        self.count = n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1.0))

    def to_state(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunningMeanStd:
        return cls(np.shape(state["mean"]), state["count"], state["mean"], state["m2"])


def standardize(obs: np.ndarray, stats: RunningMeanStd, clip: float) -> np.ndarray:
    """(obs − mean) / (std + ε), clipped to ±clip, as float32: the one formula used in training
    (`PerEnvObsNormalizer`) and outside it (`rl_agnostic.online.agent.Agent`)."""
    out = (np.asarray(obs, np.float32) - stats.mean) / (stats.std + 1e-8)
    return np.clip(out, -clip, clip).astype(np.float32)


class PerEnvObsNormalizer(ConnectorV2):
    """(obs − mean) / (std + ε), clipped to ±``clip``, per env type (see module docstring)."""

    def __init__(self, *args, clip: float = 10.0, update_stats: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clip = clip
        self.update_stats = update_stats
        self._base: dict[str, RunningMeanStd] = {}
        self._delta: dict[str, RunningMeanStd] = {}

    def _stats(self, env_id: str, dim: int) -> tuple[RunningMeanStd, RunningMeanStd]:
        if env_id not in self._base:
            self._base[env_id] = RunningMeanStd((dim,))
        if env_id not in self._delta:
            self._delta[env_id] = RunningMeanStd((dim,))
        return self._base[env_id], self._delta[env_id]

    def normalize(self, env_id: str, obs: np.ndarray, update: bool) -> np.ndarray:
        obs = np.asarray(obs, np.float32)
        base, delta = self._stats(env_id, obs.shape[-1])
        if update:
            delta.update(obs)
        merged = RunningMeanStd(base.mean.shape, base.count, base.mean, base.m2)
        merged.combine(delta)
        return standardize(obs, merged, self.clip)

    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None,
                 **kwargs):
        for sa_episode in self.single_agent_episode_iterator(episodes):
            obs = sa_episode.get_observations(indices=-1)
            sa_episode.set_observations(
                at_indices=-1,
                new_data=self.normalize(str(sa_episode.agent_id), obs, self.update_stats))
        return batch

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict:
        return {env_id: {"base": self._base[env_id].to_state(),
                         "delta": self._delta[env_id].to_state()} for env_id in self._base}

    def set_state(self, state: dict) -> None:
        for env_id, s in state.items():
            self._base[env_id] = RunningMeanStd.from_state(s["base"])
            self._delta[env_id] = RunningMeanStd.from_state(s["delta"])

    def merge_states(self, states: list[dict]) -> dict:
        merged: dict[str, dict] = {}
        for env_id in sorted({e for s in states for e in s}):
            per_runner = [s[env_id] for s in states if env_id in s]
            # All runners share the base of the last broadcast, except restarted ones (empty).
            base = RunningMeanStd.from_state(max((p["base"] for p in per_runner),
                                                 key=lambda b: b["count"]))
            for p in per_runner:
                base.combine(RunningMeanStd.from_state(p["delta"]))
            empty = RunningMeanStd(base.mean.shape)
            merged[env_id] = {"base": base.to_state(), "delta": empty.to_state()}
        return merged


class PerEnvRewardScaler(ConnectorV2):
    """Divides each module's batch rewards by the running std of its discounted return (γ per
    module id from ``env_gammas``, else ``gamma``)."""

    def __init__(self, *args, gamma: float = 0.99, env_gammas: dict[str, float] | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gamma = gamma
        self.env_gammas = dict(env_gammas or {})
        self._returns: dict[str, RunningMeanStd] = {}

    def __call__(self, *, rl_module, batch, episodes, **kwargs):
        lengths: dict[str, list[int]] = {}
        for e in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            lengths.setdefault(e.module_id, []).append(len(e))
        for mid, module_batch in batch.items():
            if Columns.REWARDS not in module_batch or mid not in lengths:
                continue
            rewards = np.asarray(module_batch[Columns.REWARDS], np.float64)
            stats = self._returns.setdefault(mid, RunningMeanStd())
            gamma = self.env_gammas.get(mid, self.gamma)
            stats.update(discounted_returns(rewards, lengths[mid], gamma))
            scale = float(stats.std) + 1e-8 if stats.count > 1 else 1.0
            module_batch[Columns.REWARDS] = (rewards / scale).astype(np.float32)
        return batch

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict:
        return {mid: s.to_state() for mid, s in self._returns.items()}

    def set_state(self, state: dict) -> None:
        self._returns = {mid: RunningMeanStd.from_state(s) for mid, s in state.items()}


def discounted_returns(rewards: np.ndarray, lengths: list[int], gamma: float) -> np.ndarray:
    """Forward discounted sum G_t = γ·G_{t-1} + r_t, restarted at each episode chunk."""
    out = np.empty_like(rewards, dtype=np.float64)
    start = 0
    for n in lengths:
        g = 0.0
        for t in range(start, start + n):
            g = gamma * g + rewards[t]
            out[t] = g
        start += n
    return out
