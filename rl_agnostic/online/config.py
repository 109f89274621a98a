"""Typed, validated config of an online run, loaded from one YAML file (``tune_configs/*.yaml``).

Sections: ``envs`` (list), ``model``, ``ppo``, ``resources``, ``run``. Every key is a field below,
with its doc; an unknown or mistyped key is an error that names the section and suggests the
closest known key. PPO defaults are the paper's Appendix B (Table 2a).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl_agnostic.configs import (
    SectionedConfig,
    check_keys,
    check_top_level,
    parse_model,
    read_yaml_mapping,
    section,
)
from rl_agnostic.envs.make import ENVPOOL_PREFIX
from rl_agnostic.nn import KINDS, NetworkConfig
from rl_agnostic.nn.config import ConfigError

__all__ = ["ConfigError", "EnvEntry", "ModelSettings", "PPOSettings", "ResourceSettings",
           "RunSettings", "TrainConfig", "load_train_config"]


@dataclass(frozen=True)
class EnvEntry:
    """One env type. YAML: a bare id string, or a mapping with these keys."""

    id: str
    """Gymnasium id (``CartPole-v1``) or envpool id (``envpool:HalfCheetah-v4``)."""
    backend: str | None = None
    """``gymnasium`` or ``envpool``; prefixes ``id`` with ``envpool:`` when ``envpool``."""
    kwargs: dict = field(default_factory=dict)
    """Extra constructor arguments for the environment."""
    gamma: float | None = None
    """Discount of this env type's returns (GAE and reward scaling); None = ``ppo.gamma``.
    Tasks differ in horizon: PPO learns Pendulum-v1 within 150k steps at 0.9, not at 0.99."""

    @property
    def env_id(self) -> str:
        if self.backend == "envpool" and not self.id.startswith(ENVPOOL_PREFIX):
            return ENVPOOL_PREFIX + self.id
        return self.id


@dataclass(frozen=True)
class ModelSettings:
    kind: str = "agnostic"
    """agnostic | specific | padded | single (see `rl_agnostic.nn.build_actor_critic`)."""
    network: NetworkConfig = field(default_factory=NetworkConfig.cpu)
    """Network hyperparameters. YAML: ``cpu`` or ``paper`` preset name, or a mapping of
    `NetworkConfig` fields, optionally with ``preset:`` to start from."""


@dataclass(frozen=True)
class PPOSettings:
    actor_lr: float = 3e-4
    """Adam learning rate of the policy parameters (paper: 3e-4)."""
    critic_lr: float = 5e-4
    """Adam learning rate of the value parameters (paper: 5e-4)."""
    ssm_lr: float = 1e-3
    """Learning rate of the S4 state-space parameters (Δ, A, B), no weight decay."""
    anneal_lr: bool = True
    """Decay every learning rate linearly to 0 over the run's env-step budget."""
    num_epochs: int = 10
    """Passes over each iteration's batch (paper: update_epochs 10)."""
    num_minibatches: int = 8
    """Minibatches per epoch; each has rollout_steps·copies/num_minibatches rows per env type."""
    clip: float = 0.2
    """PPO ratio clip ε (paper: 0.2)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (paper: 0.0)."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    vf_clip: float = 10.0
    """Clip of the squared value error (RLlib's vf_clip_param), in scaled-reward units."""
    gamma: float = 0.99
    """Discount (paper: 0.99); an env entry's ``gamma`` overrides it for that env type."""
    gae_lambda: float = 0.95
    """GAE λ (paper: 0.95)."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip over the summed multi-env loss (paper: 0.5)."""
    rollout_steps: int = 256
    """Steps per env copy per iteration (RLlib's rollout_fragment_length)."""
    normalize_observations: bool = True
    """Per-env running mean/std observation normalization (paper §3.2)."""
    scale_rewards: bool = True
    """Per-env reward scaling by the running std of the discounted return (paper §3.2)."""


@dataclass(frozen=True)
class ResourceSettings:
    num_env_runners: int | None = None
    """EnvRunner actors; None = one per env type. Fewer than the types: S types per runner."""
    num_envs_per_env_runner: int = 8
    """Env copies per runner, acted on in one batched forward (split over its S types)."""
    num_learners: int = 0
    """0 = one learner in the driver; ≥2 = learner actors with synchronized gradients (gloo/NCCL)."""
    num_gpus_per_learner: float = 0
    """GPUs per learner (0 on CPU machines)."""
    num_cpus_per_env_runner: float = 1
    """CPU reservation per EnvRunner actor (fractional lets many runners share a small machine)."""
    learner_torch_threads: int = 2
    """torch threads of the driver process, where the learner runs when num_learners is 0.
    Learner actors and runners keep Ray's one thread per actor."""
    sample_timeout_s: float = 600.0
    """Max seconds to wait for one round of samples (RLlib's default 60 s returns empty
    iterations on a loaded machine)."""


@dataclass(frozen=True)
class RunSettings:
    env_steps_per_env: int = 100_000
    """Stop after this many env steps of EVERY env type (the paper's per-env budget)."""
    seed: int = 0
    """Seed of network init and env copies."""
    checkpoint_every: int = 10
    """Write a checkpoint every N iterations (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest)."""
    output_dir: str = "runs"
    """Run directory parent: <output_dir>/<name>/ holds checkpoints, progress.csv, metrics."""
    evaluation_episodes: int = 0
    """Deterministic evaluation episodes per env at the end (0 = none)."""
    transfer_reinit: list = field(default_factory=list)
    """With ``--init-from``: weight-name prefixes NOT copied (kept at fresh init), e.g.
    ``[critic_trunk, value_decoder]`` to learn the new envs' critic anew."""
    transfer_shrink: float = 1.0
    """With ``--init-from``: copied weights become α·pretrained + (1 − α)·fresh init (Ash & Adams'
    shrink-and-perturb warm start, with the fresh init as the perturbation); 1 = plain copy."""


@dataclass(frozen=True)
class TrainConfig(SectionedConfig):
    """A whole online run. ``name`` names the run directory."""

    LIST_SECTION = "envs"

    name: str
    envs: tuple[EnvEntry, ...]
    model: ModelSettings = field(default_factory=ModelSettings)
    ppo: PPOSettings = field(default_factory=PPOSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    run: RunSettings = field(default_factory=RunSettings)

    @property
    def env_ids(self) -> list[str]:
        return [e.env_id for e in self.envs]

    @property
    def env_gammas(self) -> dict[str, float]:
        """Discount of every env type (its own, else ``ppo.gamma``)."""
        return {e.env_id: self.ppo.gamma if e.gamma is None else float(e.gamma)
                for e in self.envs}

    @property
    def num_env_runners(self) -> int:
        r = self.resources.num_env_runners
        return len(self.envs) if r is None else r

    @classmethod
    def from_dict(cls, values: Any, source: str = "config") -> TrainConfig:
        name = check_top_level(cls, values, source, ("name", "envs"))
        envs = parse_envs(values["envs"], source)
        model = parse_model(values.get("model"), source, KINDS, "cpu", len(envs), "env")
        cfg = cls(
            name=name, envs=envs, model=ModelSettings(**model),
            ppo=section(PPOSettings, values.get("ppo"), f"{source}: ppo"),
            resources=section(ResourceSettings, values.get("resources"), f"{source}: resources"),
            run=section(RunSettings, values.get("run"), f"{source}: run"),
        )
        cfg._check(source)
        return cfg

    def _check(self, source: str) -> None:
        p, r = self.ppo, self.resources
        copies = r.num_envs_per_env_runner
        if self.num_env_runners < 0:
            raise ConfigError(f"{source}: resources.num_env_runners must be >= 0")
        types_per_runner = -(-len(self.envs) // max(self.num_env_runners, 1))
        if copies % types_per_runner:
            raise ConfigError(
                f"{source}: resources.num_envs_per_env_runner ({copies}) must be a multiple of the "
                f"env types per runner ({types_per_runner} = {len(self.envs)} types over "
                f"{self.num_env_runners} runners)")
        if self.num_env_runners >= len(self.envs) and self.num_env_runners % len(self.envs):
            raise ConfigError(
                f"{source}: resources.num_env_runners ({self.num_env_runners}) must be a multiple "
                f"of the number of env types ({len(self.envs)}) or smaller than it")
        if (p.rollout_steps * copies // types_per_runner) % p.num_minibatches:
            raise ConfigError(
                f"{source}: ppo.num_minibatches ({p.num_minibatches}) must divide the steps per env "
                f"type per runner ({p.rollout_steps} × {copies // types_per_runner} copies)")
        for name in ("num_epochs", "num_minibatches", "rollout_steps"):
            if getattr(p, name) < 1:
                raise ConfigError(f"{source}: ppo.{name} must be >= 1")
        if r.num_learners == 1:
            raise ConfigError(f"{source}: resources.num_learners must be 0 (driver) or >= 2")
        run = self.run
        if not all(isinstance(x, str) and x for x in run.transfer_reinit):
            raise ConfigError(f"{source}: run.transfer_reinit must be a list of weight-name "
                              f"prefixes, got {run.transfer_reinit!r}")
        if not 0.0 < run.transfer_shrink <= 1.0:
            raise ConfigError(f"{source}: run.transfer_shrink must be in (0, 1], "
                              f"got {run.transfer_shrink!r}")


def parse_envs(values: Any, source: str) -> tuple[EnvEntry, ...]:
    """A config's ``envs`` list (ids or mappings) as validated entries."""
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{source}: envs must be a non-empty list of env ids or mappings")
    envs = []
    for i, item in enumerate(values):
        if isinstance(item, str):
            item = {"id": item}
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: envs[{i}] must be an id or a mapping, got {item!r}")
        check_keys(item, ["id", "backend", "kwargs", "gamma"], f"{source}: envs[{i}]")
        if not isinstance(item.get("id"), str) or not item["id"]:
            raise ConfigError(f"{source}: envs[{i}] needs a string 'id'")
        if item.get("backend") not in (None, "gymnasium", "envpool"):
            raise ConfigError(f"{source}: envs[{i}].backend must be gymnasium or envpool, "
                              f"got {item['backend']!r}")
        gamma = item.get("gamma")
        if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, (int, float))
                                  or not 0.0 < gamma <= 1.0):
            raise ConfigError(f"{source}: envs[{i}].gamma must be a number in (0, 1], "
                              f"got {gamma!r}")
        envs.append(EnvEntry(**item))
    ids = [e.env_id for e in envs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{source}: env ids listed twice: {dup}")
    return tuple(envs)


def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a run config YAML file."""
    return TrainConfig.from_dict(read_yaml_mapping(path), source=str(path))
