"""rl_agnostic.envs.make: real gymnasium and envpool environments, their specs, and the errors."""

from __future__ import annotations

import numpy as np
import pytest

from rl_agnostic.envs import EnvSpec, check_env_id, env_spec, make_env, parse_env_id


@pytest.mark.parametrize(
    ("env_id", "obs_dim", "kind", "action_dim"),
    [
        ("CartPole-v1", 4, "discrete", 2),
        ("Pendulum-v1", 3, "continuous", 1),
        ("envpool:HalfCheetah-v4", 17, "continuous", 6),
        ("envpool:CartPole-v1", 4, "discrete", 2),
    ],
)
def test_env_spec_shapes(env_id, obs_dim, kind, action_dim):
    spec = env_spec(env_id)
    assert isinstance(spec, EnvSpec)
    assert (spec.env_id, spec.obs_dim, spec.action_kind, spec.action_dim) == (
        env_id, obs_dim, kind, action_dim)


def test_continuous_spec_carries_bounds():
    assert env_spec("Pendulum-v1").action_low == (-2.0,)
    assert env_spec("Pendulum-v1").action_high == (2.0,)
    cheetah = env_spec("envpool:HalfCheetah-v4")
    assert cheetah.action_low == (-1.0,) * 6 and cheetah.action_high == (1.0,) * 6
    assert env_spec("CartPole-v1").action_low is None


def test_parse_env_id():
    assert parse_env_id("CartPole-v1") == ("gymnasium", "CartPole-v1")
    assert parse_env_id("envpool:HalfCheetah-v4") == ("envpool", "HalfCheetah-v4")


@pytest.mark.parametrize(
    ("env_id", "backend"),
    [("CartPol-v1", "gymnasium"), ("NoSuchEnv-v0", "gymnasium"), ("envpool:NoSuchEnv-v0", "envpool")],
)
def test_unknown_id_names_id_and_backend(env_id, backend):
    for call in (check_env_id, make_env, env_spec):
        with pytest.raises(ValueError) as err:
            call(env_id)
        assert env_id in str(err.value) and backend in str(err.value)


def test_unknown_gymnasium_id_suggests_close_match():
    with pytest.raises(ValueError, match="CartPole-v1"):
        check_env_id("CartPol-v1")


@pytest.mark.parametrize("env_id", ["", "envpool:"])
def test_empty_id_rejected(env_id):
    with pytest.raises(ValueError):
        check_env_id(env_id)


def test_non_box_observation_is_a_type_error():
    with pytest.raises(TypeError, match="FrozenLake-v1.*Box"):
        env_spec("FrozenLake-v1")


@pytest.mark.parametrize("num_envs", [0, -1, 1.5, True])
def test_bad_num_envs(num_envs):
    with pytest.raises(ValueError, match="num_envs"):
        make_env("CartPole-v1", num_envs=num_envs)


def _step_checks(env, num_envs, obs_dim, actions):
    obs, _ = env.reset()
    assert np.asarray(obs).shape == (num_envs, obs_dim)
    obs, reward, terminated, truncated, _ = env.step(actions)
    assert np.asarray(obs).shape == (num_envs, obs_dim)
    assert np.asarray(reward).shape == (num_envs,)
    assert np.asarray(terminated).shape == (num_envs,) and np.asarray(truncated).shape == (num_envs,)
    assert np.isfinite(np.asarray(obs, dtype=np.float64)).all()
    return obs


@pytest.mark.parametrize("env_id", ["CartPole-v1", "envpool:CartPole-v1"])
def test_vector_env_step_discrete(env_id):
    env = make_env(env_id, num_envs=3, seed=1)
    try:
        assert env.num_envs == 3
        assert env.single_observation_space.shape == (4,)
        _step_checks(env, 3, 4, np.array([0, 1, 0]))
    finally:
        env.close()


@pytest.mark.parametrize(("env_id", "obs_dim", "act_dim"),
                         [("Pendulum-v1", 3, 1), ("envpool:HalfCheetah-v4", 17, 6)])
def test_vector_env_step_continuous(env_id, obs_dim, act_dim):
    env = make_env(env_id, num_envs=2, seed=0)
    try:
        space = env.single_action_space
        actions = np.clip(np.full((2, act_dim), 0.5), space.low, space.high).astype(space.dtype)
        _step_checks(env, 2, obs_dim, actions)
    finally:
        env.close()


@pytest.mark.parametrize("env_id", ["CartPole-v1", "envpool:CartPole-v1"])
def test_seed_makes_first_reset_reproducible(env_id):
    first = []
    for _ in range(2):
        env = make_env(env_id, num_envs=2, seed=7)
        try:
            first.append(np.asarray(env.reset()[0]).copy())
        finally:
            env.close()
    np.testing.assert_array_equal(first[0], first[1])


def test_episodes_autoreset_on_next_step():
    """A finished copy keeps stepping: the vector env resets it and the batch keeps its shape."""
    env = make_env("CartPole-v1", num_envs=2, seed=0)
    try:
        env.reset()
        done_seen = False
        for _ in range(200):  # always pushing right ends a CartPole episode within ~10-30 steps
            obs, _, terminated, truncated, _ = env.step(np.array([1, 1]))
            assert obs.shape == (2, 4)
            done_seen |= bool(np.any(terminated | truncated))
        assert done_seen
    finally:
        env.close()


# The demo and the network config files are about running these envs; their light checks live here.


def test_network_config_files_load():
    import dataclasses
    from pathlib import Path

    import yaml

    from rl_agnostic.nn.config import NetworkConfig

    root = Path(__file__).resolve().parent.parent / "tune_configs"
    files = {name: yaml.safe_load((root / f"network_{name}.yaml").read_text())
             for name in ("cpu", "paper")}
    assert NetworkConfig.from_dict(files["cpu"]) == NetworkConfig.cpu()
    assert NetworkConfig.from_dict(files["paper"]) == NetworkConfig.paper()
    # the files say they list every field, so a new field must be written there too
    fields = {f.name for f in dataclasses.fields(NetworkConfig)}
    assert all(set(values) == fields for values in files.values())


def test_demo_acts_in_two_backends(capsys):
    from rl_agnostic.cli import main

    assert main(["demo", "--envs", "CartPole-v1", "envpool:HalfCheetah-v4", "--steps", "3",
                 "--num-envs", "2", "--d-model", "16"]) == 0
    out = capsys.readouterr().out
    assert "CartPole-v1" in out and "envpool:HalfCheetah-v4" in out
    assert "registering them added 0" in out


def test_demo_bad_env_id_exits_2(capsys):
    from rl_agnostic.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--envs", "CartPole-v1", "NoSuchEnv-v0", "--steps", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "NoSuchEnv-v0" in err and "Traceback" not in err
