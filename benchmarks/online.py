"""Online multi-env PPO on the cpu-scale classic suite (issue: online DD-PPO on RLlib).

One agnostic agent trained on CartPole-v1, Acrobot-v1, Pendulum-v1 and LunarLander-v3 at once
(``tune_configs/classic4_cpu.yaml``) against four single-env agents (``model.kind: single``) with
the same per-env budget, hyperparameters and code, plus stock RLlib PPO (its default config and
MLP) on CartPole alone for the speed reference, measured right before and right after the agnostic
run (their mean is the reference), all in this one run.

- score: mean return of deterministic evaluation episodes of the final checkpoint
  (`rl_agnostic.online.agent.evaluate`), per env;
- random score: mean return of uniformly random actions, measured here;
- normalized score (paper §4.2): 100·(score − random)/(single-env score − random). Undefined
  (null, left out of the mean) where the single-env agent is not clearly better than random
  (by less than 5 % of the random score's magnitude, or 10 return units): the ratio of two
  noise-level differences says nothing;
- env-steps/s: env steps over wall time of all iterations but the first (which includes actor
  start-up and warm-up), for our multi-env run and for stock RLlib PPO on CartPole.

Writes ``results/online.md``, ``results/online.json`` and ``results/online.png`` (one panel per
env, training return vs env steps, agnostic vs single).

    python benchmarks/online.py                       # 150k env steps per env (~1 h on 2 cores)
    python benchmarks/online.py --env-steps 4000 --out /tmp/x   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from rl_agnostic.experiments.report import load_curves, normalize, random_score

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "tune_configs" / "classic4_cpu.yaml"


def stock_rllib_cartpole(iterations: int) -> dict:
    """Stock RLlib PPO (default PPOConfig, default MLP RLModule) on CartPole-v1."""
    import ray
    from ray.rllib.algorithms.ppo import PPOConfig

    ray.init(include_dashboard=False, logging_level="WARNING")
    algo = PPOConfig().environment("CartPole-v1").build_algo()
    try:
        t0 = s0 = None
        for i in range(iterations):
            result = algo.train()
            steps = result["env_runners"]["num_env_steps_sampled_lifetime"]
            if i == 0:
                t0, s0 = time.perf_counter(), steps
        rate = (steps - s0) / (time.perf_counter() - t0)
        return {"env_steps_per_s": rate, "iterations": iterations,
                "return": result["env_runners"].get("episode_return_mean")}
    finally:
        algo.stop()
        ray.shutdown()


def run(cfg, env_steps: int, eval_episodes: int) -> dict:
    """Train ``cfg``; per-iteration curves, throughput and final evaluation."""
    import ray

    from rl_agnostic.online.agent import evaluate
    from rl_agnostic.online.trainer import OnlineTrainer

    trainer = OnlineTrainer(cfg, stop_env_steps=env_steps)
    curves: dict[str, list] = {e: [] for e in cfg.env_ids}
    t_first = s_first = None
    try:
        for item in trainer.iterate():
            for e in cfg.env_ids:
                if e in item.returns:
                    curves[e].append((item.env_steps[e], item.returns[e]))
            if t_first is None:
                t_first, s_first = time.perf_counter(), item.metrics["num_env_steps"]
            last = item
        wall = time.perf_counter() - t_first
        ckpt = trainer.dir
    finally:
        trainer.stop()
        ray.shutdown()
    rate = (last.metrics["num_env_steps"] - s_first) / wall if wall > 0 else float("nan")
    evals = {e: evaluate(ckpt, e, eval_episodes)["mean"] for e in cfg.env_ids}
    return {"curves": curves, "env_steps_per_s": rate, "train_returns": last.returns,
            "eval": evals, "num_parameters": trainer.num_parameters,
            "iterations": last.iteration, "wall_s": wall}


def main() -> None:
    from rl_agnostic.online.config import load_train_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default=str(SUITE))
    ap.add_argument("--env-steps", type=int, default=150_000, help="env steps per env type")
    ap.add_argument("--eval-episodes", type=int, default=20)
    ap.add_argument("--random-episodes", type=int, default=50)
    ap.add_argument("--stock-iterations", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--rerender", action="store_true",
                    help="only rewrite online.md/.png from online.json and the runs' metrics")
    args = ap.parse_args()
    out = Path(args.out)
    if args.rerender:
        rerender(out)
        return
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = str(out / "online_runs")
    base = load_train_config(args.suite)
    base = base.replace(run={"output_dir": runs_dir, "seed": args.seed})
    envs = base.env_ids

    t0 = time.perf_counter()
    rand = {e: random_score(e, args.random_episodes) for e in envs}
    print("random scores:", {e: round(v, 1) for e, v in rand.items()}, flush=True)
    # Stock PPO right before and right after the agnostic run: the machine's speed drifts over
    # the ~40 min between them, and the mean of both brackets it.
    stock_rates = [stock_rllib_cartpole(args.stock_iterations)["env_steps_per_s"]]
    agnostic = run(base.replace(name="agnostic"), args.env_steps, args.eval_episodes)
    print(f"agnostic: {agnostic['env_steps_per_s']:.0f} env-steps/s, eval {agnostic['eval']}",
          flush=True)
    stock_rates.append(stock_rllib_cartpole(args.stock_iterations)["env_steps_per_s"])
    stock_rate = float(np.mean(stock_rates))
    print(f"stock RLlib PPO CartPole: {stock_rate:.0f} env-steps/s (before / after: "
          f"{stock_rates[0]:.0f} / {stock_rates[1]:.0f})", flush=True)
    single: dict[str, dict] = {}
    for i, e in enumerate(envs):
        entry = base.envs[i]
        cfg = base.replace(name=f"single_{e}", envs=[dataclasses.asdict(entry)],
                           model={"kind": "single"}, resources={"num_env_runners": 1})
        single[e] = run(cfg, args.env_steps, args.eval_episodes)
        print(f"single {e}: eval {single[e]['eval'][e]:.1f}", flush=True)

    normalized = normalized_scores(agnostic["eval"], {e: single[e]["eval"][e] for e in envs}, rand)
    defined = [v for v in normalized.values() if v is not None]
    summary = {
        "normalized": normalized,
        "normalized_mean": float(np.mean(defined)) if defined else None,
        "returns": {"agnostic": agnostic["eval"], "single": {e: single[e]["eval"][e] for e in envs}},
        "train_returns": {"agnostic": agnostic["train_returns"],
                          "single": {e: single[e]["train_returns"].get(e) for e in envs}},
        "random": rand,
        "env_steps_per_s": agnostic["env_steps_per_s"],
        "stock_rllib_env_steps_per_s": stock_rate,
        "stock_rllib_env_steps_per_s_before_after": stock_rates,
        "speed_ratio": agnostic["env_steps_per_s"] / stock_rate,
        "env_steps_per_env": args.env_steps,
        "num_parameters": {"agnostic": agnostic["num_parameters"],
                           "single": {e: single[e]["num_parameters"] for e in envs}},
        "wall_s": {"total": time.perf_counter() - t0, "agnostic": agnostic["wall_s"],
                   "single": {e: single[e]["wall_s"] for e in envs}},
        "config": base.to_dict(),
    }
    (out / "online.json").write_text(json.dumps(summary, indent=2, default=float))
    write_markdown(out / "online.md", summary)
    plot(out / "online.png", envs, agnostic["curves"], {e: single[e]["curves"][e] for e in envs},
         rand)
    print(json.dumps({k: summary[k] for k in ("normalized", "normalized_mean", "returns",
                                             "env_steps_per_s", "stock_rllib_env_steps_per_s")},
                     indent=2, default=float))


def normalized_scores(agnostic: dict, single: dict, rand: dict) -> dict[str, float | None]:
    return {e: normalize(agnostic[e], rand[e], single[e]) for e in agnostic}


def rerender(out: Path) -> None:
    """Rewrite online.md/.png from online.json and the runs' metrics.jsonl (no training)."""
    s = json.loads((out / "online.json").read_text())
    envs = list(s["random"])
    s["normalized"] = normalized_scores(s["returns"]["agnostic"], s["returns"]["single"], s["random"])
    defined = [v for v in s["normalized"].values() if v is not None]
    s["normalized_mean"] = float(np.mean(defined)) if defined else None
    (out / "online.json").write_text(json.dumps(s, indent=2, default=float))
    write_markdown(out / "online.md", s)
    runs = out / "online_runs"
    agn = load_curves(runs / "agnostic" / "metrics.jsonl", envs)
    sgl = {e: load_curves(runs / f"single_{e}" / "metrics.jsonl", [e])[e] for e in envs}
    plot(out / "online.png", envs, agn, sgl, s["random"])


