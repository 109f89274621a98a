"""The ``rl-agnostic`` command.

    rl-agnostic train CONFIG.yaml [--stop-env-steps N] [--resume] [--init-from CKPT]
    rl-agnostic evaluate CKPT --env ID [--episodes N]
    rl-agnostic collect ENV_ID --policy POLICY:EPISODES [...] --out DIR --name NAME [--seed S]
    rl-agnostic offline CONFIG.yaml [--steps N] [--resume] [--output-dir DIR]
    rl-agnostic serve CKPT [--host H] [--port P]
    rl-agnostic tune SWEEP.yaml [--resume]
    rl-agnostic demo [--envs ID ...] [--steps N] [--num-envs K] [--d-model H]
                     [--network-config FILE.yaml] [--seed S]

``train`` runs DD-PPO over every env type of the config on RLlib (a local Ray started here, or the
cluster of ``RAY_ADDRESS``). ``evaluate`` acts deterministically with a checkpoint's policy (online
or offline). ``collect`` writes an offline dataset (Minari + parquet) from policy rollouts;
``offline`` trains DD-IQL over the config's datasets on Ray Train. ``serve`` puts a checkpoint's
policy behind one Ray Serve HTTP endpoint that acts in any of its envs (or a described new one).
``demo`` lets ONE untrained agnostic actor-critic act in several envs of different shapes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DEMO_ENVS = (
    "CartPole-v1",
    "Pendulum-v1",
    "LunarLander-v3",
    "envpool:HalfCheetah-v4",
    "Hopper-v5",
)


class CliError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


# ---------------------------------------------------------------------------------------------
# Network config files
# ---------------------------------------------------------------------------------------------


def load_network_config(path: str | Path | None = None, d_model: int | None = None):
    """`NetworkConfig` from a YAML file (see ``tune_configs/network_*.yaml``), else the CPU size.

    The file holds the network section: a mapping whose keys are `NetworkConfig` field names. A
    file whose top level is ``{network: {...}}`` is accepted too. ``d_model``, when given,
    overrides the file's; widths left unset in the file follow it.
    """
    import yaml

    from rl_agnostic.nn.config import NetworkConfig

    if path is None:
        return NetworkConfig.cpu() if d_model is None else NetworkConfig.cpu(d_model=d_model)
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CliError(f"cannot read network config {str(path)!r}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise CliError(f"network config {str(path)!r} is not valid YAML: {exc}") from None
    if isinstance(values, dict) and set(values) == {"network"}:
        values = values["network"]
    if not isinstance(values, dict):
        raise CliError(
            f"network config {str(path)!r} must be a mapping of NetworkConfig fields, "
            f"got {type(values).__name__}"
        )
    if d_model is not None:
        values = {**values, "d_model": d_model}
    try:
        return NetworkConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise CliError(f"network config {str(path)!r}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


@dataclass
class _Runner:
    """One environment id as a small vector env, with its bookkeeping."""

    env_id: str
    spec: Any
    env: Any
    obs: Any = None
    steps: int = 0
    seconds: float = 0.0
    episode_returns: list[float] = field(default_factory=list)
    running: Any = None
    autoreset: Any = None

    @property
    def env_steps(self) -> int:
        return self.steps * self.env.num_envs

    @property
    def rate(self) -> float:
        return self.env_steps / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_return(self) -> float:
        return sum(self.episode_returns) / len(self.episode_returns) if self.episode_returns else math.nan

    def action_text(self) -> str:
        if self.spec.is_discrete:
            return f"discrete {self.spec.action_dim}"
        low, high = min(self.spec.action_low), max(self.spec.action_high)
        return f"box {self.spec.action_dim} [{low:g},{high:g}]"

    def return_text(self) -> str:
        if not self.episode_returns:
            return "— (no episode finished yet)"
        n = len(self.episode_returns)
        return f"{self.mean_return:9.1f} ({n} episode{'s' if n != 1 else ''})"


def _act(net, runner: _Runner, torch, np) -> None:
    """One step of every copy of ``runner``'s env with actions sampled from the shared network."""
    env, spec = runner.env, runner.spec
    start = time.perf_counter()
    obs = torch.as_tensor(np.asarray(runner.obs, dtype=np.float32)).reshape(env.num_envs, -1)
    actions = net.sample(spec, net.actor(obs, spec)).numpy()
    space = env.single_action_space
    if spec.is_discrete:
        actions = actions.astype(space.dtype if space.dtype is not None else np.int64)
    else:
        # The Gaussian is unbounded; the env only accepts actions inside its Box.
        actions = np.clip(actions.reshape(env.num_envs, *space.shape), space.low, space.high)
        actions = actions.astype(space.dtype)
    runner.obs, reward, terminated, truncated, _ = env.step(actions)
    runner.seconds += time.perf_counter() - start
    runner.steps += 1
    # Both backends reset a finished copy on the NEXT step (reward 0 there): skip that step.
    live = ~runner.autoreset
    runner.running[live] += np.asarray(reward, dtype=np.float64)[live]
    done = np.logical_or(terminated, truncated) & live
    for i in np.flatnonzero(done):
        runner.episode_returns.append(float(runner.running[i]))
        runner.running[i] = 0.0
    runner.autoreset = done


