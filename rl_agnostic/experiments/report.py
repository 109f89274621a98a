"""An experiment's results: scores, normalized scores, parameter counts, tables and plots.

- **score** of a run on an env: its training return curve (``env/<id>/episode_return_mean`` per
  iteration, from ``metrics.jsonl``); *final* = mean over the last ``final_fraction`` of its
  iterations, *best* = the curve's maximum.
- **random score**: mean return of uniformly random actions, measured (``random.json``).
- **normalized score** (paper §4.2): 100·(score − random)/(reference − random), the reference
  being the reference single-env agent's best score on that env (mean over seeds). Undefined
  (left out of means) where the reference is not clearly above random (by less than
  max(5 % of |random|, 10)): a ratio of two noise-level differences says nothing.
- **parameters**: of each agent's network in each phase, and — for transfer phases — of the
  network that serves every env seen so far (old and new: the specific agent keeps its pretrained
  envs' layers and adds new ones, the agnostic network is unchanged).

Files in the output directory: ``results.md`` (tables), ``results.json``, ``<phase>.png`` (one
panel per env, every agent, mean over seeds with the min–max band), ``config.yaml``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rl_agnostic.experiments.spec import EXPERIMENTS_DIR, Experiment, Run
from rl_agnostic.online.trainer import run_dir

RANDOM_FILE = "random.json"


def random_score(env_id: str, episodes: int, seed: int = 0,
                 env_kwargs: dict | None = None) -> float:
    """Mean return of uniformly random actions over ``episodes`` episodes."""
    from rl_agnostic.online.agent import episode_returns
    from rl_agnostic.online.envs import SingleEnvTypeMultiAgentEnv

    probe = SingleEnvTypeMultiAgentEnv(env_id, seed=seed, env_kwargs=env_kwargs)
    space = probe.action_spaces[env_id]
    probe.close()
    space.seed(seed)
    return float(np.mean(episode_returns(env_id, lambda obs: [space.sample() for _ in obs],
                                         episodes, seed, env_kwargs)))


def measure_random_scores(exp: Experiment, out: Path,
                          say: Callable[[str], None] = print) -> dict[str, float]:
    """Random scores of every env of ``exp``, cached in ``<out>/random.json``."""
    path = out / RANDOM_FILE
    cached = json.loads(path.read_text()) if path.is_file() else {}
    for phase in exp.phases:
        for env in phase.envs:
            if env.env_id not in cached:
                cached[env.env_id] = random_score(env.env_id, exp.random_episodes,
                                                  env_kwargs=env.kwargs or None)
                say(f"random score {env.env_id}: {cached[env.env_id]:.1f} "
                    f"({exp.random_episodes} episodes)")
    path.write_text(json.dumps(cached, indent=2))
    return cached


def load_curves(metrics_file: Path, env_ids: list[str]) -> dict[str, list[tuple[int, float]]]:
    """(env steps of that env, episode return mean) per iteration of a run's metrics.jsonl."""
    curves: dict[str, list] = {e: [] for e in env_ids}
    if not metrics_file.is_file():
        return curves
    for line in metrics_file.read_text().splitlines():
        m = json.loads(line)
        for e in env_ids:
            if f"env/{e}/episode_return_mean" in m:
                curves[e].append((m[f"env/{e}/env_steps"], m[f"env/{e}/episode_return_mean"]))
    return curves


def final_score(curve: list[tuple[int, float]], fraction: float) -> float | None:
    if not curve:
        return None
    k = max(1, round(len(curve) * fraction))
    return float(np.mean([r for _, r in curve[-k:]]))


def best_score(curve: list[tuple[int, float]]) -> float | None:
    return float(max(r for _, r in curve)) if curve else None


def normalize(score: float | None, rand: float, ref: float | None) -> float | None:
    if score is None or ref is None:
        return None
    margin = max(0.05 * abs(rand), 10.0)
    return 100.0 * (score - rand) / (ref - rand) if ref - rand > margin else None


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None, 0
    return float(np.mean(v)), (float(np.std(v)) if len(v) > 1 else None), len(v)


