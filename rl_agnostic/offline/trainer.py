"""``rl-agnostic offline CONFIG.yaml``: DD-IQL (paper Algorithm 2) on Ray Train.

    driver:   read + validate every dataset (errors before Ray starts) → one Ray Dataset each
    workers:  Ray Train `TorchTrainer` workers, W of them. With N datasets ≥ W, worker w holds the
              whole datasets d ≡ w (mod W) (S = N/W per worker, as in Algorithm 2); with N < W,
              every worker holds a 1/W shard of every dataset.
    step:     for each held dataset: a minibatch and L_V + L_Q + L_π (`rl_agnostic.offline.iql`),
              weighted 1/(workers holding it) and summed; one backward; ONE flat all-reduce (sum)
              of all gradients; Adam; Polyak update of the target Q. Every worker applies the same
              summed gradient to the same weights, so the weights stay identical.

Why not torch DDP (``prepare_model``): the workers' graphs differ (a worker that holds only
continuous datasets never touches the discrete decoder), which DDP only tolerates with
``find_unused_parameters`` and one wrapper per network; one all-reduce of one flat buffer is the
same collective, once per step, with no per-module bookkeeping. Why every worker keeps its shard
in memory and samples minibatches itself (instead of streaming epochs from Ray Data): IQL draws
i.i.d. minibatches for ~10⁵–10⁶ steps from datasets that fit in memory; Ray Data does the reading,
splitting and transport once, and sampling costs microseconds per step (the data-wait fraction is
measured and reported).

Checkpoints go through Ray Train (``ray.train.report``; ``<output_dir>/<name>/ckpt_NNNNNN``), each
with a ``policy.pt`` that `rl_agnostic.online.agent.Agent` (and ``rl-agnostic evaluate``) loads;
``--resume`` continues from the latest one (Ray Train's run restoration); without it, an
earlier run in the same directory is moved aside whole (``<name>.<time>``), as online.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rl_agnostic.envs.spec import EnvSpec
from rl_agnostic.metrics import RunMetrics
from rl_agnostic.offline.config import OfflineConfig
from rl_agnostic.offline.data import (
    DatasetError,
    DatasetInfo,
    TransitionData,
    check_against_spec,
    read_dataset,
    shard_to_arrays,
    to_ray_dataset,
)
from rl_agnostic.online.normalize import RunningMeanStd, standardize
from rl_agnostic.online.trainer import (
    atomic_write_text,
    check_checkpoint_compatible,
    load_policy_file,
    move_previous_run_aside,
)

POLICY_FILE = "policy.pt"
STATE_FILE = "iql_state.pt"
OBS_CLIP = 10.0


@dataclass
class PreparedDataset:
    """A dataset checked against its environment, with what training needs to know of it."""

    name: str
    spec: EnvSpec
    data: TransitionData
    info: DatasetInfo
    reward_scale: float


def prepare_datasets(cfg: OfflineConfig, log: Callable[[str], None] = print
                     ) -> list[PreparedDataset]:
    """Read every dataset of ``cfg`` and check it against its environment. Raises
    `DatasetError` (file, keys, shapes, NaN/inf, env) before any training work starts."""
    from rl_agnostic.envs.make import check_env_id, env_spec

    prepared: list[PreparedDataset] = []
    for i, entry in enumerate(cfg.datasets):
        data = read_dataset(entry.path, entry.format, entry.name)
        where = f"datasets[{i}] ({entry.path})"
        env_id = entry.env_id or data.info.env_id
        if not env_id:
            raise DatasetError(f"{where}: the dataset records no environment id; set "
                               f"datasets[{i}].env_id to the env to evaluate it in")
        try:
            check_env_id(env_id)
            spec = env_spec(env_id)
        except Exception as exc:  # noqa: BLE001 - any failure to build is the same user error
            raise DatasetError(f"{where}: environment {env_id!r} cannot be built for "
                               f"evaluation: {exc}") from None
        data = check_against_spec(data, spec)
        info = dataclasses.replace(
            data.info, env_id=env_id,
            ref_min_score=_first(entry.ref_min_score, data.info.ref_min_score),
            ref_max_score=_first(entry.ref_max_score, data.info.ref_max_score))
        if (info.ref_min_score is None) != (info.ref_max_score is None):
            raise DatasetError(f"{where}: give both ref_min_score and ref_max_score, or neither")
        if info.ref_min_score is not None and info.ref_max_score == info.ref_min_score:
            raise DatasetError(f"{where}: ref_min_score equals ref_max_score "
                               f"({info.ref_min_score}); normalized scores would be undefined")
        if any(p.name == info.name for p in prepared):
            raise DatasetError(f"{where}: dataset name {info.name!r} is used twice; set "
                               f"datasets[{i}].name")
        prepared.append(PreparedDataset(info.name, spec, data, info,
                                        _reward_scale(cfg, data, info, log)))
    return prepared


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _reward_scale(cfg: OfflineConfig, data: TransitionData, info: DatasetInfo,
                  log: Callable[[str], None]) -> float:
    if not cfg.iql.normalize_rewards:
        return 1.0
    if info.ref_min_score is not None and info.ref_max_score > info.ref_min_score:
        # The IQL reference code's locomotion scaling is 1000 / (return range) for 1000-step
        # episodes; with the mean episode length instead of 1000, short-episode datasets
        # (Reacher: 50 steps) get per-step rewards of the same size as long ones, so that no
        # dataset's TD loss dominates the shared network's gradient.
        length = len(data) / info.num_episodes if info.num_episodes else 1000.0
        return length / (info.ref_max_score - info.ref_min_score)
    log(f"{info.name}: no usable reference scores (need ref_max > ref_min); rewards not scaled")
    return 1.0


def obs_stats_by_env(prepared: list[PreparedDataset]) -> dict[str, RunningMeanStd]:
    """Mean/std of the observations of every env, over all its datasets."""
    stats: dict[str, RunningMeanStd] = {}
    for p in prepared:
        s = stats.setdefault(p.spec.env_id, RunningMeanStd((p.spec.obs_dim,)))
        s.update(p.data.observations.astype(np.float64))
    return stats


def held_datasets(num_datasets: int, num_workers: int, rank: int) -> tuple[list[int], int]:
    """Indices of the datasets worker ``rank`` trains on, and how many workers hold each one
    (1: whole datasets assigned round-robin; ``num_workers``: every worker a shard of each)."""
    if num_datasets >= num_workers:
        return [d for d in range(num_datasets) if d % num_workers == rank], 1
    return list(range(num_datasets)), num_workers


def run_dir(cfg: OfflineConfig) -> Path:
    return (Path(cfg.run.output_dir) / cfg.name).absolute()


# -- the worker ---------------------------------------------------------------------------------
def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from rl_agnostic.distributed import all_reduce_gradients, broadcast_from_rank0
    from rl_agnostic.nn.native import flush_denormals
    from rl_agnostic.nn.optim import adam, clipped_step
    from rl_agnostic.offline.iql import IQLNetworks

    # Ray Train logs every report with its whole metrics dict at INFO: keep the progress lines.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = OfflineConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    torch.set_num_threads(cfg.resources.torch_threads)
    flush_denormals()  # after the thread count: every thread of the pool (rl_agnostic.nn.native)
    device = ray.train.torch.get_device()
    specs = [EnvSpec(**s) for s in config["specs"]]
    names = config["names"]
    obs_stats = {e: RunningMeanStd.from_state(s) for e, s in config["obs_stats"].items()}
    held, holders = held_datasets(len(names), world, rank)

    # Identical init everywhere (same seed), then rank 0's weights broadcast to be certain.
    torch.manual_seed(cfg.run.seed)
    nets = IQLNetworks(cfg.model.kind, cfg.model.network, specs).to(device)
    params = [p for p in nets.parameters() if p.requires_grad]
    if distributed:
        broadcast_from_rank0(nets)
    i = cfg.iql
    optimizer = adam(nets.optimizer_groups(i.actor_lr, i.critic_lr, i.ssm_lr))
    actor_group = next(g for g in optimizer.param_groups if g["name"] == "actor")

    # Every held dataset in memory on this worker, observations standardized, rewards scaled.
    buffers: dict[int, dict[str, torch.Tensor]] = {}
    for d in held:
        arrays = shard_to_arrays(ray.train.get_dataset_shard(names[d]))
        if not arrays:
            raise DatasetError(f"worker {rank}: its shard of {names[d]} is empty")
        spec = specs[d]
        if cfg.iql.normalize_observations:
            stats = obs_stats[spec.env_id]
            for key in ("observations", "next_observations"):  # as the Agent does when acting
                arrays[key] = standardize(arrays[key], stats, OBS_CLIP)
        arrays["rewards"] = arrays["rewards"] * config["reward_scales"][d]
        buffers[d] = {k: torch.as_tensor(np.ascontiguousarray(v)).to(
            device, torch.int64 if k == "actions" and spec.is_discrete else torch.float32)
            for k, v in arrays.items()}
    batch = max(i.batch_size // holders, 1)
    generator = torch.Generator(device="cpu").manual_seed(cfg.run.seed * 1000 + rank)

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as path:
            state = torch.load(Path(path) / STATE_FILE, map_location=device, weights_only=False)
        nets.load_state_dict(state["nets"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generators"][rank % len(state["generators"])])
        start = state["step"]
    out = Path(config["run_dir"])
    if rank == 0:
        if ckpt is not None:
            _say(f"resumed from step {start:,}")
        # After a worker failure Ray Train restarts the loop from the last checkpoint it
        # registered (or from step 0): the steps it redoes must not be logged twice.
        log = out / "metrics.jsonl"
        if log.is_file():
            kept = [line for line in log.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= start]
            atomic_write_text(log, "".join(line + "\n" for line in kept))
    gauges = RunMetrics(cfg.name)
    sums = {"data_s": 0.0, "step_s": 0.0, "steps": 0}
    for step in range(start + 1, cfg.run.steps + 1):
        t0 = time.perf_counter()
        batches = {}
        for d in held:
            idx = torch.randint(len(buffers[d]["rewards"]), (batch,), generator=generator)
            batches[d] = {k: v[idx.to(device)] for k, v in buffers[d].items()}
        t_data = time.perf_counter() - t0
        losses = dict(zip(held, nets.iql_losses_many(
            [(specs[d], batches[d]) for d in held], expectile=i.expectile, beta=i.beta,
            gamma=i.gamma)))
        total = sum(parts["total"] / holders for parts in losses.values()) if losses else None
        optimizer.zero_grad()
        if total is not None:
            total.backward()
        if distributed:  # sum: each dataset's loss is already divided by its holders
            all_reduce_gradients(params, mean=False)
        if i.actor_cosine_schedule:
            actor_group["lr"] = i.actor_lr * 0.5 * (1 + math.cos(math.pi * (step - 1)
                                                                    / cfg.run.steps))
        if i.max_grad_norm:
            clipped_step(optimizer, i.max_grad_norm)
        else:
            optimizer.step()
        nets.update_target(i.polyak_tau)
        sums["data_s"] += t_data
        sums["step_s"] += time.perf_counter() - t0
        sums["steps"] += 1

        final = step == cfg.run.steps
        if step % cfg.run.log_every and not final and step % cfg.run.checkpoint_every:
            continue
        metrics = _gather_metrics(losses, names, holders, distributed, device)
        metrics.update({
            "step": step,
            "perf/grad_steps_per_s": sums["steps"] / max(sums["step_s"], 1e-9),
            "perf/data_wait_fraction": sums["data_s"] / max(sums["step_s"], 1e-9),
        })
        sums = {"data_s": 0.0, "step_s": 0.0, "steps": 0}
        evaluate_now = cfg.run.eval_episodes > 0 and (
            final or (cfg.run.eval_every and step % cfg.run.eval_every == 0))
        if rank == 0 and evaluate_now:
            metrics.update(_evaluate(nets, cfg, config, specs, obs_stats))
        if rank == 0:
            _say(_progress_line(step, cfg.run.steps, metrics, names))
            gauges.set("rl_agnostic_grad_steps_per_s", metrics["perf/grad_steps_per_s"])
            gauges.set("rl_agnostic_data_wait_fraction", metrics["perf/data_wait_fraction"])
            gauges.set_per("rl_agnostic_normalized_score", {
                n: metrics[f"dataset/{n}/normalized_score"] for n in names
                if f"dataset/{n}/normalized_score" in metrics}, "dataset")
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if final or step % cfg.run.checkpoint_every == 0:
            metrics["sync/max_weight_diff"] = _max_weight_diff(nets, distributed)
            _report_checkpoint(nets, optimizer, generator, step, metrics, cfg, config, specs,
                               obs_stats, rank, world, distributed)


def _say(text: str) -> None:
    """One progress line on the worker's stdout (which Ray forwards to the driver). Not print():
    Ray Train patches it to log the text AND echo it, so each line would show twice."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _gather_metrics(losses: dict[int, dict], names: list[str], holders: int, distributed: bool,
                    device) -> dict[str, float]:
    """Per-dataset losses from every worker (a dataset's value: the mean over its holders)."""
    import torch
    import torch.distributed as dist

    keys = ("value", "q", "policy", "total", "v_mean", "advantage_mean")
    table = torch.zeros(len(names), len(keys), dtype=torch.float64, device=device)
    for d, parts in losses.items():
        table[d] = torch.stack([parts[k].detach().double() for k in keys]) / holders
    if distributed:
        dist.all_reduce(table)
    table = table.cpu().numpy()
    metrics = {}
    for d, name in enumerate(names):
        for k, key in enumerate(keys):
            metrics[f"dataset/{name}/{'loss_' if key in keys[:4] else ''}{key}"] = \
                float(table[d, k])
    metrics["loss/total"] = float(table[:, 3].sum())
    return metrics


