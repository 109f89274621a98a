"""Several env types' batches through the agnostic network in few padded passes
(`ActorCritic.actor_critic_many`, what the PPO learner's forward runs) compute what one pass per
env type computes, and the RLlib module hands the packed values to the PPO loss."""

from __future__ import annotations

import itertools

import gymnasium as gym
import numpy as np
import pytest
import torch
from _reference import randomize_norms

from rl_agnostic.nn import (
    AgnosticActorCritic,
    EnvSpec,
    NetworkConfig,
    build_actor_critic,
)
from rl_agnostic.nn.agnostic import length_buckets
from rl_agnostic.nn.transformer import TransformerLayer


def continuous(env_id: str, obs_dim: int, d: int) -> EnvSpec:
    return EnvSpec(env_id, obs_dim, "continuous", d, (-1.0,) * d, (1.0,) * d)


# mix_to_mix's pretraining shapes, a second discrete env and one long observation (own bucket,
# past the CPU Toeplitz threshold: FFT convolution)
SPECS = [
    EnvSpec("CartPole-v1", 4, "discrete", 2), continuous("MountainCarContinuous-v0", 2, 1),
    continuous("InvertedPendulum-v5", 4, 1), continuous("Hopper-v5", 11, 3),
    continuous("HalfCheetah-v5", 17, 6), EnvSpec("LunarLander-v3", 8, "discrete", 4),
    continuous("BipedalWalker-v3", 24, 4), continuous("Long-v0", 600, 5),
]
VARIANTS = {
    "default": {},
    "shared-encoder": {"shared_encoder": True},
    "two-heads": {"n_heads": 2},
    "paper-positions": {"encoder_position": "none", "decoder_position": "additive",
                        "decoder_pool": "mean"},
    "bigru": {"embedding": "bigru"},  # not packed: one pass per env type
}


def _items(rows=(5, 7, 3, 6, 4, 8, 2, 3)):
    return [(torch.randn(n, spec.obs_dim), spec) for n, spec in zip(rows, SPECS)]


def _gradients(net: torch.nn.Module, outputs) -> list[torch.Tensor]:
    net.zero_grad()
    # weights per output element, so every element's gradient counts differently
    gen = torch.Generator().manual_seed(1)
    loss = sum((d * torch.randn(d.shape, generator=gen)).sum()
               + (v * torch.randn(v.shape, generator=gen)).sum() for d, v in outputs)
    loss.backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_passes_compute_what_one_pass_per_env_type_computes(variant):
    torch.manual_seed(0)
    cfg = NetworkConfig(d_model=16, dropout=0.0, **VARIANTS[variant])
    net = randomize_norms(AgnosticActorCritic(cfg, SPECS)).train()
    items = _items()
    packed = net.actor_critic_many(items)
    single = [net.actor_critic(obs, spec) for obs, spec in items]
    for (obs, spec), (dist, value), (dist1, value1) in zip(items, packed, single):
        assert dist.shape == dist1.shape and value.shape == value1.shape == (obs.shape[0],)
        torch.testing.assert_close(dist, dist1, atol=1e-5, rtol=1e-5, msg=spec.env_id)
        torch.testing.assert_close(value, value1, atol=1e-5, rtol=1e-5, msg=spec.env_id)
    for name, g, g1 in zip([n for n, _ in net.named_parameters()], _gradients(net, packed),
                           _gradients(net, single)):
        torch.testing.assert_close(g, g1, atol=1e-5, rtol=1e-4, msg=name)


def test_baselines_answer_many_batches_one_by_one():
    torch.manual_seed(0)
    net = build_actor_critic("specific", NetworkConfig(d_model=16, dropout=0.0), SPECS[:3])
    items = _items()[:3]
    for (obs, spec), (dist, value) in zip(items, net.actor_critic_many(items)):
        dist1, value1 = net.actor_critic(obs, spec)
        assert torch.equal(dist, dist1) and torch.equal(value, value1)