def collect(exp: Experiment, out: Path) -> dict[str, Any]:
    """Everything the tables and plots show, from the finished runs on disk."""
    from rl_agnostic.experiments.run import run_done

    rand = json.loads((out / RANDOM_FILE).read_text())
    runs = exp.runs(out)
    by_phase: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_phase[r.phase].append(r)
    result: dict[str, Any] = {"experiment": exp.name, "scale": exp.scale,
                              "seeds": list(exp.seeds), "env_steps_per_env": exp.env_steps_per_env,
                              "random": rand, "phases": {}, "missing_runs": []}
    seed_wall: dict[int, float] = defaultdict(float)  # all phases: the cpu budget is per seed
    for phase in exp.phases:
        env_ids = exp.env_ids(phase.name)
        # label -> env -> seed -> (final, best, curve)
        table: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
        params: dict[str, int] = {}
        wall: dict[str, float] = defaultdict(float)
        reused: list[float] = []  # wall times of runs whose records another run made
        for r in by_phase[phase.name]:
            done = run_done(r)
            if done is None:
                result["missing_runs"].append(f"{r.key} (seed {r.seed})")
                continue
            wall[r.label] += done["wall_s"]
            seed_wall[r.seed] += done["wall_s"]
            if done.get("reused_from"):
                reused.append(done["wall_s"])
            if r.seed == exp.seeds[0]:
                if r.mode == "single":
                    params[r.label] = params.get(r.label, 0) + done["num_parameters"]
                else:
                    params[r.label] = done["num_parameters"]
            curves = load_curves(run_dir(r.config) / "metrics.jsonl", r.config.env_ids)
            for e, c in curves.items():
                table[r.label][e][r.seed] = {"final": final_score(c, exp.final_fraction),
                                             "best": best_score(c), "curve": c}
        ref_label = exp.reference
        ref = {e: _mean_std([s["best"] for s in table[ref_label][e].values()])[0]
               for e in env_ids}
        scores: dict[str, dict[str, dict]] = {}
        for label, per_env in table.items():
            scores[label] = {}
            for e in env_ids:
                seeds = per_env.get(e, {})
                order = sorted(seeds)
                entry = {}
                for what in ("final", "best"):
                    raw = [seeds[s][what] for s in order]
                    norm = [normalize(x, rand[e], ref[e]) for x in raw]
                    entry[what] = {"returns": raw, "seeds": order, "normalized": norm,
                                   "normalized_mean_std": _mean_std(norm)[:2],
                                   "return_mean_std": _mean_std(raw)[:2]}
                scores[label][e] = entry
        labels = list(scores)
        means = {}
        for label in labels:
            per_seed = defaultdict(list)
            for e in env_ids:
                final = scores[label][e]["final"]
                for s, x in zip(final["seeds"], final["normalized"]):
                    if x is not None:
                        per_seed[s].append(x)
            seed_means = [float(np.mean(v)) for v in per_seed.values() if v]
            means[label] = _mean_std(seed_means)[:2]
        result["phases"][phase.name] = {
            "envs": env_ids, "init_from": phase.init_from, "reference": ref, "labels": labels,
            "scores": scores, "normalized_final_mean": means, "parameters": params,
            "wall_s": dict(wall), "reused_runs": len(reused), "reused_wall_s": sum(reused),
            "curves": {lab: {e: {s: table[lab][e][s]["curve"] for s in table[lab].get(e, {})}
                             for e in env_ids} for lab in labels},
        }
        if phase.init_from:
            result["phases"][phase.name]["parameters_all_envs"] = _parameters_all_envs(
                exp, runs, phase)
        if exp.primary:
            result["phases"][phase.name]["primary_check"] = _primary_check(
                exp, scores, env_ids, transfer=bool(phase.init_from))
    result["wall_s_per_seed"] = dict(seed_wall)
    return result