def run_demo(
    env_ids: Sequence[str] = DEFAULT_DEMO_ENVS,
    steps: int = 500,
    num_envs: int = 4,
    d_model: int | None = None,
    network_config: str | None = None,
    seed: int = 0,
    log_every: int | None = None,
    out=None,
) -> list[_Runner]:
    """Act with one untrained agnostic network in every env of ``env_ids`` for ``steps`` steps."""
    out = out or sys.stdout

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    # Validate everything the user typed before building anything.
    from rl_agnostic.envs import check_env_id

    env_ids = list(dict.fromkeys(env_ids))
    for env_id in env_ids:
        try:
            check_env_id(env_id)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    cfg = load_network_config(network_config, d_model)

    import numpy as np
    import torch

    from rl_agnostic.envs import EnvSpec, make_env
    from rl_agnostic.nn.agnostic import AgnosticActorCritic

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo shares the machine; one thread is plenty at this size
    torch.manual_seed(seed)

    runners: list[_Runner] = []
    try:
        for env_id in env_ids:
            try:
                env = make_env(env_id, num_envs=num_envs, seed=seed)
            except Exception as exc:  # a registered env that cannot be built here (missing deps, ...)
                raise CliError(f"cannot build {env_id}: {type(exc).__name__}: {exc}") from None
            runners.append(_Runner(env_id, None, env))
            try:
                runners[-1].spec = EnvSpec.from_spaces(
                    env_id, env.single_observation_space, env.single_action_space)
            except (TypeError, ValueError) as exc:
                raise CliError(str(exc)) from None

        plural = "s" if len(runners) != 1 else ""
        say(f"rl-agnostic demo: one agnostic actor-critic acting in {len(runners)} environment"
            f"{plural} ({num_envs} copies each, {steps} steps per env)")
        say(f"network: d_model={cfg.d_model} s4_layers={cfg.s4_layers} "
            f"transformer_layers={cfg.transformer_layers} mlp_depth={cfg.mlp_depth} "
            f"embedding={cfg.embedding}"
            + (f"  (from {network_config})" if network_config else ""))
        net = AgnosticActorCritic(cfg).eval()
        n_params = sum(p.numel() for p in net.parameters())
        for r in runners:
            net.add_env(r.spec)
            r.obs, _ = r.env.reset()
            r.running = np.zeros(num_envs, dtype=np.float64)
            r.autoreset = np.zeros(num_envs, dtype=bool)
        n_params_after = sum(p.numel() for p in net.parameters())
        say(f"parameters: {n_params_after:,}: the same network for all {len(runners)} env"
            f"{plural} (registering them added {n_params_after - n_params:,})")
        say()

        width = max(len(r.env_id) for r in runners)
        log_every = log_every or max(1, steps // 4)
        wall = time.perf_counter()
        with torch.inference_mode():
            for step in range(1, steps + 1):
                for r in runners:  # round-robin: every env advances together
                    _act(net, r, torch, np)
                if step % log_every == 0 or step == steps:
                    for r in runners:
                        say(f"{r.env_id:<{width}}  obs {r.spec.obs_dim:>3}  "
                            f"{r.action_text():<18} step {r.steps:>{len(str(steps))}}/{steps}  "
                            f"{r.rate:>8,.0f} env-steps/s  return {r.return_text()}")
                    say()
        wall = time.perf_counter() - wall
    finally:
        for r in runners:
            r.env.close()
        torch.set_num_threads(threads)

    header = (f"{'env':<{width}}  {'obs':>3}  {'action':<18} {'env-steps':>9}  "
              f"{'env-steps/s':>11}  {'episodes':>8}  {'mean return':>11}")
    say(header)
    say("-" * len(header))
    for r in runners:
        mean = f"{r.mean_return:11.1f}" if r.episode_returns else f"{'—':>11}"
        say(f"{r.env_id:<{width}}  {r.spec.obs_dim:>3}  {r.action_text():<18} {r.env_steps:>9,}  "
            f"{r.rate:>11,.0f}  {len(r.episode_returns):>8}  {mean}")
    total = sum(r.env_steps for r in runners)
    say(f"\n{total:,} env-steps in {wall:.1f} s with one network of {n_params_after:,} parameters "
        f"(policy sampled in eval mode, continuous actions clipped to the action bounds).")
    say("The network is untrained, so these are an untrained policy's returns: `rl-agnostic "
        "train` trains it online (DD-PPO on RLlib), `rl-agnostic offline` from datasets (DD-IQL).")
    return runners


# ---------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rl-agnostic",
        description="One shape-agnostic RL agent for many heterogeneous environments.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser(
        "demo",
        help="act with one untrained agnostic network in several envs of different shapes",
        description=(
            "Build ONE agnostic actor-critic and act with it (eval mode, no training) in several "
            "real environments of different observation/action shapes at once, each as a small "
            "vector env. Gymnasium ids as is (CartPole-v1), envpool ids with the prefix "
            "'envpool:' (envpool:HalfCheetah-v4). Training arrives with the online trainer."
        ),
    )
    demo.add_argument("--envs", nargs="+", default=list(DEFAULT_DEMO_ENVS), metavar="ID",
                      help="environment ids (default: %(default)s)")
    demo.add_argument("--steps", type=_positive_int, default=500, metavar="N",
                      help="vector steps per environment (default: %(default)s)")
    demo.add_argument("--num-envs", type=_positive_int, default=4, metavar="K",
                      help="copies of each environment in its vector env (default: %(default)s)")
    demo.add_argument("--d-model", type=_positive_int, default=None, metavar="H",
                      help="network width (default: 64, or the network config file's)")
    demo.add_argument("--network-config", default=None, metavar="FILE.yaml",
                      help="network config section, e.g. tune_configs/network_cpu.yaml")
    demo.add_argument("--seed", type=int, default=0, metavar="S", help="seed (default: 0)")
    demo.add_argument("--log-every", type=_positive_int, default=None, metavar="N",
                      help="print progress every N steps (default: steps/4)")
    train = sub.add_parser(
        "train", help="train one agent on every env type of a config (DD-PPO on RLlib)",
        description="Online multi-env PPO. CONFIG.yaml: see tune_configs/quickstart.yaml. Starts "
                    "a local Ray unless RAY_ADDRESS names a cluster.")
    train.add_argument("config", metavar="CONFIG.yaml")
    train.add_argument("--stop-env-steps", type=_positive_int, default=None, metavar="N",
                       help="env steps PER ENV TYPE to train for (default: run.env_steps_per_env)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the run directory's latest checkpoint")
    train.add_argument("--init-from", default=None, metavar="CKPT",
                       help="start from the weights of a checkpoint (or run directory) of "
                            "another run, e.g. to transfer to new env types")
    train.add_argument("--output-dir", default=None, metavar="DIR",
                       help="parent of the run directory (default: run.output_dir)")
    exp = sub.add_parser(
        "experiment", help="run one of the paper's experiments (tables and plots)",
        description="Run an experiment of tune_configs/experiments/ (mix_to_mix, ablation, "
                    "mix16, classic_to_mujoco, mujoco_to_classic, offline_table1) or an "
                    "experiment YAML: every run of every seed, then results/<name>/results.md, "
                    "results.json and PNG plots. Started again, it skips finished runs and "
                    "resumes the unfinished one; a run another experiment already finished "
                    "with the same config (e.g. a single-env reference) is copied, not trained "
                    "again, and so is a pretraining run of two agents that differ only in how "
                    "they transfer. An offline experiment (offline_table1) first makes its "
                    "datasets, or reads those it cannot make from --data-dir.")
    exp.add_argument("experiment", metavar="NAME|FILE.yaml")
    exp.add_argument("--scale", default="cpu", help="paper | cpu | tiny (default: %(default)s)")
    exp.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                     help="seeds to run (default: the scale's)")
    exp.add_argument("--env-steps", type=_positive_int, default=None, metavar="N",
                     help="env steps per env type and run (default: the scale's)")
    exp.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                     help="gradient steps per run of an offline experiment (default: the "
                          "scale's)")
    exp.add_argument("--data-dir", default=None, metavar="DIR",
                     help="an offline experiment's datasets: the files it reads and those it "
                          "makes (default: the scale's data_dir, else <out>/data)")
    exp.add_argument("--out", default=None, metavar="DIR",
                     help="results directory (default: results/<name>)")
    exp.add_argument("--report-only", action="store_true",
                     help="rewrite the tables and plots from the finished runs, train nothing")
    exp.add_argument("--no-reuse-runs", action="store_true",
                     help="train every run, even one whose config a finished run of another "
                          "experiment next to --out, or a twin in this one, has (default: copy "
                          "that run's records)")
    ev = sub.add_parser("evaluate", help="deterministic episodes with a checkpoint's policy")
    ev.add_argument("checkpoint", metavar="CKPT",
                    help="run directory, checkpoint directory, checkpoints/latest or policy.pt")
    ev.add_argument("--env", required=True, action="append", metavar="ID",
                    help="env id (repeatable)")
    ev.add_argument("--episodes", type=_positive_int, default=10, metavar="N")
    ev.add_argument("--seed", type=int, default=12345, metavar="S")
    ev.add_argument("--stochastic", action="store_true", help="sample actions instead")
    col = sub.add_parser(
        "collect", help="roll out policies in an env and write an offline dataset",
        description="Write <out>/<name>.parquet and a Minari dataset under <out>/minari from "
                    "rollouts of one or more policies (a mixed-quality dataset when several). "
                    "Reference scores: the random policy's mean return (min) and the best "
                    "policy's (max).")
    col.add_argument("env_id", metavar="ENV_ID")
    col.add_argument("--policy", required=True, action="append", metavar="POLICY:EPISODES",
                     help="'random:N' or 'CHECKPOINT:N' (run dir, checkpoint dir or policy.pt); "
                          "repeatable")
    col.add_argument("--out", required=True, metavar="DIR")
    col.add_argument("--name", required=True, metavar="NAME")
    col.add_argument("--seed", type=int, default=0, metavar="S")
    col.add_argument("--random-episodes", type=_positive_int, default=20, metavar="N",
                     help="episodes of the random policy for ref_min_score (default: 20)")
    col.add_argument("--action-noise", type=float, default=None, metavar="X",
                     help="act with the policies' modes plus N(0, X²) noise in the [-1, 1] action "
                          "space (continuous) or a random action with probability X (discrete); "
                          "default: sample each policy's own distribution")
    off = sub.add_parser(
        "offline", help="train DD-IQL over several offline datasets (Ray Train)",
        description="Offline multi-dataset IQL. CONFIG.yaml: see tune_configs/offline_quickstart.yaml."
                    " Starts a local Ray unless RAY_ADDRESS names a cluster.")
    off.add_argument("config", metavar="CONFIG.yaml")
    off.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                     help="gradient steps (default: run.steps)")
    off.add_argument("--resume", action="store_true",
                     help="continue from the run directory's latest checkpoint")
    off.add_argument("--output-dir", default=None, metavar="DIR",
                     help="parent of the run directory (default: run.output_dir)")
    srv = sub.add_parser(
        "serve", help="serve a checkpoint's policy over HTTP (Ray Serve)",
        description="POST /act {\"env_id\": ..., \"observation\": [...], \"deterministic\": "
                    "true} returns the action; GET /envs lists the checkpoint's envs. A new env "
                    "is accepted when the request adds obs_dim and action_space (agnostic "
                    "checkpoints). Runs until interrupted.")
    srv.add_argument("checkpoint", metavar="CKPT", help="checkpoint or run directory")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=_positive_int, default=8000)
    srv.add_argument("--max-batch-size", type=_positive_int, default=32, metavar="N")
    tun = sub.add_parser(
        "tune", help="hyperparameter search over online runs (Ray Tune, ASHA or PBT)",
        description="SWEEP.yaml names a base run config, a search space of its dotted keys, "
                    "a scheduler and per-env reference scores (see tune_configs/sweep_*.yaml). "
                    "Writes results.md and best_config.yaml under output_dir/name.")
    tun.add_argument("sweep", metavar="SWEEP.yaml")
    tun.add_argument("--resume", action="store_true",
                     help="continue an interrupted sweep (Tune's restore)")
    return parser


