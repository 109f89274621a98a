"""Offline data (D4RL HDF5, Minari, parquet), `collect`, the offline config, the IQL losses and
the DD-IQL dataset assignment — real files in tmp_path, real gymnasium envs, no Ray."""

from __future__ import annotations

import dataclasses
import math
import re

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from rl_agnostic.envs.make import env_spec
from rl_agnostic.envs.spec import EnvSpec
from rl_agnostic.nn import NetworkConfig, build_twin_q
from rl_agnostic.nn.config import ConfigError
from rl_agnostic.offline.collect import PolicySource, collect
from rl_agnostic.offline.config import DatasetEntry, OfflineConfig
from rl_agnostic.offline.data import (
    FIELDS,
    DatasetError,
    DatasetInfo,
    TransitionData,
    check_against_spec,
    check_arrays,
    d4rl_task,
    normalize_actions,
    read_d4rl_hdf5,
    read_dataset,
    read_minari,
    read_parquet,
    write_parquet,
)
from rl_agnostic.offline.iql import (
    EXP_ADV_MAX,
    IQLNetworks,
    awr_policy_loss,
    expectile_loss,
    td_loss,
)
from rl_agnostic.offline.trainer import held_datasets, prepare_datasets


def esc(text: str) -> str:
    """``text`` as a literal regular expression (messages hold brackets and parentheses)."""
    return re.escape(text)


def random_data(n: int = 12, obs_dim: int = 3, discrete: int | None = None, act_dim: int = 2,
                seed: int = 0, info: DatasetInfo | None = None) -> TransitionData:
    rng = np.random.default_rng(seed)
    if discrete:
        actions = rng.integers(0, discrete, n).astype(np.int64)
    else:
        actions = rng.uniform(-1, 1, (n, act_dim)).astype(np.float32)
    return TransitionData(
        observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
        actions=actions,
        rewards=rng.normal(size=n).astype(np.float32),
        next_observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
        terminals=(rng.random(n) < 0.2).astype(np.float32),
        info=info or DatasetInfo(name="rand"),
    )


