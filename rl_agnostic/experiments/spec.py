"""An experiment file (``tune_configs/experiments/<name>.yaml``) and the runs it expands to.

An experiment is a sequence of **phases** (e.g. ``pretrain`` then ``transfer``), each a set of env
types, and a set of **agents** (model sections such as ``{kind: agnostic}``). Every agent trains
on every phase; a phase with ``init_from: <earlier phase>`` starts each multi-env agent from its
own final checkpoint of that phase (transfer), and the agents listed in its ``scratch`` also train
there from freshly initialized weights; a phase's ``train:`` (any `TrainConfig` sections) applies
to all its runs, and its ``env_steps_factor`` scales the scale's budget for them (e.g. a longer
pretraining than transfer). Agents of ``kind: single`` train one run per env (the reference of
the normalized score) and never transfer. ``scales`` hold the budget and the shared run settings
(``train:``, any `TrainConfig` sections) per scale — ``paper`` for a GPU cluster, ``cpu`` for a
2-core machine, ``tiny`` for tests — and a seed list.

Everything is validated when the file is loaded: every run's `TrainConfig` is built (unknown keys,
bad values) and every env id is checked, so a typo fails before the first run starts.

A file with ``kind: offline`` (paper Table 1) holds datasets and offline agents instead of phases;
`load_experiment` hands it to `rl_agnostic.experiments.offline`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rl_agnostic.configs import check_keys, read_yaml_mapping
from rl_agnostic.nn.config import ConfigError
from rl_agnostic.online.config import EnvEntry, TrainConfig, parse_envs

if TYPE_CHECKING:
    from rl_agnostic.experiments.offline import OfflineExperiment

__all__ = ["EXPERIMENTS_DIR", "Experiment", "Phase", "Run", "experiment_path", "load_experiment"]

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "tune_configs" / "experiments"


@dataclass(frozen=True)
class Phase:
    name: str
    envs: tuple[EnvEntry, ...]
    """The phase's env types, parsed as a train config's ``envs``."""
    init_from: str | None = None
    """Earlier phase whose final checkpoint each multi-env agent starts from (transfer)."""
    scratch: tuple[str, ...] = ()
    """Agents that ALSO train this phase from scratch (only meaningful with ``init_from``)."""
    train: dict = dataclasses.field(default_factory=dict)
    """Run settings of every run of this phase (`TrainConfig` sections) on top of the scale's
    ``train``; an agent's own ``train`` (and ``transfer``) overrides still win."""
    env_steps_factor: float = 1.0
    """Each run of this phase trains round(env_steps_per_env × env_steps_factor) env steps per
    env type (the paper's phases share one budget: 1.0)."""

    def env_steps(self, env_steps_per_env: int) -> int:
        return max(1, round(env_steps_per_env * self.env_steps_factor))


