"""``rl-agnostic tune SWEEP.yaml``: hyperparameter search over online runs with Ray Tune.

A sweep file names a base run config and what to vary (dotted keys of that config)::

    name: quickstart_sweep
    base: quickstart.yaml              # a `rl-agnostic train` config, relative to this file
    stop_env_steps: 20000              # per env type, per trial
    num_samples: 4
    max_concurrent_trials: 1
    scheduler: {type: asha, grace_period: 2, reduction_factor: 2}   # asha | pbt | fifo
    search_space:
      ppo.actor_lr: {loguniform: [1.0e-4, 1.0e-3]}
      ppo.clip: {choice: [0.1, 0.2, 0.3]}
      model.network.d_model: {choice: [32, 64]}
      model.network.transformer: {choice: [true, false]}      # ablation flags too
    reference_scores:                  # env id: [random return, target return]
      CartPole-v1: [22.2, 500.0]
    output_dir: results/tune

The metric is ``normalized_score_mean``: the mean over envs of 100·(return − random)/(target −
random), so that an env with large raw returns does not dominate the search (the mixed raw return
would). Each trial is one `OnlineTrainer` (RLlib) inside a placement group sized for its learner
and env runners. ASHA stops bad trials early; PBT exploits and explores with our checkpoints
(each reported through Tune). Results: ``<output_dir>/<name>/results.md`` (one row per trial,
best first) and ``best_config.yaml`` (a config ``rl-agnostic train`` runs as is); ``--resume``
continues an interrupted sweep (Tune's own restore).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rl_agnostic.configs import check_keys, read_yaml_mapping
from rl_agnostic.nn.config import ConfigError
from rl_agnostic.online.config import TrainConfig, load_train_config

METRIC = "normalized_score_mean"
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")
SCHEDULERS = ("asha", "pbt", "fifo")


@dataclass(frozen=True)
class SweepConfig:
    name: str
    base: TrainConfig
    search_space: dict[str, dict[str, Any]]
    reference_scores: dict[str, tuple[float, float]]
    stop_env_steps: int
    num_samples: int = 4
    max_concurrent_trials: int = 1
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha"})
    output_dir: str = "results/tune"


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file (every key checked before Ray starts)."""
    path = Path(path)
    values = read_yaml_mapping(path)
    src = str(path)
    if not isinstance(values, dict):
        raise ConfigError(f"{src}: top level must be a mapping")
    known = [f.name for f in dataclasses.fields(SweepConfig)]
    check_keys(values, known, src)
    for key in ("name", "base", "search_space", "reference_scores", "stop_env_steps"):
        if key not in values:
            raise ConfigError(f"{src}: missing required key {key!r}")
    base = load_train_config(path.parent / values["base"])
    space = values["search_space"]
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{src}: search_space must be a non-empty mapping of dotted keys")
    base_dict = base.to_dict()
    for key, dist in space.items():
        _lookup(base_dict, key, src)
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise ConfigError(f"{src}: search_space.{key} must be one of "
                              f"{{{', '.join(DISTRIBUTIONS)}: ...}}, got {dist!r}")
    for sample in _corners(space):  # every value the space can take must make a valid config
        _trial_config(base, sample, "probe", "/tmp", src)
    refs = values["reference_scores"]
    if not isinstance(refs, dict) or set(refs) != set(base.env_ids):
        raise ConfigError(f"{src}: reference_scores needs [random, target] for exactly the base "
                          f"config's envs {base.env_ids}")
    for env_id, pair in refs.items():
        if not (isinstance(pair, list) and len(pair) == 2 and pair[1] != pair[0]):
            raise ConfigError(f"{src}: reference_scores.{env_id} must be [random, target] with "
                              f"target != random")
    sched = dict(values.get("scheduler") or {"type": "asha"})
    if sched.get("type") not in SCHEDULERS:
        raise ConfigError(f"{src}: scheduler.type must be one of {list(SCHEDULERS)}")
    if sched["type"] == "pbt" and any("grid" in d for d in space.values()):
        raise ConfigError(f"{src}: PBT cannot mutate grid_search keys")
    if sched["type"] == "pbt" and values.get("max_concurrent_trials", 1) < 2:
        raise ConfigError(f"{src}: PBT needs its population training at once: set "
                          f"max_concurrent_trials >= 2 (and resources for that many trials)")
    for key in ("stop_env_steps", "num_samples", "max_concurrent_trials"):
        if key in values and (not isinstance(values[key], int) or values[key] < 1):
            raise ConfigError(f"{src}: {key} must be an integer >= 1")
    return SweepConfig(
        name=values["name"], base=base, search_space=space,
        reference_scores={e: (float(a), float(b)) for e, (a, b) in refs.items()},
        stop_env_steps=values["stop_env_steps"],
        num_samples=values.get("num_samples", 4),
        max_concurrent_trials=values.get("max_concurrent_trials", 1), scheduler=sched,
        output_dir=values.get("output_dir", "results/tune"))


