"""Environments as RLlib sees them: each env type is a one-agent ``MultiAgentEnv``.

The agent id IS the env id (``CartPole-v1``), and the policy mapping sends every agent to the
module of the same name, so RLlib's multi-agent machinery keeps each env type's episodes, GAE and
minibatches apart while one network (`rl_agnostic.online.module`) serves them all.

Which env types a runner hosts is decided by `assign_env_types` from its ``worker_index``
(Algorithm 1 of the paper: S = types per runner when runners are fewer than types). A runner's
``num_envs_per_env_runner`` copies are split evenly over its types; copy k gets type k mod S.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from typing import Any

import gymnasium as gym
import numpy as np
from ray.rllib.env.multi_agent_env import MultiAgentEnv

from rl_agnostic.envs.make import check_env_id, make_env


class NonFiniteObservationError(RuntimeError):
    """An environment returned NaN or inf in an observation or reward."""


def assign_env_types(env_ids: list[str], num_env_runners: int) -> dict[int, list[str]]:
    """Env types of each remote runner (worker_index 1..R).

    R ≥ T: runner w hosts type (w-1) mod T (R must be a multiple of T so every type gets the same
    number of runners). R < T: runner w hosts types w-1, w-1+R, … (S = ceil(T/R) types each).
    worker_index 0 (the driver's local runner, used when R = 0) hosts every type.
    """
    t, r = len(env_ids), num_env_runners
    if r == 0:
        return {0: list(env_ids)}
    if r >= t:
        if r % t:
            raise ValueError(
                f"num_env_runners={r} must be a multiple of the number of env types ({t}) "
                "so every env type is sampled equally; or use fewer runners than types"
            )
        return {w: [env_ids[(w - 1) % t]] for w in range(1, r + 1)}
    return {w: env_ids[w - 1::r] for w in range(1, r + 1)}


class SingleEnvTypeMultiAgentEnv(MultiAgentEnv):
    """One copy of one gymnasium/envpool env, exposed as a one-agent ``MultiAgentEnv``.

    The agent id is the env id. Observations are flattened to float32 and checked for NaN/inf:
    a non-finite observation or reward raises `NonFiniteObservationError` naming the env and step
    (silently training on it would poison the normalization statistics of every env type).
    """

    def __init__(self, env_id: str, seed: int, env_kwargs: dict[str, Any] | None = None,
                 cohosted_spaces: dict[str, tuple[gym.Space, gym.Space]] | None = None) -> None:
        """``cohosted_spaces``: (observation, action) spaces of the other env types of the same
        runner. RLlib's vector env reads every agent's spaces from its FIRST copy only (e.g. to
        unsquash actions), so each copy must also declare the spaces of the types beside it."""
        super().__init__()
        self.env_id = env_id
        backend, name = check_env_id(env_id)
        # gymnasium: a plain env (a one-copy vector env only adds per-step overhead); envpool is
        # vector-only, so it runs as a one-copy vector env and its outputs are unbatched below.
        self._vector = backend == "envpool"
        if self._vector:
            self._env = make_env(env_id, num_envs=1, seed=seed, **(env_kwargs or {}))
            obs_space = self._env.single_observation_space
            act_space = self._env.single_action_space
        else:
            self._env = gym.make(name, **(env_kwargs or {}))
            obs_space, act_space = self._env.observation_space, self._env.action_space
            self._env.action_space.seed(seed)
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            raise TypeError(
                f"{env_id}: unsupported observation space {obs_space}: only 1-D Box observations "
                "are supported for now (no Dict/Tuple/Discrete observations, no images)")
        if not isinstance(act_space, (gym.spaces.Box, gym.spaces.Discrete)) or (
                isinstance(act_space, gym.spaces.Box) and len(act_space.shape) != 1):
            raise TypeError(f"{env_id}: unsupported action space {act_space}: only Discrete and "
                            "1-D Box actions are supported")
        self._obs_dim = int(np.prod(obs_space.shape))
        self._pending_seed: int | None = seed
        self._steps = 0
        self.agents = self.possible_agents = [env_id]
        others = {k: v for k, v in (cohosted_spaces or {}).items() if k != env_id}
        self.observation_spaces = {**{k: o for k, (o, _) in others.items()},
                                   env_id: flat_box(obs_space)}
        self.action_spaces = {**{k: a for k, (_, a) in others.items()},
                              env_id: act_space if isinstance(act_space, gym.spaces.Discrete)
                              else gym.spaces.Box(act_space.low.astype(np.float32),
                                                  act_space.high.astype(np.float32),
                                                  dtype=np.float32)}
        self._discrete = isinstance(act_space, gym.spaces.Discrete)

    def _obs(self, obs: np.ndarray) -> np.ndarray:
        flat = np.asarray(obs, dtype=np.float32).reshape(self._obs_dim)
        if not np.isfinite(flat).all():
            bad = np.flatnonzero(~np.isfinite(flat))[:5].tolist()
            raise NonFiniteObservationError(
                f"{self.env_id}: non-finite observation at step {self._steps} "
                f"(indices {bad}); check the environment or its wrappers"
            )
        return flat

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is None:
            seed, self._pending_seed = self._pending_seed, None
        obs, _ = self._env.reset(seed=None if self._vector else seed, options=options)
        self._steps = 0
        return {self.env_id: self._obs(obs[0] if self._vector else obs)}, {}

    def step(self, action_dict: dict):
        action = action_dict[self.env_id]
        if self._vector:
            batch_action = (np.asarray([action], dtype=np.int64) if self._discrete
                            else np.asarray(action, dtype=np.float32).reshape(1, -1))
            obs, reward, terminated, truncated, _ = self._env.step(batch_action)
            obs, reward, terminated, truncated = obs[0], reward[0], terminated[0], truncated[0]
        else:
            obs, reward, terminated, truncated, _ = self._env.step(
                int(action) if self._discrete else np.asarray(action, dtype=np.float32))
        self._steps += 1
        reward = float(reward)
        if not math.isfinite(reward):
            raise NonFiniteObservationError(
                f"{self.env_id}: non-finite reward {reward} at step {self._steps}")
        done_t, done_tr = bool(terminated), bool(truncated)
        # envpool autoresets on the step after a done; ending the episode here makes RLlib call
        # reset() instead, so that autoreset step never happens.
        aid = self.env_id
        return ({aid: self._obs(obs)}, {aid: reward},
                {aid: done_t, "__all__": done_t}, {aid: done_tr, "__all__": done_tr}, {})

    def close(self) -> None:
        self._env.close()


def flat_box(space: gym.spaces.Box) -> gym.spaces.Box:
    """``space`` as a flat float32 Box."""
    return gym.spaces.Box(np.asarray(space.low, np.float32).ravel(),
                          np.asarray(space.high, np.float32).ravel(), dtype=np.float32)


# Copies created so far in this process, per worker_index: copy k of a runner gets type k mod S.
_copies_made: dict[int, itertools.count] = defaultdict(itertools.count)


def make_rllib_env(env_ctx: Any) -> SingleEnvTypeMultiAgentEnv:
    """RLlib env creator: picks this copy's env type from ``worker_index`` (see module doc)."""
    env_ids: list[str] = list(env_ctx["env_ids"])
    kwargs_per_env: dict[str, dict] = env_ctx.get("env_kwargs", {})
    worker = int(getattr(env_ctx, "worker_index", 0))
    types = assign_env_types(env_ids, int(env_ctx["num_env_runners"]))[worker]
    k = next(_copies_made[worker])
    env_id = types[k % len(types)]
    seed = int(env_ctx.get("seed", 0)) * 100_003 + worker * 1_009 + k
    spaces = env_ctx.get("spaces") or {}
    return SingleEnvTypeMultiAgentEnv(env_id, seed=seed, env_kwargs=kwargs_per_env.get(env_id),
                                      cohosted_spaces={t: spaces[t] for t in types if t in spaces})