@dataclass(frozen=True)
class Run:
    """One training run of the expanded experiment."""

    phase: str
    agent: str
    mode: str
    """``scratch`` (fresh weights), ``transfer`` (from ``init_from``) or ``single`` (one env)."""
    seed: int
    config: TrainConfig
    init_from: Run | None = None

    @property
    def label(self) -> str:
        """Column name in tables and plots: the agent, with ``(transfer)``/``(scratch)`` in
        phases that transfer."""
        return self.agent if self.mode in ("single", "plain") else f"{self.agent} ({self.mode})"

    @property
    def key(self) -> str:
        return f"{self.phase}/{self.config.name}"


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    phases: tuple[Phase, ...]
    agents: dict[str, dict]
    """Agent name → ``{model: …, train: …, transfer: …}`` overrides of the scale's run settings
    (``transfer``: on top of ``train``, for the agent's transfer runs only)."""
    reference: str
    """The single-env agent whose best score per env is the normalized score's 100."""
    primary: str | None
    """The agent whose transfer the report checks against every other column, per env."""
    scale: str
    seeds: tuple[int, ...]
    env_steps_per_env: int
    train: dict
    """Run settings of this scale shared by every run (`TrainConfig` sections)."""
    note: str = ""
    """What this scale changes from the paper's setup."""
    random_episodes: int = 20
    final_fraction: float = 0.1
    """The final score of a run: mean of the training returns of its last fraction of
    iterations (at least one)."""
    share_runs_with: str | None = None
    """Another experiment whose runs directory (``<out>/../<name>/runs``) this one uses, so runs
    identical in both (same phase, name, seed and config) train once."""
    source: str = ""

    def runs(self, output_dir: str | Path) -> list[Run]:
        """Every run, in the order they must execute (a transfer after its pretraining)."""
        out: list[Run] = []
        for seed in self.seeds:
            done: dict[tuple[str, str], Run] = {}
            for phase in self.phases:
                base_dir = self.runs_dir(output_dir) / phase.name / f"seed{seed}"
                for agent, overrides in self.agents.items():
                    kind = overrides.get("model", {}).get("kind", "agnostic")
                    if kind == "single":
                        for env in phase.envs:
                            cfg = self._config(f"{agent}_{env.env_id}", phase, [env], overrides,
                                               seed, base_dir)
                            out.append(Run(phase.name, agent, "single", seed, cfg))
                        continue
                    modes = ["transfer"] if phase.init_from else ["plain"]
                    if phase.init_from and agent in phase.scratch:
                        modes.append("scratch")
                    for mode in modes:
                        name = agent if mode == "plain" else f"{agent}_{mode}"
                        cfg = self._config(name, phase, phase.envs, overrides, seed, base_dir,
                                           transfer=mode == "transfer")
                        parent = done.get((phase.init_from, agent)) if mode == "transfer" else None
                        run = Run(phase.name, agent, mode, seed, cfg, parent)
                        out.append(run)
                        if mode != "scratch":
                            done[(phase.name, agent)] = run
        return out

    def runs_dir(self, output_dir: str | Path) -> Path:
        if self.share_runs_with:
            return Path(output_dir).parent / self.share_runs_with / "runs"
        return Path(output_dir) / "runs"

    def _config(self, name: str, phase: Phase, envs: Sequence[EnvEntry], overrides: dict,
                seed: int, base_dir: Path, transfer: bool = False) -> TrainConfig:
        values = _merge(_merge(copy.deepcopy(self.train), phase.train), overrides.get("train", {}))
        values["model"] = _merge(values.get("model", {}), overrides.get("model", {}))
        if transfer:  # the agent's transfer-only settings (e.g. run.transfer_shrink)
            values = _merge(values, overrides.get("transfer", {}))
        values.setdefault("run", {})
        values["run"].update(seed=seed, output_dir=str(base_dir),
                             env_steps_per_env=phase.env_steps(self.env_steps_per_env))
        envs = [dataclasses.asdict(e) for e in envs]
        return TrainConfig.from_dict({"name": name, "envs": envs, **values},
                                     f"{self.source}: run {name}")

    def env_ids(self, phase: str) -> list[str]:
        p = next(p for p in self.phases if p.name == phase)
        return [e.env_id for e in p.envs]

    def resolved(self) -> dict:
        """The experiment at this scale, as written to ``config.yaml`` of the results."""
        return {"name": self.name, "description": self.description, "scale": self.scale,
                "seeds": list(self.seeds), "env_steps_per_env": self.env_steps_per_env,
                "phases": {p.name: {"envs": [dataclasses.asdict(e) for e in p.envs],
                                    "init_from": p.init_from,
                                    "scratch": list(p.scratch),
                                    **({"train": p.train} if p.train else {}),
                                    **({"env_steps_factor": p.env_steps_factor}
                                       if p.env_steps_factor != 1.0 else {})}
                           for p in self.phases},
                "agents": self.agents, "note": self.note, "reference": self.reference,
                "primary": self.primary, "train": self.train,
                "random_episodes": self.random_episodes, "final_fraction": self.final_fraction}


