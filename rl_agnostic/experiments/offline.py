"""Offline experiments (``kind: offline`` files, paper Table 1): one multi-dataset agent (DD-IQL)
against per-dataset agents (IQL), every run an ordinary offline run
(`rl_agnostic.offline.trainer.train_offline`).

A scale lists its **datasets**: files the user supplies (``path``, relative to the scale's
``data_dir``; D4RL HDF5, parquet or Minari, as an offline config takes them), or datasets this
module makes (``collect: {expert: 30, medium: 30, random: 5}``): PPO behaviour policies trained
with ``expert_config`` for the scale's ``experts`` budgets ("expert" = the last checkpoint,
"medium" = the one at ``medium_fraction`` of the run), then `rl_agnostic.offline.collect.collect`
with fixed seeds. Datasets are made once and reused, and shared by every seed (like D4RL's).

Agents of model kind ``single`` train one run per dataset, the others one run over all datasets;
runs live in ``<out>/runs/seed<k>/<run name>/`` and leave ``done.json`` when finished (so do
the behaviour policies' runs), so a second start skips them and resumes an unfinished one from
its checkpoint. The report (``results.md``, ``results.json``, ``curves.png``, ``config.yaml``,
``datasets.json``) gives the final and best normalized score per dataset and agent (mean ± std
over seeds), the ratio of the primary agent's mean to the reference agent's (the paper's 89 %),
parameter counts, wall time and the primary agent's data-wait fraction and gradient steps/s.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rl_agnostic.configs import check_keys
from rl_agnostic.experiments.report import _command_target, _fmt, _mean_std
from rl_agnostic.experiments.run import DONE_FILE
from rl_agnostic.experiments.spec import _merge
from rl_agnostic.nn.config import ConfigError
from rl_agnostic.offline.config import OfflineConfig
from rl_agnostic.online.trainer import OnlineTrainer, atomic_write_text, latest_checkpoint

__all__ = ["OfflineExperiment", "load_offline_experiment", "run_offline_experiment",
           "write_offline_report"]

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EXPERT_CONFIG = ROOT / "tune_configs" / "offline_experts.yaml"
POLICY_KINDS = ("expert", "medium", "random")
DATASETS_FILE = "datasets.json"
COLLECT_DEFAULTS = {"seed": 0, "random_episodes": 50, "action_noise": 0.1, "medium_fraction": 0.3}


@dataclass(frozen=True)
class OfflineRun:
    seed: int
    agent: str
    dataset: str | None
    """The one dataset of a per-dataset agent's run; None for a run over all datasets."""
    config: OfflineConfig

    @property
    def directory(self) -> Path:
        return Path(self.config.run.output_dir) / self.config.name


@dataclass(frozen=True)
class OfflineExperiment:
    name: str
    description: str
    scale: str
    seeds: tuple[int, ...]
    note: str
    agents: dict[str, dict]
    """Agent name → offline config sections (``model``, ``iql``, ``resources``, ``run``) over the
    scale's ``offline``."""
    reference: str
    """The per-dataset agent the ratio divides by (IQL)."""
    primary: str
    """The multi-dataset agent (DD-IQL)."""
    datasets: tuple[dict, ...]
    """Offline config dataset entries (path relative to the data directory) plus ``collect``."""
    offline: dict
    data_dir: str | None
    """Where the datasets are (and are made); None = ``<out>/data``."""
    experts: dict[str, int]
    expert_config: str
    collect: dict
    source: str = ""
    steps: int | None = None
    """Gradient steps of every run, overriding the scale's ``run.steps``."""

    def data_path(self, out: str | Path) -> Path:
        return Path(self.data_dir) if self.data_dir else Path(out) / "data"

    def dataset_names(self) -> list[str]:
        return [d["name"] for d in self.datasets]

    def runs(self, out: str | Path) -> list[OfflineRun]:
        """Every run: per seed, the per-dataset agents' runs, then the multi-dataset ones."""
        data = self.data_path(out).absolute()
        entries = [{k: v for k, v in d.items() if k != "collect"} for d in self.datasets]
        for entry in entries:
            entry["path"] = str(data / entry["path"])
        runs = []
        for seed in self.seeds:
            for agent, over in self.agents.items():
                values = _merge(copy.deepcopy(self.offline), over)
                run = values.setdefault("run", {})
                run.update(seed=seed, output_dir=str(Path(out).absolute() / "runs" / f"seed{seed}"))
                if self.steps:
                    run["steps"] = self.steps
                single = values.get("model", {}).get("kind") == "single"
                for entry in (entries if single else [None]):
                    name = f"{agent}_{entry['name']}" if entry else agent
                    cfg = OfflineConfig.from_dict(
                        {"name": name, "datasets": [entry] if entry else entries, **values},
                        f"{self.source}: scales.{self.scale}, run {name}")
                    runs.append(OfflineRun(seed, agent, entry["name"] if entry else None, cfg))
        return runs

    def resolved(self) -> dict:
        """The experiment at this scale, as written to ``config.yaml`` of the results."""
        return {"name": self.name, "kind": "offline", "description": self.description,
                "scale": self.scale, "seeds": list(self.seeds), "note": self.note,
                "agents": self.agents, "reference": self.reference, "primary": self.primary,
                "data_dir": self.data_dir, "datasets": list(self.datasets),
                "experts": self.experts, "expert_config": _repo_relative(self.expert_config),
                "collect": self.collect, "offline": self.offline,
                **({"steps": self.steps} if self.steps else {})}


