"""Online DD-PPO on a real local Ray: heterogeneous env types through one shared network.

Small on purpose (tiny network, short rollouts): every test builds real EnvRunner actors and a
real RLlib learner (or two learner actors with gloo), and trains for a few iterations.
"""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import ray
import torch
from ray import cloudpickle
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner

from rl_agnostic.online.config import TrainConfig
from rl_agnostic.online.learner import SharedNetworkPPOLearner
from rl_agnostic.online.trainer import OnlineTrainer, latest_checkpoint

# Learner actors unpickle the recording learner below: ship this module by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY_NET = {"preset": "cpu", "d_model": 16, "s4_layers": 1, "transformer_layers": 1,
            "mlp_depth": 1, "dropout": 0.0}
ENVS = ["CartPole-v1", "Pendulum-v1", "Acrobot-v1"]  # obs 4 / 3 / 6; discrete, continuous


class RecordingLearner(SharedNetworkPPOLearner):
    """Records, per update, the module ids that reached the loss, and checks that the gradient
    applied is the gradient of the SUM of the per-module losses (and, when distributed, the
    mean of every learner's local gradient)."""

    def compute_gradients(self, loss_per_module, **kwargs):
        params = list(self._params.values())
        per_module = {
            mid: torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            for mid, loss in loss_per_module.items()}
        local = [sum((g[i] if g[i] is not None else torch.zeros_like(p))
                     for g in per_module.values()) for i, p in enumerate(params)]
        total = float(sum(loss.item() for loss in loss_per_module.values()))
        grads = super().compute_gradients(loss_per_module, **kwargs)
        applied = [grads[self.get_param_ref(p)] for p in params]
        if not hasattr(self, "records"):
            self.records = []
        self.records.append({
            "modules": sorted(loss_per_module), "total_loss": total,
            "local": torch.cat([g.reshape(-1) for g in local]).detach().clone(),
            "applied": torch.cat([g.reshape(-1) for g in applied]).detach().clone(),
        })
        return grads


def tiny_config(tmp_path, name="t", envs=ENVS, **sections) -> TrainConfig:
    values = {
        "name": name, "envs": list(envs),
        "model": {"kind": "agnostic", "network": TINY_NET},
        "ppo": {"num_epochs": 2, "num_minibatches": 2, "rollout_steps": 32},
        "resources": {"num_envs_per_env_runner": 2, "num_cpus_per_env_runner": 0.25,
                      "learner_torch_threads": 1},
        "run": {"output_dir": str(tmp_path), "checkpoint_every": 1, "env_steps_per_env": 10**9},
    }
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value}
    return TrainConfig.from_dict(values)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def _train(trainer: OnlineTrainer, iterations: int):
    items = []
    for item in trainer.iterate():
        items.append(item)
        if len(items) == iterations:
            break
    return items


def _with_learner(cfg, learner_class) -> OnlineTrainer:
    return OnlineTrainer(cfg, customize=lambda c: c.training(learner_class=learner_class))


