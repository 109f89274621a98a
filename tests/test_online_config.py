"""Online run config, env assignment, normalization statistics and input errors (no Ray)."""

from __future__ import annotations

import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import ray
import yaml

from rl_agnostic.online.config import ConfigError, TrainConfig, load_train_config
from rl_agnostic.online.envs import (
    NonFiniteObservationError,
    SingleEnvTypeMultiAgentEnv,
    assign_env_types,
)
from rl_agnostic.online.normalize import PerEnvObsNormalizer, RunningMeanStd, discounted_returns

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(p for p in (ROOT / "tune_configs").glob("*.yaml")
                     if not p.name.startswith(("network_", "offline_", "sweep_"))
                     or p.name == "offline_experts.yaml")


def base(**extra):
    return {"name": "t", "envs": ["CartPole-v1", "Pendulum-v1"], **extra}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_run_config_in_tune_configs_loads(path):
    cfg = load_train_config(path)
    assert cfg.env_ids and cfg.name == yaml.safe_load(path.read_text())["name"]


def test_quickstart_has_three_env_types_with_both_action_kinds():
    cfg = load_train_config(ROOT / "tune_configs" / "quickstart.yaml")
    assert len(cfg.envs) == 3 and cfg.model.kind == "agnostic"


@pytest.mark.parametrize("values, message", [
    (base(ppo={"num_epoch": 3}), "unknown key 'num_epoch'; did you mean 'num_epochs'"),
    (base(ppo={"clip": "big"}), "ppo.clip must be float"),
    (base(resources={"num_env_runners": 3}), "multiple of the number of env types"),
    (base(model={"kind": "agnostik"}), "model.kind must be one of"),
    (base(model={"network": {"d_modle": 32}}), "d_modle"),
    (base(runn={}), "unknown key 'runn'; did you mean 'run'"),
    ({"name": "t", "envs": []}, "non-empty list"),
    ({"envs": ["CartPole-v1"]}, "missing required key 'name'"),
    (base(envs=["CartPole-v1", "CartPole-v1"]), "listed twice"),
    (base(resources={"num_learners": 1}), "num_learners must be 0"),
    (base(ppo={"num_minibatches": 7}), "must divide"),
    (base(envs=[{"id": "Pendulum-v1", "gamma": 1.5}]), "envs[0].gamma must be a number in (0, 1]"),
    (base(envs=[{"id": "Pendulum-v1", "gamma": "0.9"}]), "envs[0].gamma must be a number"),
    (base(run={"transfer_shrink": 0}), "run.transfer_shrink must be in (0, 1]"),
    (base(run={"transfer_shrink": 1.5}), "run.transfer_shrink must be in (0, 1]"),
    (base(run={"transfer_reinit": "critic_trunk"}), "run.transfer_reinit must be list"),
    (base(run={"transfer_reinit": ["critic_trunk", 3]}), "run.transfer_reinit must be a list of"),
])
def test_bad_config_is_rejected_with_a_specific_message(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.from_dict(values)


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_train_config(tmp_path / "missing.yaml")


def test_backend_key_selects_envpool():
    cfg = TrainConfig.from_dict({"name": "t", "envs": [{"id": "CartPole-v1", "backend": "envpool"}]})
    assert cfg.env_ids == ["envpool:CartPole-v1"]


def test_env_types_are_assigned_to_runners_as_in_algorithm_1():
    ids = ["a", "b", "c", "d"]
    assert assign_env_types(ids, 4) == {1: ["a"], 2: ["b"], 3: ["c"], 4: ["d"]}
    assert assign_env_types(ids, 8)[5] == ["a"]
    assert assign_env_types(ids, 2) == {1: ["a", "c"], 2: ["b", "d"]}
    assert assign_env_types(ids, 0) == {0: ids}
    with pytest.raises(ValueError, match="multiple"):
        assign_env_types(ids, 6)


# --- bad environments, rejected before Ray starts --------------------------------------------

class _DictObsEnv(gym.Env):
    observation_space = gym.spaces.Dict({"x": gym.spaces.Box(-1, 1, (2,))})
    action_space = gym.spaces.Discrete(2)


class _ImageEnv(gym.Env):
    observation_space = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)
    action_space = gym.spaces.Discrete(2)