def _lookup(d: dict, dotted: str, src: str) -> None:
    node = d
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"{src}: search_space key {dotted!r}: {where} has no {part!r}")
        node = node[part]


def _set(d: dict, dotted: str, value: Any) -> None:
    *head, last = dotted.split(".")
    for part in head:
        d = d[part]
    d[last] = value


def _corners(space: dict[str, dict]) -> list[dict[str, Any]]:
    """Low and high ends (or every choice) of each key, one key at a time."""
    samples = []
    for key, dist in space.items():
        kind, arg = next(iter(dist.items()))
        values = list(arg) if kind in ("choice", "grid") else [arg[0], arg[1] - (kind == "randint")]
        samples += [{key: v} for v in values]
    return samples


def _trial_config(base: TrainConfig, params: dict[str, Any], name: str, output_dir: str,
                  src: str = "sweep") -> TrainConfig:
    values = copy.deepcopy(base.to_dict())
    for key, value in params.items():
        _set(values, key, value)
    values["name"] = name
    values["run"]["output_dir"] = output_dir
    try:
        return TrainConfig.from_dict(values, source=f"{src} (trial {params})")
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def normalized_score_mean(returns: dict[str, float], refs: dict[str, tuple[float, float]]
                          ) -> float | None:
    """Mean over envs of 100·(return − random)/(target − random); None until every env has a
    return."""
    if any(e not in returns for e in refs):
        return None
    return sum(100.0 * (returns[e] - lo) / (hi - lo) for e, (lo, hi) in refs.items()) / len(refs)


def _param_space(space: dict[str, dict]) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, dist in space.items():
        kind, arg = next(iter(dist.items()))
        out[key] = {"choice": lambda a: tune.choice(a), "grid": lambda a: tune.grid_search(a),
                    "uniform": lambda a: tune.uniform(*a),
                    "loguniform": lambda a: tune.loguniform(*a),
                    "randint": lambda a: tune.randint(*a)}[kind](arg)
    return out


def _trainable(params: dict[str, Any]) -> None:
    """One trial: an `OnlineTrainer` on the base config with ``params`` applied."""
    import ray.tune

    from rl_agnostic.online.trainer import OnlineTrainer, latest_checkpoint

    sweep: SweepConfig = params["__sweep__"]
    overrides = {k: v for k, v in params.items() if k != "__sweep__"}
    ctx = ray.tune.get_context()
    cfg = _trial_config(sweep.base, overrides, "run", ctx.get_trial_dir())
    restore = ray.tune.get_checkpoint()
    restore_dir = None
    if restore is not None:
        restore_dir = Path(restore.to_directory())
    trainer = OnlineTrainer(cfg, stop_env_steps=sweep.stop_env_steps, restore_from=restore_dir,
                            log=lambda text: print(f"[{ctx.get_trial_name()}] {text}",
                                                   flush=True))
    try:
        for item in trainer.iterate():
            metrics = dict(item.metrics)
            score = normalized_score_mean(item.returns, sweep.reference_scores)
            metrics[METRIC] = score if score is not None else -1e9
            ckpt = latest_checkpoint(trainer.dir)
            if ckpt is not None and ckpt.name == f"ckpt_{item.iteration:06d}":
                ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(ckpt))
            else:
                ray.tune.report(metrics)
    finally:
        trainer.stop()