def _parameters_all_envs(exp: Experiment, runs: list[Run], phase) -> dict[str, int]:
    """Parameters of each multi-env agent's network serving the envs of ``phase`` AND of the
    phase it transferred from (built from the envs of the runs' configs, not trained)."""
    from rl_agnostic.envs.make import env_spec
    from rl_agnostic.experiments.run import run_done
    from rl_agnostic.nn import build_actor_critic

    counts = {}
    by_key = {(r.phase, r.agent, r.mode, r.seed): r for r in runs}
    seed = exp.seeds[0]
    for agent, over in exp.agents.items():
        if over.get("model", {}).get("kind") == "single":
            continue
        pre = by_key.get((phase.init_from, agent, "plain", seed)) or \
            by_key.get((phase.init_from, agent, "transfer", seed))
        new = by_key.get((phase.name, agent, "transfer", seed))
        if pre is None or new is None or run_done(pre) is None or run_done(new) is None:
            continue
        # from the runs' configs, not their checkpoints: committed run records carry no weights
        specs = {e.env_id: env_spec(e.env_id, **e.kwargs)
                 for r in (pre, new) for e in r.config.envs}
        net = build_actor_critic(new.config.model.kind, new.config.model.network, specs.values())
        counts[agent] = sum(p.numel() for p in net.parameters())
    return counts


def _primary_check(exp: Experiment, scores: dict, env_ids: list[str],
                   transfer: bool = True) -> dict[str, Any]:
    """Per env: is the primary agent's final score (mean over seeds) ≥ each other column's? In a
    transfer phase the primary's transfer run against the other multi-env columns (the issue's
    comparison); in a phase trained from scratch its run against every other agent, the reference
    included (paper Fig. 2: one agent against the single-env agents). ``per_seed``: the same count
    for each seed both columns have, when there are several."""
    primary = f"{exp.primary} (transfer)" if transfer else exp.primary
    if primary not in scores:
        return {}
    out: dict[str, Any] = {"primary": primary, "versus": {}}
    for other in scores:
        if other == primary or (transfer and other.startswith(exp.reference)):
            continue
        wins = {}
        for e in env_ids:
            a = scores[primary][e]["final"]["return_mean_std"][0]
            b = scores[other][e]["final"]["return_mean_std"][0]
            wins[e] = None if a is None or b is None else bool(a >= b)
        out["versus"][other] = {"per_env": wins,
                                "count": sum(1 for w in wins.values() if w),
                                "of": sum(1 for w in wins.values() if w is not None),
                                "per_seed": _count_per_seed(scores[primary], scores[other],
                                                            env_ids)}
    return out


def _count_per_seed(primary: dict, other: dict, env_ids: list[str]) -> dict[int, int]:
    """Seed -> envs where ``primary``'s final return is ≥ ``other``'s on that seed; empty unless
    both columns have two or more seeds in common."""
    per_env = []
    for e in env_ids:
        a, b = primary[e]["final"], other[e]["final"]
        per_env.append((dict(zip(a.get("seeds", []), a.get("returns", []))),
                        dict(zip(b.get("seeds", []), b.get("returns", [])))))
    seeds = sorted(set.intersection(*(set(x) & set(y) for x, y in per_env))) if per_env else []
    if len(seeds) < 2:
        return {}
    return {s: sum(1 for x, y in per_env
                   if x[s] is not None and y[s] is not None and x[s] >= y[s]) for s in seeds}