class _NaNEnv(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self.t += 1
        obs = np.full(3, np.nan if self.t == 3 else 0.0, np.float32)
        return obs, 1.0, False, False, {}


for _name, _cls in (("DictObsTest-v0", _DictObsEnv), ("ImageObsTest-v0", _ImageEnv),
                    ("NaNObsTest-v0", _NaNEnv)):
    if _name not in gym.envs.registry:
        gym.register(_name, entry_point=_cls)


@pytest.mark.parametrize("env_id, error, message", [
    ("CartPol-v1", ValueError, "unknown env id 'CartPol-v1'.*did you mean CartPole-v1"),
    ("envpool:HalfCheeta-v4", ValueError, "envpool has no environment"),
    ("DictObsTest-v0", TypeError, "DictObsTest-v0: unsupported observation space Dict"),
    ("ImageObsTest-v0", TypeError, "ImageObsTest-v0: unsupported observation space.*no images"),
    ("NaNObsTest-v0", NonFiniteObservationError, "NaNObsTest-v0: non-finite observation at step 3"),
])
def test_bad_env_fails_before_any_actor_starts(env_id, error, message, tmp_path):
    from rl_agnostic.online.trainer import train

    cfg = TrainConfig.from_dict({"name": "bad", "envs": ["CartPole-v1", env_id],
                                 "run": {"output_dir": str(tmp_path)}})
    assert not ray.is_initialized()
    with pytest.raises(error, match=message):
        train(cfg)
    assert not ray.is_initialized()


def test_cli_train_reports_a_bad_config_and_exits_2(tmp_path, capsys):
    from rl_agnostic.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "envs": ["CartPole-v1"], "ppo": {"lr": 1}}))
    with pytest.raises(SystemExit) as exc:
        main(["train", str(path)])
    assert exc.value.code == 2
    assert "unknown key 'lr'" in capsys.readouterr().err


def test_nonfinite_reward_names_env_and_step():
    env = SingleEnvTypeMultiAgentEnv("NaNObsTest-v0", seed=0)
    env.reset()
    env.step({"NaNObsTest-v0": 0})
    env.step({"NaNObsTest-v0": 0})
    with pytest.raises(NonFiniteObservationError, match="step 3"):
        env.step({"NaNObsTest-v0": 0})


# --- normalization statistics ----------------------------------------------------------------

def test_running_mean_std_matches_numpy():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, (1000, 4))
    stats = RunningMeanStd((4,))
    for chunk in np.array_split(data, 7):
        stats.update(chunk)
    np.testing.assert_allclose(stats.mean, data.mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats.std, data.std(0), rtol=1e-10)


def _feed(norm: PerEnvObsNormalizer, env_id: str, data: np.ndarray) -> None:
    for row in data:
        norm.normalize(env_id, row, update=True)


def test_obs_normalizer_merges_heterogeneous_runners_without_double_counting():
    rng = np.random.default_rng(1)
    a1, a2, b = rng.normal(size=(50, 4)), rng.normal(2, 3, size=(70, 4)), rng.normal(size=(30, 3))
    runner1, runner2, runner3 = PerEnvObsNormalizer(), PerEnvObsNormalizer(), PerEnvObsNormalizer()
    _feed(runner1, "A", a1)      # runner 1 and 2 host env A (obs 4), runner 3 env B (obs 3)
    _feed(runner2, "A", a2)
    _feed(runner3, "B", b)
    merged = runner1.merge_states([r.get_state() for r in (runner1, runner2, runner3)])
    for r in (runner1, runner2, runner3):
        r.set_state(merged)
    a = RunningMeanStd.from_state(merged["A"]["base"])
    assert a.count == 120
    # observations arrive as float32
    np.testing.assert_allclose(a.mean, np.concatenate([a1, a2]).mean(0), rtol=1e-6)
    np.testing.assert_allclose(a.std, np.concatenate([a1, a2]).std(0), rtol=1e-6)
    assert RunningMeanStd.from_state(merged["B"]["base"]).count == 30
    # A second sync with new data on one runner counts every sample once; a restarted runner
    # (empty base) does not reset the statistics.
    a3 = rng.normal(size=(10, 4))
    _feed(runner2, "A", a3)
    merged = runner1.merge_states([runner1.get_state(), runner2.get_state(),
                                   PerEnvObsNormalizer().get_state()])
    assert RunningMeanStd.from_state(merged["A"]["base"]).count == 130


def test_discounted_returns_restart_per_episode_chunk():
    r = np.array([1.0, 1.0, 1.0, 2.0, 2.0])
    out = discounted_returns(r, [3, 2], gamma=0.5)
    np.testing.assert_allclose(out, [1.0, 1.5, 1.75, 2.0, 3.0])


