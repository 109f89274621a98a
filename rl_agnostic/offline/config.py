"""Typed, validated config of an offline (DD-)IQL run, loaded from one YAML file.

Sections: ``datasets`` (list), ``model``, ``iql``, ``resources``, ``run``. Unknown keys are errors
that suggest the closest known key. IQL defaults are the IQL paper's MuJoCo values (expectile 0.7,
β 3, Polyak τ 0.005, batch 256, lr 3e-4); AntMaze-like sparse tasks use expectile 0.9, β 10.
"""

from __future__ import annotations

import dataclasses
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
from rl_agnostic.nn import Q_KINDS, NetworkConfig
from rl_agnostic.nn.config import ConfigError
from rl_agnostic.offline.data import FORMATS

__all__ = ["DatasetEntry", "IQLSettings", "OfflineConfig", "OfflineModelSettings",
           "OfflineResourceSettings", "OfflineRunSettings", "load_offline_config"]


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset. YAML: a bare path / Minari id string, or a mapping with these keys."""

    path: str
    """D4RL ``.hdf5``, flat-transition ``.parquet``, or a local Minari dataset id or directory."""
    format: str | None = None
    """``d4rl``, ``minari`` or ``parquet``; None = from the extension."""
    name: str | None = None
    """Name in metrics and results; None = the dataset's own name."""
    env_id: str | None = None
    """Environment to evaluate in; None = the one the dataset records (required for D4RL files,
    which record none)."""
    ref_min_score: float | None = None
    """Return normalized to 0; None = the dataset's (or D4RL's) reference."""
    ref_max_score: float | None = None
    """Return normalized to 100; None = the dataset's (or D4RL's) reference."""


@dataclass(frozen=True)
class OfflineModelSettings:
    kind: str = "agnostic"
    """agnostic | specific | single: policy, V and twin Q are all of this kind."""
    network: NetworkConfig = field(default_factory=lambda: NetworkConfig.cpu(dropout=0.0))
    """Network hyperparameters: ``cpu``/``paper`` preset or a mapping (dropout 0 by default:
    it would make the TD targets noisy)."""


@dataclass(frozen=True)
class IQLSettings:
    expectile: float = 0.7
    """τ of the expectile value loss (MuJoCo 0.7; AntMaze-like 0.9)."""
    beta: float = 3.0
    """Inverse temperature β of the advantage weights exp(β·A) (MuJoCo 3; AntMaze-like 10)."""
    polyak_tau: float = 0.005
    """Target Q update Q̄ ← (1 − τ)Q̄ + τQ after every gradient step."""
    gamma: float = 0.99
    """Discount."""
    actor_lr: float = 3e-4
    """Adam learning rate of the policy."""
    critic_lr: float = 3e-4
    """Adam learning rate of V and Q."""
    ssm_lr: float = 1e-3
    """Adam learning rate of the S4 state-space parameters (no weight decay)."""
    actor_cosine_schedule: bool = True
    """Cosine-anneal the policy's learning rate to 0 over ``run.steps`` (IQL reference code)."""
    batch_size: int = 256
    """Minibatch per dataset per gradient step (split across the workers holding it)."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm; None = no clipping (IQL reference code)."""
    normalize_observations: bool = True
    """Standardize observations with each env's dataset mean/std (kept in the checkpoint)."""
    normalize_rewards: bool = True
    """Scale rewards by T / (ref_max − ref_min) per dataset, T its mean episode length (1000 when
    unknown): the random-to-reference return gap becomes one unit per step in every dataset (the
    IQL reference code's 1000 / return range, for any episode length). Datasets without usable
    reference scores are left unscaled."""


@dataclass(frozen=True)
class OfflineResourceSettings:
    num_workers: int = 1
    """Ray Train workers; gradients are summed across them every step. Fewer workers than
    datasets: each worker holds whole datasets (S per worker, Algorithm 2); more: every worker
    holds a shard of every dataset."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1
    """CPU reservation of each worker."""
    torch_threads: int = 1
    """torch threads per worker."""


@dataclass(frozen=True)
class OfflineRunSettings:
    steps: int = 10_000
    """Gradient steps."""
    seed: int = 0
    """Seed of network init (identical on every worker) and minibatch sampling."""
    log_every: int = 100
    """Progress line and metrics every N steps."""
    eval_every: int = 0
    """Evaluate in the real envs every N steps (0 = only at the end)."""
    eval_episodes: int = 5
    """Deterministic episodes per dataset per evaluation (0 = no evaluation)."""
    checkpoint_every: int = 1000
    """Checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest)."""
    max_failures: int = 3
    """Worker-group failures Ray Train recovers from by restarting the workers from the latest
    checkpoint it registered (0 = none). Also covers Ray 2.60's placement-group cleaner, which under heavy
    load can take the live controller for dead and remove the workers' placement group."""
    output_dir: str = "runs"
    """Run directory parent: <output_dir>/<name>/ holds checkpoints and metrics.jsonl."""