def _repo_relative(path: str) -> str:
    """``path`` relative to the repository when inside it: results name no machine's paths."""
    p = Path(path).absolute()
    return str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)


def load_offline_experiment(values: dict, source: str, scale: str,
                            seeds: list[int] | None = None, steps: int | None = None,
                            data_dir: str | None = None) -> OfflineExperiment:
    """An offline experiment file's mapping at ``scale``, validated: every run's offline config
    is built (unknown keys, bad values) and every dataset's collect recipe checked."""
    check_keys(values, ["name", "kind", "description", "agents", "reference", "primary",
                        "scales"], source)
    agents = values.get("agents")
    if not isinstance(agents, dict) or not agents:
        raise ConfigError(f"{source}: agents must be a non-empty mapping of name → overrides")
    for name, over in agents.items():
        if not isinstance(over, dict):
            raise ConfigError(f"{source}: agents.{name} must be a mapping")
        check_keys(over, ["model", "iql", "resources", "run"], f"{source}: agents.{name}")
    scales = values.get("scales")
    if not isinstance(scales, dict) or scale not in scales:
        raise ConfigError(f"{source}: unknown scale {scale!r}; this experiment has "
                          f"{', '.join(scales) if isinstance(scales, dict) else 'none'}")
    sc = scales[scale]
    where = f"{source}: scales.{scale}"
    if not isinstance(sc, dict):
        raise ConfigError(f"{where} must be a mapping")
    check_keys(sc, ["note", "seeds", "data_dir", "datasets", "experts", "expert_config",
                    "collect", "offline", "agents"], where)
    for name, over in (sc.get("agents") or {}).items():
        if name not in agents:
            raise ConfigError(f"{where}.agents: unknown agent {name!r} ({', '.join(agents)})")
        agents = {**agents, name: _merge(agents[name], over)}
    kinds = {a: o.get("model", {}).get("kind", "agnostic") for a, o in agents.items()}
    reference, primary = values.get("reference"), values.get("primary")
    if kinds.get(reference) != "single":
        raise ConfigError(f"{source}: reference must name an agent of model kind 'single' (one "
                          f"run per dataset), got {reference!r}")
    if primary not in agents or kinds[primary] == "single":
        raise ConfigError(f"{source}: primary must name an agent trained on all datasets at "
                          f"once (model kind agnostic or specific), got {primary!r}")
    collect = {**COLLECT_DEFAULTS, **(sc.get("collect") or {})}
    check_keys(collect, list(COLLECT_DEFAULTS), f"{where}.collect")
    experts = sc.get("experts") or {}
    if not isinstance(experts, dict) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in experts.values()):
        raise ConfigError(f"{where}.experts must map env ids to positive PPO env-step budgets, "
                          f"got {experts!r}")
    datasets = _parse_datasets(sc.get("datasets"), experts, where)
    expert_config = Path(sc.get("expert_config") or DEFAULT_EXPERT_CONFIG)
    if experts and not expert_config.is_file():
        raise ConfigError(f"{where}.expert_config: {expert_config} does not exist")
    exp = OfflineExperiment(
        name=str(values.get("name", Path(source).stem)),
        description=str(values.get("description", "")).strip(), scale=scale,
        seeds=tuple(seeds if seeds is not None else sc.get("seeds", [0])),
        note=str(sc.get("note", "")).strip(), agents=agents, reference=reference,
        primary=primary, datasets=datasets, offline=sc.get("offline") or {},
        data_dir=data_dir or sc.get("data_dir"), experts=experts,
        expert_config=str(expert_config),
        collect=collect, source=source, steps=steps)
    if not exp.seeds:
        raise ConfigError(f"{source}: no seeds")
    exp.runs("validate")  # builds every OfflineConfig: bad keys and values fail here
    return exp