def _cost(buckets, lengths, rows, overhead):
    return sum(overhead + sum(rows[i] for i in b) * max(lengths[i] for i in b) for b in buckets)


def test_length_buckets_minimize_passes_plus_padding():
    # mix_to_mix's pretraining lengths at the cpu scale's 128 rows per env type
    lengths, rows = [4, 2, 4, 11, 17, 10, 24, 8], [128] * 8
    assert length_buckets(lengths, rows) == [[1, 0, 2], [7, 5, 3], [4, 6]]
    # small batches: overhead dominates, one pass; big ones: padding dominates, more passes
    assert length_buckets(lengths, [8] * 8) == [sorted(range(8), key=lambda i: lengths[i])]
    assert len(length_buckets(lengths, [4096] * 8)) == len(set(lengths))
    # a long observation is never padded onto short ones, nor short ones onto it
    assert length_buckets([4, 376, 11], [64, 64, 64]) == [[0, 2], [1]]
    assert length_buckets([], []) == []
    # optimal among all splits of the length order (brute force over the cut points)
    gen = np.random.default_rng(0)
    for _ in range(20):
        n = int(gen.integers(1, 7))
        lengths = [int(v) for v in gen.integers(1, 40, n)]
        rows = [int(v) for v in gen.integers(1, 300, n)]
        buckets = length_buckets(lengths, rows, pass_overhead=500)
        order = sorted(range(n), key=lambda k: lengths[k])
        assert [i for b in buckets for i in b] == order
        best = min(_cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, n))], lengths, rows, 500)
                   for k in range(n) for cuts in itertools.combinations(range(1, n), k))
        assert _cost(buckets, lengths, rows, 500) == best


@pytest.mark.parametrize("training", [False, True])
def test_padded_keys_do_not_reach_real_positions(training):
    """Whatever the padding holds, the real positions' outputs stay the same: in eval (fused
    attention with a key mask) and in training with dropout (the CPU dropout path)."""
    layer = TransformerLayer(16, 2, 24, dropout=0.2).train(training)
    x = torch.randn(3, 6, 16)
    valid = torch.tensor([[True] * 6, [True] * 2 + [False] * 4, [True] * 4 + [False] * 2])
    noisy = x.clone()
    noisy[~valid] = 1e3 * torch.randn(int((~valid).sum()), 16)
    torch.manual_seed(0)
    y = layer(x, valid)
    torch.manual_seed(0)
    y_noisy = layer(noisy, valid)
    torch.testing.assert_close(y[valid], y_noisy[valid])
    # and without dropout, equal to the unpadded rows
    if not training:
        torch.testing.assert_close(y[1, :2], layer(x[1:2, :2])[0], atol=1e-5, rtol=1e-5)


def test_rllib_module_trains_on_packed_outputs_and_hands_values_to_the_loss():
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec

    from rl_agnostic.online.module import SharedNetworkMultiRLModule, env_module_spec

    spaces = {
        "CartPole-v1": (gym.spaces.Box(-1, 1, (4,), np.float32), gym.spaces.Discrete(2)),
        "Hopper-v5": (gym.spaces.Box(-1, 1, (11,), np.float32),
                      gym.spaces.Box(-1, 1, (3,), np.float32)),
        "Pendulum-v1": (gym.spaces.Box(-1, 1, (3,), np.float32),
                        gym.spaces.Box(-2, 2, (1,), np.float32)),
    }
    torch.manual_seed(0)
    multi = MultiRLModuleSpec(
        multi_rl_module_class=SharedNetworkMultiRLModule,
        model_config={"kind": "agnostic",
                      "network": NetworkConfig(d_model=16, dropout=0.0).to_dict()},
        rl_module_specs={i: env_module_spec(i, *s) for i, s in spaces.items()},
    ).build()
    batch = {i: {Columns.OBS: torch.randn(5, s[0].shape[0])} for i, s in spaces.items()}
    out = multi.forward_train(batch)
    assert set(out) == set(spaces)
    for mid, module in multi._rl_modules.items():
        alone = module.forward_train(batch[mid])[Columns.ACTION_DIST_INPUTS]
        torch.testing.assert_close(out[mid][Columns.ACTION_DIST_INPUTS], alone,
                                   atol=1e-5, rtol=1e-5)
        values = module.compute_values(batch[mid])
        torch.testing.assert_close(out[mid][Columns.EMBEDDINGS], values, atol=1e-5, rtol=1e-5)
        # the PPO loss passes fwd_out[EMBEDDINGS] back: the packed values, not a recomputation
        assert module.compute_values(batch[mid], embeddings=out[mid][Columns.EMBEDDINGS]) is \
            out[mid][Columns.EMBEDDINGS]


