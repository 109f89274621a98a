"""`rl-agnostic experiment`: experiment files, their expansion into runs, the report's scores, and
the tiny scale of mix_to_mix and ablation run end to end on a real local Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rl_agnostic.cli import main
from rl_agnostic.experiments import load_experiment, run_experiment
from rl_agnostic.experiments.report import _primary_check, final_score, normalize
from rl_agnostic.experiments.spec import EXPERIMENTS_DIR
from rl_agnostic.nn.config import ConfigError

# the online experiments (offline ones: tests/test_offline_experiment.py)
SHIPPED = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")
                 if yaml.safe_load(p.read_text()).get("kind", "online") == "online")


def test_the_papers_experiments_are_shipped():
    assert {"mix16", "mix_to_mix", "classic_to_mujoco", "mujoco_to_classic",
            "ablation"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("scale", ["paper", "cpu", "tiny"])
def test_shipped_experiment_expands_into_valid_ordered_runs(name, scale):
    exp = load_experiment(name, scale)
    runs = exp.runs("/tmp/out")
    assert runs and {r.seed for r in runs} == set(exp.seeds)
    seen = set()
    for r in runs:
        if r.mode == "single":
            assert len(r.config.envs) == 1 and r.config.model.kind == "single"
        if r.mode == "transfer":
            # starts from the SAME agent's run of the earlier phase, which runs before it
            assert r.init_from.agent == r.agent and r.init_from.seed == r.seed
            assert (r.init_from.key, r.seed) in seen and r.init_from.phase != r.phase
        phase = next(p for p in exp.phases if p.name == r.phase)
        assert r.config.run.env_steps_per_env == phase.env_steps(exp.env_steps_per_env)
        seen.add((r.key, r.seed))
    assert len({(r.key, r.seed) for r in runs}) == len(runs)


def test_scale_overrides_swap_envs_and_adjust_or_leave_agents_out(tmp_path):
    text = BASE + """  small:
    seeds: [0]
    agents: {agn: null, single: {train: {ppo: {num_epochs: 1}}}}
