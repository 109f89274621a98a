"""``rl-agnostic collect``: roll out policies in an environment and write an offline dataset.

Each policy is ``random`` or a checkpoint of ours (an online or offline run directory, a
checkpoint directory, or a ``policy.pt``), with a number of episodes; several policies make one
mixed-quality dataset (e.g. medium + expert). The result is written twice:

- a Minari dataset (``minari.create_dataset_from_buffers``, which needs no jax), under
  ``<out>/minari/<dataset id>``, readable with ``minari.load_dataset(id, download=False)`` when
  ``MINARI_DATASETS_PATH=<out>/minari``, or by path;
- a flat transition parquet file ``<out>/<name>.parquet`` (`rl_agnostic.offline.data`).

Reference scores for normalization: ``ref_min_score`` is the random policy's mean return
(measured here), ``ref_max_score`` the best mean return among the collecting policies.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rl_agnostic.offline.data import DatasetInfo, TransitionData, write_parquet


@dataclass(frozen=True)
class PolicySource:
    """``random`` or a checkpoint path, and how many episodes to collect with it."""

    policy: str
    episodes: int

    @classmethod
    def parse(cls, text: str) -> PolicySource:
        """``POLICY:EPISODES`` (``random:50``, ``runs/hopper:100``)."""
        policy, sep, count = text.rpartition(":")
        if not sep or not policy or not count.isdigit() or int(count) < 1:
            raise ValueError(f"--policy {text!r}: expected POLICY:EPISODES, e.g. random:50 or "
                             f"runs/my_run:100")
        if policy != "random" and not Path(policy).exists():
            raise FileNotFoundError(f"--policy {text!r}: checkpoint {policy} does not exist")
        return cls(policy, int(count))


@dataclass
class Episode:
    observations: np.ndarray  # (T + 1, obs_dim)
    actions: np.ndarray  # (T, ...) env actions
    rewards: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray

    @property
    def ret(self) -> float:
        return float(self.rewards.sum())


def _actor(policy: str, env: Any, seed: int, action_noise: float | None
           ) -> Callable[[np.ndarray], Any]:
    """``policy``'s acting function. ``action_noise`` None: sample the policy's own distribution;
    a number x: its mode, perturbed by N(0, x²) in the [-1, 1] action space (continuous; clipped)
    or replaced by a uniformly random action with probability x (discrete)."""
    env_id = env.env_id
    space = env.action_spaces[env_id]
    if policy == "random":
        space.seed(seed)
        return lambda obs: space.sample()
    from rl_agnostic.envs.spec import EnvSpec
    from rl_agnostic.offline.data import normalize_actions
    from rl_agnostic.online.agent import Agent, to_env_action

    agent = Agent.load(policy)
    spec = EnvSpec.from_spaces(env_id, env.observation_spaces[env_id], space)
    agent.spec(env_id, spec)  # fails early for an env the checkpoint cannot act in
    import torch

    torch.manual_seed(seed)  # the stochastic policy's action samples
    if action_noise is None:
        return lambda obs: agent.act(env_id, obs[None], False, spec)[0]
    rng = np.random.default_rng(seed)

    def act(obs: np.ndarray) -> Any:
        action = agent.act(env_id, obs[None], True, spec)[0]
        if spec.is_discrete:
            return rng.integers(spec.action_dim) if rng.random() < action_noise else action
        noisy = normalize_actions(action, spec) + rng.normal(0.0, action_noise, action.shape)
        return to_env_action(np.clip(noisy, -1.0, 1.0), spec)

    return act


def rollout(env: Any, act: Callable[[np.ndarray], Any], episodes: int) -> list[Episode]:
    """Whole episodes of a `SingleEnvTypeMultiAgentEnv`, with every observation kept."""
    env_id = env.env_id
    out = []
    for _ in range(episodes):
        obs, _ = env.reset()
        o, a, r, te, tr = [obs[env_id]], [], [], [], []
        while True:
            action = act(obs[env_id])
            obs, reward, term, trunc, _ = env.step({env_id: action})
            o.append(obs[env_id])
            a.append(action)
            r.append(reward[env_id])
            te.append(bool(term[env_id]))
            tr.append(bool(trunc[env_id]))
            if term["__all__"] or trunc["__all__"]:
                break
        out.append(Episode(np.asarray(o, np.float32), np.asarray(a), np.asarray(r, np.float32),
                           np.asarray(te), np.asarray(tr)))
    return out


def _transitions(episodes: list[Episode], info: DatasetInfo) -> TransitionData:
    cat = np.concatenate
    return TransitionData(
        observations=cat([e.observations[:-1] for e in episodes]),
        actions=cat([e.actions for e in episodes]),
        rewards=cat([e.rewards for e in episodes]),
        next_observations=cat([e.observations[1:] for e in episodes]),
        terminals=cat([e.terminations for e in episodes]).astype(np.float32),
        info=info,
    )


def dataset_id_for(name: str) -> str:
    """A Minari dataset id for ``name``: ``rl_agnostic/<name>-v0`` (Minari id grammar)."""
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    return f"rl_agnostic/{clean}-v0"


def _write_minari(episodes: list[Episode], env: Any, info: DatasetInfo, root: Path,
                  description: str) -> Path:
    import warnings

    import minari
    from minari.data_collector import EpisodeBuffer

    env_id = env.env_id
    dataset_id = dataset_id_for(info.name)
    buffers = [EpisodeBuffer(id=i, observations=e.observations, actions=e.actions,
                             rewards=list(e.rewards), terminations=list(e.terminations),
                             truncations=list(e.truncations))
               for i, e in enumerate(episodes)]
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        shutil.rmtree(root / dataset_id, ignore_errors=True)
        gym_id = None if env_id.startswith("envpool:") else env_id
        with warnings.catch_warnings():  # author / e-mail / permalink / eval_env not set
            warnings.simplefilter("ignore", UserWarning)
            minari.create_dataset_from_buffers(
                dataset_id, buffers, env=gym_id, algorithm_name="rl_agnostic collect",
                observation_space=env.observation_spaces[env_id],
                action_space=env.action_spaces[env_id],
                ref_min_score=info.ref_min_score, ref_max_score=info.ref_max_score,
                description=description,
            )
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    return root / dataset_id


def collect(env_id: str, policies: list[PolicySource], out_dir: str | Path, name: str,
            seed: int = 0, random_episodes: int = 20, action_noise: float | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Collect ``policies`` in ``env_id`` into ``<out_dir>/<name>.parquet`` and a Minari dataset.

    ``action_noise``: None samples each policy's own action distribution (a PPO policy's wide
    Gaussian makes bang-bang, mostly clipped actions); a number acts with the policy's mode plus
    that much noise (see `_actor`), the usual way to make "expert" data from a policy.

    Returns a summary (paths, per-policy returns, reference scores), also written as
    ``<out_dir>/<name>.json``. Seeds: episode i of the whole run resets with ``seed + i``."""
    from rl_agnostic.envs.make import check_env_id
    from rl_agnostic.online.envs import SingleEnvTypeMultiAgentEnv

    check_env_id(env_id)
    out = Path(out_dir).absolute()  # Minari resolves a relative MINARI_DATASETS_PATH twice
    out.mkdir(parents=True, exist_ok=True)
    env = SingleEnvTypeMultiAgentEnv(env_id, seed=seed)
    try:
        rand_env = SingleEnvTypeMultiAgentEnv(env_id, seed=seed + 1_000_000)
        try:
            random_returns = [e.ret for e in rollout(
                rand_env, _actor("random", rand_env, seed, None), random_episodes)]
        finally:
            rand_env.close()
        episodes: list[Episode] = []
        per_policy = []
        for i, source in enumerate(policies):
            act = _actor(source.policy, env, seed + 7919 * (i + 1), action_noise)
            eps = rollout(env, act, source.episodes)
            returns = [e.ret for e in eps]
            per_policy.append({"policy": source.policy, "episodes": source.episodes,
                               "return_mean": float(np.mean(returns)),
                               "return_std": float(np.std(returns)),
                               "steps": int(sum(len(e.rewards) for e in eps))})
            log(f"collect {name}: {source.policy} × {source.episodes} episodes, return "
                f"{np.mean(returns):.1f} ± {np.std(returns):.1f}")
            episodes += eps
        info = DatasetInfo(
            name=name, env_id=env_id, ref_min_score=float(np.mean(random_returns)),
            ref_max_score=max(p["return_mean"] for p in per_policy), source="",
            num_episodes=len(episodes))
        data = _transitions(episodes, info)
        parquet = write_parquet(data, out / f"{name}.parquet")
        minari_dir = _write_minari(
            episodes, env, info, out / "minari",
            description=f"{env_id}: " + ", ".join(f"{p['policy']} × {p['episodes']}"
                                                   for p in per_policy))
    finally:
        env.close()
    summary = {"name": name, "env_id": env_id, "seed": seed, "action_noise": action_noise,
               "transitions": len(data),
               "parquet": str(parquet), "minari_dataset_id": dataset_id_for(name),
               "minari_path": str(minari_dir), "policies": per_policy,
               "random_return_mean": info.ref_min_score, "info": dataclasses.asdict(info)}
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    log(f"collect {name}: {len(data):,} transitions → {parquet} and Minari "
        f"{dataset_id_for(name)} (ref scores {info.ref_min_score:.1f} / {info.ref_max_score:.1f})")
    return summary