def test_ddiql_losses_of_packed_datasets_equal_one_dataset_at_a_time():
    """DD-IQL's workers run every held dataset's minibatch through each network at once
    (target Q, V(s'), V and π, Q over state-action sequences of different lengths)."""
    from rl_agnostic.offline.iql import IQLNetworks

    torch.manual_seed(0)
    specs = [SPECS[0], SPECS[3], SPECS[5], SPECS[1]]  # CartPole, Hopper, LunarLander, MountainCar
    nets = randomize_norms(IQLNetworks("agnostic", NetworkConfig(d_model=16, dropout=0.0), specs))
    gen = torch.Generator().manual_seed(2)
    items = []
    for spec, rows in zip(specs, (6, 5, 7, 4)):
        actions = (torch.randint(0, spec.action_dim, (rows,), generator=gen) if spec.is_discrete
                   else torch.rand(rows, spec.action_dim, generator=gen) * 2 - 1)
        items.append((spec, {"observations": torch.randn(rows, spec.obs_dim, generator=gen),
                             "actions": actions, "rewards": torch.randn(rows, generator=gen),
                             "next_observations": torch.randn(rows, spec.obs_dim, generator=gen),
                             "terminals": (torch.rand(rows, generator=gen) < 0.3).float()}))
    kw = {"expectile": 0.7, "beta": 3.0, "gamma": 0.99}

    def grads(losses):
        nets.zero_grad()
        sum(part["total"] for part in losses).backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for p in nets.parameters()]

    packed = nets.iql_losses_many(items, **kw)
    single = [nets.iql_losses(spec, batch, **kw) for spec, batch in items]
    for part, part1 in zip(packed, single):
        for key in ("value", "q", "policy", "total", "v_mean"):
            torch.testing.assert_close(part[key], part1[key], atol=1e-5, rtol=1e-5)
    for g, g1 in zip(grads(packed), grads(single)):
        torch.testing.assert_close(g, g1, atol=1e-5, rtol=1e-4)


def test_packing_benchmark_rows_report_both_ways(tmp_path, monkeypatch):
    """benchmarks/packing.py still runs: tiny rows of both kinds and its report (no timing
    checks)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "packing.py"
    spec = importlib.util.spec_from_file_location("packing_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = NetworkConfig(d_model=16, s4_layers=1, transformer_layers=1, dropout=0.0)
    row = bench.measure(cfg, SPECS[:4], rows=4, rounds=1, steps=1)
    assert row["speedup"] > 0 and row["max_abs_output_diff"] < 1e-5
    assert sorted(e for b in row["buckets"] for e in b) == sorted(s.env_id for s in SPECS[:4])
    iql = bench.measure_iql(cfg, SPECS[:3], rows=4, rounds=1, steps=1)
    assert iql["ms_per_update_packed"] > 0 and iql["ms_per_update_one_pass_per_env"] > 0
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    bench.write([{"network": "n", "env_set": "s", **row}],
                [{"network": "n", "worker": "w", **iql}],
                {"ppo_threads": 1, "iql_threads": 1, "load_average": (0.0, 0.0, 0.0)})
    for name in ("packing.md", "packing.json", "packing.png"):
        assert (tmp_path / name).stat().st_size > 0, name