def test_three_env_types_train_through_one_network_and_losses_sum(local_ray, tmp_path):
    trainer = _with_learner(tiny_config(tmp_path), RecordingLearner)
    try:
        items = _train(trainer, 2)
        learner = trainer.algo.learner_group._learner
        records = learner.records
        # 2 iterations × 2 epochs × ≥ 2 minibatches (RLlib adds a bootstrap row per episode
        # chunk, so a batch can hold a few rows more than 2 minibatches), all 3 env types in each.
        assert len(records) >= 8
        assert all(r["modules"] == sorted(ENVS) for r in records)
        for r in records:
            torch.testing.assert_close(r["applied"], r["local"], rtol=1e-5, atol=1e-7)
        # One optimizer, under one module id, over every shared parameter exactly once.
        assert sum(len(v) for v in learner._module_optimizers.values()) == 1
        net_params = {id(p) for p in learner.module.network.parameters()}
        assert {id(p) for p in learner._params.values()} == net_params
        # Every env type's observations went through the same network object.
        assert all(learner.module[e].network is learner.module.network for e in ENVS)
        last = items[-1]
        assert set(last.env_steps) == set(ENVS) and min(last.env_steps.values()) > 0
        assert last.metrics["perf/env_steps_per_s"] > 0
        lines = (trainer.dir / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2 and "env/CartPole-v1/env_steps" in json.loads(lines[-1])
        assert "env/CartPole-v1/episode_return_mean" in last.metrics
        assert list((trainer.dir / "tensorboard").glob("events.out.tfevents*"))
        # Runner-side weights equal the learner's after the sync (shipped once, owner module).
        runner_state = trainer.algo.env_runner_group.foreach_env_runner(
            lambda r: {k: v.clone() for k, v in r.module.network.state_dict().items()},
            local_env_runner=False)[0]
        for k, v in learner.module.network.state_dict().items():
            torch.testing.assert_close(runner_state[k], v)
    finally:
        trainer.stop()


def test_checkpoint_resume_continues_step_count_and_evaluate_loads_it(local_ray, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative output dir, as in the shipped configs
    cfg = tiny_config(tmp_path, name="resume", envs=["CartPole-v1", "Pendulum-v1"],
                      run={"output_dir": "runs"})
    trainer = OnlineTrainer(cfg)
    try:
        saved = _train(trainer, 2)[-1]
    finally:
        trainer.stop()
    ckpt = latest_checkpoint(trainer.dir)
    assert ckpt is not None and ckpt.name == "ckpt_000002"
    assert not list(ckpt.parent.glob("*.tmp"))
    resumed = OnlineTrainer(cfg, resume=True)
    try:
        assert resumed.iteration == 2
        nxt = _train(resumed, 1)[-1]
    finally:
        resumed.stop()
    assert nxt.iteration == 3
    for env_id, steps in saved.env_steps.items():
        # continues from the saved count: one more iteration of 2 copies × 32 steps (+ a few)
        assert steps + 64 <= nxt.env_steps[env_id] <= steps + 80
    # resumed at its budget (a finished run), it trains nothing more
    finished = OnlineTrainer(cfg, resume=True, stop_env_steps=min(nxt.env_steps.values()))
    try:
        assert list(finished.iterate()) == []
    finally:
        finished.stop()

    from rl_agnostic.cli import main

    assert main(["evaluate", str(trainer.dir), "--env", "CartPole-v1", "--env", "Pendulum-v1",
                 "--episodes", "1"]) == 0

    # a new (not resumed) run under the same name starts clean; the old one is kept whole
    fresh = OnlineTrainer(cfg)
    try:
        assert fresh.iteration == 0 and latest_checkpoint(fresh.dir) is None
        assert _train(fresh, 1)[-1].iteration == 1
    finally:
        fresh.stop()
    (aside,) = [p for p in trainer.dir.parent.iterdir() if p.name.startswith("resume.")]
    assert latest_checkpoint(aside).name == "ckpt_000003"
    assert len((aside / "metrics.jsonl").read_text().splitlines()) == 3
    assert len((fresh.dir / "metrics.jsonl").read_text().splitlines()) == 1


def test_parameter_count_is_the_same_for_two_and_five_env_types(local_ray, tmp_path):
    from rl_agnostic.online.algo import build_algorithm_config, env_spaces

    counts, sizes = [], []
    for envs in (ENVS[:2], ENVS + ["LunarLander-v3", "MountainCarContinuous-v0"]):
        cfg = tiny_config(tmp_path, envs=envs)
        spec = build_algorithm_config(cfg, env_spaces(cfg, probe_steps=0)).rl_module_spec
        module = spec.build()
        counts.append(module.num_parameters())
        state = module.get_state()
        sizes.append(sum(len(s) for s in state.values()))
        assert sum(1 for s in state.values() if s) == 1  # weights shipped under one module id
    assert counts[0] == counts[1]
    assert sizes[0] == sizes[1]


def test_killed_env_runner_is_replaced_and_training_continues(local_ray, tmp_path):
    trainer = OnlineTrainer(tiny_config(tmp_path, name="fault", envs=ENVS[:2]))
    try:
        first = _train(trainer, 1)[-1]
        group = trainer.algo.env_runner_group
        ray.kill(group._worker_manager._actors[1], no_restart=False)  # runner 1: CartPole
        healthy_again = None
        for item in trainer.iterate():
            if healthy_again is None and group.num_healthy_remote_workers() == 2:
                healthy_again = item.env_steps
            elif healthy_again is not None:
                break  # one full iteration with the restarted runner back in service
            assert item.iteration < 30, "the killed env runner was never restored"
        assert group.num_healthy_remote_workers() == 2
        for env_id in ENVS[:2]:
            assert item.env_steps[env_id] > healthy_again[env_id] > first.env_steps[env_id]
    finally:
        trainer.stop()


def test_two_learners_hold_identical_weights_and_apply_the_mean_gradient(local_ray, tmp_path):
    cfg = tiny_config(tmp_path, name="ddp", envs=ENVS[:2],
                      resources={"num_learners": 2, "num_env_runners": 2})
    trainer = _with_learner(cfg, RecordingLearner)
    try:
        _train(trainer, 2)
        group = trainer.algo.learner_group
        weights = [r.get() for r in group.foreach_learner(
            lambda l: {k: v.detach().clone() for k, v in l.module.network.state_dict().items()})]
        records = [r.get() for r in group.foreach_learner(lambda l: l.records)]
    finally:
        trainer.stop()
    assert len(weights) == 2
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
    assert len(records[0]) == len(records[1]) > 0
    for r0, r1 in zip(records[0], records[1]):
        assert torch.equal(r0["applied"], r1["applied"])
        torch.testing.assert_close(r0["applied"], (r0["local"] + r1["local"]) / 2,
                                   rtol=1e-5, atol=1e-7)
    # the learners saw different data, so without the all-reduce they would have diverged
    assert not torch.equal(records[0][0]["local"], records[1][0]["local"])


@pytest.mark.parametrize("kind, adds_layers", [("agnostic", False), ("specific", True)])
def test_init_from_transfers_to_new_env_types(local_ray, tmp_path, kind, adds_layers):
    pre = tiny_config(tmp_path, name=f"pre_{kind}", envs=["CartPole-v1", "Pendulum-v1"],
                      model={"kind": kind})
    trainer = OnlineTrainer(pre)
    try:
        _train(trainer, 1)
        pre_state = trainer.network_state()
    finally:
        trainer.stop()
    # the agnostic transfer also keeps its critic at the fresh init (run.transfer_reinit)
    critic = ("critic_trunk", "value_decoder")
    new = tiny_config(tmp_path, name=f"transfer_{kind}",
                      envs=["Acrobot-v1", "MountainCarContinuous-v0"], model={"kind": kind},
                      run={} if adds_layers else {"transfer_reinit": list(critic)})
    transfer = OnlineTrainer(new, init_from=str(trainer.dir))
    try:
        state = transfer.network_state()
        loaded = [k for k in state if k in pre_state
                  and np.array_equal(np.asarray(state[k]), np.asarray(pre_state[k]))]
        if adds_layers:  # new encoder/decoder layers for the new envs, shared middle loaded
            assert set(state) - set(pre_state) and loaded
            assert transfer.num_parameters > 0
        else:  # the agnostic network: the same tensors, every one but the critic's loaded
            assert set(state) == set(pre_state)
            assert {k.split(".")[0] for k in set(state) - set(loaded)} == set(critic)
        _train(transfer, 1)
    finally:
        transfer.stop()


def test_train_runs_to_its_budget_and_evaluates_each_env(local_ray, tmp_path):
    from rl_agnostic.online.trainer import train

    cfg = tiny_config(tmp_path, name="budget", envs=["CartPole-v1", "Pendulum-v1"],
                      run={"evaluation_episodes": 1, "checkpoint_every": 100})
    metrics = train(cfg, stop_env_steps=100)  # 64 steps per env per iteration → 2 iterations
    assert metrics["iteration"] == 2
    assert min(metrics[f"env/{e}/env_steps"] for e in cfg.env_ids) >= 100
    assert metrics["env/CartPole-v1/evaluation_return_mean"] >= 1.0
    assert metrics["env/Pendulum-v1/evaluation_return_mean"] < 0.0
    assert latest_checkpoint(tmp_path / "budget").name == "ckpt_000002"  # final checkpoint


@pytest.mark.parametrize("kind", ["agnostic", "specific", "padded", "single"])
def test_every_model_kind_builds_as_one_shared_network(tmp_path, kind):
    from rl_agnostic.online.algo import build_algorithm_config, env_spaces

    envs = ["CartPole-v1"] if kind == "single" else ENVS
    cfg = tiny_config(tmp_path, envs=envs, model={"kind": kind})
    module = build_algorithm_config(cfg, env_spaces(cfg, probe_steps=0)).rl_module_spec.build()
    assert module.network.kind == kind
    assert all(module[e].network is module.network for e in envs)
    obs = {e: torch.zeros(2, module[e].env_spec.obs_dim) for e in envs}
    out = module.forward_inference({e: {"obs": obs[e]} for e in envs})
    for e in envs:
        spec = module[e].env_spec
        width = spec.action_dim * (1 if spec.is_discrete else 2)
        assert out[e]["action_dist_inputs"].shape == (2, width)


def test_each_env_type_gets_its_own_discount_in_gae_and_reward_scaling(tmp_path):
    """Env entries may set ``gamma``: the learner's GAE equals RLlib's own GAE run with that
    module's γ (and differs from it run with the other γ), on the learner's real module."""
    from ray.rllib.connectors.common.numpy_to_tensor import NumpyToTensor
    from ray.rllib.connectors.learner import GeneralAdvantageEstimation
    from ray.rllib.core.columns import Columns
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    from rl_agnostic.online.algo import build_algorithm_config, env_spaces
    from rl_agnostic.online.gae import PerEnvGeneralAdvantageEstimation
    from rl_agnostic.online.normalize import PerEnvRewardScaler

    cfg = tiny_config(tmp_path, envs=[{"id": "CartPole-v1", "gamma": 0.5}, "Pendulum-v1"])
    assert cfg.env_gammas == {"CartPole-v1": 0.5, "Pendulum-v1": 0.99}
    spaces = env_spaces(cfg, probe_steps=0)
    learner = build_algorithm_config(cfg, spaces).build_learner(spaces=spaces)
    connectors = learner._learner_connector.connectors
    pieces = [type(c) for c in connectors]
    # RLlib's one-γ GAE is replaced; rewards are scaled (on numpy) before GAE.
    assert GeneralAdvantageEstimation not in pieces
    assert pieces[-1] is PerEnvGeneralAdvantageEstimation
    scaler = pieces.index(PerEnvRewardScaler)
    assert scaler == pieces.index(NumpyToTensor) - 1
    assert connectors[scaler].env_gammas == cfg.env_gammas

    module = learner.module
    rng = np.random.default_rng(0)
    episodes, batch = [], {}
    for mid in cfg.env_ids:
        obs_dim, lens = module[mid].env_spec.obs_dim, [7, 5]
        episodes += [SingleAgentEpisode(observations=[np.zeros(obs_dim)] * (n + 1),
                                        actions=[0] * n, rewards=[0.0] * n, module_id=mid,
                                        len_lookback_buffer=0) for n in lens]
        # The first episode terminates, the second is a truncated chunk.
        terminated, truncated = np.zeros(12, bool), np.zeros(12, bool)
        terminated[6], truncated[11] = True, True
        batch[mid] = {Columns.OBS: torch.tensor(rng.normal(size=(12, obs_dim)), dtype=torch.float32),
                      Columns.REWARDS: rng.normal(size=12).astype(np.float32),
                      Columns.TERMINATEDS: terminated, Columns.TRUNCATEDS: truncated}
    out = connectors[-1](rl_module=module, episodes=episodes, batch=copy.deepcopy(batch))
    for mid, other in [("CartPole-v1", 0.99), ("Pendulum-v1", 0.5)]:
        def stock(gamma, mid=mid):
            return GeneralAdvantageEstimation(gamma=gamma, lambda_=0.95)(
                rl_module=module, episodes=episodes, batch={mid: copy.deepcopy(batch[mid])})[mid]
        for column in ("advantages", "value_targets"):
            torch.testing.assert_close(out[mid][column], stock(cfg.env_gammas[mid])[column])
        assert not torch.allclose(out[mid]["value_targets"], stock(other)["value_targets"])


def test_one_runner_hosting_discrete_then_continuous_types_samples_both(local_ray, tmp_path):
    # RLlib's vector env takes every agent's spaces from its FIRST copy (here CartPole's), and
    # unsquashes continuous actions with them: without the co-hosted spaces, the Pendulum copies
    # of the same runner fail with KeyError('Pendulum-v1').
    cfg = tiny_config(tmp_path, name="cohost", envs=["CartPole-v1", "Pendulum-v1"],
                      resources={"num_env_runners": 1, "num_envs_per_env_runner": 4})
    trainer = OnlineTrainer(cfg)
    try:
        items = _train(trainer, 2)
        assert all(items[-1].env_steps[e] > 0 for e in cfg.env_ids), items[-1].env_steps
    finally:
        trainer.stop()


class RLlibClipLearner(SharedNetworkPPOLearner):
    """RLlib's own clip and optimizer step (a norm and a multiply per tensor, then per-tensor
    finiteness checks), as the reference for the learner's folded clip."""

    postprocess_gradients_for_module = PPOTorchLearner.postprocess_gradients_for_module
    apply_gradients = PPOTorchLearner.apply_gradients


@pytest.mark.parametrize("grad_scale", [1e-4, 10.0, float("nan")])  # unclipped, clipped, NaN
def test_learner_clip_folded_into_adam_equals_rllibs_clip_then_step(tmp_path, grad_scale):
    from rl_agnostic.online.algo import build_algorithm_config, env_spaces

    cfg = tiny_config(tmp_path, envs=["CartPole-v1", "Pendulum-v1"])
    spaces = env_spaces(cfg, probe_steps=0)
    learners = [build_algorithm_config(cfg, spaces).training(learner_class=cls)
                .build_learner(spaces=spaces) for cls in (SharedNetworkPPOLearner, RLlibClipLearner)]
    learners[1].module.network.load_state_dict(learners[0].module.network.state_dict())
    norms = []
    for step in range(2):
        for learner in learners:
            gen = torch.Generator().manual_seed(step)
            grads = {}
            for ref, p in learner._params.items():
                p.grad = torch.randn(p.shape, generator=gen) * grad_scale
                grads[ref] = p.grad
            learner.apply_gradients(learner.postprocess_gradients(grads))
            norms.append(learner.metrics.peek(
                (learner.module.weights_owner, "gradients_default_optimizer_global_norm")))
        nets = [learner.module.network for learner in learners]
        for (name, a), b in zip(nets[1].named_parameters(), nets[0].parameters()):
            assert torch.isfinite(b).all(), name
            torch.testing.assert_close(b, a, rtol=0, atol=2e-6 * max(1.0, a.abs().max().item()),
                                       msg=name)
    if grad_scale == grad_scale:  # finite: the same norm logged
        torch.testing.assert_close(torch.tensor(norms[::2]), torch.tensor(norms[1::2]), rtol=1e-5,
                                   atol=0)