"""
    exp = load_experiment(_write(tmp_path, text), "small")
    assert list(exp.agents) == ["single"] and exp.phases[1].scratch == ()
    assert all(r.agent == "single" and r.config.ppo.num_epochs == 1 for r in exp.runs("/tmp/o"))
    tiny = load_experiment("mix16", "tiny")
    assert tiny.env_ids("train") == ["CartPole-v1", "Pendulum-v1"]
    assert load_experiment("mix16", "cpu", seeds=[3, 4], env_steps_per_env=7).seeds == (3, 4)


def test_an_experiment_sharing_runs_takes_their_settings_unless_it_sets_its_own(tmp_path):
    shared = BASE.replace("cpu: {seeds: [0], env_steps_per_env: 10}",
                          "cpu: {seeds: [0], env_steps_per_env: 10, train: {ppo: {num_epochs: 3}},"
                          "\n        agents: {single: {train: {ppo: {num_minibatches: 2}}}}}")
    (tmp_path / "base.yaml").write_text(shared)
    sharing = (BASE.replace("name: x", f"name: y\nshare_runs_with: {tmp_path / 'base.yaml'}")
               .replace("cpu: {seeds: [0], env_steps_per_env: 10}", "cpu: {seeds: [1]}"))
    exp = load_experiment(_write(tmp_path, sharing), "cpu")
    assert exp.env_steps_per_env == 10 and exp.seeds == (1,)
    for r in exp.runs("/tmp/o/y"):
        assert r.config.ppo.num_epochs == 3
        assert r.config.ppo.num_minibatches == (2 if r.agent == "single" else 8)
    own = sharing.replace("cpu: {seeds: [1]}", "cpu: {seeds: [1], train: {ppo: {num_epochs: 5}}}")
    assert {r.config.ppo.num_epochs for r in load_experiment(_write(tmp_path, own), "cpu")
            .runs("/tmp/o/y")} == {5}
    with pytest.raises(ConfigError, match="has no scale 'cpu'"):
        (tmp_path / "base.yaml").write_text(shared.replace("  cpu:", "  gpu:"))
        load_experiment(_write(tmp_path, sharing), "cpu")


def test_transfer_start_settings_reach_only_transfer_runs(tmp_path):
    text = BASE.replace("agn: {model: {kind: agnostic}}",
                        "agn: {model: {kind: agnostic}, transfer: {run: {transfer_shrink: 0.5}}}")
    runs = load_experiment(_write(tmp_path, text), "cpu").runs("/tmp/o")
    shrink = {(r.phase, r.agent, r.mode): r.config.run.transfer_shrink for r in runs}
    assert shrink == {("a", "single", "single"): 1.0, ("a", "agn", "plain"): 1.0,
                      ("b", "single", "single"): 1.0, ("b", "agn", "transfer"): 0.5,
                      ("b", "agn", "scratch"): 1.0}


def test_phase_settings_reach_its_runs_under_the_agents_own(tmp_path):
    text = BASE.replace("init_from: a, scratch: [agn]}",
                        "init_from: a, scratch: [agn], train: {ppo: {num_minibatches: 16}}}")
    text = text.replace("single: {model: {kind: single}}",
                        "single: {model: {kind: single}, train: {ppo: {num_minibatches: 2}}}")
    runs = load_experiment(_write(tmp_path, text), "cpu").runs("/tmp/o")
    minibatches = {(r.phase, r.agent, r.mode): r.config.ppo.num_minibatches for r in runs}
    default = load_experiment(_write(tmp_path, BASE), "cpu").runs("/tmp/o")[1].config.ppo
    assert default.num_minibatches not in (2, 16)
    assert minibatches == {("a", "single", "single"): 2,
                           ("a", "agn", "plain"): default.num_minibatches,
                           ("b", "single", "single"): 2, ("b", "agn", "transfer"): 16,
                           ("b", "agn", "scratch"): 16}


def test_a_phase_budget_factor_scales_only_its_runs_and_follows_the_budget_override(tmp_path):
    text = BASE.replace("a: {envs: [CartPole-v1]}", "a: {envs: [CartPole-v1], env_steps_factor: 4}")
    steps = {(r.phase, r.mode): r.config.run.env_steps_per_env
             for r in load_experiment(_write(tmp_path, text), "cpu").runs("/tmp/o")}
    assert steps == {("a", "single"): 40, ("a", "plain"): 40, ("b", "single"): 10,
                     ("b", "transfer"): 10, ("b", "scratch"): 10}
    exp = load_experiment(_write(tmp_path, text), "cpu", env_steps_per_env=3)
    assert {r.config.run.env_steps_per_env for r in exp.runs("/tmp/o") if r.phase == "a"} == {12}
    assert exp.resolved()["phases"]["a"]["env_steps_factor"] == 4.0
    assert "env_steps_factor" not in exp.resolved()["phases"]["b"]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


BASE = """
name: x
phases:
  a: {envs: [CartPole-v1]}
  b: {envs: [Pendulum-v1], init_from: a, scratch: [agn]}
agents:
  single: {model: {kind: single}}
  agn: {model: {kind: agnostic}}
scales:
  cpu: {seeds: [0], env_steps_per_env: 10}