def write_markdown(path: Path, s: dict) -> None:
    envs = list(s["normalized"])
    lines = [
        "# Online multi-env PPO: one agnostic agent vs single-env agents (cpu scale)",
        "",
        (f"{s['env_steps_per_env']:,} env steps per env type, `tune_configs/classic4_cpu.yaml` "
         f"(cpu network preset, dropout 0{_own_discounts(s)}), seed "
         f"{s['config']['run']['seed']}. Scores: deterministic evaluation of the final checkpoint; "
         "normalized = 100·(score − random)/(single-env score − random) (paper §4.2); "
         "'undefined' where the single-env agent is not clearly above random "
         "(by < max(5 % of |random|, 10)), and left out of the mean."),
        "",
        "| env | random | single-env | agnostic | normalized | train return (agn / single) |",
        "|---|---|---|---|---|---|",
    ]
    for e in envs:
        ta, ts = s["train_returns"]["agnostic"].get(e), s["train_returns"]["single"].get(e)
        lines.append(
            f"| {e} | {s['random'][e]:.1f} | {s['returns']['single'][e]:.1f} | "
            f"{s['returns']['agnostic'][e]:.1f} | {_fmt(s['normalized'][e], 'undefined')} | "
            f"{_fmt(ta)} / {_fmt(ts)} |")
    lines += [
        f"| **mean** (defined envs) | | | | **{_fmt(s['normalized_mean'], 'undefined')}** | |",
        "",
        "| throughput | env-steps/s |",
        "|---|---|",
        f"| agnostic, 4 env types (this run) | {s['env_steps_per_s']:.0f} |",
        ("| stock RLlib PPO, default MLP, CartPole-v1 (mean of before / after) | "
         f"{s['stock_rllib_env_steps_per_s']:.0f} ({_before_after(s)}) |"),
        f"| ratio | {s['speed_ratio']:.2f} |",
        "",
        f"Parameters: agnostic {s['num_parameters']['agnostic']:,} (one network for all envs); "
        "single-env agents " + ", ".join(f"{e} {n:,}" for e, n in
                                         s["num_parameters"]["single"].items()) + ".",
        "",
        f"Wall time: {s['wall_s']['total'] / 60:.1f} min in total.",
        "",
        "![learning curves](online.png)",
    ]
    path.write_text("\n".join(lines) + "\n")