def _max_weight_diff(nets, distributed: bool) -> float:
    """Largest |w − w_rank0| over every weight and worker: 0 when the workers are in sync."""
    import torch
    import torch.distributed as dist

    if not distributed:
        return 0.0
    with torch.no_grad():
        mine = torch.cat([t.detach().reshape(-1).double() for t in nets.state_dict().values()])
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        diff = (mine - ref).abs().max()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def _agent(nets, cfg: OfflineConfig, specs: list[EnvSpec], obs_stats: dict[str, RunningMeanStd]):
    from rl_agnostic.online.agent import Agent

    stats = obs_stats if cfg.iql.normalize_observations else {}
    return Agent(nets.actor_critic, cfg.model.kind, {s.env_id: s for s in specs}, stats,
                 clip=OBS_CLIP)


def _evaluate(nets, cfg: OfflineConfig, config: dict, specs: list[EnvSpec],
              obs_stats: dict[str, RunningMeanStd]) -> dict[str, float]:
    """Deterministic episodes of the policy in each dataset's env; raw and normalized returns."""
    from rl_agnostic.online.agent import episode_returns

    agent = _agent(nets, cfg, specs, obs_stats)
    nets.eval()
    metrics: dict[str, float] = {}
    returns_by_env: dict[str, float] = {}
    try:
        for d, name in enumerate(config["names"]):
            env_id = specs[d].env_id
            if env_id not in returns_by_env:
                returns_by_env[env_id] = float(np.mean(episode_returns(
                    env_id, lambda obs, e=env_id: agent.act(e, obs), cfg.run.eval_episodes,
                    seed=cfg.run.seed + 10_000)))
            ret = returns_by_env[env_id]
            info = DatasetInfo(**config["infos"][d])
            metrics[f"dataset/{name}/return_mean"] = ret
            norm = info.normalized(ret)
            if norm is not None:
                metrics[f"dataset/{name}/normalized_score"] = norm
    finally:
        nets.train()
    scores = [v for k, v in metrics.items() if k.endswith("/normalized_score")]
    if scores:
        metrics["eval/normalized_score_mean"] = float(np.mean(scores))
    return metrics


