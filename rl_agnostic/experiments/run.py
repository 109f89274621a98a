"""Execute an experiment's runs in order, resumably, then write its report.

Each run is an ordinary online run (`rl_agnostic.online.trainer.OnlineTrainer`) in
``<out>/runs/<phase>/seed<k>/<run name>/``. A finished run leaves ``done.json`` (wall time,
parameter count, env steps) and is skipped when the experiment is started again; an unfinished one
resumes from its latest checkpoint. A transfer run starts from the final checkpoint of the same
agent's run in the ``init_from`` phase. A run from fresh weights that another experiment next to
this one already finished with the same config is copied instead of trained
(`find_identical_run`). Two parent runs of one experiment whose configs differ only in their
name (agents that differ only in how they transfer) train once (`twin_parents`). One local Ray
serves every run.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from rl_agnostic.experiments.spec import Experiment, Run
from rl_agnostic.nn.config import ConfigError, NetworkConfig
from rl_agnostic.online.config import EnvEntry, RunSettings
from rl_agnostic.online.trainer import (atomic_write_text, latest_checkpoint, run_dir,
                                        write_run_config)

DONE_FILE = "done.json"


def run_done(run: Run) -> dict | None:
    """The run's done.json, or None while it has not finished."""
    path = run_dir(run.config) / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _comparable(saved: dict, run: Run) -> tuple[dict, dict]:
    """(saved config as today's code reads it, ``run``'s config), both without output_dir: equal
    when the saved run is this run."""
    saved = copy.deepcopy(saved)
    wanted = run.config.to_dict()
    # a run saved before a run setting existed (``transfer_shrink``) ran with its default
    if isinstance(saved.get("run"), dict):
        saved["run"] = {**dataclasses.asdict(RunSettings()), **saved["run"]}
    # the results directory may have moved since
    saved.get("run", {}).pop("output_dir", None)
    wanted["run"].pop("output_dir", None)
    # ... and one saved before an env-entry field existed (``gamma``) with that field's default
    saved["envs"] = [{**dataclasses.asdict(EnvEntry(id=e.get("id"))), **e}
                     if isinstance(e, dict) else e for e in saved.get("envs") or []]
    model = saved.get("model")
    if isinstance(model, dict) and isinstance(model.get("network"), dict):
        # a run saved before a network field existed ran with the value that field reproduces
        model["network"] = NetworkConfig.from_saved(model["network"]).to_dict()
        if run.config.model.kind != "agnostic":  # only the agnostic encoder reads it
            model["network"].pop("encoder_position", None)
            wanted["model"]["network"].pop("encoder_position", None)
    return saved, wanted


def check_run_dir(run: Run) -> None:
    """A run directory from an earlier start (to skip or resume, possibly another experiment's
    sharing it) must hold the same config: otherwise its results would be reported as this run's."""
    path = run_dir(run.config) / "config.yaml"
    if not path.is_file():
        return
    saved, wanted = _comparable(yaml.safe_load(path.read_text()), run)
    if saved != wanted:
        diff = sorted(f"{section}.{k}" for section in wanted
                      if isinstance(wanted[section], dict) and isinstance(saved.get(section), dict)
                      for k in set(wanted[section]) | set(saved[section])
                      if wanted[section].get(k) != saved[section].get(k))
        raise ConfigError(
            f"{path.parent} holds a run with a different config ({', '.join(diff) or 'envs/name'}"
            "); remove that directory or give the experiment another --out")


