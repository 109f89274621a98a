"""A trained policy outside Ray: load a checkpoint's ``policy.pt`` and act in any of its envs (or
a new one, for the agnostic network), with the run's per-env observation normalization and the
same action mapping as RLlib's env runners (continuous actions live in [-1, 1] and are mapped to
the env's bounds)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rl_agnostic.envs.make import env_spec
from rl_agnostic.envs.spec import EnvSpec
from rl_agnostic.nn import ActorCritic, NetworkConfig, build_actor_critic
from rl_agnostic.online.normalize import RunningMeanStd, standardize


@dataclass
class Agent:
    network: ActorCritic
    kind: str
    specs: dict[str, EnvSpec]
    obs_stats: dict[str, RunningMeanStd]
    clip: float = 10.0

    @classmethod
    def load(cls, path: str | Path) -> Agent:
        from rl_agnostic.online.trainer import load_policy_file

        policy = load_policy_file(path)
        specs = {e: EnvSpec(**s) for e, s in policy["specs"].items()}
        net = build_actor_critic(policy["kind"], NetworkConfig.from_saved(policy["network_config"]),
                                 specs.values())
        net.load_state_dict({k: torch.as_tensor(v) for k, v in policy["network"].items()})
        net.eval()
        stats = {e: RunningMeanStd.from_state(s["base"]) for e, s in policy["obs_stats"].items()}
        return cls(net, policy["kind"], specs, stats)

    def spec(self, env_id: str, spec: EnvSpec | None = None) -> EnvSpec:
        if env_id in self.specs:
            return self.specs[env_id]
        if spec is None:
            raise KeyError(f"{env_id!r} is not an env of this checkpoint "
                           f"({sorted(self.specs)}) and no description was given")
        if self.network.adds_layers_per_env:
            raise ValueError(f"a {self.kind} network has no layers for the new env {env_id!r}")
        return spec

    def normalize(self, env_id: str, obs: np.ndarray) -> np.ndarray:
        stats = self.obs_stats.get(env_id)
        if stats is None or stats.count == 0:
            return np.asarray(obs, np.float32)
        return standardize(obs, stats, self.clip)

    @torch.inference_mode()
    def act(self, env_id: str, obs: np.ndarray, deterministic: bool = True,
            spec: EnvSpec | None = None) -> np.ndarray:
        """Env actions for a batch of raw observations (B, obs_dim)."""
        spec = self.spec(env_id, spec)
        x = torch.as_tensor(self.normalize(env_id, obs)).reshape(len(obs), spec.obs_dim)
        dist_inputs = self.network.actor(x, spec)
        action = self.network.sample(spec, dist_inputs, deterministic).numpy()
        if spec.is_discrete:
            return action.astype(np.int64)
        return to_env_action(action, spec)


def policy_file_contents(kind: str, network_config: NetworkConfig, specs: Iterable[EnvSpec],
                         network_state: dict[str, Any], obs_stats: dict[str, RunningMeanStd],
                         **extra: Any) -> dict[str, Any]:
    """What a checkpoint's ``policy.pt`` holds (`Agent.load` reads it): the model kind, network
    config, env specs, actor-critic weights and per-env observation statistics, plus ``extra``
    (steps, the run config, ...)."""
    return {
        "format": 1, "kind": kind, "network_config": network_config.to_dict(),
        "specs": {s.env_id: dataclasses.asdict(s) for s in specs},
        "network": {k: torch.as_tensor(v).detach().cpu() for k, v in network_state.items()},
        "obs_stats": {e: {"base": s.to_state()} for e, s in obs_stats.items()},
        **extra,
    }


def to_env_action(action: np.ndarray, spec: EnvSpec) -> np.ndarray:
    """[-1, 1] → env bounds, clipped (RLlib's ``normalize_actions``); unbounded dims unchanged."""
    low, high = np.asarray(spec.action_low), np.asarray(spec.action_high)
    bounded = np.isfinite(low) & np.isfinite(high)
    out = np.where(bounded, low + (action + 1.0) * (high - low) / 2.0, action)
    return np.where(bounded, np.clip(out, low, high), out).astype(np.float32)


def episode_returns(env_id: str, act: Callable[[np.ndarray], Any], episodes: int, seed: int,
                    env_kwargs: dict | None = None) -> list[float]:
    """Returns of ``episodes`` episodes of ``env_id``, one per env copy (copy i seeded
    ``seed + i``), all stepped together: ``act`` maps a (B, obs_dim) batch of the still-running
    copies' observations to B actions, so N episodes cost about as many policy forwards as one."""
    from rl_agnostic.online.envs import SingleEnvTypeMultiAgentEnv

    envs = [SingleEnvTypeMultiAgentEnv(env_id, seed=seed + i, env_kwargs=env_kwargs)
            for i in range(episodes)]
    try:
        obs = [env.reset()[0][env_id] for env in envs]
        returns = [0.0] * episodes
        running = list(range(episodes))
        while running:
            actions = act(np.stack([obs[i] for i in running]))
            still = []
            for i, action in zip(running, actions, strict=True):
                step_obs, reward, term, trunc, _ = envs[i].step({env_id: action})
                obs[i] = step_obs[env_id]
                returns[i] += reward[env_id]
                if not (term["__all__"] or trunc["__all__"]):
                    still.append(i)
            running = still
        return returns
    finally:
        for env in envs:
            env.close()


def evaluate(path: str | Path, env_id: str, episodes: int = 10, seed: int = 12345,
             deterministic: bool = True) -> dict[str, Any]:
    """Returns of ``episodes`` episodes of ``env_id`` acted by the checkpoint's policy."""
    agent = Agent.load(path)
    spec = agent.spec(env_id, env_spec(env_id))
    returns = episode_returns(env_id, lambda obs: agent.act(env_id, obs, deterministic, spec),
                              episodes, seed)
    return {"env_id": env_id, "episodes": episodes, "returns": returns,
            "mean": float(np.mean(returns)), "std": float(np.std(returns))}