def _trial_resources(cfg: TrainConfig):
    from ray import tune

    r = cfg.resources
    learners = [{"CPU": 1, "GPU": r.num_gpus_per_learner}] * r.num_learners
    runners = [{"CPU": r.num_cpus_per_env_runner}] * cfg.num_env_runners
    driver = {"CPU": 1, "GPU": r.num_gpus_per_learner if r.num_learners == 0 else 0}
    return tune.PlacementGroupFactory([driver, *learners, *runners], strategy="PACK")


def _scheduler(sweep: SweepConfig):
    from ray.tune.schedulers import (
        ASHAScheduler,
        FIFOScheduler,
        PopulationBasedTraining,
    )

    s = dict(sweep.scheduler)
    kind = s.pop("type")
    if kind == "fifo":
        return FIFOScheduler()
    if kind == "asha":
        max_t = s.pop("max_t", 10_000)
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                             grace_period=s.pop("grace_period", 1),
                             reduction_factor=s.pop("reduction_factor", 2), **s)
    interval = s.pop("perturbation_interval", sweep.base.run.checkpoint_every)
    # log_config: PBT writes each exploit/explore step to pbt_global.txt in the experiment dir
    return PopulationBasedTraining(time_attr="training_iteration",
                                   perturbation_interval=interval,
                                   hyperparam_mutations=_param_space(sweep.search_space),
                                   log_config=s.pop("log_config", True), **s)


def run_sweep(sweep: SweepConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run the sweep; write results.md and best_config.yaml; return the best trial's summary."""
    from ray import tune

    from rl_agnostic.distributed import init_ray

    out = Path(sweep.output_dir).absolute()
    exp_dir = out / sweep.name
    init_ray()
    trainable = tune.with_parameters(tune.with_resources(
        _trainable, _trial_resources(sweep.base)))
    if resume and tune.Tuner.can_restore(str(exp_dir)):
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            # PBT too starts each trial from a sample of the space it then mutates
            param_space={**_param_space(sweep.search_space), "__sweep__": sweep},
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=_scheduler(sweep),
                                        num_samples=sweep.num_samples,
                                        max_concurrent_trials=sweep.max_concurrent_trials),
            # PBT restores trials from other trials' checkpoints: keep enough of them that the
            # one being exploited is not deleted first.
            run_config=tune.RunConfig(name=sweep.name, storage_path=str(out),
                                      checkpoint_config=tune.CheckpointConfig(
                                          num_to_keep=8 if sweep.scheduler["type"] == "pbt"
                                          else 2)),
        )
    grid = tuner.fit()
    return write_results(sweep, grid, exp_dir)


def write_results(sweep: SweepConfig, grid, exp_dir: Path) -> dict[str, Any]:
    rows = []
    for result in grid:
        if result.metrics is None:
            continue
        params = {k: v for k, v in (result.config or {}).items() if k != "__sweep__"}
        rows.append({"trial": result.metrics.get("trial_id", Path(result.path).name),
                     "params": params,
                     METRIC: result.metrics.get(METRIC),
                     "iterations": result.metrics.get("training_iteration"),
                     "env_steps": result.metrics.get("num_env_steps"),
                     "error": bool(result.error)})
    rows.sort(key=lambda r: -(r[METRIC] if r[METRIC] is not None else -1e18))
    keys = list(sweep.search_space)
    lines = [f"# Sweep {sweep.name}", "",
             f"Metric: {METRIC} (mean over envs of 100·(return − random)/(target − random), "
             f"training returns at the trial's last iteration). Scheduler: "
             f"{sweep.scheduler['type']}.", "",
             "| trial | " + " | ".join(keys) + f" | {METRIC} | iterations | env steps |",
             "|---" * (len(keys) + 4) + "|"]
    for r in rows:
        vals = " | ".join(_fmt(r["params"].get(k)) for k in keys)
        lines.append(f"| {r['trial']} | {vals} | {_fmt(r[METRIC])} | {r['iterations']} | "
                     f"{r['env_steps']} |")
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / "results.md").write_text("\n".join(lines) + "\n")
    best = rows[0] if rows else None
    if best is not None:
        cfg = _trial_config(sweep.base, best["params"], f"{sweep.base.name}_best",
                            sweep.base.run.output_dir)
        (exp_dir / "best_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    print((exp_dir / "results.md").read_text(), flush=True)
    return {"best": best, "rows": rows, "dir": str(exp_dir)}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