def write_d4rl(path, n=10, obs_dim=3, act_dim=1, timeouts=None, terminals=None,
               next_observations=False, skip=(), env_id=None, seed=0, obs=None):
    """A D4RL-layout HDF5 file; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32) if obs is None else obs,
        "actions": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": np.zeros(n, bool) if terminals is None else np.asarray(terminals, bool),
    }
    if timeouts is not None:
        arrays["timeouts"] = np.asarray(timeouts, bool)
    if next_observations is True:
        arrays["next_observations"] = rng.normal(size=(n, obs_dim)).astype(np.float32)
    elif next_observations is not False:
        arrays["next_observations"] = next_observations
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            if k not in skip:
                f[k] = v
        if env_id is not None:
            f.attrs["env_id"] = env_id
    return arrays


def assert_same_arrays(a: TransitionData, b: TransitionData) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype, f
        assert x.shape == y.shape, f
        assert np.array_equal(x, y), f


# --- parquet round trip ------------------------------------------------------------------------

@pytest.mark.parametrize("discrete", [None, 3], ids=["continuous", "discrete"])
def test_parquet_round_trip_keeps_arrays_dtypes_and_info(tmp_path, discrete):
    info = DatasetInfo(name="rt", env_id="CartPole-v1", ref_min_score=1.5, ref_max_score=99.0,
                       source="", num_episodes=4)
    data = random_data(n=17, obs_dim=5, discrete=discrete, act_dim=2, info=info)
    path = write_parquet(data, tmp_path / "sub" / "rt.parquet")
    assert path == tmp_path / "sub" / "rt.parquet" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["rt.parquet"]  # no temporary left
    back = read_parquet(path)
    assert_same_arrays(back, data)
    assert back.actions.dtype == (np.int64 if discrete else np.float32)
    assert back.actions.shape == ((17,) if discrete else (17, 2))
    assert back.info == dataclasses.replace(info, source=str(path))
    assert read_parquet(path, name="other").info.name == "other"
    # dispatch by extension, and by explicit format
    assert_same_arrays(read_dataset(str(path)), data)
    assert_same_arrays(read_dataset(str(path), "parquet"), data)


def test_parquet_without_metadata_takes_the_file_stem_as_name(tmp_path):
    data = random_data(n=4)
    table = pa.table({
        "observations": [list(r) for r in data.observations],  # variable-size lists
        "actions": [list(r) for r in data.actions],
        "rewards": data.rewards, "next_observations": [list(r) for r in data.next_observations],
        "terminals": data.terminals})
    pq.write_table(table, tmp_path / "plain.parquet")
    back = read_parquet(tmp_path / "plain.parquet")
    assert back.info.name == "plain" and back.info.env_id is None
    np.testing.assert_array_equal(back.observations, data.observations)
    np.testing.assert_array_equal(back.actions, data.actions)


# --- collect → Minari and parquet --------------------------------------------------------------

@pytest.fixture(scope="module")
def cartpole(tmp_path_factory):
    out = tmp_path_factory.mktemp("collect")
    summary = collect("CartPole-v1", [PolicySource("random", 3)], out, "cp", seed=0,
                      random_episodes=2, log=lambda _: None)
    return out, summary


def test_collect_writes_identical_minari_and_parquet(cartpole, monkeypatch):
    out, summary = cartpole
    minari_dir = out / "minari" / "rl_agnostic" / "cp-v0"
    assert summary["minari_path"] == str(minari_dir)
    assert (out / "cp.json").is_file()
    m = read_minari(minari_dir)
    p = read_parquet(out / "cp.parquet")
    assert_same_arrays(m, p)
    assert len(p) == summary["transitions"] == summary["policies"][0]["steps"]
    assert p.actions.dtype == np.int64 and p.observations.shape == (len(p), 4)
    for info in (m.info, p.info):
        assert info.name == "cp" and info.env_id == "CartPole-v1" and info.num_episodes == 3
        assert info.ref_min_score == pytest.approx(summary["random_return_mean"])
        # CartPole pays 1 per step: the random policy's mean return is steps / episodes
        assert info.ref_max_score == pytest.approx(len(p) / 3)
    # dispatch: a directory (no .parquet/.hdf5 suffix) is a Minari dataset
    assert_same_arrays(read_dataset(str(minari_dir)), p)
    # and by id, under MINARI_DATASETS_PATH
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(out / "minari"))
    assert_same_arrays(read_minari("rl_agnostic/cp-v0"), p)


def test_collected_transitions_follow_the_episodes(cartpole):
    out, _ = cartpole
    d = read_parquet(out / "cp.parquet")
    ends = np.nonzero(d.terminals)[0]
    # a random CartPole policy always falls over long before the 500-step limit
    assert len(ends) == 3 and ends[-1] == len(d) - 1
    assert set(np.unique(d.terminals)) == {0.0, 1.0}
    inside = np.setdiff1d(np.arange(len(d) - 1), ends)
    np.testing.assert_array_equal(d.next_observations[inside], d.observations[inside + 1])
    # terminals are exactly CartPole's termination condition on the next observation
    x, theta = d.next_observations[:, 0], d.next_observations[:, 2]
    fell = (np.abs(x) > 2.4) | (np.abs(theta) > 12 * 2 * math.pi / 360)
    np.testing.assert_array_equal(fell, d.terminals.astype(bool))
    assert np.all(d.rewards == 1.0)
    assert set(np.unique(d.actions)) <= {0, 1}


def test_collect_is_deterministic_for_a_seed(cartpole, tmp_path):
    out, _ = cartpole
    collect("CartPole-v1", [PolicySource("random", 3)], tmp_path, "cp", seed=0,
            random_episodes=2, log=lambda _: None)
    assert_same_arrays(read_parquet(tmp_path / "cp.parquet"), read_parquet(out / "cp.parquet"))


def test_collect_continuous_truncated_episodes(tmp_path):
    collect("Pendulum-v1", [PolicySource("random", 2)], tmp_path, "pend", seed=3,
            random_episodes=1, log=lambda _: None)
    p = read_parquet(tmp_path / "pend.parquet")
    m = read_minari(tmp_path / "minari" / "rl_agnostic" / "pend-v0")
    assert_same_arrays(m, p)
    assert len(p) == 400 and p.actions.shape == (400, 1) and p.actions.dtype == np.float32
    assert np.all(p.terminals == 0)  # Pendulum only truncates
    assert np.all(np.abs(p.actions) <= 2.0)  # stored in the env's own bounds
    inside = np.setdiff1d(np.arange(399), [199])
    np.testing.assert_array_equal(p.next_observations[inside], p.observations[inside + 1])
    assert not np.array_equal(p.next_observations[199], p.observations[200])


# --- D4RL HDF5 ---------------------------------------------------------------------------------

def test_d4rl_without_next_observations_drops_timeouts_and_last_row(tmp_path):
    n = 10
    timeouts = np.zeros(n, bool)
    timeouts[[3, 6]] = True
    terminals = np.zeros(n, bool)
    terminals[8] = True
    raw = write_d4rl(tmp_path / "data.hdf5", n=n, timeouts=timeouts, terminals=terminals)
    d = read_d4rl_hdf5(tmp_path / "data.hdf5")
    keep = np.array([0, 1, 2, 4, 5, 7, 8])
    assert len(d) == len(keep)
    np.testing.assert_array_equal(d.observations, raw["observations"][keep])
    np.testing.assert_array_equal(d.next_observations, raw["observations"][keep + 1])
    np.testing.assert_array_equal(d.actions, raw["actions"][keep])
    np.testing.assert_array_equal(d.rewards, raw["rewards"][keep])
    np.testing.assert_array_equal(d.terminals, np.array([0, 0, 0, 0, 0, 0, 1], np.float32))
    assert d.terminals.dtype == np.float32 and d.actions.dtype == np.float32
    assert d.info.name == "data" and d.info.env_id is None and d.info.num_episodes == 3
    assert d.info.ref_min_score is None and d.info.normalized(1.0) is None
    assert_same_arrays(read_dataset(str(tmp_path / "data.hdf5")), d)  # .hdf5 → d4rl


def test_d4rl_with_next_observations_keeps_every_row(tmp_path):
    n = 8
    timeouts = np.zeros(n, bool)
    timeouts[[2, 7]] = True
    raw = write_d4rl(tmp_path / "d.h5", n=n, timeouts=timeouts, next_observations=True,
                     env_id="Pendulum-v1")
    d = read_d4rl_hdf5(tmp_path / "d.h5", name="mine")
    assert len(d) == n
    np.testing.assert_array_equal(d.observations, raw["observations"])
    np.testing.assert_array_equal(d.next_observations, raw["next_observations"])
    np.testing.assert_array_equal(d.rewards, raw["rewards"])
    assert d.info.name == "mine" and d.info.env_id == "Pendulum-v1"
    assert read_dataset(str(tmp_path / "d.h5")).info.name == "d"  # .h5 → d4rl too


def test_d4rl_file_name_gives_reference_scores(tmp_path):
    write_d4rl(tmp_path / "hopper-medium-v2.hdf5", obs_dim=11, act_dim=3)
    info = read_d4rl_hdf5(tmp_path / "hopper-medium-v2.hdf5").info
    assert (info.ref_min_score, info.ref_max_score) == (-20.272305, 3234.3)
    assert info.normalized(3234.3) == pytest.approx(100.0)
    assert info.normalized(-20.272305) == pytest.approx(0.0)
    assert d4rl_task("hopper-medium-v2.hdf5") == "hopper"
    assert d4rl_task("/some/dir/HalfCheetah_expert.hdf5") == "halfcheetah"
    assert d4rl_task("antmaze-umaze-v2.hdf5") is None  # not the ant locomotion task
    assert d4rl_task("mydata.hdf5") is None


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, fmt, message", [
    ("missing.hdf5", None, "D4RL file {} does not exist"),
    ("missing.parquet", None, "parquet file {} does not exist"),
    ("missing_minari", None, "Minari dataset '{}' cannot be loaded (no download is attempted)"),
    ("missing.hdf5", "minari", "Minari dataset '{}' cannot be loaded"),
])
def test_missing_dataset_is_a_dataset_error(tmp_path, monkeypatch, name, fmt, message):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari_root"))
    path = tmp_path / name
    with pytest.raises(DatasetError, match=esc(message.format(path))):
        read_dataset(str(path), fmt)
    with pytest.raises(DatasetError, match=esc("unknown dataset format 'csv'")):
        read_dataset(str(path), "csv")


def test_unreadable_files_are_dataset_errors(tmp_path):
    (tmp_path / "junk.hdf5").write_text("not hdf5")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DatasetError, match="junk.hdf5 is not a readable HDF5 file"):
        read_d4rl_hdf5(tmp_path / "junk.hdf5")
    with pytest.raises(DatasetError, match="junk.parquet is not a readable parquet file"):
        read_parquet(tmp_path / "junk.parquet")


def test_d4rl_missing_rewards_key(tmp_path):
    write_d4rl(tmp_path / "x.hdf5", skip=("rewards",))
    with pytest.raises(DatasetError, match=esc("missing D4RL keys ['rewards'] (found "
                                               "['actions', 'observations', 'terminals'])")):
        read_d4rl_hdf5(tmp_path / "x.hdf5")


def test_d4rl_timeouts_of_wrong_length(tmp_path):
    write_d4rl(tmp_path / "x.hdf5", n=6, timeouts=np.zeros(5, bool))
    with pytest.raises(DatasetError, match="timeouts has 5 rows, observations 6"):
        read_d4rl_hdf5(tmp_path / "x.hdf5")


@pytest.mark.parametrize("short", [1, 2])
def test_d4rl_rewards_shorter_than_observations(tmp_path, short):
    raw = write_d4rl(tmp_path / "x.hdf5", n=10)
    with h5py.File(tmp_path / "x.hdf5", "a") as f:
        del f["rewards"]
        f["rewards"] = raw["rewards"][: 10 - short]
    with pytest.raises(DatasetError, match=f"rewards has {10 - short} rows, observations 10"):
        read_d4rl_hdf5(tmp_path / "x.hdf5")


def test_parquet_missing_column(tmp_path):
    data = random_data(n=5)
    write_parquet(data, tmp_path / "x.parquet")
    table = pq.read_table(tmp_path / "x.parquet").drop_columns(["terminals"])
    pq.write_table(table, tmp_path / "x.parquet")
    with pytest.raises(DatasetError, match=esc("missing columns ['terminals']")):
        read_parquet(tmp_path / "x.parquet")


def test_next_observations_of_another_shape(tmp_path):
    data = random_data(n=6, obs_dim=4)
    bad = dataclasses.replace(data, next_observations=np.zeros((6, 5), np.float32))
    write_parquet(bad, tmp_path / "x.parquet")
    with pytest.raises(DatasetError, match=esc("next_observations shape (6, 5) differs from "
                                               "observations shape (6, 4)")):
        read_parquet(tmp_path / "x.parquet")
    write_d4rl(tmp_path / "x.hdf5", n=6, obs_dim=4,
               next_observations=np.zeros((6, 3), np.float32))
    with pytest.raises(DatasetError, match=esc("next_observations shape (6, 3) differs from "
                                               "observations shape (6, 4)")):
        read_d4rl_hdf5(tmp_path / "x.hdf5")


def test_fields_of_another_row_count():
    d = random_data(n=6, info=DatasetInfo(name="short", source="src.parquet"))
    with pytest.raises(DatasetError, match="src.parquet: rewards has 5 rows, observations 6"):
        check_arrays(dataclasses.replace(d, rewards=d.rewards[:5]))
    with pytest.raises(DatasetError, match="holds no transitions"):
        check_arrays(dataclasses.replace(d, **{f: getattr(d, f)[:0] for f in FIELDS}))


def test_non_finite_values_name_the_field(tmp_path):
    data = random_data(n=8)
    data.rewards[3] = np.nan
    write_parquet(data, tmp_path / "nan.parquet")
    with pytest.raises(DatasetError, match=esc("rewards holds 1 NaN/inf values in 1 rows "
                                               "(first row 3)")):
        read_parquet(tmp_path / "nan.parquet")
    obs = np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32)
    obs[2, 1] = np.inf
    obs[5, 0] = -np.inf
    write_d4rl(tmp_path / "inf.hdf5", n=10, obs=obs)
    with pytest.raises(DatasetError, match=esc("observations holds 2 NaN/inf values in 2 rows "
                                               "(first row 2)")):
        read_d4rl_hdf5(tmp_path / "inf.hdf5")


@pytest.fixture(scope="module")
def cartpole_spec():
    return env_spec("CartPole-v1")


def test_check_against_spec_discrete(cartpole_spec):
    ok = random_data(n=6, obs_dim=4, discrete=2)
    assert check_against_spec(ok, cartpole_spec).actions is ok.actions
    too_big = dataclasses.replace(ok, actions=np.array([0, 1, 2, 1, 0, 1]))
    with pytest.raises(DatasetError, match=esc("discrete actions must lie in [0, 2) for "
                                               "CartPole-v1; found [0, 2]")):
        check_against_spec(too_big, cartpole_spec)
    negative = dataclasses.replace(ok, actions=np.array([0, -1, 1, 1, 0, 1]))
    with pytest.raises(DatasetError, match=esc("found [-1, 1]")):
        check_against_spec(negative, cartpole_spec)
    with pytest.raises(DatasetError, match="observations have 3 values but CartPole-v1 observes 4"):
        check_against_spec(random_data(n=6, obs_dim=3, discrete=2), cartpole_spec)
    # integral floats (N, 1) become indices; fractional ones are rejected
    as_float = dataclasses.replace(ok, actions=ok.actions.astype(np.float32)[:, None])
    out = check_against_spec(as_float, cartpole_spec)
    assert out.actions.dtype == np.int64 and np.array_equal(out.actions, ok.actions)
    with pytest.raises(DatasetError, match="discrete actions but the dataset's actions are float"):
        check_against_spec(random_data(n=6, obs_dim=4, act_dim=1), cartpole_spec)


def test_check_against_spec_continuous_maps_bounds_to_unit_box():
    spec = env_spec("Pendulum-v1")  # actions in [-2, 2]
    data = random_data(n=4, obs_dim=3, act_dim=1)
    data = dataclasses.replace(data, actions=np.array([[2.0], [-2.0], [1.0], [3.0]], np.float32))
    out = check_against_spec(data, spec)
    np.testing.assert_allclose(out.actions, [[1.0], [-1.0], [0.5], [1.0]])
    assert out.actions.dtype == np.float32
    with pytest.raises(DatasetError, match=esc("Pendulum-v1 takes continuous actions of length 1; "
                                               "the dataset's actions have shape (4,) (int64)")):
        check_against_spec(dataclasses.replace(data, actions=np.zeros(4, np.int64)), spec)
    unbounded = EnvSpec("U-v0", 3, "continuous", 2, (-math.inf, 0.0), (math.inf, 4.0))
    np.testing.assert_allclose(normalize_actions(np.array([[5.0, 3.0]]), unbounded), [[5.0, 0.5]])


def _cfg(datasets, **extra):
    return OfflineConfig.from_dict({"name": "t", "datasets": datasets, **extra})


def test_prepare_datasets_rejects_bad_env_before_ray(tmp_path):
    write_parquet(random_data(n=5, obs_dim=4, discrete=2), tmp_path / "a.parquet")
    write_d4rl(tmp_path / "d.hdf5")
    assert not ray.is_initialized()
    cfg = _cfg([{"path": str(tmp_path / "a.parquet"), "env_id": "NoSuchEnv-v0"}])
    with pytest.raises(DatasetError, match=esc(f"datasets[0] ({tmp_path / 'a.parquet'}): "
                                               "environment 'NoSuchEnv-v0' cannot be built for "
                                               "evaluation: unknown env id 'NoSuchEnv-v0'")):
        prepare_datasets(cfg, log=lambda _: None)
    assert not ray.is_initialized()
    cfg = _cfg([str(tmp_path / "a.parquet"), str(tmp_path / "d.hdf5")])
    with pytest.raises(DatasetError, match=esc("the dataset records no environment id; set "
                                               "datasets[0].env_id")):
        # the parquet file records no env either: it is the first one to fail
        prepare_datasets(cfg, log=lambda _: None)
    cfg = _cfg([{"path": str(tmp_path / "a.parquet"), "env_id": "CartPole-v1"},
                str(tmp_path / "d.hdf5")])
    with pytest.raises(DatasetError, match=esc(f"datasets[1] ({tmp_path / 'd.hdf5'}): the dataset "
                                               "records no environment id; set "
                                               "datasets[1].env_id")):
        prepare_datasets(cfg, log=lambda _: None)
    cfg = _cfg([{"path": str(tmp_path / "missing.parquet"), "env_id": "CartPole-v1"}])
    with pytest.raises(DatasetError, match="does not exist"):
        prepare_datasets(cfg, log=lambda _: None)
    cfg = _cfg([{"path": str(tmp_path / "d.hdf5"), "env_id": "CartPole-v1"}])
    with pytest.raises(DatasetError, match="observations have 3 values but CartPole-v1"):
        prepare_datasets(cfg, log=lambda _: None)
    assert not ray.is_initialized()


def test_prepare_datasets_reads_checks_and_scales(tmp_path, cartpole):
    out, _ = cartpole
    raw = write_d4rl(tmp_path / "pend.hdf5", n=9, act_dim=1, env_id="Pendulum-v1")
    raw_actions = raw["actions"] * 2.0  # Pendulum's [-2, 2]
    with h5py.File(tmp_path / "pend.hdf5", "a") as f:
        f["actions"][...] = raw_actions
    cfg = _cfg([str(out / "cp.parquet"),
                {"path": str(tmp_path / "pend.hdf5"), "name": "p",
                 "ref_min_score": -10.0, "ref_max_score": 40.0}])
    logs = []
    prepared = prepare_datasets(cfg, log=logs.append)
    assert [p.name for p in prepared] == ["cp", "p"]
    assert [p.spec.env_id for p in prepared] == ["CartPole-v1", "Pendulum-v1"]
    np.testing.assert_allclose(prepared[1].data.actions, raw["actions"][:8], rtol=1e-6)
    # T / (ref_max - ref_min) with T the mean episode length (1000 when episodes are unknown)
    n_ep = prepared[1].info.num_episodes
    length = len(prepared[1].data) / n_ep if n_ep else 1000.0
    assert prepared[1].reward_scale == pytest.approx(length / 50.0)
    assert prepared[1].info.normalized(40.0) == pytest.approx(100.0)
    # rewards are scaled only when the reference range is positive
    lo, hi = prepared[0].info.ref_min_score, prepared[0].info.ref_max_score
    usable = hi > lo
    length = len(prepared[0].data) / prepared[0].info.num_episodes
    assert prepared[0].reward_scale == pytest.approx(length / (hi - lo) if usable else 1.0)
    assert any("cp: no usable reference" in m for m in logs) == (not usable)
    cfg = _cfg([str(out / "cp.parquet"), str(out / "cp.parquet")])
    with pytest.raises(DatasetError, match="dataset name 'cp' is used twice"):
        prepare_datasets(cfg, log=lambda _: None)
    cfg = _cfg([{"path": str(tmp_path / "pend.hdf5"), "ref_min_score": 1.0}])
    with pytest.raises(DatasetError, match="give both ref_min_score and ref_max_score"):
        prepare_datasets(cfg, log=lambda _: None)
    assert not ray.is_initialized()


# --- config ------------------------------------------------------------------------------------

def test_config_defaults_and_round_trip():
    cfg = _cfg(["a.parquet", {"path": "b", "format": "minari", "name": "bee"}])
    assert cfg.datasets == (DatasetEntry("a.parquet"), DatasetEntry("b", "minari", "bee"))
    assert cfg.model.kind == "agnostic" and cfg.model.network.dropout == 0.0
    assert cfg.iql.expectile == 0.7 and cfg.iql.beta == 3.0
    assert OfflineConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(iql={"expectile": 0.9}).iql.expectile == 0.9


@pytest.mark.parametrize("extra, datasets, message", [
    ({"iql": {"expectle": 0.7}}, ["a"], "iql: unknown key 'expectle'; did you mean 'expectile'?"),
    ({"iql": {"expectile": 1.0}}, ["a"], "iql.expectile must be in (0, 1), got 1.0"),
    ({"iql": {"expectile": 0}}, ["a"], "iql.expectile must be in (0, 1), got 0"),
    ({"model": {"kind": "single"}}, ["a", "b"],
     "model.kind 'single' needs exactly one dataset, got 2"),
    ({"model": {"kind": "padded"}}, ["a"], "model.kind must be one of"),
    ({}, [{"path": "a", "format": "csv"}],
     "datasets[0].format must be one of ['d4rl', 'minari', 'parquet'], got 'csv'"),
    ({}, ["a", {"path": "b", "fromat": "d4rl"}],
     "datasets[1]: unknown key 'fromat'; did you mean 'format'?"),
    ({}, [], "datasets must be a non-empty list"),
    ({}, [{"format": "d4rl"}], "datasets[0] needs a string 'path'"),
    ({"datsets": 1}, ["a"], "unknown key 'datsets'; did you mean 'datasets'?"),
    ({"run": {"max_failures": -1}}, ["a"], "run.max_failures must be >= 0, got -1"),
])
def test_bad_offline_config_is_rejected_with_a_specific_message(extra, datasets, message):
    with pytest.raises(ConfigError, match=esc(message)):
        _cfg(datasets, **extra)


# --- IQL losses --------------------------------------------------------------------------------

def test_expectile_loss_matches_numpy():
    rng = np.random.default_rng(0)
    u = rng.normal(size=200)
    for tau in (0.5, 0.7, 0.9):
        expected = np.mean(np.abs(tau - (u < 0).astype(float)) * u ** 2)
        got = expectile_loss(torch.as_tensor(u), tau).item()
        assert got == pytest.approx(expected, rel=1e-6)
    # asymmetric: positive errors weigh τ, negative 1 − τ
    assert expectile_loss(torch.tensor([2.0]), 0.9).item() == pytest.approx(0.9 * 4)
    assert expectile_loss(torch.tensor([-2.0]), 0.9).item() == pytest.approx(0.1 * 4)


def test_td_loss_averages_the_two_networks():
    q1, q2, t = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    assert td_loss(q1, q2, t).item() == pytest.approx(0.5 * (0.5 + 1.0))


def test_awr_weights_are_clamped_and_advantage_gets_no_gradient():
    log_prob = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    advantage = torch.tensor([10.0, 0.0, -1.0], requires_grad=True)
    beta = 3.0
    loss = awr_policy_loss(log_prob, advantage, beta)
    weights = torch.tensor([EXP_ADV_MAX, 1.0, math.exp(-3.0)])
    assert EXP_ADV_MAX == 100.0
    assert loss.item() == pytest.approx(-(weights * log_prob.detach()).mean().item())
    loss.backward()
    assert advantage.grad is None
    torch.testing.assert_close(log_prob.grad, -weights / 3)
    assert awr_policy_loss(torch.tensor([-1.0]), torch.tensor([1e4]), 1.0,
                           max_weight=5.0).item() == pytest.approx(5.0)


DISCRETE = EnvSpec("CartPole-v1", 4, "discrete", 2)
CONTINUOUS = EnvSpec("UnitBox-v0", 3, "continuous", 1, (-1.0,), (1.0,))
SMALL = NetworkConfig.cpu(d_model=16, dropout=0.0, s4_layers=1, transformer_layers=1)
IQL = {"expectile": 0.7, "beta": 3.0, "gamma": 0.99}


def batch_for(spec: EnvSpec, b: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if spec.is_discrete:
        actions = torch.randint(0, spec.action_dim, (b,), generator=g)
    else:
        actions = torch.rand(b, spec.action_dim, generator=g) * 1.8 - 0.9
    return {"observations": torch.randn(b, spec.obs_dim, generator=g),
            "actions": actions,
            "rewards": torch.randn(b, generator=g),
            "next_observations": torch.randn(b, spec.obs_dim, generator=g),
            "terminals": (torch.rand(b, generator=g) < 0.3).float()}


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return IQLNetworks("agnostic", SMALL, [DISCRETE, CONTINUOUS])


def grads(nets: IQLNetworks, loss_fn) -> dict[str, torch.Tensor]:
    nets.zero_grad(set_to_none=True)
    loss_fn().backward()
    out = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
           for n, p in nets.named_parameters()}
    nets.zero_grad(set_to_none=True)
    return out


def test_iql_losses_are_the_documented_formulas(nets):
    for spec in (DISCRETE, CONTINUOUS):
        batch = batch_for(spec)
        losses = nets.iql_losses(spec, batch, **IQL)
        torch.testing.assert_close(losses["total"],
                                   losses["value"] + losses["q"] + losses["policy"])
        with torch.no_grad():
            obs, a = batch["observations"], batch["actions"]
            tq = torch.minimum(*nets.q_target(obs, a, spec))
            v = nets.actor_critic.value(obs, spec)
            target = batch["rewards"] + 0.99 * (1 - batch["terminals"]) * \
                nets.actor_critic.value(batch["next_observations"], spec)
            q1, q2 = nets.q(obs, a, spec)
            logp = nets.actor_critic.log_prob(spec, nets.actor_critic.actor(obs, spec), a)
            adv = (tq - v).numpy()
            value = np.mean(np.abs(0.7 - (adv < 0)) * adv ** 2)
            q = 0.5 * (((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean())
            w = np.minimum(np.exp(3.0 * adv), 100.0)
            policy = -np.mean(w * logp.numpy())
        assert losses["value"].item() == pytest.approx(value, rel=1e-5)
        assert losses["q"].item() == pytest.approx(q.item(), rel=1e-5)
        assert losses["policy"].item() == pytest.approx(policy, rel=1e-5)
        assert losses["advantage_mean"].item() == pytest.approx(adv.mean(), abs=1e-6)


def test_gradient_of_summed_datasets_is_the_sum_of_gradients(nets):
    bd, bc = batch_for(DISCRETE, seed=1), batch_for(CONTINUOUS, seed=2)
    gd = grads(nets, lambda: nets.iql_losses(DISCRETE, bd, **IQL)["total"])
    gc = grads(nets, lambda: nets.iql_losses(CONTINUOUS, bc, **IQL)["total"])
    gs = grads(nets, lambda: nets.iql_losses(DISCRETE, bd, **IQL)["total"]
               + nets.iql_losses(CONTINUOUS, bc, **IQL)["total"])
    for name in gs:
        assert torch.allclose(gs[name], gd[name] + gc[name], rtol=1e-5, atol=1e-7), name
    # the two datasets reach their own heads only, and both reach the shared networks
    disc = [n for n in gs if n.startswith("actor_critic.discrete_decoder")]
    mean = [n for n in gs if n.startswith("actor_critic.mean_decoder")]
    assert disc and mean
    assert all(gc[n].abs().sum() == 0 for n in disc)
    assert any(gd[n].abs().sum() > 0 for n in disc)
    assert all(gd[n].abs().sum() == 0 for n in mean)
    assert any(gc[n].abs().sum() > 0 for n in mean)
    assert all(gs[n].abs().sum() == 0 for n in gs if n.startswith("q_target"))


def test_each_loss_reaches_only_its_own_network(nets):
    batch = batch_for(CONTINUOUS, seed=3)

    def part(key):
        return grads(nets, lambda: nets.iql_losses(CONTINUOUS, batch, **IQL)[key])

    def is_v(n):
        return n.startswith(("actor_critic.critic", "actor_critic.value"))

    def is_q(n):
        return n.startswith("q.")

    def is_pi(n):
        return n.startswith("actor_critic.") and not is_v(n)

    def touched(g, pred):
        return any(g[n].abs().sum() > 0 for n in g if pred(n))

    policy, value, q = part("policy"), part("value"), part("q")
    assert touched(policy, is_pi) and not touched(policy, is_v) and not touched(policy, is_q)
    assert touched(value, is_v) and not touched(value, is_pi) and not touched(value, is_q)
    assert touched(q, is_q) and not touched(q, is_v) and not touched(q, is_pi)


def test_update_target_moves_halfway(nets):
    with torch.no_grad():
        for p in nets.q.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    online = [p.detach().clone() for p in nets.q.parameters()]
    before = [p.detach().clone() for p in nets.q_target.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(online, before))
    nets.update_target(0.5)
    for p, a, b in zip(nets.q_target.parameters(), online, before):
        torch.testing.assert_close(p, (a + b) / 2)
        assert not p.requires_grad
    for p, a in zip(nets.q.parameters(), online):
        assert torch.equal(p, a)
    nets.update_target(1.0)
    for p, a in zip(nets.q_target.parameters(), online):
        torch.testing.assert_close(p, a)


def test_optimizer_groups_cover_every_trainable_parameter_once(nets):
    groups = nets.optimizer_groups(1e-4, 2e-4, 3e-4)
    names = [g["name"] for g in groups]
    assert "ssm" in names and "actor" in names and "critic" in names
    assert len(names) == len(set(names))
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in nets.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    assert not {id(p) for p in nets.q_target.parameters()} & set(ids)
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in groups}
    assert lrs["actor"][0] == 1e-4 and lrs["critic"][0] == 2e-4 and lrs["ssm"] == (3e-4, 0.0)
    assert all(lr == (2e-4 if not n.endswith("ssm") else 3e-4)
               for n, (lr, _) in lrs.items() if n.startswith("q_"))
    v_ids = {id(p) for n, p in nets.actor_critic.named_parameters()
             if n.startswith(("critic", "value"))}
    critic_ids = {id(p) for g in groups if g["name"] == "critic" for p in g["params"]}
    assert critic_ids and critic_ids <= v_ids
    torch.optim.Adam(groups)  # torch rejects a parameter given twice


@pytest.mark.parametrize("kind, specs", [
    ("specific", [DISCRETE, CONTINUOUS]),
    ("single", [CONTINUOUS]),
    ("single", [DISCRETE]),
    ("agnostic", [DISCRETE, CONTINUOUS]),
])
def test_twin_q_of_every_kind_gives_finite_values(kind, specs):
    torch.manual_seed(0)
    twin = build_twin_q(kind, SMALL, specs)
    for spec in specs:
        b = batch_for(spec, b=5)
        q1, q2 = twin(b["observations"], b["actions"], spec)
        assert q1.shape == q2.shape == (5,)
        assert torch.isfinite(q1).all() and torch.isfinite(q2).all()
        assert not torch.equal(q1, q2)  # two independent networks


def test_build_twin_q_rejects_bad_kinds():
    with pytest.raises(ValueError, match="kind 'single' needs exactly one EnvSpec, got 2"):
        build_twin_q("single", SMALL, [DISCRETE, CONTINUOUS])
    with pytest.raises(ValueError, match="unknown Q network kind 'padded'"):
        build_twin_q("padded", SMALL, [DISCRETE])


# --- DD-IQL dataset assignment -----------------------------------------------------------------

def test_held_datasets():
    assert held_datasets(3, 2, 0) == ([0, 2], 1)
    assert held_datasets(3, 2, 1) == ([1], 1)
    assert held_datasets(1, 2, 0) == ([0], 2)
    assert held_datasets(1, 2, 1) == ([0], 2)
    assert held_datasets(2, 2, 1) == ([1], 1)
    # every dataset is held by exactly the announced number of workers
    for n, w in ((5, 3), (2, 4), (4, 4)):
        count = np.zeros(n, int)
        for r in range(w):
            held, holders = held_datasets(n, w, r)
            count[held] += 1
        assert np.all(count == holders)


def test_normalized_score_is_undefined_when_max_is_not_above_min():
    # Random-only data: the collecting policy's mean return can fall below the random reference.
    assert DatasetInfo("x", ref_min_score=35.5, ref_max_score=26.0).normalized(500.0) is None
    assert DatasetInfo("x", ref_min_score=1.0, ref_max_score=1.0).normalized(1.0) is None
    assert DatasetInfo("x", ref_min_score=0.0, ref_max_score=10.0).normalized(5.0) == 50.0


def test_cli_reports_bad_offline_input_in_one_line(tmp_path, capsys):
    from rl_agnostic.cli import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\ndatasets: [" + str(tmp_path / "missing.parquet") + "]\n")
    with pytest.raises(SystemExit) as exc:
        main(["offline", str(cfg)])
    assert exc.value.code == 2
    assert "missing.parquet does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["collect", "CartPole-v1", "--policy", "random", "--out", str(tmp_path),
              "--name", "x"])
    assert exc.value.code == 2
    assert "expected POLICY:EPISODES" in capsys.readouterr().err
    assert not ray.is_initialized()


@pytest.mark.parametrize("name", ["offline_quickstart.yaml"])
def test_offline_configs_in_tune_configs_load(name):
    from pathlib import Path

    from rl_agnostic.offline.config import load_offline_config

    cfg = load_offline_config(Path(__file__).resolve().parents[1] / "tune_configs" / name)
    assert len(cfg.datasets) >= 3 and cfg.model.kind == "agnostic"


def test_collect_into_a_relative_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = collect("CartPole-v1", [PolicySource("random", 2)], "data", "rel", seed=0,
                      random_episodes=1, log=lambda _: None)
    assert (tmp_path / "data" / "rel.parquet").is_file()
    a = read_minari("data/minari/rl_agnostic/rel-v0")
    assert len(a) == summary["transitions"]
