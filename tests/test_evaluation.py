"""Batched evaluation: N episodes stepped together give each copy's own episode."""

from __future__ import annotations

import numpy as np

from rl_agnostic.offline.collect import rollout
from rl_agnostic.online.agent import episode_returns
from rl_agnostic.online.envs import SingleEnvTypeMultiAgentEnv


def _lean_right(obs: np.ndarray) -> np.ndarray:
    # A fixed policy whose CartPole episodes end at different lengths for different seeds.
    return (obs[:, 2] + 0.3 * obs[:, 3] > 0.05).astype(np.int64)


def _alone(env_id: str, seed: int) -> float:
    env = SingleEnvTypeMultiAgentEnv(env_id, seed=seed)
    try:
        return rollout(env, lambda obs: _lean_right(obs[None])[0], 1)[0].ret
    finally:
        env.close()


def test_batched_episodes_equal_each_copy_run_alone_and_batches_shrink_as_copies_finish():
    batch_sizes: list[int] = []

    def act(obs: np.ndarray) -> np.ndarray:
        batch_sizes.append(len(obs))
        return _lean_right(obs)

    returns = episode_returns("CartPole-v1", act, 5, seed=7)
    assert returns == [_alone("CartPole-v1", 7 + i) for i in range(5)]
    assert len(set(returns)) > 1  # episodes of different lengths: copies finish at different steps
    assert batch_sizes[0] == 5 and batch_sizes[-1] == 1
    assert batch_sizes == sorted(batch_sizes, reverse=True)
    assert len(batch_sizes) == max(returns)  # one batched forward per step of the longest episode