def _merge(base: dict, extra: dict) -> dict:
    """Deep merge of mappings (``extra`` wins); lists and scalars are replaced."""
    out = dict(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def experiment_path(name_or_path: str | Path) -> Path:
    """A path as given, or ``tune_configs/experiments/<name>.yaml``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
    candidate = EXPERIMENTS_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown experiment {str(name_or_path)!r}; known: {', '.join(known)} "
                          "(or give a path to an experiment YAML)")
    return candidate


def load_experiment(name_or_path: str | Path, scale: str = "cpu",
                    seeds: list[int] | None = None,
                    env_steps_per_env: int | None = None, *, steps: int | None = None,
                    data_dir: str | None = None) -> Experiment | OfflineExperiment:
    """Load and validate an experiment at ``scale``; ``seeds``/``env_steps_per_env`` override the
    scale's. A ``kind: offline`` file is an `OfflineExperiment`, whose runs' gradient ``steps``
    and ``data_dir`` may be overridden instead of the env steps."""
    path = experiment_path(name_or_path)
    source = str(path)
    values = read_yaml_mapping(path)
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: must be a mapping")
    kind = values.get("kind", "online")
    if kind not in ("online", "offline"):
        raise ConfigError(f"{source}: kind must be online or offline, got {kind!r}")
    if kind == "offline":
        if env_steps_per_env is not None:
            raise ConfigError(f"{source}: an offline experiment trains gradient steps, not env "
                              "steps (--steps, not --env-steps)")
        from rl_agnostic.experiments.offline import load_offline_experiment

        return load_offline_experiment(values, source, scale, seeds, steps, data_dir)
    if steps is not None or data_dir is not None:
        raise ConfigError(f"{source}: --steps and --data-dir are for offline experiments; an "
                          "online one takes --env-steps")
    check_keys(values, ["name", "kind", "description", "phases", "agents", "reference",
                        "primary", "scales", "random_episodes", "final_fraction",
                        "share_runs_with"], source)
    for key in ("name", "phases", "agents", "scales"):
        if key not in values:
            raise ConfigError(f"{source}: missing required key {key!r}")
    agents = values["agents"]
    if not isinstance(agents, dict) or not agents:
        raise ConfigError(f"{source}: agents must be a non-empty mapping of name → overrides")
    for name, over in agents.items():
        if not isinstance(over, dict):
            raise ConfigError(f"{source}: agents.{name} must be a mapping")
        check_keys(over, ["model", "train", "transfer"], f"{source}: agents.{name}")
    phases = _parse_phases(values["phases"], agents, source)
    scales = values["scales"]
    if not isinstance(scales, dict) or scale not in scales:
        raise ConfigError(f"{source}: unknown scale {scale!r}; this experiment has "
                          f"{', '.join(scales) if isinstance(scales, dict) else 'none'}")
    sc = scales[scale]
    if not isinstance(sc, dict):
        raise ConfigError(f"{source}: scales.{scale} must be a mapping")
    check_keys(sc, ["seeds", "env_steps_per_env", "train", "phases", "agents", "note"],
               f"{source}: scales.{scale}")
    if values.get("share_runs_with"):
        sc = _inherit_shared_scale(sc, str(values["share_runs_with"]), scale, agents, source)
    # A scale may swap the env sets (e.g. cheaper envs on a CPU) and adjust agents.
    if sc.get("phases") is not None:
        phases = _parse_phases(sc["phases"], agents, f"{source}: scales.{scale}")
    for name, over in (sc.get("agents") or {}).items():
        if name not in agents:
            raise ConfigError(f"{source}: scales.{scale}.agents: unknown agent {name!r} "
                              f"({', '.join(agents)})")
        if over is None:  # `name: null` leaves the agent out at this scale
            agents = {k: v for k, v in agents.items() if k != name}
            phases = tuple(dataclasses.replace(p, scratch=tuple(a for a in p.scratch if a != name))
                           for p in phases)
        else:
            agents = {**agents, name: _merge(agents[name], over)}
    reference = values.get("reference")
    singles = [a for a, o in agents.items() if o.get("model", {}).get("kind") == "single"]
    if reference is None:
        reference = singles[0] if singles else None
    if reference not in singles:
        raise ConfigError(f"{source}: reference must name an agent of model kind 'single' "
                          f"(the normalized score's 100), got {reference!r}")
    primary = values.get("primary")
    if primary is not None and primary not in agents:
        raise ConfigError(f"{source}: primary {primary!r} is not an agent ({', '.join(agents)})")
    exp = Experiment(
        name=str(values["name"]), description=str(values.get("description", "")),
        phases=phases, agents=agents, reference=reference, primary=primary, scale=scale,
        seeds=tuple(seeds if seeds is not None else sc.get("seeds", [0])),
        env_steps_per_env=int(env_steps_per_env or sc.get("env_steps_per_env", 100_000)),
        train=sc.get("train") or {}, note=str(sc.get("note", "")).strip(),
        random_episodes=int(values.get("random_episodes", 20)),
        final_fraction=float(values.get("final_fraction", 0.1)),
        share_runs_with=values.get("share_runs_with"), source=source)
    if not exp.seeds:
        raise ConfigError(f"{source}: no seeds")
    _check_env_ids(exp)
    exp.runs("validate")  # builds every TrainConfig: bad keys and values fail here
    return exp


def _inherit_shared_scale(sc: dict, shared: str, scale: str, agents: dict, source: str) -> dict:
    """A scale of an experiment that shares another's runs takes that experiment's same-scale
    budget, ``train`` block and per-agent overrides (of the agents both have) where it sets none
    of its own: the shared runs must have been trained with exactly those settings, so writing
    them twice would only let the copies drift apart (and `check_run_dir` refuse the runs)."""
    other = read_yaml_mapping(experiment_path(shared))
    other_sc = (other.get("scales") or {}).get(scale) if isinstance(other, dict) else None
    if not isinstance(other_sc, dict):
        raise ConfigError(f"{source}: share_runs_with {shared!r} has no scale {scale!r}")
    inherited = {key: other_sc[key] for key in ("env_steps_per_env", "train") if key in other_sc}
    inherited["agents"] = {name: over for name, over in (other_sc.get("agents") or {}).items()
                           if name in agents}
    return _merge(inherited, sc)


def _parse_phases(values: Any, agents: dict, source: str) -> tuple[Phase, ...]:
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"{source}: phases must be a mapping of phase name → {{envs: [...]}}")
    phases: list[Phase] = []
    for name, p in values.items():
        where = f"{source}: phases.{name}"
        if not isinstance(p, dict):
            raise ConfigError(f"{where} must be a mapping")
        check_keys(p, ["envs", "init_from", "scratch", "train", "env_steps_factor"], where)
        envs = parse_envs(p.get("envs"), where)
        init_from = p.get("init_from")
        if init_from is not None and init_from not in [q.name for q in phases]:
            raise ConfigError(f"{where}.init_from {init_from!r} must name an EARLIER phase "
                              f"({', '.join(q.name for q in phases) or 'none'})")
        scratch = tuple(p.get("scratch") or ())
        for agent in scratch:
            if agent not in agents:
                raise ConfigError(f"{where}.scratch: unknown agent {agent!r} "
                                  f"({', '.join(agents)})")
        if scratch and init_from is None:
            raise ConfigError(f"{where}.scratch needs init_from (every run of a phase without "
                              "init_from is from scratch already)")
        train = p.get("train") or {}
        if not isinstance(train, dict):
            raise ConfigError(f"{where}.train must be a mapping of run settings (TrainConfig "
                              "sections such as ppo: {...})")
        factor = p.get("env_steps_factor", 1.0)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) \
                or not 0 < factor < float("inf"):
            raise ConfigError(f"{where}.env_steps_factor must be a positive number, got {factor!r}")
        phases.append(Phase(str(name), envs, init_from, scratch, train, float(factor)))
    return tuple(phases)


def _check_env_ids(exp: Experiment) -> None:
    from rl_agnostic.envs.make import check_env_id

    for phase in exp.phases:
        for env in phase.envs:
            try:
                check_env_id(env.env_id)
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"{exp.source}: phases.{phase.name}: {exc}") from None