def run_collect(args: argparse.Namespace) -> None:
    from rl_agnostic.offline.collect import PolicySource, collect

    try:
        sources = [PolicySource.parse(p) for p in args.policy]
        collect(args.env_id, sources, args.out, args.name, seed=args.seed,
                random_episodes=args.random_episodes, action_noise=args.action_noise)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None


def run_offline(args: argparse.Namespace) -> None:
    from rl_agnostic.offline.config import ConfigError, load_offline_config
    from rl_agnostic.offline.trainer import train_offline

    try:
        cfg = load_offline_config(args.config)
        if args.output_dir:
            cfg = cfg.replace(run={"output_dir": args.output_dir})
        if args.steps:
            cfg = cfg.replace(run={"steps": args.steps})
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    try:
        train_offline(cfg, resume=args.resume)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None


def run_train(args: argparse.Namespace) -> None:
    from rl_agnostic.online.config import ConfigError, load_train_config
    from rl_agnostic.online.trainer import train

    try:
        cfg = load_train_config(args.config)
        if args.output_dir:
            cfg = cfg.replace(run={"output_dir": args.output_dir})
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    from rl_agnostic.online.envs import NonFiniteObservationError

    try:
        train(cfg, stop_env_steps=args.stop_env_steps, resume=args.resume,
              init_from=args.init_from)
    except (ValueError, TypeError, FileNotFoundError, NonFiniteObservationError) as exc:
        raise CliError(str(exc)) from None