def _parse_datasets(values: Any, experts: dict[str, int], where: str) -> tuple[dict, ...]:
    from rl_agnostic.envs.make import check_env_id

    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.datasets must be a non-empty list")
    out = []
    for i, d in enumerate(values):
        at = f"{where}.datasets[{i}]"
        if not isinstance(d, dict):
            raise ConfigError(f"{at} must be a mapping")
        d = dict(d)
        recipe = d.get("collect")
        if recipe is None:
            if not d.get("path"):
                raise ConfigError(f"{at} needs a 'path' (a file in the data directory) or a "
                                  "'collect' recipe")
            d.setdefault("name", Path(d["path"]).stem)
        else:
            if not d.get("name") or not d.get("env_id"):
                raise ConfigError(f"{at}: a collected dataset needs a 'name' and an 'env_id'")
            try:
                check_env_id(d["env_id"])
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"{at}: {exc}") from None
            if not isinstance(recipe, dict) or not recipe:
                raise ConfigError(f"{at}.collect must map policies ({', '.join(POLICY_KINDS)}) "
                                  "to episode counts")
            check_keys(recipe, list(POLICY_KINDS), f"{at}.collect")
            for policy, episodes in recipe.items():
                if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
                    raise ConfigError(f"{at}.collect.{policy} must be a positive episode count")
                if policy != "random" and d["env_id"] not in experts:
                    raise ConfigError(f"{at}: its {policy} policy needs experts.{d['env_id']} "
                                      "(the PPO env steps of its behaviour policy)")
            d["path"] = f"{d['name']}.parquet"
        out.append(d)
    names = [d["name"] for d in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.datasets: names must be unique, got {names}")
    return tuple(out)


# -- datasets ---------------------------------------------------------------------------------
def behaviour_policies(exp: OfflineExperiment, data_dir: Path,
                       say: Callable[[str], None]) -> dict[str, dict[str, Path]]:
    """Train (or reuse) the PPO behaviour policies; env id → {"expert": ckpt, "medium": ckpt}."""
    import ray

    from rl_agnostic.online.config import load_train_config

    base = load_train_config(exp.expert_config).replace(
        run={"output_dir": str(data_dir / "experts"), "seed": exp.collect["seed"]})
    needed = {d["env_id"] for d in exp.datasets
              if set(d.get("collect") or {}) - {"random"}
              and not (data_dir / d["path"]).is_file()}
    policies = {}
    started_ray = not ray.is_initialized()
    for env_id in sorted(needed):
        steps = exp.experts[env_id]
        run = (data_dir / "experts" / env_id).absolute()
        if not (run / DONE_FILE).is_file():  # an interrupted one resumes from its checkpoint
            resume = latest_checkpoint(run) is not None
            say(f"{'resuming' if resume else 'training'} the {env_id} behaviour policy "
                f"({steps:,} env steps, {exp.expert_config})")
            cfg = base.replace(name=env_id, envs=[env_id], run={"env_steps_per_env": steps})
            trainer = OnlineTrainer(cfg, resume=resume, log=say)
            try:
                for _ in trainer.iterate():
                    pass
            finally:
                trainer.stop()
                if started_ray:
                    ray.shutdown()
            atomic_write_text(run / DONE_FILE, json.dumps({"env_steps_per_env": steps}))
        ckpts = sorted(p for p in (run / "checkpoints").glob("ckpt_*") if p.is_dir())
        policies[env_id] = {"expert": latest_checkpoint(run),
                            "medium": ckpts[int(exp.collect["medium_fraction"]
                                                * (len(ckpts) - 1))]}
    return policies


def make_datasets(exp: OfflineExperiment, data_dir: Path,
                  say: Callable[[str], None] = print) -> dict[str, dict]:
    """Make every missing collected dataset; dataset name → its collection summary (empty for
    a supplied file). A supplied file that is missing fails here, all missing ones named."""
    from rl_agnostic.offline.collect import PolicySource, collect

    missing = [str(data_dir / d["path"]) for d in exp.datasets
               if "collect" not in d and not (data_dir / d["path"]).exists()]
    if missing:
        raise FileNotFoundError(
            f"{exp.name} ({exp.scale} scale) reads datasets it cannot make, and nothing is "
            f"downloaded; missing: {', '.join(missing)}. Put the files there or give "
            "--data-dir the directory that holds them")
    policies = behaviour_policies(exp, data_dir, say)
    summaries = {}
    for i, d in enumerate(exp.datasets):
        summary = data_dir / f"{d['name']}.json"
        if "collect" not in d:
            summaries[d["name"]] = {}
        elif summary.is_file() and (data_dir / d["path"]).is_file():
            summaries[d["name"]] = json.loads(summary.read_text())
        else:
            sources = [PolicySource("random" if kind == "random"
                                    else str(policies[d["env_id"]][kind]), episodes)
                       for kind, episodes in d["collect"].items()]
            summaries[d["name"]] = collect(
                d["env_id"], sources, data_dir, d["name"], seed=exp.collect["seed"] + 1000 * i,
                random_episodes=exp.collect["random_episodes"],
                action_noise=exp.collect["action_noise"], log=say)
    return summaries


# -- runs -------------------------------------------------------------------------------------
def _check_run_dir(run: OfflineRun) -> None:
    """A run directory from an earlier start must hold this run's config, or its results would
    be reported as this run's."""
    path = run.directory / "config.yaml"
    if not path.is_file():
        return
    saved, wanted = yaml.safe_load(path.read_text()), run.config.to_dict()
    for values in (saved, wanted):  # the results and data directories may have moved since
        values.get("run", {}).pop("output_dir", None)
        for entry in values.get("datasets") or []:
            entry["path"] = Path(entry["path"]).name
    if saved != wanted:
        raise ConfigError(f"{run.directory} holds a run with a different config; remove that "
                          "directory or give the experiment another --out")


def run_offline_experiment(exp: OfflineExperiment, out_dir: str | Path, *,
                           log: Callable[[str], None] | None = None) -> dict:
    """Make the datasets, train every unfinished run, then write the report."""
    import ray

    from rl_agnostic.distributed import init_ray
    from rl_agnostic.offline.trainer import train_offline

    say = log or (lambda text: print(text, flush=True))
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    runs = exp.runs(out)
    for run in runs:
        _check_run_dir(run)
    make_datasets(exp, exp.data_path(out).absolute(), say)
    todo = [r for r in runs if not (r.directory / DONE_FILE).is_file()]
    say(f"experiment {exp.name} ({exp.scale} scale): {len(runs)} runs over seeds "
        f"{list(exp.seeds)}, {len(runs) - len(todo)} already done; results in {out}")
    started_ray = not ray.is_initialized()
    t_start = time.perf_counter()
    try:
        init_ray()
        for i, run in enumerate(todo, 1):
            prefix = f"[{i}/{len(todo)} seed{run.seed} {run.config.name}]"
            resume = any(run.directory.glob("ckpt_*"))
            t0 = time.perf_counter()
            final = train_offline(run.config, resume=resume,
                                  log=lambda text, p=prefix: say(f"{p} {text}"))
            done = {"wall_s": time.perf_counter() - t0, "resumed": resume,
                    "num_parameters": final.get("num_parameters"),
                    "final": {k: v for k, v in final.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)}}
            atomic_write_text(run.directory / DONE_FILE, json.dumps(done, indent=2))
            say(f"{prefix} done in {done['wall_s'] / 60:.1f} min ("
                f"{(time.perf_counter() - t_start) / 60:.1f} min since start, "
                f"{len(todo) - i} left)")
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    return write_offline_report(exp, out, say)


