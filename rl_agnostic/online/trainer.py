"""The online training loop: RLlib PPO iterations, progress lines, metrics, atomic checkpoints.

Run directory ``<run.output_dir>/<name>/``:

- ``config.yaml``: the validated config of the run;
- ``tensorboard/``: the same metrics as TensorBoard scalars (x axis: total env steps);
- ``metrics.jsonl``: one JSON result per iteration (stable names: ``env/<env_id>/episode_return_mean``,
  ``env/<env_id>/env_steps``, ``env/<env_id>/{policy_loss,vf_loss,entropy,vf_explained_var,
  approx_kl,clip_fraction}``, ``perf/env_steps_per_s``, ``perf/iteration_s``, ``num_env_steps``);
  a new run in the directory of an earlier one first moves that one aside (``<name>.<time>``);
- ``checkpoints/ckpt_<iteration>/``: RLlib's full algorithm checkpoint (``algorithm/``: learner
  with weights, optimizer and reward-scaler state; env runners' normalizer state; metrics and
  step counters) plus ``policy.pt``, a self-contained policy (network config and weights,
  per-env observation statistics, env specs) that `evaluate`, serving and ``--init-from`` load
  without Ray. A checkpoint is written under a temporary name and renamed when complete, and
  ``checkpoints/latest`` (also replaced atomically) names the newest, so a crash mid-write never
  leaves a half checkpoint behind as the one to resume from.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from rl_agnostic.envs.spec import EnvSpec
from rl_agnostic.nn.config import ConfigError
from rl_agnostic.online.config import TrainConfig

if TYPE_CHECKING:
    from rl_agnostic.offline.config import OfflineConfig

POLICY_FILE = "policy.pt"


@dataclass
class IterationResult:
    iteration: int
    env_steps: dict[str, int]
    returns: dict[str, float]
    metrics: dict[str, float]


def run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.run.output_dir) / cfg.name


def write_run_config(directory: Path, cfg: TrainConfig) -> None:
    """The run directory's ``config.yaml``: what a restart (or another experiment looking for
    the same run) compares its own config with."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (or of its ``checkpoints/``)."""
    for base in (directory / "checkpoints", directory):
        pointer = base / "latest"
        if pointer.is_file():
            ckpt = base / pointer.read_text().strip()
            if (ckpt / POLICY_FILE).is_file():
                return ckpt
    return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old
    content or the new, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def move_previous_run_aside(directory: Path, log: Callable[[str], None]) -> None:
    """A new run in the directory of an earlier one would append to its metrics and mix its
    checkpoints with the old ones: the earlier run is kept whole under ``<name>.<time>``."""
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    aside = directory.with_name(f"{directory.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(directory, aside)
    log(f"new run: the previous run in {directory} was moved to {aside}")


class OnlineTrainer:
    """Builds the RLlib algorithm of ``cfg`` and trains it; see the module docstring."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, init_from: str | None = None,
                 restore_from: Path | None = None, stop_env_steps: int | None = None,
                 log: Callable[[str], None] | None = None,
                 customize: Callable[[Any], Any] | None = None) -> None:
        """``resume`` continues from the run directory's latest checkpoint, ``restore_from`` from
        a given checkpoint directory (Ray Tune hands trials theirs). ``customize`` receives the
        RLlib ``AlgorithmConfig`` before it is built and returns the config to build (e.g. to add
        callbacks or swap the learner class)."""
        from rl_agnostic.online.algo import build_algorithm_config, env_spaces

        self.cfg = cfg
        self.dir = run_dir(cfg).absolute()  # RLlib checkpoint paths must be absolute
        self.log = log or (lambda text: print(text, flush=True))
        # Everything that can be wrong with the input fails here, before any actor starts.
        self.spaces = env_spaces(cfg)
        resume_from = restore_from or (latest_checkpoint(self.dir) if resume else None)
        if resume and resume_from is None:
            self.log(f"--resume: no checkpoint in {self.dir}, starting a new run")
        init_policy = load_policy_file(init_from) if init_from else None
        if init_policy is not None:
            check_checkpoint_compatible(init_policy, cfg, f"--init-from {init_from}")
            check_transfer_reinit(init_policy, cfg.run.transfer_reinit)
        if resume_from is not None:
            check_checkpoint_compatible(load_policy_file(resume_from), cfg,
                                        f"resuming from {resume_from}")
        if resume_from is None:
            move_previous_run_aside(self.dir, self.log)
        write_run_config(self.dir, cfg)

        from rl_agnostic.distributed import init_ray

        init_ray()
        import torch

        torch.set_num_threads(cfg.resources.learner_torch_threads)
        self.stop_env_steps = stop_env_steps or cfg.run.env_steps_per_env
        algo_config = build_algorithm_config(cfg, self.spaces, self.stop_env_steps)
        if customize is not None:
            algo_config = customize(algo_config)
        self.algo = algo_config.build_algo()
        self.iteration = 0
        self._restored_env_steps: dict[str, int] = {}
        self._num_params: int | None = None
        from tensorboardX import SummaryWriter  # a dependency of ray[tune]

        self._tensorboard = SummaryWriter(str(self.dir / "tensorboard"))
        from rl_agnostic.metrics import RunMetrics

        self._gauges = RunMetrics(cfg.name)  # Ray dashboard / Prometheus
        if resume_from is not None:
            self.algo.restore_from_path(resume_from / "algorithm")
            meta = json.loads((resume_from / "trainer.json").read_text())
            self.iteration = meta["iteration"]
            self._restored_env_steps = meta["env_steps"]
            self.log(f"resumed from {resume_from} at iteration {self.iteration}, "
                     f"{sum(meta['env_steps'].values()):,} env steps")
        elif init_policy is not None:
            self._load_weights(init_policy)
            self.log(f"initialized weights from {init_from}")

    # -- weights -------------------------------------------------------------------------
    def network_state(self) -> dict[str, Any]:
        """The shared network's weights (numpy), read from the learner group."""
        from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE

        from rl_agnostic.online.module import weights_owner

        state = self.algo.learner_group.get_state(
            components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}")
        modules = state[COMPONENT_LEARNER][COMPONENT_RL_MODULE]
        return {k[len("network."):]: v for k, v in modules[weights_owner(modules)].items()
                if k.startswith("network.")}

    def _load_weights(self, policy: dict[str, Any]) -> None:
        """Copy matching weights (all of them for the agnostic network; the shared middle and
        known envs' layers for the specific one) into every learner and runner, except the
        ``run.transfer_reinit`` prefixes; ``run.transfer_shrink`` < 1 blends each copied
        floating-point tensor with its fresh init."""
        import torch
        from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE

        from rl_agnostic.online.module import weights_owner

        current = self.network_state()
        alpha = self.cfg.run.transfer_shrink
        loaded = transferred_weights(policy["network"], current, self.cfg.run.transfer_reinit,
                                     alpha)
        new = {**current, **loaded}
        self.algo.learner_group.set_state({COMPONENT_LEARNER: {COMPONENT_RL_MODULE: {
            weights_owner(self.cfg.env_ids): {f"network.{k}": torch.as_tensor(v) for k, v in new.items()}}}})
        self.algo.env_runner_group.sync_weights(from_worker_or_learner_group=self.algo.learner_group,
                                                inference_only=True)
        blend = f", blended {alpha:g}·pretrained + {1 - alpha:g}·fresh" if alpha < 1.0 else ""
        self.log(f"  loaded {len(loaded)}/{len(current)} weight tensors "
                 f"({len(current) - len(loaded)} fresh{blend})")

    def obs_stats(self) -> dict[str, dict]:
        from rl_agnostic.online.normalize import PerEnvObsNormalizer

        runner = self.algo.env_runner
        if runner is None or not self.cfg.ppo.normalize_observations:
            return {}
        for piece in runner._env_to_module.connectors:
            if isinstance(piece, PerEnvObsNormalizer):
                return piece.merge_states([piece.get_state()])
        return {}

    # -- loop ----------------------------------------------------------------------------
    def env_steps(self, result: dict) -> dict[str, int]:
        per_agent = result.get("env_runners", {}).get("num_agent_steps_sampled_lifetime", {})
        return {e: int(per_agent.get(e, 0)) for e in self.cfg.env_ids}

    def iterate(self) -> Iterator[IterationResult]:
        """Train until every env type has ``stop_env_steps`` env steps; yield each iteration."""
        target = self.stop_env_steps
        restored = self._restored_env_steps
        if restored and all(restored.get(e, 0) >= target for e in self.cfg.env_ids):
            self.log(f"the checkpoint resumed from is at the budget ({target:,} env steps per "
                     "env type): nothing to train")
            return
        returns: dict[str, float] = {}
        last_steps = None
        while True:
            t0 = time.perf_counter()
            result = self.algo.train()
            dt = time.perf_counter() - t0
            self.iteration += 1
            er = result.get("env_runners", {})
            steps = self.env_steps(result)
            total = sum(steps.values())
            prev = sum(last_steps.values()) if last_steps else \
                total - int(er.get("num_env_steps_sampled", 0))
            last_steps = steps
            for env_id, value in (er.get("agent_episode_returns_mean") or {}).items():
                if value is not None and np.isfinite(value):
                    returns[env_id] = float(value)
            metrics: dict[str, float] = {
                "iteration": self.iteration, "num_env_steps": total,
                "perf/env_steps_per_s": (total - prev) / dt, "perf/iteration_s": dt,
                # each sampled step is trained on num_epochs times
                "perf/learner_samples_per_s": (total - prev) * self.cfg.ppo.num_epochs / dt,
                "model/num_parameters": self.num_parameters,
            }
            for env_id in self.cfg.env_ids:
                metrics[f"env/{env_id}/env_steps"] = steps[env_id]
                if env_id in returns:
                    metrics[f"env/{env_id}/episode_return_mean"] = returns[env_id]
                learner_out = result.get("learners", {}).get(env_id, {})
                for key in ("policy_loss", "vf_loss", "entropy", "vf_explained_var", "approx_kl",
                            "clip_fraction"):
                    if key in learner_out:
                        metrics[f"env/{env_id}/{key}"] = float(learner_out[key])
            item = IterationResult(self.iteration, steps, dict(returns), metrics)
            self._record(item)
            done = min(steps.values()) >= target
            if done or self.iteration % self.cfg.run.checkpoint_every == 0:
                self.save_checkpoint(steps)
            yield item
            if done:
                return

    @property
    def num_parameters(self) -> int:
        """Parameters of the shared network, counted once (RLlib would count them per module)."""
        if self._num_params is None:
            self._num_params = sum(int(np.prod(np.shape(v)))
                                   for v in self.network_state().values())
        return self._num_params

    def _record(self, item: IterationResult) -> None:
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(item.metrics) + "\n")
        step = int(item.metrics["num_env_steps"])
        for key, value in item.metrics.items():
            self._tensorboard.add_scalar(key, value, global_step=step)
        self._tensorboard.flush()
        self._gauges.set_per("rl_agnostic_episode_return", item.returns, "env_id")
        self._gauges.set("rl_agnostic_env_steps_per_s", item.metrics["perf/env_steps_per_s"])
        self._gauges.set("rl_agnostic_learner_samples_per_s",
                         item.metrics["perf/learner_samples_per_s"])
        env_text = " | ".join(
            f"{e} {item.returns[e]:.1f}" if e in item.returns else f"{e} -"
            for e in self.cfg.env_ids)
        m = item.metrics
        self.log(f"iter {item.iteration:4d} | env-steps {m['num_env_steps']:>9,} "
                 f"({m['perf/env_steps_per_s']:,.0f}/s) | {env_text}")

    def save_checkpoint(self, env_steps: dict[str, int]) -> Path:
        import torch

        from rl_agnostic.online.agent import policy_file_contents
        from rl_agnostic.online.normalize import RunningMeanStd

        base = self.dir / "checkpoints"
        base.mkdir(parents=True, exist_ok=True)
        name = f"ckpt_{self.iteration:06d}"
        tmp = base / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.algo.save_to_path(tmp / "algorithm")
        policy = policy_file_contents(
            self.cfg.model.kind, self.cfg.model.network,
            [EnvSpec.from_spaces(e, *self.spaces[e]) for e in self.cfg.env_ids],
            self.network_state(),
            {e: RunningMeanStd.from_state(s["base"]) for e, s in self.obs_stats().items()},
            env_steps=env_steps, iteration=self.iteration, config=self.cfg.to_dict())
        torch.save(policy, tmp / POLICY_FILE)
        (tmp / "trainer.json").write_text(json.dumps(
            {"iteration": self.iteration, "env_steps": env_steps}))
        final = base / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic_write_text(base / "latest", name)
        kept = sorted(p for p in base.glob("ckpt_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in kept[:-max(self.cfg.run.keep_checkpoints, 1)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def stop(self) -> None:
        self._tensorboard.close()
        self.algo.stop()


def check_checkpoint_compatible(policy: dict[str, Any], cfg: TrainConfig | OfflineConfig,
                                source: str) -> None:
    """Weights loaded from a checkpoint (``--init-from``, ``--resume`` online or offline, a Tune
    restore) must mean the same function in this run's network. Shape mismatches fail when the
    weights are loaded; these fields change what the same weights compute, silently, so they
    must match."""
    from rl_agnostic.nn.config import FUNCTION_FIELDS, NetworkConfig

    if policy["kind"] != cfg.model.kind:
        raise ValueError(f"{source}: checkpoint model kind {policy['kind']!r} "
                         f"differs from this config's {cfg.model.kind!r}")
    saved = NetworkConfig.from_saved(policy["network_config"])
    differ = {f: (getattr(saved, f), getattr(cfg.model.network, f)) for f in FUNCTION_FIELDS
              if getattr(saved, f) != getattr(cfg.model.network, f)}
    if differ:
        detail = ", ".join(f"{f}: checkpoint {a!r}, config {b!r}" for f, (a, b) in differ.items())
        raise ValueError(f"{source}: the network config differs in fields that "
                         f"change what the same weights compute ({detail}); set them in "
                         f"model.network to the checkpoint's values")


def transferred_weights(pretrained: dict[str, Any], fresh: dict[str, Any],
                        reinit: list[str] | tuple[str, ...] = (),
                        shrink: float = 1.0) -> dict[str, np.ndarray]:
    """The tensors of ``pretrained`` to load over the ``fresh`` init: those whose name and shape
    match, minus the names starting with a ``reinit`` prefix; floating-point ones become
    ``shrink``·pretrained + (1 − ``shrink``)·fresh."""
    out, reinit = {}, tuple(reinit)
    for name, value in pretrained.items():
        value = np.asarray(value)
        if name not in fresh or value.shape != np.shape(fresh[name]) or name.startswith(reinit):
            continue
        if shrink < 1.0 and np.issubdtype(value.dtype, np.floating):
            value = (shrink * value + (1.0 - shrink) * np.asarray(fresh[name])).astype(value.dtype)
        out[name] = value
    return out


def check_transfer_reinit(policy: dict[str, Any], prefixes: list[str]) -> None:
    """Every ``run.transfer_reinit`` prefix must name some weight of the policy: a typo would
    otherwise silently copy everything."""
    names = list(policy["network"])
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"run.transfer_reinit: {prefix!r} matches no weight of the "
                              f"--init-from policy (its top-level names: {', '.join(tops)})")


def load_policy_file(path: str | Path) -> dict[str, Any]:
    """``policy.pt`` of a checkpoint directory, of a run directory or its ``checkpoints/``
    (their latest), of the ``latest`` pointer file, or the file itself."""
    import pickle

    import torch

    path = Path(path)
    if path.is_file() and path.name == "latest":  # a text file naming the newest checkpoint
        path = path.parent
    if path.is_dir():
        ckpt = path if (path / POLICY_FILE).is_file() else latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoint ({POLICY_FILE}) found in {path}")
        path = ckpt / POLICY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        policy = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable {POLICY_FILE} (truncated, corrupt or "
                         f"another kind of file): {err}") from err
    if not isinstance(policy, dict):
        raise ValueError(f"{path} holds a {type(policy).__name__}, not a {POLICY_FILE} dict")
    return policy


def train(cfg: TrainConfig, *, stop_env_steps: int | None = None, resume: bool = False,
          init_from: str | None = None) -> dict[str, Any]:
    """Run ``cfg`` to its step budget; returns the last iteration's metrics."""
    trainer = OnlineTrainer(cfg, resume=resume, init_from=init_from,
                            stop_env_steps=stop_env_steps)
    trainer.log(f"run {cfg.name}: {len(cfg.envs)} env types, model {cfg.model.kind} "
                f"({trainer.num_parameters:,} parameters), {cfg.num_env_runners} env runners × "
                f"{cfg.resources.num_envs_per_env_runner} copies, dir {trainer.dir}")
    last = None
    try:
        for last in trainer.iterate():
            pass
    finally:
        trainer.stop()
    metrics = dict(last.metrics) if last else {}
    if cfg.run.evaluation_episodes > 0:
        from rl_agnostic.online.agent import evaluate

        for env_id in cfg.env_ids:
            out = evaluate(trainer.dir, env_id, cfg.run.evaluation_episodes, seed=cfg.run.seed)
            metrics[f"env/{env_id}/evaluation_return_mean"] = out["mean"]
            trainer.log(f"evaluation {env_id}: {out['mean']:.1f} ± {out['std']:.1f} "
                        f"over {out['episodes']} deterministic episodes")
    return metrics