@pytest.mark.parametrize("saved, message", [
    ({"encoder_position": "none"}, "encoder_position: checkpoint 'none', config 'modulated'"),
    ({"decoder_pool": "mean"}, "decoder_pool"),
    (None, "model kind"),
])
def test_init_from_or_resuming_a_checkpoint_whose_weights_mean_another_function_fails_before_ray(
        tmp_path, saved, message):
    import torch

    from rl_agnostic.nn import EnvSpec, NetworkConfig, build_actor_critic
    from rl_agnostic.online.agent import policy_file_contents
    from rl_agnostic.online.trainer import OnlineTrainer

    net_cfg = NetworkConfig(d_model=16, **(saved or {}))
    spec = EnvSpec(env_id="CartPole-v1", obs_dim=4, action_kind="discrete", action_dim=2)
    net = build_actor_critic("agnostic", net_cfg, [spec])
    path = tmp_path / "policy.pt"
    torch.save(policy_file_contents("agnostic" if saved else "specific", net_cfg, [spec],
                                    net.state_dict(), {}), path)
    cfg = TrainConfig.from_dict(base(model={"kind": "agnostic", "network": {"d_model": 16}},
                                     run={"output_dir": str(tmp_path)}))
    assert not ray.is_initialized()
    with pytest.raises(ValueError, match=message):
        OnlineTrainer(cfg, init_from=str(path))
    # the same checkpoint as this run's latest: --resume refuses it too
    ckpt = tmp_path / cfg.name / "checkpoints" / "ckpt_000001"
    ckpt.mkdir(parents=True)
    path.rename(ckpt / "policy.pt")
    (ckpt.parent / "latest").write_text(ckpt.name)
    with pytest.raises(ValueError, match=f"resuming from .*{message}"):
        OnlineTrainer(cfg, resume=True)
    assert not ray.is_initialized()


def test_transferred_weights_skip_mismatches_and_reinit_prefixes_and_blend_with_fresh_init():
    from rl_agnostic.online.trainer import transferred_weights

    pre = {"actor.w": np.full(3, 4.0, np.float32), "critic.w": np.ones(2, np.float32),
           "actor.steps": np.array([7]), "enc.CartPole.w": np.ones(4), "dec.w": np.ones(5)}
    fresh = {"actor.w": np.zeros(3, np.float32), "critic.w": np.zeros(2, np.float32),
             "actor.steps": np.array([0]), "dec.w": np.zeros(6), "enc.Acrobot.w": np.zeros(4)}
    plain = transferred_weights(pre, fresh)
    assert set(plain) == {"actor.w", "critic.w", "actor.steps"}  # shape and name must match
    np.testing.assert_array_equal(plain["actor.w"], pre["actor.w"])
    out = transferred_weights(pre, fresh, reinit=["critic"], shrink=0.25)
    assert set(out) == {"actor.w", "actor.steps"}
    np.testing.assert_allclose(out["actor.w"], 1.0)  # 0.25·4 + 0.75·0
    assert out["actor.w"].dtype == np.float32
    assert out["actor.steps"][0] == 7  # integer buffers are copied, never blended


def test_a_transfer_reinit_prefix_naming_no_weight_fails_before_ray(tmp_path):
    import torch

    from rl_agnostic.nn import EnvSpec, NetworkConfig, build_actor_critic
    from rl_agnostic.online.agent import policy_file_contents
    from rl_agnostic.online.trainer import OnlineTrainer

    net_cfg = NetworkConfig(d_model=16)
    spec = EnvSpec(env_id="CartPole-v1", obs_dim=4, action_kind="discrete", action_dim=2)
    net = build_actor_critic("agnostic", net_cfg, [spec])
    path = tmp_path / "policy.pt"
    torch.save(policy_file_contents("agnostic", net_cfg, [spec], net.state_dict(), {}), path)
    cfg = TrainConfig.from_dict(base(model={"kind": "agnostic", "network": {"d_model": 16}},
                                     run={"output_dir": str(tmp_path),
                                          "transfer_reinit": ["critic_trunk", "critc_decoder"]}))
    with pytest.raises(ConfigError, match="'critc_decoder' matches no weight.*critic_trunk"):
        OnlineTrainer(cfg, init_from=str(path))
    assert not ray.is_initialized()


def test_policy_file_is_found_from_every_checkpoint_path_and_bad_files_are_named(tmp_path):
    import torch

    from rl_agnostic.online.trainer import POLICY_FILE, load_policy_file

    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "ckpt_000003").mkdir(parents=True)
    torch.save({"kind": "agnostic", "step": 3}, ckpts / "ckpt_000003" / POLICY_FILE)
    (ckpts / "latest").write_text("ckpt_000003\n")
    for given in (tmp_path / "run", ckpts, ckpts / "latest", ckpts / "ckpt_000003",
                  ckpts / "ckpt_000003" / POLICY_FILE):
        assert load_policy_file(given) == {"kind": "agnostic", "step": 3}, given

    whole = (ckpts / "ckpt_000003" / POLICY_FILE).read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole[: len(whole) // 2])
    not_a_policy = tmp_path / "notes.txt"
    not_a_policy.write_text("ckpt_000003\n")
    for bad in (truncated, not_a_policy):
        with pytest.raises(ValueError, match=f"{re.escape(str(bad))} is not a readable"):
            load_policy_file(bad)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list"):
        load_policy_file(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_policy_file(tmp_path)