@dataclass(frozen=True)
class OfflineConfig(SectionedConfig):
    """A whole offline run. ``name`` names the run directory."""

    LIST_SECTION = "datasets"

    name: str
    datasets: tuple[DatasetEntry, ...]
    model: OfflineModelSettings = field(default_factory=OfflineModelSettings)
    iql: IQLSettings = field(default_factory=IQLSettings)
    resources: OfflineResourceSettings = field(default_factory=OfflineResourceSettings)
    run: OfflineRunSettings = field(default_factory=OfflineRunSettings)

    @classmethod
    def from_dict(cls, values: Any, source: str = "config") -> OfflineConfig:
        name = check_top_level(cls, values, source, ("name", "datasets"))
        datasets = _parse_datasets(values["datasets"], source)
        model = parse_model(values.get("model"), source, Q_KINDS,
                            {"preset": "cpu", "dropout": 0.0}, len(datasets), "dataset")
        cfg = cls(
            name=name, datasets=datasets, model=OfflineModelSettings(**model),
            iql=section(IQLSettings, values.get("iql"), f"{source}: iql"),
            resources=section(OfflineResourceSettings, values.get("resources"),
                              f"{source}: resources"),
            run=section(OfflineRunSettings, values.get("run"), f"{source}: run"),
        )
        cfg._check(source)
        return cfg

    def _check(self, source: str) -> None:
        i, r, run = self.iql, self.resources, self.run
        if not 0.0 < i.expectile < 1.0:
            raise ConfigError(f"{source}: iql.expectile must be in (0, 1), got {i.expectile}")
        if not 0.0 < i.polyak_tau <= 1.0:
            raise ConfigError(f"{source}: iql.polyak_tau must be in (0, 1], got {i.polyak_tau}")
        if not 0.0 <= i.gamma <= 1.0:
            raise ConfigError(f"{source}: iql.gamma must be in [0, 1], got {i.gamma}")
        for name in ("batch_size",):
            if getattr(i, name) < 1:
                raise ConfigError(f"{source}: iql.{name} must be >= 1")
        if r.num_workers < 1:
            raise ConfigError(f"{source}: resources.num_workers must be >= 1")
        if r.torch_threads < 1:
            raise ConfigError(f"{source}: resources.torch_threads must be >= 1")
        for name in ("steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(run, name) < 1:
                raise ConfigError(f"{source}: run.{name} must be >= 1")
        if len(self.datasets) < r.num_workers and i.batch_size < r.num_workers:
            raise ConfigError(f"{source}: iql.batch_size ({i.batch_size}) must be >= "
                              f"resources.num_workers ({r.num_workers}) when every worker holds "
                              f"a shard of every dataset")


def _parse_datasets(values: Any, source: str) -> tuple[DatasetEntry, ...]:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{source}: datasets must be a non-empty list of paths or mappings")
    entries = []
    known = [f.name for f in dataclasses.fields(DatasetEntry)]
    for i, item in enumerate(values):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: datasets[{i}] must be a path or a mapping, got {item!r}")
        check_keys(item, known, f"{source}: datasets[{i}]")
        if not isinstance(item.get("path"), str) or not item["path"]:
            raise ConfigError(f"{source}: datasets[{i}] needs a string 'path'")
        if item.get("format") not in (None, *FORMATS):
            raise ConfigError(f"{source}: datasets[{i}].format must be one of {list(FORMATS)}, "
                              f"got {item['format']!r}")
        for key in ("ref_min_score", "ref_max_score"):
            if item.get(key) is not None and not isinstance(item[key], (int, float)):
                raise ConfigError(f"{source}: datasets[{i}].{key} must be a number")
        entries.append(DatasetEntry(**item))
    return tuple(entries)


def load_offline_config(path: str | Path) -> OfflineConfig:
    """Read and validate an offline run config YAML file; relative dataset paths are taken
    relative to the current directory (as on the command line)."""
    return OfflineConfig.from_dict(read_yaml_mapping(path), source=str(path))