def _progress_line(step: int, steps: int, m: dict[str, float], names: list[str]) -> str:
    parts = [f"step {step:>8,}/{steps:,}", f"{m['perf/grad_steps_per_s']:.1f} steps/s",
             f"data-wait {100 * m['perf/data_wait_fraction']:.1f}%",
             f"loss {m['loss/total']:.3f}"]
    for name in names:
        score = m.get(f"dataset/{name}/normalized_score")
        ret = m.get(f"dataset/{name}/return_mean")
        if ret is not None:
            parts.append(f"{name} {ret:.1f}" + (f" ({score:.1f})" if score is not None else ""))
    return " | ".join(parts)


def _report_checkpoint(nets, optimizer, generator, step: int, metrics: dict, cfg: OfflineConfig,
                       config: dict, specs: list[EnvSpec], obs_stats: dict[str, RunningMeanStd],
                       rank: int, world: int, distributed: bool) -> None:
    """Every worker's sampler state to rank 0, then one checkpoint through ``ray.train.report``
    (which every worker must call); rank 0 also points ``latest`` at it."""
    import ray.train
    import torch
    import torch.distributed as dist

    from rl_agnostic.online.agent import policy_file_contents

    gen_state = generator.get_state()
    states = [gen_state]
    if distributed:
        states = [torch.empty_like(gen_state) for _ in range(world)]
        dist.all_gather(states, gen_state)
    if rank != 0:
        ray.train.report(metrics)
        return
    name = f"ckpt_{step:06d}"
    with tempfile.TemporaryDirectory() as tmp:
        policy = policy_file_contents(
            cfg.model.kind, cfg.model.network, specs, nets.actor_critic.state_dict(),
            obs_stats if cfg.iql.normalize_observations else {},
            step=step, config=cfg.to_dict(), algorithm="iql")
        torch.save(policy, Path(tmp) / POLICY_FILE)
        torch.save({"nets": nets.state_dict(), "optimizer": optimizer.state_dict(),
                    "generators": states, "step": step}, Path(tmp) / STATE_FILE)
        (Path(tmp) / "trainer.json").write_text(json.dumps({"step": step, "metrics": metrics}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=name)
    run = Path(config["run_dir"])
    if (run / name / POLICY_FILE).is_file():
        atomic_write_text(run / "latest", name)


# -- the driver ---------------------------------------------------------------------------------
def train_offline(cfg: OfflineConfig, *, resume: bool = False,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``cfg`` to ``run.steps`` gradient steps; returns the final metrics."""
    log = log or (lambda text: print(text, flush=True))
    prepared = prepare_datasets(cfg, log)
    out = run_dir(cfg)
    has_state = out.is_dir() and any(out.glob("ckpt_*"))
    if not has_state and resume:
        log(f"--resume: no checkpoint in {out}, starting a new run")
    if has_state and resume:
        check_checkpoint_compatible(load_policy_file(out), cfg, f"--resume from {out}")
    else:
        move_previous_run_aside(out, log)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    stats = obs_stats_by_env(prepared)
    for p in prepared:
        log(f"dataset {p.name}: {len(p.data):,} transitions of {p.spec.env_id} (obs "
            f"{p.spec.obs_dim}, {p.spec.action_kind} {p.spec.action_dim}), reward scale "
            f"{p.reward_scale:.3g}, ref scores {p.info.ref_min_score} / {p.info.ref_max_score}")

    from rl_agnostic.distributed import init_ray

    init_ray()
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from rl_agnostic.offline.iql import IQLNetworks

    n_params = sum(p.numel() for p in IQLNetworks(cfg.model.kind, cfg.model.network,
                                                  [p.spec for p in prepared]).parameters())
    r = cfg.resources
    split = len(prepared) < r.num_workers
    log(f"run {cfg.name}: {len(prepared)} datasets, model {cfg.model.kind} ({n_params:,} "
        f"parameters incl. target Q), {r.num_workers} workers "
        f"({'a shard of every dataset each' if split else 'whole datasets assigned'}), dir {out}")
    loop_config = {
        "cfg": cfg.to_dict(), "names": [p.name for p in prepared],
        "specs": [dataclasses.asdict(p.spec) for p in prepared],
        "infos": [dataclasses.asdict(p.info) for p in prepared],
        "reward_scales": [p.reward_scale for p in prepared],
        "obs_stats": {e: s.to_state() for e, s in stats.items()}, "run_dir": str(out),
    }
    names = [p.name for p in prepared]
    trainer = TorchTrainer(
        _train_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=str(out.parent),
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=cfg.run.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures)),
        datasets={p.name: to_ray_dataset(p.data) for p in prepared},
        dataset_config=DataConfig(datasets_to_split=names if split else []),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    metrics["num_parameters"] = n_params
    return metrics
