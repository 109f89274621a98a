"""`rl-agnostic experiment offline_table1`: the offline experiment file at every scale, its
errors, and its tiny scale end to end (a PPO behaviour policy, collected datasets, per-dataset IQL
and DD-IQL runs on a real local Ray, the report)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rl_agnostic.cli import main
from rl_agnostic.experiments import (OfflineExperiment, load_experiment, run_offline_experiment,
                                     write_offline_report)
from rl_agnostic.experiments.spec import EXPERIMENTS_DIR
from rl_agnostic.nn.config import ConfigError

TABLE1 = EXPERIMENTS_DIR / "offline_table1.yaml"


@pytest.mark.parametrize("scale", ["paper", "cpu", "tiny"])
def test_offline_table1_expands_into_per_dataset_and_all_dataset_runs(scale):
    exp = load_experiment("offline_table1", scale)
    assert isinstance(exp, OfflineExperiment)
    runs = exp.runs("/tmp/out")
    names = exp.dataset_names()
    assert len(runs) == len(exp.seeds) * (len(names) + 1)
    data_dir = exp.data_path("/tmp/out").absolute()  # paper: the files the user supplies
    for run in runs:
        assert {Path(d.path).parent for d in run.config.datasets} == {data_dir}
        assert run.config.run.seed == run.seed
        if run.agent == "iql":
            assert run.config.model.kind == "single" and [d.name for d in
                                                          run.config.datasets] == [run.dataset]
        else:
            assert run.config.model.kind == "agnostic" and run.dataset is None
            assert [d.name for d in run.config.datasets] == names
    assert len({r.directory for r in runs}) == len(runs)


def test_offline_overrides_and_wrong_step_flags():
    exp = load_experiment("offline_table1", "cpu", seeds=[3, 4], steps=7, data_dir="/data")
    assert exp.seeds == (3, 4) and {r.config.run.steps for r in exp.runs("/o")} == {7}
    assert all(d.path.startswith("/data/") for r in exp.runs("/o") for d in r.config.datasets)
    with pytest.raises(ConfigError, match="gradient steps, not env steps"):
        load_experiment("offline_table1", "cpu", env_steps_per_env=10)
    with pytest.raises(ConfigError, match="for offline experiments"):
        load_experiment("mix16", "cpu", steps=10)


@pytest.mark.parametrize("change, message", [
    (("collect: {expert: 30}}", "collect: {expertt: 30}}"), "expertt"),
    (("collect: {expert: 200}}", "collect: {expert: 0}}"), "positive episode count"),
    (("{InvertedPendulum-v5: 60000, ", "{"), "needs experts.InvertedPendulum-v5"),
    (("env_id: Acrobot-v1", "env_id: Acrobott-v1"), "Acrobott-v1"),
    (("primary: dd-iql", "primary: iql"), "primary must name an agent trained on all"),
    (("resources: {num_workers: 2}", "resources: {num_workerz: 2}"), "num_workerz"),
    (("name: hopper-expert,", "name: invpend-expert,"), "names must be unique"),
    (("seeds: [0, 1]\n    # env", "seeds: [0, 1]\n    datadir: x\n    # env"), "datadir"),
    (("Hopper-v5: 400000", "Hopper-v5: lots"), "positive PPO env-step budgets"),
    (("seeds: [0, 1]\n    # env", "seeds: [0, 1]\n    expert_config: nope.yaml\n    # env"),
     "nope.yaml does not exist"),
])
def test_bad_offline_experiment_files_fail_at_load(tmp_path, change, message):
    text = TABLE1.read_text()
    assert change[0] in text, change
    path = tmp_path / "exp.yaml"
    path.write_text(text.replace(*change, 1))
    with pytest.raises(ConfigError, match=message):
        load_experiment(path, "cpu")


def test_missing_supplied_datasets_are_named_before_any_work(tmp_path, capsys):
    import ray

    with pytest.raises(SystemExit) as exc:
        main(["experiment", "offline_table1", "--scale", "paper", "--data-dir",
              str(tmp_path / "d4rl"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "nothing is downloaded" in err
    assert "halfcheetah-medium-expert-v2.hdf5" in err and "relocate-expert-v1.hdf5" in err
    assert not ray.is_initialized()
    with pytest.raises(SystemExit) as exc:
        main(["experiment", "offline_table1", "--scale", "tiny", "--report-only", "--out",
              str(tmp_path / "empty")])
    assert exc.value.code == 2 and "holds no finished run" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_table1(tmp_path_factory):
    import ray

    ray.init(include_dashboard=False, logging_level="WARNING")
    out = tmp_path_factory.mktemp("offline") / "offline_table1"
    lines: list[str] = []
    try:
        result = run_offline_experiment(load_experiment("offline_table1", "tiny"), out,
                                        log=lines.append)
        yield out, result, lines
    finally:
        ray.shutdown()


def test_tiny_offline_table1_makes_datasets_trains_and_reports(tiny_table1):
    out, result, lines = tiny_table1
    for name in ("results.md", "results.json", "curves.png", "config.yaml", "datasets.json"):
        assert (out / name).stat().st_size > 0, name
    # the behaviour policy was trained and the datasets collected with it and at random
    assert any("training the CartPole-v1 behaviour policy" in line for line in lines)
    info = json.loads((out / "data" / "cartpole-expert.json").read_text())
    assert info["policies"][0]["policy"].endswith(tuple(f"ckpt_{i:06d}" for i in range(1, 9)))
    assert (out / "data" / "pendulum-random.parquet").is_file()
    # every run reported a normalized score for each of its datasets
    for name in ("cartpole-expert", "pendulum-random"):
        for agent in ("iql", "dd-iql"):
            assert isinstance(result["scores"][name][agent]["final"]["0"], float), (name, agent)
    assert result["ratio"] == pytest.approx(result["mean_normalized"]["dd-iql"][0]
                                            / result["mean_normalized"]["iql"][0])
    # one agnostic network for both datasets; one single-env agent per dataset
    params = result["num_parameters"]
    assert set(params) == {"dd-iql", "iql_cartpole-expert", "iql_pendulum-random"}
    md = (out / "results.md").read_text()
    assert "| cartpole-expert | CartPole-v1 |" in md and "dd-iql / iql mean normalized" in md
    assert "`rl-agnostic experiment offline_table1 --scale tiny --seeds 0`" in md
    assert yaml.safe_load((out / "config.yaml").read_text())["scale"] == "tiny"
    assert result["perf"]["0"]["perf/data_wait_fraction"] < 1.0


def test_restarting_trains_nothing_and_the_report_can_be_rewritten(tiny_table1):
    out, result, _ = tiny_table1
    lines: list[str] = []
    again = run_offline_experiment(load_experiment("offline_table1", "tiny"), out,
                                   log=lines.append)
    assert any("3 already done" in line for line in lines)
    assert not any("training the" in line or "collect " in line for line in lines)
    assert again["scores"] == result["scores"]
    (out / "results.md").unlink()
    write_offline_report(load_experiment("offline_table1", "tiny"), out, say=lambda _: None)
    assert (out / "results.md").is_file()
    # results moved elsewhere (a clone, another disk) are still this experiment's finished runs
    moved = out.parent / "moved"
    shutil.copytree(out, moved)
    lines = []
    run_offline_experiment(load_experiment("offline_table1", "tiny"), moved, log=lines.append)
    assert any("3 already done" in line for line in lines)
    shutil.rmtree(moved / "data")  # like a clone: the records are committed, the data is not
    write_offline_report(load_experiment("offline_table1", "tiny"), moved, say=lambda _: None)
    assert (moved / "results.md").read_text() == (out / "results.md").read_text()


def test_a_run_directory_with_another_config_is_refused(tiny_table1):
    out, _, _ = tiny_table1
    with pytest.raises(ConfigError, match="holds a run with a different config"):
        run_offline_experiment(load_experiment("offline_table1", "tiny", steps=30), out,
                               log=lambda _: None)


def test_an_unfinished_behaviour_policy_resumes_and_a_missing_dataset_is_made_again(
        tiny_table1, tmp_path):
    from rl_agnostic.experiments.offline import make_datasets

    out, _, _ = tiny_table1
    data = tmp_path / "data"
    shutil.copytree(out / "data", data)
    (data / "cartpole-expert.parquet").unlink()
    (data / "experts" / "CartPole-v1" / "done.json").unlink()  # as if stopped mid-run
    lines: list[str] = []
    summaries = make_datasets(load_experiment("offline_table1", "tiny"), data, lines.append)
    assert any("resuming the CartPole-v1 behaviour policy" in line for line in lines)
    assert (data / "cartpole-expert.parquet").is_file()
    assert (data / "experts" / "CartPole-v1" / "done.json").is_file()
    # the same policy checkpoint and seed collect the same data
    before = json.loads((out / "data" / "cartpole-expert.json").read_text())
    assert summaries["cartpole-expert"]["transitions"] == before["transitions"]