def run_experiment_command(args: argparse.Namespace) -> None:
    from rl_agnostic.experiments import (OfflineExperiment, load_experiment, run_experiment,
                                         run_offline_experiment, write_offline_report,
                                         write_report)
    from rl_agnostic.offline.data import DatasetError
    from rl_agnostic.online.config import ConfigError

    try:
        exp = load_experiment(args.experiment, args.scale, args.seeds, args.env_steps,
                              steps=args.steps, data_dir=args.data_dir)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    out = Path(args.out or Path("results") / exp.name)
    if isinstance(exp, OfflineExperiment):
        try:
            if args.report_only:
                write_offline_report(exp, out)
            else:
                run_offline_experiment(exp, out)
        except (ConfigError, DatasetError, FileNotFoundError) as exc:
            raise CliError(str(exc)) from None
        return
    if args.report_only:
        if not (out / "random.json").is_file():
            raise CliError(f"--report-only: {out} holds no experiment results")
        write_report(exp, out)
    else:
        run_experiment(exp, out, reuse_runs=not args.no_reuse_runs)


def run_evaluate(args: argparse.Namespace) -> None:
    from rl_agnostic.online.agent import evaluate

    for env_id in args.env:
        try:
            out = evaluate(args.checkpoint, env_id, args.episodes, args.seed,
                           deterministic=not args.stochastic)
        except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:
            raise CliError(str(exc)) from None
        print(f"{env_id}: return {out['mean']:.2f} ± {out['std']:.2f} over "
              f"{out['episodes']} episodes", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            run_train(args)
        elif args.command == "experiment":
            run_experiment_command(args)
        elif args.command == "evaluate":
            run_evaluate(args)
        elif args.command == "collect":
            run_collect(args)
        elif args.command == "offline":
            run_offline(args)
        elif args.command == "tune":
            from rl_agnostic.online.config import ConfigError
            from rl_agnostic.tune import load_sweep_config, run_sweep

            try:
                sweep = load_sweep_config(args.sweep)
            except ConfigError as exc:
                raise CliError(str(exc)) from None
            run_sweep(sweep, resume=args.resume)
        elif args.command == "serve":
            from rl_agnostic.serve import serve_checkpoint

            try:
                serve_checkpoint(args.checkpoint, args.host, args.port,
                                 max_batch_size=args.max_batch_size)
            except (ValueError, FileNotFoundError) as exc:
                raise CliError(str(exc)) from None
        elif args.command == "demo":
            run_demo(args.envs, steps=args.steps, num_envs=args.num_envs, d_model=args.d_model,
                     network_config=args.network_config, seed=args.seed,
                     log_every=args.log_every)
    except CliError as exc:
        parser.exit(2, f"{parser.prog} {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