# -- report -----------------------------------------------------------------------------------
def _rows(run: OfflineRun) -> list[dict]:
    path = run.directory / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def collect_results(exp: OfflineExperiment, out: Path) -> dict[str, Any]:
    """Scores, curves, parameters and timings of every finished run of ``exp``."""
    names = exp.dataset_names()
    agents = list(exp.agents)
    scores = {n: {a: {"final": {}, "best": {}, "return": {}} for a in agents} for n in names}
    curves = {a: {n: {} for n in names} for a in agents}
    params, wall, perf = {}, {}, {}
    for run in exp.runs(out):
        done_file = run.directory / DONE_FILE
        if not done_file.is_file():
            continue
        done, rows = json.loads(done_file.read_text()), _rows(run)
        params[run.config.name] = done.get("num_parameters")
        wall.setdefault(run.config.name, {})[run.seed] = done["wall_s"]
        for n in ([run.dataset] if run.dataset else names):
            key = f"dataset/{n}/normalized_score"
            curve = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            curves[run.agent][n][run.seed] = curve
            cell = scores[n][run.agent]
            cell["final"][run.seed] = done["final"].get(key)
            cell["best"][run.seed] = max((v for _, v in curve), default=None)
            cell["return"][run.seed] = done["final"].get(f"dataset/{n}/return_mean")
        if run.agent == exp.primary:
            timed = [r for r in rows if "perf/grad_steps_per_s" in r]
            if timed:
                perf[run.seed] = {k: float(np.mean([r[k] for r in timed])) for k in
                                  ("perf/grad_steps_per_s", "perf/data_wait_fraction")}
    seeds = sorted({s for n in names for a in agents for s in scores[n][a]["final"]})
    # mean over datasets per seed, then mean ± std over seeds (the table's mean row)
    per_seed_mean = {a: {s: float(np.mean([scores[n][a]["final"][s] for n in names]))
                         for s in seeds
                         if all(scores[n][a]["final"].get(s) is not None for n in names)}
                     for a in agents}
    mean = {a: _mean_std(list(per_seed_mean[a].values()))[:2] for a in agents}
    pri, ref = mean[exp.primary][0], mean[exp.reference][0]
    ratio = pri / ref if pri is not None and ref else None
    return {
        "experiment": exp.name, "scale": exp.scale, "seeds": seeds, "datasets": names,
        "agents": agents, "reference": exp.reference, "primary": exp.primary,
        "scores": {n: {a: {k: {str(s): v for s, v in cell.items()} for k, cell in c.items()}
                       | {f"{k}_mean_std": _mean_std(list(c[k].values()))[:2]
                          for k in ("final", "best", "return")}
                       for a, c in scores[n].items()} for n in names},
        "mean_normalized": mean,
        "mean_normalized_per_seed": {a: {str(s): v for s, v in m.items()}
                                     for a, m in per_seed_mean.items()},
        "ratio": ratio,
        "num_parameters": params,
        "wall_s": {k: {str(s): v for s, v in w.items()} for k, w in wall.items()},
        "perf": {str(s): v for s, v in perf.items()},
        "curves": {a: {n: {str(s): c for s, c in per.items()} for n, per in cs.items()}
                   for a, cs in curves.items()},
        "dataset_info": _dataset_info(exp, exp.data_path(out), out),
    }


