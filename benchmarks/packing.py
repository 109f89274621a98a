"""Multi-env updates, one pass per env type against packed passes, side by side.

The learner's forward runs every env type's minibatch through the one agnostic network
(`ActorCritic.actor_critic_many`). Run one by one, each env type pays the network's per-op
overhead once per update; packed, batches of close observation lengths share one padded pass
(`rl_agnostic.nn.agnostic.length_buckets`). This times one PPO update — actor log-prob, entropy
and value of every env type's minibatch, clipped loss summed over env types, backward,
grad-norm clip 0.5, Adam — both ways, in one process, alternating the two in rounds (the
machine is noisy) and reporting medians, for the env sets and networks the experiments use:

- mix_to_mix's pretraining and transfer env sets (8 env types each), 128 rows per env type
  (the cpu scale's 4 minibatches of 8 copies × 64 steps),
- the mix_to_mix cpu network (d_model 32, 1 S4 + 1 Transformer layer per block, no dropout)
  and the ``cpu`` preset (d_model 64, the paper's 2 + 2 layers, dropout 0.1).

The same for a DD-IQL worker's gradient step over its datasets (`IQLNetworks.iql_losses_many`).

Writes ``results/packing.md``, ``results/packing.json`` and ``results/packing.png``.

    python benchmarks/packing.py               # ~6 min on 2 cores
    python benchmarks/packing.py --rounds 2    # shorter
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch

from rl_agnostic.envs.spec import EnvSpec
from rl_agnostic.nn import build_actor_critic
from rl_agnostic.nn.agnostic import length_buckets
from rl_agnostic.nn.config import NetworkConfig
from rl_agnostic.nn.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def _c(env_id: str, obs: int, act: int) -> EnvSpec:
    return EnvSpec(env_id, obs, "continuous", act, (-1.0,) * act, (1.0,) * act)


def _d(env_id: str, obs: int, act: int) -> EnvSpec:
    return EnvSpec(env_id, obs, "discrete", act)


# tune_configs/experiments/mix_to_mix.yaml (gymnasium v5 / v3 / v1 shapes)
ENV_SETS = {
    "mix_to_mix pretrain": [
        _d("CartPole-v1", 4, 2), _c("MountainCarContinuous-v0", 2, 1),
        _c("InvertedPendulum-v5", 4, 1), _c("Hopper-v5", 11, 3), _c("HalfCheetah-v5", 17, 6),
        _c("Reacher-v5", 10, 2), _c("BipedalWalker-v3", 24, 4), _c("Swimmer-v5", 8, 2)],
    "mix_to_mix transfer": [
        _d("Acrobot-v1", 6, 3), _d("LunarLander-v3", 8, 4), _c("Pendulum-v1", 3, 1),
        _c("LunarLanderContinuous-v3", 8, 2), _c("InvertedDoublePendulum-v5", 9, 1),
        _c("Walker2d-v5", 17, 6), _c("Pusher-v5", 23, 7), _c("Ant-v5", 27, 8)],
}
NETWORKS = {
    "mix_to_mix cpu (d32, 1+1 layers, no dropout)": dataclasses.replace(
        NetworkConfig.cpu(), d_model=32, d_state=32, dim_feedforward=32, mlp_hidden=32,
        s4_layers=1, transformer_layers=1, dropout=0.0),
    "cpu preset (d64, 2+2 layers, dropout 0.1)": NetworkConfig.cpu(),
}


def measure(cfg: NetworkConfig, specs: list[EnvSpec], rows: int, rounds: int,
            steps: int) -> dict:
    torch.manual_seed(0)
    net = build_actor_critic("agnostic", cfg, specs).train()
    opt = make_optimizer(net)
    items = [(torch.randn(rows, s.obs_dim), s) for s in specs]
    actions = [torch.randint(0, s.action_dim, (rows,)) if s.is_discrete
               else torch.randn(rows, s.action_dim) * 0.3 for s in specs]
    old_logp, adv, returns = (torch.randn(len(specs), rows) for _ in range(3))

    def update(packed: bool) -> None:
        opt.zero_grad(set_to_none=True)
        outs = (net.actor_critic_many(items) if packed
                else [net.actor_critic(obs, spec) for obs, spec in items])
        loss = 0.0
        for i, ((dist, value), (_, spec)) in enumerate(zip(outs, items)):
            ratio = torch.exp(net.log_prob(spec, dist, actions[i]) - old_logp[i])
            pg = -torch.min(ratio * adv[i], ratio.clamp(0.8, 1.2) * adv[i]).mean()
            vf = 0.5 * (value - returns[i]).square().mean()
            loss = loss + pg + vf - 0.01 * net.entropy(spec, dist).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
        opt.step()

    with torch.no_grad():
        net.eval()
        diff = max((a - b).abs().max().item()
                   for (a, va), (b, vb) in zip(net.actor_critic_many(items),
                                               [net.actor_critic(o, s) for o, s in items])
                   for a, b in ((a, b), (va, vb)))
        net.train()
    buckets = length_buckets([s.obs_dim for s in specs], [rows] * len(specs))
    return _timed(update, rows * len(specs), rounds, steps) | {
        "env_types": len(specs), "rows_per_env": rows,
        "buckets": [[specs[i].env_id for i in b] for b in buckets],
        "max_abs_output_diff": diff, "rounds": rounds, "updates_per_round": steps,
    }


# offline_table1's cpu scale (tune_configs/experiments/): 6 datasets over 2 workers, 3 whole
# datasets each
IQL_WORKERS = {
    "DD-IQL worker 0": [_c("InvertedPendulum-v5", 4, 1), _c("Hopper-v5", 11, 3),
                        _c("Hopper-v5 (medium-expert)", 11, 3)],
    "DD-IQL worker 1": [_c("Reacher-v5", 10, 2), _d("LunarLander-v3", 8, 4),
                        _d("Acrobot-v1", 6, 3)],
}
IQL_NETWORK = ("offline_cpu (d64, 1+1 layers, no dropout)",
               dataclasses.replace(NetworkConfig.cpu(), s4_layers=1, transformer_layers=1,
                                   dropout=0.0))


def measure_iql(cfg: NetworkConfig, specs: list[EnvSpec], rows: int, rounds: int,
                steps: int) -> dict:
    """One DD-IQL gradient step over a worker's datasets: `IQLNetworks.iql_losses` once per
    dataset against `iql_losses_many`, backward, Adam, Polyak update."""
    from rl_agnostic.offline.iql import IQLNetworks

    torch.manual_seed(0)
    nets = IQLNetworks("agnostic", cfg, specs)
    opt = torch.optim.Adam(nets.optimizer_groups(3e-4, 3e-4, 1e-3))
    items = [(s, {"observations": torch.randn(rows, s.obs_dim),
                  "actions": (torch.randint(0, s.action_dim, (rows,)) if s.is_discrete
                              else torch.rand(rows, s.action_dim) * 2 - 1),
                  "rewards": torch.randn(rows), "next_observations": torch.randn(rows, s.obs_dim),
                  "terminals": torch.zeros(rows)}) for s in specs]
    kw = {"expectile": 0.7, "beta": 3.0, "gamma": 0.99}

    def update(packed: bool) -> None:
        opt.zero_grad(set_to_none=True)
        losses = (nets.iql_losses_many(items, **kw) if packed
                  else [nets.iql_losses(s, b, **kw) for s, b in items])
        sum(part["total"] for part in losses).backward()
        opt.step()
        nets.update_target(0.005)

    return _timed(update, rows * len(specs), rounds, steps) | {
        "env_types": len(specs), "rows_per_env": rows, "rounds": rounds,
        "updates_per_round": steps}


def _timed(update, samples: int, rounds: int, steps: int) -> dict:
    for packed in (False, True):
        update(packed)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for packed in ((False, True) if r % 2 == 0 else (True, False)):
            t0 = time.perf_counter()
            for _ in range(steps):
                update(packed)
            times[packed].append((time.perf_counter() - t0) / steps)
    one, pk = statistics.median(times[False]), statistics.median(times[True])
    return {"ms_per_update_one_pass_per_env": 1e3 * one, "ms_per_update_packed": 1e3 * pk,
            "samples_per_s_one_pass_per_env": samples / one, "samples_per_s_packed": samples / pk,
            "speedup": one / pk}


def write(rows: list[dict], iql_rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "packing.json").write_text(json.dumps(
        {"ppo": rows, "ddiql": iql_rows, **meta}, indent=2))
    lines = [
        "# Multi-env updates: one pass per env type vs packed passes",
        "",
        (f"Machine: {os.cpu_count()} cores, load average before the run "
         f"{meta['load_average'][0]:.2f}. Each figure is the median of {rows[0]['rounds']} "
         f"alternating rounds of {rows[0]['updates_per_round']} updates each way, in one "
         "process (the machine's speed drifts by ±20 %)."),
        "",
        f"## PPO learner update (torch threads {meta['ppo_threads']}, the learner's default)",
        "",
        (f"Every env type's minibatch ({rows[0]['rows_per_env']} rows each): forward, clipped "
         "loss, backward, grad clip, Adam."),
        "",
        ("| network | env set | ms/update, one pass per env type | ms/update, packed "
         "| speed-up | buckets | max output diff |"),
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['network']} | {r['env_set']} | {r['ms_per_update_one_pass_per_env']:.1f} "
            f"| {r['ms_per_update_packed']:.1f} | **{r['speedup']:.2f}×** "
            f"| {len(r['buckets'])} | {r['max_abs_output_diff']:.1e} |")
    lines += ["", "Buckets (observation lengths padded to each bucket's longest):", ""]
    for r in rows[: len(ENV_SETS)]:
        lines.append(f"- {r['env_set']}: " + " · ".join(
            "[" + ", ".join(b) + "]" for b in r["buckets"]))
    lines += [
        "",
        (f"## DD-IQL gradient step on one worker (torch threads {meta['iql_threads']}, the "
         "worker's default)"),
        "",
        (f"{iql_rows[0]['network']}, batch {iql_rows[0]['rows_per_env']} per dataset: target "
         "Q, V(s'), V, twin Q and π of every held dataset, backward, Adam, Polyak update "
         "(offline_table1's cpu-scale split of 6 datasets over 2 workers)."),
        "",
        "| worker's datasets | ms/step, one dataset at a time | ms/step, packed | speed-up |",
        "|---|---|---|---|",
    ]
    for r in iql_rows:
        lines.append(f"| {r['worker']} | {r['ms_per_update_one_pass_per_env']:.1f} "
                     f"| {r['ms_per_update_packed']:.1f} | **{r['speedup']:.2f}×** |")
    lines += ["", "![ms per update](packing.png)", "",
              "Reproduce: `python benchmarks/packing.py`."]
    (RESULTS / "packing.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['network'].split(' (')[0]}\n{r['env_set']}" for r in rows] + [
        f"DD-IQL\n{r['worker'].split(':')[0]}" for r in iql_rows]
    every = rows + iql_rows
    xs = range(len(every))
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.bar([x - 0.2 for x in xs], [r["ms_per_update_one_pass_per_env"] for r in every], 0.4,
           label="one pass per env type")
    ax.bar([x + 0.2 for x in xs], [r["ms_per_update_packed"] for r in every], 0.4,
           label="packed")
    for x, r in zip(xs, every):
        ax.text(x + 0.2, r["ms_per_update_packed"], f"{r['speedup']:.2f}×", ha="center",
                va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("ms per update (median)")
    ax.set_title("Multi-env update: one pass per env type vs packed passes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "packing.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4, help="updates per round and way")
    parser.add_argument("--rows", type=int, default=128, help="PPO rows per env type")
    parser.add_argument("--iql-rows", type=int, default=256, help="DD-IQL batch per dataset")
    args = parser.parse_args()
    meta = {"ppo_threads": 2, "iql_threads": 1, "load_average": os.getloadavg()}
    rows, iql_rows = [], []
    print(f"{'network':<46} {'env set':<20} {'one/env ms':>10} {'packed ms':>10} {'speed-up':>8}")
    torch.set_num_threads(meta["ppo_threads"])
    for net_name, cfg in NETWORKS.items():
        for set_name, specs in ENV_SETS.items():
            r = {"network": net_name, "env_set": set_name,
                 **measure(cfg, specs, args.rows, args.rounds, args.steps)}
            rows.append(r)
            print(f"{net_name:<46} {set_name:<20} {r['ms_per_update_one_pass_per_env']:>10.1f} "
                  f"{r['ms_per_update_packed']:>10.1f} {r['speedup']:>7.2f}x", flush=True)
    torch.set_num_threads(meta["iql_threads"])
    net_name, cfg = IQL_NETWORK
    for worker, specs in IQL_WORKERS.items():
        r = {"network": net_name, "worker": worker + ": " + ", ".join(s.env_id for s in specs),
             **measure_iql(cfg, specs, args.iql_rows, args.rounds, args.steps)}
        iql_rows.append(r)
        print(f"{net_name:<46} {worker:<20} {r['ms_per_update_one_pass_per_env']:>10.1f} "
              f"{r['ms_per_update_packed']:>10.1f} {r['speedup']:>7.2f}x", flush=True)
    write(rows, iql_rows, meta)
    print(f"wrote {RESULTS / 'packing.md'}, packing.json and packing.png")


if __name__ == "__main__":
    main()
