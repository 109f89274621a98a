"""The transfer-init benchmark's report, from the committed mix_to_mix run records (no training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "transfer_init.py"


def load_benchmark():
    """The benchmark script as a module (benchmarks/ is not a package)."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        import transfer_init
    finally:
        sys.path.remove(str(BENCH.parent))
    return transfer_init


def test_plain_variant_reproduces_the_experiment_reports_seed0_scores(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--variants", "plain", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=True)
    assert "plain" in out.stdout
    for name in ("results.md", "results.json", "curves.png", "runs/seed0/plain/metrics.jsonl"):
        assert (tmp_path / name).is_file(), name
    res = json.loads((tmp_path / "results.json").read_text())
    exp = json.loads((ROOT / "results/mix_to_mix/results.json").read_text())
    scores = exp["phases"]["transfer"]["scores"]
    for label, theirs in [("plain", "agnostic-s4 (transfer)"),
                          ("specific (transfer)", "specific (transfer)"),
                          ("agnostic-s4 (scratch)", "agnostic-s4 (scratch)")]:
        assert res["rows"][label]["seeds"] == [0]
        for env in res["envs"]:
            assert res["rows"][label][env]["final"] == pytest.approx(
                scores[theirs][env]["final"]["returns"][0]), env
    wins = res["wins"]["plain"]
    assert set(wins) == {"seeds", "specific (transfer)", "agnostic-s4 (scratch)"}
    for against, theirs in [("specific (transfer)", "specific (transfer)"),
                            ("agnostic-s4 (scratch)", "agnostic-s4 (scratch)")]:
        expected = sum(scores["agnostic-s4 (transfer)"][e]["final"]["returns"][0]
                       >= scores[theirs][e]["final"]["returns"][0] for e in res["envs"])
        assert wins[against] == {"mean": expected, "per_seed": [expected]}


def test_specific_variant_trains_the_specific_agent_with_the_agnostic_best_start(tmp_path):
    transfer_init = load_benchmark()
    from rl_agnostic.online.config import TrainConfig

    best = transfer_init.variant_config(0, "shrink-0.5+lr-2x", tmp_path)
    same = transfer_init.variant_config(0, "specific+shrink-0.5+lr-2x", tmp_path)
    assert transfer_init.agent_of("specific+shrink-0.5+lr-2x") == "specific"
    assert same["model"]["kind"] == "specific" and best["model"]["kind"] == "agnostic"
    assert same["ppo"] == best["ppo"]  # the same learning rates
    assert same["run"]["transfer_shrink"] == best["run"]["transfer_shrink"] == 0.5
    assert TrainConfig.from_dict(same, source="test").name == "specific+shrink-0.5+lr-2x"


def test_std_reset_variant_names_the_agnostic_log_std_decoder(tmp_path):
    transfer_init = load_benchmark()
    from rl_agnostic.envs.spec import EnvSpec
    from rl_agnostic.nn.agnostic import AgnosticActorCritic
    from rl_agnostic.nn.config import NetworkConfig
    from rl_agnostic.online.config import ConfigError
    from rl_agnostic.online.trainer import check_transfer_reinit

    best = transfer_init.variant_config(0, "shrink-0.5+lr-2x", tmp_path)
    reset = transfer_init.variant_config(0, "shrink-0.5+lr-2x+std-reset", tmp_path)
    assert reset["ppo"] == best["ppo"]
    assert reset["run"]["transfer_shrink"] == best["run"]["transfer_shrink"] == 0.5
    assert reset["run"]["transfer_reinit"] == ["log_std_decoder"]
    # The prefix names weights of the agnostic agent: the trainer's check accepts it and would
    # reject a typo (which would otherwise silently copy every weight).
    net = AgnosticActorCritic(NetworkConfig(d_model=16),
                              [EnvSpec("Pendulum-v1", 3, "continuous", 1, (-2.0,), (2.0,))])
    policy = {"network": net.state_dict()}
    check_transfer_reinit(policy, reset["run"]["transfer_reinit"])
    with pytest.raises(ConfigError, match="log_std_decoderr"):
        check_transfer_reinit(policy, ["log_std_decoderr"])


def test_redraw_variants_are_the_experiments_own_runs(tmp_path):
    """``plain``, ``specific+plain`` and ``scratch`` re-train mix_to_mix's committed agnostic
    transfer, specific transfer and agnostic scratch configs unchanged (name and directory
    aside); only the scratch one starts from a fresh init."""
    import yaml

    transfer_init = load_benchmark()
    for variant, committed in [("plain", "agnostic-s4_transfer"),
                               ("specific+plain", "specific_transfer"),
                               ("scratch", "agnostic-s4_scratch")]:
        ours = transfer_init.variant_config(0, variant, tmp_path)
        theirs = yaml.safe_load((transfer_init.committed_run(0, "transfer", committed)
                                 / "config.yaml").read_text())
        for cfg in (ours, theirs):
            cfg.pop("name")
            cfg["run"].pop("output_dir")
        assert ours == theirs, variant
    assert "scratch" in transfer_init.SCRATCH and "specific+plain" not in transfer_init.SCRATCH
    assert transfer_init.agent_of("specific+plain") == "specific"


def test_env_steps_sets_every_trained_variants_budget_and_drops_the_committed_comparisons(tmp_path):
    """``--env-steps``: the variant configs carry that budget, and the report compares only the
    runs made at it (the experiment's committed runs, at its own budget, are left out)."""
    import shutil

    import yaml

    transfer_init = load_benchmark()
    for variant in ("plain", "specific+plain", "scratch"):
        cfg = transfer_init.variant_config(0, variant, tmp_path, env_steps=100_000)
        assert cfg["run"]["env_steps_per_env"] == 100_000, variant
    assert transfer_init.variant_config(0, "plain", tmp_path)["run"]["env_steps_per_env"] == 25_000

    record = tmp_path / "out" / "runs" / "seed0" / "plain"
    record.mkdir(parents=True)
    committed = transfer_init.committed_run(0, "transfer", "agnostic-s4_transfer")
    shutil.copy(committed / "metrics.jsonl", record / "metrics.jsonl")
    cfg = yaml.safe_load((committed / "config.yaml").read_text())
    cfg["run"]["env_steps_per_env"] = 100_000
    (record / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = transfer_init.collect(["plain"], tmp_path / "out", baselines=[], compared={})
    assert list(res["rows"]) == ["plain"] and res["compared"] == []
    assert res["env_steps_per_env"] == [100_000]
    assert res["wins"]["plain"] == {"seeds": [0]}
    transfer_init.write_markdown(res, tmp_path / "out" / "results.md")
    text = (tmp_path / "out" / "results.md").read_text()
    assert text.count("100,000 env steps per new env") == 1 and "committed runs" not in text


@pytest.mark.parametrize("steps", ["0", "-5", "ten"])
def test_env_steps_must_be_a_positive_integer_before_any_work(tmp_path, steps):
    out = subprocess.run([sys.executable, str(BENCH), "--env-steps", steps, "--variants", "plain",
                          "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--env-steps" in out.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