def _dataset_info(exp: OfflineExperiment, data_dir: Path, out: Path) -> dict[str, dict]:
    """What the report says of each dataset. A collected dataset's summary comes from the data
    directory or, when that is gone (the data is not committed: a fresh clone), from the results'
    `DATASETS_FILE`, which keeps it."""
    kept_file = out / DATASETS_FILE
    kept = json.loads(kept_file.read_text()) if kept_file.is_file() else {}
    info = {}
    for d in exp.datasets:
        path = data_dir / f"{d['name']}.json"
        if "collect" in d and not path.is_file() and "transitions" in kept.get(d["name"], {}):
            info[d["name"]] = kept[d["name"]]
        elif "collect" in d and path.is_file():
            s = json.loads(path.read_text())
            info[d["name"]] = {"env_id": s["env_id"], "transitions": s["transitions"],
                               "random_return": s["random_return_mean"],
                               "policies": [{"policy": "/".join(Path(p["policy"]).parts[-3::2])
                                             if p["policy"] != "random" else "random",
                                             "episodes": p["episodes"],
                                             "return": p["return_mean"]}
                                            for p in s["policies"]]}
        else:
            info[d["name"]] = {"env_id": d.get("env_id"), "file": d["path"]}
    return info


def write_markdown(exp: OfflineExperiment, res: dict, path: Path) -> None:
    ref, pri = exp.reference, exp.primary
    n_seeds = len(res["seeds"])
    run = next(r.config.run for r in exp.runs("validate") if r.agent == pri)
    lines = [
        f"# {exp.name} ({exp.scale} scale): {pri} on all datasets vs {ref} per dataset", "",
        exp.description, "",
        f"Scale: {exp.note}", "",
        f"{run.steps:,} gradient steps per run; "
        + (f"{n_seeds} seeds {res['seeds']}, mean ± std over seeds" if n_seeds > 1
           else f"seed {res['seeds'][0]}")
        + f". Final: the last evaluation ({run.eval_episodes} deterministic episodes, each in "
        "its own seeded env copy); best: the best of the run's evaluations.", "",
        f"| dataset | env | {ref} final | {pri} final | {ref} best | {pri} best | "
        f"{ref} return | {pri} return |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in res["datasets"]:
        s = res["scores"][n]
        lines.append(
            f"| {n} | {res['dataset_info'][n].get('env_id') or ''} | "
            f"{_fmt(s[ref]['final_mean_std'])} | {_fmt(s[pri]['final_mean_std'])} | "
            f"{_fmt(s[ref]['best_mean_std'])} | {_fmt(s[pri]['best_mean_std'])} | "
            f"{_fmt(s[ref]['return_mean_std'])} | {_fmt(s[pri]['return_mean_std'])} |")
    m = res["mean_normalized"]
    lines += [f"| **mean** | | **{_fmt(m.get(ref))}** | **{_fmt(m.get(pri))}** | | | | |", ""]
    if res["ratio"] is not None:
        lines.append(f"- {pri} / {ref} mean normalized score: **{res['ratio']:.3f}** (paper "
                     "Table 1: 96.22 / 107.54 = 0.895).")
    if n_seeds > 1:
        lines.append("- Mean over datasets per seed: " + "; ".join(
            f"{a} " + ", ".join(f"seed {s} {v:.1f}" for s, v in per.items())
            for a, per in res["mean_normalized_per_seed"].items()) + ".")
    ids = {n: res["dataset_info"][n].get("env_id") for n in res["datasets"]}
    shared = {e for e in ids.values() if e and list(ids.values()).count(e) > 1}
    if shared:
        lines.append(f"- Datasets of one env ({', '.join(sorted(shared))}) share that env's "
                     f"task context, so {pri} has one policy for them, trained on all of "
                     f"them and scored against each dataset's references; {ref} trains one "
                     "policy per dataset.")
    if res["perf"]:
        frac = np.mean([p["perf/data_wait_fraction"] for p in res["perf"].values()])
        rate = np.mean([p["perf/grad_steps_per_s"] for p in res["perf"].values()])
        lines.append(f"- {pri} data-wait fraction of step time: **{100 * frac:.2f} %**; "
                     f"gradient steps/s: **{rate:.2f}** (each step: every dataset's minibatch "
                     "and all three IQL losses).")
    params = res["num_parameters"]
    if params.get(pri):
        per = {k: v for k, v in params.items() if k.startswith(f"{ref}_")}
        lines.append(f"- Parameters (policy, V, twin Q and target): {pri} {params[pri]:,} for "
                     f"all datasets; {ref} {sum(per.values()):,} in all (" + ", ".join(
                         f"{k[len(ref) + 1:]} {v:,}" for k, v in per.items()) + ").")
    if res["wall_s"]:
        walls = {k: np.mean(list(v.values())) / 60 for k, v in res["wall_s"].items()}
        lines.append("- Wall time per run (mean over seeds): " + ", ".join(
            f"{k} {v:.1f} min" for k, v in walls.items()) + f"; {sum(walls.values()):.1f} min "
            "per seed in all.")
    lines.append("")
    steps_seen = sorted({t for c in res["curves"][pri].values() for cs in c.values()
                         for t, _ in cs})
    if steps_seen:
        # one final evaluation hides how much a policy moves between evaluations
        lines += [f"Normalized score at every evaluation ({ref} / {pri}, mean over seeds):", "",
                  "| dataset | " + " | ".join(f"step {t:,}" for t in steps_seen) + " |",
                  "|---|" + "---|" * len(steps_seen)]
        for n in res["datasets"]:
            at = {a: _mean_curve(res["curves"][a][n]) for a in (ref, pri)}
            lines.append(f"| {n} | " + " | ".join(
                f"{_fmt((at[ref].get(t), None))} / {_fmt((at[pri].get(t), None))}"
                for t in steps_seen) + " |")
        lines.append("")
    made = {n: i for n, i in res["dataset_info"].items() if "transitions" in i}
    if made:
        lines += ["Datasets made here (reused once made; seeds fixed):", "",
                  "| dataset | transitions | random return | behaviour policies × episodes "
                  "(return) |", "|---|---|---|---|"]
        for n, i in made.items():
            lines.append(f"| {n} | {i['transitions']:,} | {i['random_return']:.1f} | " + ", ".join(
                f"{p['policy']} × {p['episodes']} ({p['return']:.1f})"
                for p in i["policies"]) + " |")
        lines.append("")
    lines += [f"Reproduce: `rl-agnostic experiment {_command_target(exp)} --scale {exp.scale} "
              f"--seeds {' '.join(map(str, res['seeds']))}` (writes this file, results.json, "
              "curves.png and config.yaml).", ""]
    path.write_text("\n".join(lines))


def _mean_curve(per_seed: dict[str, list]) -> dict[int, float]:
    by_step: dict[int, list[float]] = {}
    for curve in per_seed.values():
        for t, v in curve:
            by_step.setdefault(t, []).append(v)
    return {t: float(np.mean(v)) for t, v in by_step.items()}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = res["datasets"]
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.2 * rows), squeeze=False)
    for ax, n in zip(axes.ravel(), names):
        for a in res["agents"]:
            curves = [c for c in res["curves"][a][n].values() if c]
            if not curves:
                continue
            steps = sorted({t for c in curves for t, _ in c})
            ys = np.array([[dict(c).get(t, np.nan) for t in steps] for c in curves])
            label = f"{a} ({'all datasets' if a == res['primary'] else 'per dataset'})"
            line, = ax.plot(steps, np.nanmean(ys, 0), marker="o", label=label)
            if len(curves) > 1:
                ax.fill_between(steps, np.nanmin(ys, 0), np.nanmax(ys, 0),
                                color=line.get_color(), alpha=0.15)
        ax.axhline(100, color="grey", lw=0.8, ls="--")
        ax.set_title(n, fontsize=10)
        ax.set_xlabel("gradient step")
        ax.set_ylabel("normalized score")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels) or 1, fontsize=9)
    n = len(res["seeds"])
    fig.suptitle(f"{res['experiment']} ({res['scale']} scale, "
                 f"{'1 seed' if n == 1 else f'{n} seeds, mean and min–max'})")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_offline_report(exp: OfflineExperiment, out: str | Path,
                         say: Callable[[str], None] = print) -> dict:
    """Write results.md / results.json / curves.png / config.yaml; returns the results."""
    out = Path(out)
    res = collect_results(exp, out)
    if not res["seeds"]:
        raise FileNotFoundError(f"{out} holds no finished run of {exp.name} ({exp.scale} scale)")
    (out / "config.yaml").write_text(yaml.safe_dump(exp.resolved(), sort_keys=False))
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / DATASETS_FILE).write_text(json.dumps(res["dataset_info"], indent=1))
    write_markdown(exp, res, out / "results.md")
    plot(res, out / "curves.png")
    say(f"report: {out / 'results.md'}; mean normalized score " + ", ".join(
        f"{a} {_fmt(m)}" for a, m in res["mean_normalized"].items())
        + ("" if res["ratio"] is None else f"; {exp.primary}/{exp.reference} {res['ratio']:.3f}"))
    return res