def _fmt(ms: tuple | list | None) -> str:
    if not ms or ms[0] is None:
        return "–"
    mean, std = ms[0], ms[1]
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def write_markdown(exp: Experiment, result: dict, path: Path) -> None:
    lines = [f"# Experiment `{exp.name}` ({exp.scale} scale)", "", exp.description.strip(), "",
             f"**Scale `{exp.scale}`:** {exp.note or '(no note)'}", "",
             (f"Seeds {list(exp.seeds)}, {exp.env_steps_per_env:,} env steps per env type and "
              "run" + "".join(f" ({p.env_steps(exp.env_steps_per_env):,} in phase `{p.name}`)"
                              for p in exp.phases if p.env_steps_factor != 1.0)
              + ". Scores are training returns: *final* = mean over the last "
              f"{exp.final_fraction:.0%} of iterations, *best* = the curve's maximum. Normalized "
              "= 100·(score − random)/(best single-env score − random) (paper §4.2), mean ± std "
              "over seeds; – where undefined (the single-env agent not clearly above random)."),
             ""]
    if result["missing_runs"]:
        n = len(result["missing_runs"])
        lines += [f"**Incomplete:** {n} run{'s' if n != 1 else ''} not finished: "
                  + ", ".join(result["missing_runs"][:8])
                  + (" …" if n > 8 else ""), ""]
    for name, ph in result["phases"].items():
        labels = ph["labels"]
        title = f"## Phase `{name}`" + (f" (from `{ph['init_from']}`)" if ph["init_from"] else "")
        lines += [title, "", "Final normalized score:", "",
                  "| env | random | reference | " + " | ".join(labels) + " |",
                  "|---|---|---|" + "---|" * len(labels)]
        for e in ph["envs"]:
            ref = ph["reference"][e]
            cells = [_fmt(ph["scores"][lab][e]["final"]["normalized_mean_std"]) for lab in labels]
            lines.append(f"| {e} | {result['random'][e]:.1f} | "
                         f"{'–' if ref is None else f'{ref:.1f}'} | " + " | ".join(cells) + " |")
        lines.append("| **mean** (defined envs) | | | "
                     + " | ".join(f"**{_fmt(ph['normalized_final_mean'][lab])}**" for lab in labels)
                     + " |")
        lines += ["", "Best normalized score:", "",
                  "| env | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for e in ph["envs"]:
            lines.append(f"| {e} | " + " | ".join(
                _fmt(ph["scores"][lab][e]["best"]["normalized_mean_std"]) for lab in labels) + " |")
        lines += ["", "Final return (mean ± std over seeds):", "",
                  "| env | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for e in ph["envs"]:
            lines.append(f"| {e} | " + " | ".join(
                _fmt(ph["scores"][lab][e]["final"]["return_mean_std"]) for lab in labels) + " |")
        check = ph.get("primary_check")
        if check:
            lines += ["", f"`{check['primary']}` final return ≥ the other column's, per env:", "",
                      "| versus | envs where ≥ | " + " | ".join(ph["envs"]) + " |",
                      "|---|---|" + "---|" * len(ph["envs"])]
            for other, v in check["versus"].items():
                marks = ["–" if w is None else ("✓" if w else "✗") for w in v["per_env"].values()]
                seeds = v.get("per_seed") or {}
                count = f"{v['count']}/{v['of']}" + (
                    f" (per seed {', '.join(str(n) for n in seeds.values())})" if seeds else "")
                lines.append(f"| {other} | {count} | " + " | ".join(marks) + " |")
        lines += ["", "| agent | parameters (this phase) |"
                  + (" parameters serving all envs so far |" if ph.get("parameters_all_envs")
                     else ""),
                  "|---|---|" + ("---|" if ph.get("parameters_all_envs") else "")]
        for lab, n in ph["parameters"].items():
            row = f"| {lab} | {n:,}" + (" (one network per env, summed)" if
                                        lab.startswith(exp.reference) else "") + " |"
            if ph.get("parameters_all_envs"):
                agent = lab.split(" (")[0]
                n_all = ph["parameters_all_envs"].get(agent) if "(transfer)" in lab else None
                row += f" {n_all:,} |" if n_all else " |"
            lines.append(row)
        walls = ", ".join(f"{lab} {w / 60:.1f}" for lab, w in ph["wall_s"].items())
        total = sum(ph["wall_s"].values()) / 60
        reused = (f" It counts {ph['reused_runs']} runs ({ph['reused_wall_s'] / 60:.1f} min) whose "
                  "records were copied from a finished run of the same config (another "
                  "experiment's, or a twin's in this one; their done.json names it)."
                  if ph.get("reused_runs") else "")
        lines += ["", f"Wall time of this phase: {total:.1f} min ({walls}).{reused}", "",
                  f"![{name} learning curves]({name}.png)", ""]
    if result["wall_s_per_seed"]:
        lines += [("Wall time per seed, all phases: "
                   + ", ".join(f"seed {s} {w / 60:.1f} min"
                               for s, w in sorted(result["wall_s_per_seed"].items()))
                   + " (runs one after another on this machine)."), ""]
    # The seeds and budget are spelled out: a report may cover fewer seeds than the scale's.
    seeds = " ".join(str(s) for s in exp.seeds)
    lines += [(f"Config: [`config.yaml`](config.yaml). Reproduce: "
               f"`rl-agnostic experiment {_command_target(exp)} --scale {exp.scale} "
               f"--seeds {seeds} --env-steps {exp.env_steps_per_env}"
               + ("" if path.parent.name == exp.name else f" --out {_shown_path(path.parent)}")
               + "`.")]
    path.write_text("\n".join(lines) + "\n")


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when inside it (the repository, usually)."""
    path = path.absolute()
    return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


def _command_target(exp: Experiment) -> str:
    """What `rl-agnostic experiment` takes for ``exp``: a shipped experiment's name, else its
    file."""
    source = Path(exp.source)
    return exp.name if source.absolute().parent == EXPERIMENTS_DIR.absolute() else _shown_path(
        source)


def plot_phase(result: dict, phase: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ph = result["phases"][phase]
    envs = ph["envs"]
    cols = min(4, len(envs))
    rows = -(-len(envs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, e in zip(axes.ravel(), envs):
        for i, lab in enumerate(ph["labels"]):
            seeds = [c for c in ph["curves"][lab][e].values() if c]
            if not seeds:
                continue
            end = min(c[-1][0] for c in seeds)
            grid = np.linspace(min(c[0][0] for c in seeds), end, 50)
            ys = np.array([np.interp(grid, *zip(*c)) for c in seeds])
            color = colors[i % len(colors)]
            ax.plot(grid, ys.mean(0), label=lab, color=color,
                    ls="--" if "scratch" in lab else "-")
            if len(seeds) > 1:
                ax.fill_between(grid, ys.min(0), ys.max(0), color=color, alpha=0.15)
        ax.axhline(result["random"][e], color="grey", ls=":", label="random")
        ax.set_title(e, fontsize=10)
        ax.set_xlabel("env steps (this env)")
        ax.set_ylabel("episode return")
        ax.grid(alpha=0.3)
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    for ax in axes.ravel()[len(envs):]:
        ax.axis("off")
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9)
    n = len(result["seeds"])
    over = "1 seed" if n == 1 else f"{n} seeds, mean and min–max"
    fig.suptitle(f"{result['experiment']} — {phase} ({result['scale']} scale, {over})")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(exp: Experiment, out: Path, say: Callable[[str], None] = print) -> dict:
    """Write results.md / results.json / <phase>.png / config.yaml; returns the summary."""
    out = Path(out)
    result = collect(exp, out)
    (out / "config.yaml").write_text(yaml.safe_dump(exp.resolved(), sort_keys=False))
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    write_markdown(exp, result, out / "results.md")
    for phase in result["phases"]:
        plot_phase(result, phase, out / f"{phase}.png")
    summary = {p: ph["normalized_final_mean"] for p, ph in result["phases"].items()}
    say(f"report: {out / 'results.md'}; final normalized mean per phase and agent: "
        + json.dumps({p: {k: None if v[0] is None else round(v[0], 1) for k, v in m.items()}
                      for p, m in summary.items()}))
    return result