def _own_discounts(s: dict) -> str:
    own = [f"{e['id']} γ {e['gamma']}" for e in s["config"]["envs"] if e.get("gamma") is not None]
    if not own:
        return ""
    return f"; {', '.join(own)} for both agents, the rest γ {s['config']['ppo']['gamma']}"


def _before_after(s: dict) -> str:
    rates = s.get("stock_rllib_env_steps_per_s_before_after")
    return " / ".join(f"{r:.0f}" for r in rates) if rates else "before only"


def _fmt(x, missing: str = "-") -> str:
    return missing if x is None else f"{x:.1f}"


def plot(path: Path, envs: list[str], agnostic: dict, single: dict, rand: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2
    rows = -(-len(envs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, 3.6 * rows), squeeze=False)
    for ax, e in zip(axes.ravel(), envs):
        for label, curve in (("agnostic (all envs)", agnostic[e]), ("single-env", single[e])):
            if curve:
                x, y = zip(*curve)
                ax.plot(x, y, label=label)
        ax.axhline(rand[e], color="grey", ls=":", label="random")
        ax.set_title(e)
        ax.set_xlabel("env steps (this env)")
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:g}k")
        ax.set_ylabel("episode return")
        ax.grid(alpha=0.3)
    axes.ravel()[0].legend()
    for ax in axes.ravel()[len(envs):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