def find_identical_run(run: Run, search_root: Path) -> Path | None:
    """A finished run directory of another experiment in ``search_root`` (e.g. mix16's
    single-env CartPole run for mujoco_to_classic's) whose config is ``run``'s, or None. Only
    for runs that start from fresh weights: a run of the same config and seed trains the same
    on the same machine (its records came out identical), so training it again adds nothing."""
    if run.init_from is not None:
        return None
    own = run_dir(run.config).absolute()
    # experiments' layout only (<root>/<experiment>/runs/<phase>/seed<k>/<run>): a bounded walk
    # even when --out's parent is a large directory
    pattern = f"*/runs/*/seed*/{glob.escape(run.config.name)}/{DONE_FILE}"
    for done in sorted(search_root.glob(pattern)):
        directory = done.parent.absolute()
        if directory == own or not (directory / "metrics.jsonl").is_file():
            continue
        try:
            saved = yaml.safe_load((directory / "config.yaml").read_text())
            finished = json.loads(done.read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if not isinstance(saved, dict) or finished.get("init_from") is not None:
            continue
        try:
            saved, wanted = _comparable(saved, run)
        except (ConfigError, TypeError, AttributeError):  # a config today's code cannot read
            continue
        if saved == wanted:
            return directory
    return None


def reuse_run(run: Run, source: Path, search_root: Path) -> dict:
    """Make ``run`` finished with ``source``'s records (metrics and done.json, which then names
    the run that trained them); returns the new done.json."""
    directory = run_dir(run.config)
    write_run_config(directory, run.config)
    atomic_write_text(directory / "metrics.jsonl", (source / "metrics.jsonl").read_text())
    done = json.loads((source / DONE_FILE).read_text())
    # a copy of a copy names the run that trained
    done.setdefault("reused_from", str(source.relative_to(search_root.absolute())
                                       if source.is_relative_to(search_root.absolute())
                                       else source))
    atomic_write_text(directory / DONE_FILE, json.dumps(done, indent=2))
    return done


def twin_parents(runs: list[Run]) -> dict[Path, Run]:
    """Run directory -> the earlier run it is a twin of: both initialize other runs and their
    configs (seed included) differ only in the name (e.g. two agents whose pretraining is the
    same and whose transfers start differently). A twin takes its original's records and its
    children start from the original's checkpoint, since a run of one config and seed trains the
    same on one machine."""
    parents = {run_dir(r.init_from.config): r.init_from for r in runs if r.init_from is not None}
    originals: dict[str, Run] = {}  # the config without its name -> first parent with it
    twins = {}
    for run in parents.values():
        unnamed = run.config.to_dict()
        unnamed.pop("name")
        text = json.dumps(unnamed, sort_keys=True)
        if text in originals:
            twins[run_dir(run.config)] = originals[text]
        else:
            originals[text] = run
    return twins


def execute_run(run: Run, log: Callable[[str], None], parent: Run | None = None) -> dict:
    """Train one run to its budget (resuming when it has a checkpoint); returns its done.json.
    ``parent``: the run whose final weights a transfer run starts from, when not
    ``run.init_from`` (that one's original, `twin_parents`)."""
    from rl_agnostic.online.trainer import OnlineTrainer

    directory = run_dir(run.config)
    resume = latest_checkpoint(directory.absolute()) is not None
    parent = parent or run.init_from
    init_from = None
    if parent is not None and not resume:
        init_from = str(run_dir(parent.config).absolute())
    t0 = time.perf_counter()
    trainer = OnlineTrainer(run.config, resume=resume, init_from=init_from, log=log)
    last = None
    try:
        for last in trainer.iterate():
            pass
        params = trainer.num_parameters
    finally:
        trainer.stop()
    done = {"wall_s": time.perf_counter() - t0, "num_parameters": params,
            "env_steps": last.env_steps if last else {}, "init_from": init_from,
            "resumed": resume}
    atomic_write_text(directory / DONE_FILE, json.dumps(done, indent=2))
    return done


def _reuse_identical_runs(runs: list[Run], todo: list[Run], search_root: Path,
                          say: Callable[[str], None]) -> list[Run]:
    """``todo`` without the runs that `reuse_run` made finished."""
    # a parent's checkpoint is not reused (results keep no checkpoints), so a parent trains
    parents = {run_dir(r.init_from.config).absolute() for r in runs if r.init_from}
    left = []
    for run in todo:
        directory = run_dir(run.config).absolute()
        source = (None if directory in parents or latest_checkpoint(directory) is not None
                  else find_identical_run(run, search_root))
        if source is None:
            left.append(run)
            continue
        reuse_run(run, source, search_root)
        say(f"[{run.phase} seed{run.seed} {run.config.name}] reused the records of "
            f"{source}: a finished run of the same config")
    return left


def run_experiment(exp: Experiment, out_dir: str | Path, *,
                   log: Callable[[str], None] | None = None, reuse_runs: bool = True) -> dict:
    """Run every unfinished run of ``exp``, then write the report; returns the report's summary.

    ``reuse_runs``: a run that starts from fresh weights, has no checkpoint yet and initializes no
    other run takes the records of a finished run of the same config under ``out_dir``'s parent
    (other experiments' results, `find_identical_run`) instead of training, and a parent run that
    is an earlier one's twin (`twin_parents`) takes that one's records."""
    import ray

    from rl_agnostic.experiments.report import measure_random_scores, write_report

    say = log or (lambda text: print(text, flush=True))
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    runs = exp.runs(out)
    for r in runs:
        check_run_dir(r)
    todo = [r for r in runs if run_done(r) is None]
    say(f"experiment {exp.name} ({exp.scale} scale): {len(runs)} runs over seeds "
        f"{list(exp.seeds)}, {len(runs) - len(todo)} already done; results in {out}")
    if reuse_runs:
        todo = _reuse_identical_runs(runs, todo, out.parent, say)
    twins = twin_parents(runs) if reuse_runs else {}
    measure_random_scores(exp, out, say)
    started_ray = not ray.is_initialized()
    t_start = time.perf_counter()
    try:
        for i, run in enumerate(todo, 1):
            prefix = f"[{i}/{len(todo)} {run.phase} seed{run.seed} {run.config.name}]"
            directory = run_dir(run.config)
            twin = twins.get(directory)
            if twin is not None and latest_checkpoint(directory.absolute()) is None:
                reuse_run(run, run_dir(twin.config).absolute(), out.parent)
                say(f"{prefix} reused the records of {twin.config.name}, its twin (the same "
                    "config but for the name); its transfer runs start from that one's weights")
                continue
            parent = run.init_from and twins.get(run_dir(run.init_from.config), run.init_from)
            say(f"{prefix} {run.mode}: {len(run.config.envs)} env types, "
                f"{run.config.run.env_steps_per_env:,} env steps each"
                + (f", from {parent.key}" if parent else ""))
            done = execute_run(run, lambda text, p=prefix: say(f"{p} {text}"), parent)
            elapsed = time.perf_counter() - t_start
            say(f"{prefix} done in {done['wall_s'] / 60:.1f} min "
                f"({elapsed / 60:.1f} min since start, {len(todo) - i} left)")
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    return write_report(exp, out, say)
