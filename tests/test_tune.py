"""Ray Tune sweeps over online runs: sweep files are checked before Ray starts, and a small ASHA
sweep runs real trials (RLlib inside Tune placement groups), writes its table and a best config
that `rl-agnostic train` accepts, and restores from its experiment directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from rl_agnostic.nn.config import ConfigError  # noqa: E402
from rl_agnostic.online.config import load_train_config  # noqa: E402
from rl_agnostic.tune import load_sweep_config, normalized_score_mean, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "name": "tiny", "envs": ["CartPole-v1"],
    "model": {"kind": "agnostic", "network": {"preset": "cpu", "d_model": 16, "s4_layers": 1,
                                               "transformer_layers": 1, "dropout": 0.0}},
    "ppo": {"num_epochs": 1, "rollout_steps": 64, "num_minibatches": 2},
    "resources": {"num_env_runners": 1, "num_envs_per_env_runner": 2,
                  "num_cpus_per_env_runner": 0.5, "learner_torch_threads": 1},
    "run": {"env_steps_per_env": 100000, "checkpoint_every": 1},
}


def _write(tmp_path: Path, **sweep) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    values = {"name": "tiny_sweep", "base": "base.yaml", "stop_env_steps": 256,
              "num_samples": 2, "scheduler": {"type": "asha", "grace_period": 1},
              "search_space": {"ppo.actor_lr": {"loguniform": [1e-4, 1e-3]},
                               "model.network.transformer": {"choice": [True, False]}},
              "reference_scores": {"CartPole-v1": [22.0, 500.0]},
              "output_dir": str(tmp_path / "tune"), **sweep}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("name", ["sweep_quickstart.yaml", "sweep_pbt.yaml"])
def test_shipped_sweeps_load(name):
    sweep = load_sweep_config(ROOT / "tune_configs" / name)
    assert set(sweep.reference_scores) == set(sweep.base.env_ids)


@pytest.mark.parametrize("change, message", [
    ({"search_space": {"ppo.actor_lrr": {"choice": [1e-4]}}}, "ppo has no 'actor_lrr'"),
    ({"search_space": {"ppo.clip": {"normal": [0, 1]}}}, "search_space.ppo.clip must be one of"),
    ({"search_space": {"ppo.num_minibatches": {"choice": [7]}}}, "num_minibatches (7) must divide"),
    ({"reference_scores": {"Acrobot-v1": [0, 1]}}, "reference_scores needs [random, target]"),
    ({"scheduler": {"type": "hyperband"}}, "scheduler.type must be one of"),
    ({"scheduler": {"type": "pbt"}}, "PBT needs its population training at once"),
    ({"num_sampels": 3}, "did you mean 'num_samples'"),
])
def test_bad_sweeps_fail_before_ray(tmp_path, change, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        load_sweep_config(_write(tmp_path, **change))
    assert not ray.is_initialized()


def test_normalized_score_mean():
    refs = {"a": (0.0, 100.0), "b": (-500.0, -100.0)}
    assert normalized_score_mean({"a": 50.0, "b": -300.0}, refs) == pytest.approx(50.0)
    assert normalized_score_mean({"a": 50.0}, refs) is None


def test_asha_sweep_runs_trials_and_writes_results(tmp_path):
    sweep = load_sweep_config(_write(tmp_path))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        out = run_sweep(sweep)
        assert len(out["rows"]) == 2 and not any(r["error"] for r in out["rows"])
        # the best trial ran to the step budget; ASHA may have stopped the other one early
        assert out["rows"][0]["env_steps"] >= 256 or out["rows"][1]["env_steps"] >= 256
        assert all(r["iterations"] >= 1 for r in out["rows"])
        exp = Path(out["dir"])
        table = (exp / "results.md").read_text()
        assert "normalized_score_mean" in table
        assert all(f"| {r['trial']} |" in table for r in out["rows"])
        best = load_train_config(exp / "best_config.yaml")
        assert best.ppo.actor_lr == pytest.approx(out["best"]["params"]["ppo.actor_lr"])
        # The experiment directory restores (Tune's own restore); finished trials stay finished.
        again = run_sweep(sweep, resume=True)
        assert {r["trial"] for r in again["rows"]} == {r["trial"] for r in out["rows"]}
    finally:
        ray.shutdown()


def test_pbt_sweep_exploits_a_better_trials_checkpoint(tmp_path):
    sweep = load_sweep_config(_write(
        # PBT clones the better trial only after that one passed a perturbation point as the
        # better trial, so whether an exploit happens within few iterations depends on which
        # trial reports first: 10 iterations leave it many chances (at 5, on a loaded machine
        # the worse trial sometimes finished before the better one had reported)
        tmp_path, name="tiny_pbt", stop_env_steps=1280, max_concurrent_trials=2,
        scheduler={"type": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5},
        search_space={"ppo.actor_lr": {"loguniform": [1e-4, 1e-3]}}))
    # two trials at once, each 1 CPU (learner) + 0.5 (runner): 3 logical CPUs on this machine
    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    try:
        out = run_sweep(sweep)
    finally:
        ray.shutdown()
    assert len(out["rows"]) == 2 and not any(r["error"] for r in out["rows"])
    assert all(r["env_steps"] >= 1280 for r in out["rows"])
    # PBT's own log of exploit steps: the worse trial restarted from the better one's checkpoint
    log = Path(out["dir"]) / "pbt_global.txt"
    assert log.is_file() and log.read_text().strip()