"""


@pytest.mark.parametrize("change,message", [
    (("agn: {model: {kind: agnostic}}", "agn: {modle: {kind: agnostic}}"), "did you mean 'model'"),
    (("init_from: a", "init_from: c"), "must name an EARLIER phase"),
    (("scratch: [agn]", "scratch: [agm]"), "unknown agent 'agm'"),
    (("[Pendulum-v1]", "[Pendulum-v9]"), "Pendulum-v9"),
    (("env_steps_per_env: 10", "env_steps_per_env: 10, train: {ppo: {num_epoch: 2}}"),
     "did you mean 'num_epochs'"),
    (("single: {model: {kind: single}}", "single: {model: {kind: agnostic}}"),
     "reference must name an agent of model kind 'single'"),
    (("\nscales:", "\nprimary: agm\nscales:"), "primary 'agm' is not an agent"),
    (("scratch: [agn]}", "scratch: [agn], train: {ppo: {num_minibatch: 8}}}"),
     "did you mean 'num_minibatches'"),
    (("scratch: [agn]}", "scratch: [agn], train: 16}"), "phases.b.train must be a mapping"),
    (("scratch: [agn]}", "scratch: [agn], env_steps_factor: 0}"),
     "phases.b.env_steps_factor must be a positive number, got 0"),
    (("scratch: [agn]}", "scratch: [agn], env_steps_factor: four}"),
     "env_steps_factor must be a positive number, got 'four'"),
])
def test_bad_experiment_files_fail_before_any_run(tmp_path, change, message):
    assert load_experiment(_write(tmp_path, BASE), "cpu").runs("/tmp/o")
    with pytest.raises(ConfigError, match=message):
        load_experiment(_write(tmp_path, BASE.replace(*change)), "cpu")


def test_unknown_experiment_or_scale_is_a_clear_cli_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["experiment", "mix_to_mixx"])
    assert exc.value.code == 2 and "unknown experiment 'mix_to_mixx'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["experiment", "mix_to_mix", "--scale", "huge"])
    assert "unknown scale 'huge'" in capsys.readouterr().err


def test_the_reproduce_command_names_a_shipped_experiment_or_the_file_given(tmp_path):
    from rl_agnostic.experiments.report import _command_target

    assert _command_target(load_experiment("mix16", "tiny")) == "mix16"
    path = _write(tmp_path, BASE)
    assert Path(_command_target(load_experiment(path, "cpu"))).resolve() == path.resolve()


def test_scores_normalize_against_the_reference_and_undefined_near_random():
    curve = [(i, float(i)) for i in range(1, 21)]
    assert final_score(curve, 0.1) == pytest.approx(19.5)
    assert final_score([], 0.1) is None
    assert normalize(60.0, rand=20.0, ref=100.0) == pytest.approx(50.0)
    assert normalize(60.0, rand=-1000.0, ref=-980.0) is None  # within 5 % of |random|
    assert normalize(None, 0.0, 100.0) is None


def test_primary_check_counts_envs_per_other_column():
    exp = load_experiment("mix_to_mix", "tiny")

    def entry(x):
        return {"final": {"return_mean_std": (x, 0.0)}}

    scores = {"agnostic-s4 (transfer)": {"A": entry(5), "B": entry(1)},
              "specific (transfer)": {"A": entry(4), "B": entry(2)},
              "agnostic-s4 (scratch)": {"A": entry(5), "B": entry(None)},
              "single-env": {"A": entry(9), "B": entry(9)}}
    check = _primary_check(exp, scores, ["A", "B"])["versus"]
    assert check["specific (transfer)"] == {"per_env": {"A": True, "B": False}, "count": 1,
                                            "of": 2, "per_seed": {}}
    assert check["agnostic-s4 (scratch)"]["count"] == 1
    assert check["agnostic-s4 (scratch)"]["of"] == 1
    assert "single-env" not in check


def test_primary_check_counts_per_seed_on_the_seeds_both_columns_have():
    exp = load_experiment("mix_to_mix", "tiny")

    def entry(by_seed):
        return {"final": {"return_mean_std": (sum(by_seed.values()) / len(by_seed), 0.0),
                          "seeds": sorted(by_seed), "returns": [by_seed[s] for s in
                                                                sorted(by_seed)]}}

    scores = {"agnostic-s4 (transfer)": {"A": entry({0: 5, 1: 1, 2: 9}),
                                         "B": entry({0: 1, 1: 3, 2: 9})},
              "specific (transfer)": {"A": entry({0: 4, 1: 2}), "B": entry({0: 2, 1: 2})},
              "agnostic-s4 (scratch)": {"A": entry({0: 1}), "B": entry({0: 1})}}
    check = _primary_check(exp, scores, ["A", "B"])["versus"]
    # seed 0: A only; seed 1: B only; seed 2 is not the specific agent's
    assert check["specific (transfer)"]["per_seed"] == {0: 1, 1: 1}
    assert check["agnostic-s4 (scratch)"]["per_seed"] == {}  # one seed in common


def test_primary_check_of_a_phase_without_transfer_includes_the_reference():
    exp = load_experiment("mix16", "tiny")

    def entry(x):
        return {"final": {"return_mean_std": (x, 0.0)}}

    scores = {"single-env": {"A": entry(9), "B": entry(1)},
              "agnostic-s4": {"A": entry(5), "B": entry(1)}}
    check = _primary_check(exp, scores, ["A", "B"], transfer=False)
    assert check["primary"] == "agnostic-s4"
    assert check["versus"] == {"single-env": {"per_env": {"A": False, "B": True}, "count": 1,
                                              "of": 2, "per_seed": {}}}
    assert _primary_check(exp, scores, ["A", "B"]) == {}  # no transfer column


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray for the module's experiments (each would otherwise start and stop its
    own; `run_experiment` leaves a Ray it did not start running)."""
    import ray

    ray.init(include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_results(shared_ray, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "mix_to_mix"
    lines: list[str] = []
    result = run_experiment(load_experiment("mix_to_mix", "tiny"), out, log=lines.append)
    return out, result, lines


def test_tiny_mix_to_mix_writes_tables_plots_and_parameter_counts(tiny_results):
    out, result, lines = tiny_results
    for name in ("results.md", "results.json", "pretrain.png", "transfer.png", "config.yaml",
                 "random.json"):
        assert (out / name).stat().st_size > 0, name
    assert not result["missing_runs"]
    pre, tr = result["phases"]["pretrain"], result["phases"]["transfer"]
    assert set(tr["labels"]) >= {"agnostic-s4 (transfer)", "agnostic-s4 (scratch)",
                                 "specific (transfer)", "single-env"}
    # the agnostic network needs nothing new for new envs; the specific one adds layers
    assert tr["parameters"]["agnostic-s4 (transfer)"] == pre["parameters"]["agnostic-s4"]
    assert tr["parameters_all_envs"]["agnostic-s4"] == pre["parameters"]["agnostic-s4"]
    assert tr["parameters_all_envs"]["specific"] > pre["parameters"]["specific"]
    # the runs' curves reached the report (a random CartPole episode lasts ~20 steps)
    for label in ("single-env", "agnostic-s4"):
        assert pre["curves"][label]["CartPole-v1"][0], label
    done = json.loads((out / "runs/transfer/seed0/agnostic-s4_transfer/done.json").read_text())
    assert done["init_from"].endswith("runs/pretrain/seed0/agnostic-s4")
    md = (out / "results.md").read_text()
    assert "Phase `transfer` (from `pretrain`)" in md and "agnostic-s4 (transfer)" in md
    assert yaml.safe_load((out / "config.yaml").read_text())["scale"] == "tiny"
    assert any("initialized weights from" in line for line in lines)
    # the per-seed wall time is every phase's runs summed
    walls = [json.loads(path.read_text())["wall_s"]
             for path in (out / "runs").glob("*/seed0/*/done.json")]
    assert len(walls) > 2 and result["wall_s_per_seed"][0] == pytest.approx(sum(walls))
    assert f"seed 0 {sum(walls) / 60:.1f} min" in md
    # the reproduce command names the report's seeds and budget, not just the scale
    tiny = load_experiment("mix_to_mix", "tiny")
    assert (f"`rl-agnostic experiment mix_to_mix --scale tiny --seeds 0 "
            f"--env-steps {tiny.env_steps_per_env}`") in md


def test_restarting_skips_finished_runs_and_shared_runs_are_reused(tiny_results):
    out, _, _ = tiny_results
    lines: list[str] = []
    run_experiment(load_experiment("mix_to_mix", "tiny"), out, log=lines.append)
    assert "11 already done" in lines[0] and not any("iter" in line for line in lines)
    # ablation shares mix_to_mix's runs: only its three new variants train
    abl = out.parent / "ablation"
    lines = []
    result = run_experiment(load_experiment("ablation", "tiny"), abl, log=lines.append)
    assert "7 runs" in lines[0] and "4 already done" in lines[0]
    assert set(result["phases"]["pretrain"]["labels"]) == {
        "single-env", "agnostic-s4", "no-transformer", "no-mid-mlp", "agnostic-bigru",
        "no-encoder-codes"}
    assert (abl / "pretrain.png").is_file() and (abl / "results.md").is_file()


def test_a_run_another_experiment_finished_with_the_same_config_is_copied_not_trained(
        tiny_results):
    """mix16's tiny runs (single-env CartPole and Pendulum, agnostic on both) are mix_to_mix's
    tiny pretraining runs under another phase name: next to those results, nothing trains."""
    out, _, _ = tiny_results
    lines: list[str] = []
    result = run_experiment(load_experiment("mix16", "tiny"), out.parent / "mix16",
                            log=lines.append)
    assert not result["missing_runs"] and not any(" iter " in line for line in lines)
    assert sum("reused the records of" in line for line in lines) == 3
    for name in ("single-env_CartPole-v1", "agnostic-s4"):
        copy = out.parent / f"mix16/runs/train/seed0/{name}"
        source = out / f"runs/pretrain/seed0/{name}"
        done = json.loads((copy / "done.json").read_text())
        assert done["reused_from"] == f"mix_to_mix/runs/pretrain/seed0/{name}"
        assert (copy / "metrics.jsonl").read_text() == (source / "metrics.jsonl").read_text()
        assert yaml.safe_load((copy / "config.yaml").read_text())["run"]["output_dir"] == str(
            copy.parent)
    assert result["phases"]["train"]["reused_runs"] == 3
    assert "3 runs" in (out.parent / "mix16/results.md").read_text()


def test_only_fresh_runs_that_no_transfer_starts_from_are_reused(tiny_results, tmp_path):
    from rl_agnostic.experiments.run import _reuse_identical_runs

    out, _, _ = tiny_results
    shutil.copytree(out / "runs", tmp_path / "mix_to_mix/runs")
    saved = tmp_path / "mix_to_mix/runs/pretrain/seed0/single-env_CartPole-v1/config.yaml"
    cfg = yaml.safe_load(saved.read_text())
    cfg["ppo"]["num_epochs"] = 3  # another config: not this run
    saved.write_text(yaml.safe_dump(cfg))
    exp = load_experiment("mix_to_mix", "tiny")
    runs = exp.runs(tmp_path / "again")
    left = _reuse_identical_runs(runs, runs, tmp_path, lambda text: None)
    assert {(r.phase, r.config.name) for r in left} == {
        ("pretrain", "single-env_CartPole-v1"),  # its only match has another config
        # the transfers start from these pretraining runs' checkpoints, which results do not keep
        ("pretrain", "specific"), ("pretrain", "agnostic-s4"), ("pretrain", "agnostic-bigru"),
        ("transfer", "specific_transfer"), ("transfer", "agnostic-s4_transfer"),
        ("transfer", "agnostic-bigru_transfer")}
    assert (tmp_path / "again/runs/transfer/seed0/agnostic-s4_scratch/done.json").is_file()
    # a copy of that copy names the run that trained
    runs = exp.runs(tmp_path / "again2")
    _reuse_identical_runs(runs, runs, tmp_path, lambda text: None)
    done = json.loads((tmp_path / "again2/runs/transfer/seed0/agnostic-s4_scratch/done.json")
                      .read_text())
    assert done["reused_from"] == "mix_to_mix/runs/transfer/seed0/agnostic-s4_scratch"


def test_a_run_directory_with_another_config_is_refused(tiny_results, tmp_path):
    out, _, _ = tiny_results
    copy = tmp_path / "mix_to_mix"
    shutil.copytree(out, copy)
    cfg_file = copy / "runs/pretrain/seed0/agnostic-s4/config.yaml"
    saved = yaml.safe_load(cfg_file.read_text())
    saved["ppo"]["num_epochs"] = 3
    cfg_file.write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match="different config.*ppo.num_epochs"):
        run_experiment(load_experiment("mix_to_mix", "tiny"), copy, log=lambda text: None)


def test_runs_saved_before_a_field_existed_are_reused_only_when_it_changes_nothing(
        tiny_results, tmp_path):
    """Configs written before `encoder_position` existed ran without encoder codes: a single-env
    run (no agnostic encoder) is the same run today, an agnostic one is not. Env entries written
    before `gamma` existed ran with ppo.gamma, today's default, and run sections written before
    `transfer_shrink`/`transfer_reinit` existed with theirs."""
    from rl_agnostic.experiments.run import check_run_dir

    out, _, _ = tiny_results
    copy = tmp_path / "mix_to_mix"
    shutil.copytree(out, copy)
    exp = load_experiment("mix_to_mix", "tiny")
    runs = {r.key: r for r in exp.runs(copy)}
    for name in ("single-env_CartPole-v1", "agnostic-s4"):
        cfg_file = copy / f"runs/pretrain/seed0/{name}/config.yaml"
        saved = yaml.safe_load(cfg_file.read_text())
        del saved["model"]["network"]["encoder_position"]
        for entry in saved["envs"]:
            del entry["gamma"]
        del saved["run"]["transfer_shrink"], saved["run"]["transfer_reinit"]
        cfg_file.write_text(yaml.safe_dump(saved))
    check_run_dir(runs["pretrain/single-env_CartPole-v1"])
    with pytest.raises(ConfigError, match="different config.*model.network"):
        check_run_dir(runs["pretrain/agnostic-s4"])


@pytest.mark.parametrize("name", ["mix16", "classic_to_mujoco", "mujoco_to_classic"])
def test_every_other_experiment_runs_end_to_end_at_tiny_scale(name, tmp_path, shared_ray):
    import ray

    exp = load_experiment(name, "tiny")
    result = run_experiment(exp, tmp_path / name, log=lambda text: None)
    assert ray.is_initialized()  # a Ray it did not start stays up
    assert not result["missing_runs"]
    for phase in result["phases"]:
        assert (tmp_path / name / f"{phase}.png").stat().st_size > 0
    md = (tmp_path / name / "results.md").read_text()
    assert all(f"Phase `{phase}`" in md for phase in result["phases"])


def test_phase_env_entries_keep_their_backend(tmp_path):
    text = BASE.replace("a: {envs: [CartPole-v1]}", "a: {envs: [{id: CartPole-v1, backend: envpool}]}")
    exp = load_experiment(_write(tmp_path, text), "cpu")
    assert exp.env_ids("a") == ["envpool:CartPole-v1"]
    single = next(r for r in exp.runs("/tmp/o") if r.phase == "a" and r.mode == "single")
    assert single.config.env_ids == ["envpool:CartPole-v1"]
    assert single.config.name == "single_envpool:CartPole-v1"


TWINS = """
name: twins
phases:
  a: {envs: [CartPole-v1, Pendulum-v1]}
  b: {envs: [Acrobot-v1, MountainCarContinuous-v0], init_from: a}
agents:
  single: {model: {kind: single}}
  agn: {model: {kind: agnostic}}
  agn-std-reset: {model: {kind: agnostic}, transfer: {run: {transfer_reinit: [log_std_decoder]}}}
  agn-wide: {model: {kind: agnostic, network: {d_model: 24}}}
scales:
  cpu:
    seeds: [0]
    env_steps_per_env: 48
    train:
      model: {network: {preset: cpu, d_model: 16, s4_layers: 1, transformer_layers: 1,
                        dropout: 0.0, mlp_depth: 1}}
      ppo: {num_epochs: 1, rollout_steps: 24, num_minibatches: 1}
      resources: {num_env_runners: 0, num_envs_per_env_runner: 2}
      run: {checkpoint_every: 100, keep_checkpoints: 1}
"""


def test_agents_whose_pretraining_is_the_same_pretrain_once(tmp_path, shared_ray):
    """Two agents that differ only in how they transfer share one pretraining run: the twin
    takes its records and its transfer starts from the original's weights."""
    from rl_agnostic.experiments.run import twin_parents

    exp = load_experiment(_write(tmp_path, TWINS.replace("seeds: [0]", "seeds: [0, 1]")), "cpu")
    twins = twin_parents(exp.runs(tmp_path / "out"))
    assert {k.relative_to(tmp_path / "out/runs"): v.config.run.seed
            for k, v in twins.items()} == {Path("a/seed0/agn-std-reset"): 0,
                                           Path("a/seed1/agn-std-reset"): 1}
    assert {v.agent for v in twins.values()} == {"agn"}
    exp = load_experiment(_write(tmp_path, TWINS), "cpu")
    lines: list[str] = []
    result = run_experiment(exp, tmp_path / "out", log=lines.append)
    assert not result["missing_runs"]
    trained = {line.split("]")[0].split()[-1] for line in lines if " iter " in line}
    assert "agn-std-reset" not in trained and {"agn", "agn-wide"} <= trained
    pre = tmp_path / "out/runs/a/seed0"
    assert (pre / "agn-std-reset/metrics.jsonl").read_text() == (
        pre / "agn/metrics.jsonl").read_text()
    assert json.loads((pre / "agn-std-reset/done.json").read_text())["reused_from"] == (
        "out/runs/a/seed0/agn")
    done = json.loads((tmp_path / "out/runs/b/seed0/agn-std-reset_transfer/done.json")
                      .read_text())
    assert done["init_from"] == str(pre / "agn")
    assert yaml.safe_load((tmp_path / "out/runs/b/seed0/agn-std-reset_transfer/config.yaml")
                          .read_text())["run"]["transfer_reinit"] == ["log_std_decoder"]
    # started again, nothing trains
    lines = []
    run_experiment(exp, tmp_path / "out", log=lines.append)
    assert not any(" iter " in line for line in lines)
