"""DD-IQL on a real local Ray (Ray Train workers, Ray Data shards) over three real datasets of
different shapes: CartPole-v1 (obs 4, discrete 2), Pendulum-v1 (obs 3, continuous 1) and
InvertedPendulum-v5 (obs 4, continuous 1), collected here by ``rl-agnostic collect``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from rl_agnostic.cli import main  # noqa: E402
from rl_agnostic.offline.collect import PolicySource, collect  # noqa: E402
from rl_agnostic.offline.config import OfflineConfig  # noqa: E402
from rl_agnostic.offline.data import read_parquet, to_ray_dataset  # noqa: E402
from rl_agnostic.offline.trainer import train_offline  # noqa: E402
from rl_agnostic.online.agent import Agent  # noqa: E402

ENVS = {"cartpole": "CartPole-v1", "pendulum": "Pendulum-v1", "invpend": "InvertedPendulum-v5"}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    out = tmp_path_factory.mktemp("datasets")
    for name, env_id in ENVS.items():
        collect(env_id, [PolicySource("random", 4)], out, name, seed=1, random_episodes=2,
                log=lambda _: None)
    return out


def _config(datasets, out, steps: int, workers: int = 2) -> OfflineConfig:
    return OfflineConfig.from_dict({
        "name": "ddiql",
        "datasets": [str(datasets / "cartpole.parquet"),
                     str(datasets / "minari" / "rl_agnostic" / "pendulum-v0"),
                     {"path": str(datasets / "invpend.parquet"), "ref_min_score": 0.0,
                      "ref_max_score": 1000.0}],
        "model": {"kind": "agnostic",
                  "network": {"preset": "cpu", "d_model": 16, "s4_layers": 1,
                              "transformer_layers": 1, "dropout": 0.0}},
        "iql": {"batch_size": 16},
        "resources": {"num_workers": workers},
        "run": {"steps": steps, "log_every": 5, "checkpoint_every": 10, "eval_episodes": 1,
                "output_dir": str(out)},
    })


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ray_dataset_round_trip(local_ray, datasets):
    data = read_parquet(datasets / "pendulum.parquet")
    rows = to_ray_dataset(data).take_batch(len(data), batch_format="numpy")
    for field, array in data.arrays().items():
        assert np.array_equal(rows[field], array), field


@pytest.fixture(scope="module")
def two_worker_run(local_ray, datasets, tmp_path_factory):
    """20 steps on two workers, then resumed to 30: (config, run dir, final metrics of both,
    the logged steps and latest checkpoint after the first 20)."""
    cfg = _config(datasets, tmp_path_factory.mktemp("runs"), steps=20)
    run_dir = Path(cfg.run.output_dir) / cfg.name
    final = train_offline(cfg)
    first = ([m["step"] for m in _metrics(run_dir)], (run_dir / "latest").read_text())
    resumed = train_offline(cfg.replace(run={"steps": 30}), resume=True)
    return cfg, run_dir, final, resumed, first


def test_ddiql_two_workers_three_datasets(two_worker_run, capsys):
    cfg, run_dir, final, resumed, first = two_worker_run

    # The two workers hold different datasets (0 and 2 vs 1) and still end with equal weights.
    assert final["step"] == 20
    assert final["sync/max_weight_diff"] == 0.0
    # The optimized loss is the sum of the per-dataset IQL losses.
    names = ["cartpole", "pendulum", "invpend"]
    per_dataset = [final[f"dataset/{n}/loss_total"] for n in names]
    assert final["loss/total"] == pytest.approx(sum(per_dataset), rel=1e-6)
    for n in names:
        parts = [final[f"dataset/{n}/loss_{k}"] for k in ("value", "q", "policy")]
        assert final[f"dataset/{n}/loss_total"] == pytest.approx(sum(parts), rel=1e-5)
        assert np.isfinite(final[f"dataset/{n}/return_mean"])
    assert "dataset/invpend/normalized_score" in final
    assert first == ([5, 10, 15, 20], "ckpt_000020")

    # --resume continued from the step-20 checkpoint.
    assert resumed["step"] == 30
    assert resumed["sync/max_weight_diff"] == 0.0
    assert [m["step"] for m in _metrics(run_dir)] == [5, 10, 15, 20, 25, 30]
    assert (run_dir / "latest").read_text() == "ckpt_000030"

    # The checkpoint's policy acts in all three envs outside Ray, and the CLI evaluates it.
    agent = Agent.load(run_dir)
    assert set(agent.specs) == set(ENVS.values())
    assert agent.act("CartPole-v1", np.zeros((2, 4), np.float32)).dtype == np.int64
    assert agent.act("Pendulum-v1", np.zeros((1, 3), np.float32)).shape == (1, 1)
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--env", "InvertedPendulum-v5", "--episodes", "1"]) == 0
    assert "InvertedPendulum-v5: return" in capsys.readouterr().out

    # Resuming under a network config that computes another function with the same weights is
    # refused before any training, and the run is left as it was.
    other = dataclasses.replace(cfg.model.network, encoder_position="none")
    with pytest.raises(ValueError, match="encoder_position: checkpoint 'modulated', config 'none'"):
        train_offline(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, network=other),
                                          run=dataclasses.replace(cfg.run, steps=40)), resume=True)
    assert (run_dir / "latest").read_text() == "ckpt_000030"


def test_a_killed_train_worker_is_replaced_and_the_run_finishes_from_its_checkpoint(
        two_worker_run):
    """A new run in the directory of the two-worker run (which it first moves aside whole);
    one of its Ray Train workers is killed after its first checkpoint."""
    import os
    import signal
    import threading
    import time

    import psutil

    earlier, run_dir, *_ = two_worker_run
    cfg = dataclasses.replace(earlier, run=dataclasses.replace(
        earlier.run, steps=240, checkpoint_every=40, log_every=20))
    killed: list[int] = []
    before_kill: list[str] = []

    def kill_a_worker_once_the_first_checkpoint_is_registered() -> None:
        # Ray Train registers a reported checkpoint when it next polls the workers (every 2 s):
        # kill once a step past the first checkpoint (40) is logged and a poll has passed.
        deadline = time.monotonic() + 300
        log = run_dir / "metrics.jsonl"
        while time.monotonic() < deadline:
            lines = log.read_text().splitlines() if log.is_file() else []
            if lines and json.loads(lines[-1])["step"] >= 60:
                break
            time.sleep(0.1)
        time.sleep(3.0)
        # Ray titles worker processes by their actor class (the state API needs the dashboard).
        workers = [p for p in psutil.process_iter(["cmdline"])
                   if (p.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker")]
        if workers:
            before_kill.extend(log.read_text().splitlines())
            os.kill(workers[0].pid, signal.SIGKILL)
            killed.append(workers[0].pid)

    killer = threading.Thread(target=kill_a_worker_once_the_first_checkpoint_is_registered)
    killer.start()
    final = train_offline(cfg)
    killer.join()
    assert killed, "no Ray Train worker was found to kill"
    assert final["step"] == 240
    assert final["sync/max_weight_diff"] == 0.0
    # The run went on from a checkpoint, not from step 0 (the lines up to it, with their timings,
    # are the ones written before the kill), and the steps it redid are logged once.
    after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert after[:2] == before_kill[:2]
    assert [json.loads(line)["step"] for line in after] == list(range(20, 241, 20))
    # The earlier run in that directory was moved aside whole before this one started.
    (aside,) = [p for p in run_dir.parent.iterdir() if p.name.startswith(run_dir.name + ".")]
    assert [m["step"] for m in _metrics(aside)] == [5, 10, 15, 20, 25, 30]
    assert (aside / "latest").read_text() == "ckpt_000030"
