"""Our run gauges reach the node's Prometheus metrics endpoint, with their env/dataset tags, from
the driver and from a Ray worker process."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest

ray = pytest.importorskip("ray")

from rl_agnostic.metrics import GAUGES, RunMetrics  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int, wanted: list[str], timeout_s: float = 60.0) -> str:
    deadline = time.time() + timeout_s
    text = ""
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            text = ""
        if all(w in text for w in wanted):
            return text
        time.sleep(1.0)
    return text


def test_gauges_are_exported_with_env_tags():
    port = _free_port()
    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING",
             _metrics_export_port=port)
    try:
        gauges = RunMetrics("metrics-test")
        gauges.set_per("rl_agnostic_episode_return", {"CartPole-v1": 123.5, "Pendulum-v1": -800},
                       "env_id")
        gauges.set("rl_agnostic_env_steps_per_s", 512.0)

        @ray.remote(num_cpus=0)
        def from_worker() -> None:
            w = RunMetrics("metrics-test")
            w.set("rl_agnostic_normalized_score", 87.0, dataset="hopper-expert")
            w.set("rl_agnostic_data_wait_fraction", 0.01)
            time.sleep(12)  # stay alive past one export interval

        ref = from_worker.remote()
        wanted = ['ray_rl_agnostic_episode_return{', 'env_id="CartPole-v1"',
                  'env_id="Pendulum-v1"', 'ray_rl_agnostic_env_steps_per_s{',
                  'ray_rl_agnostic_normalized_score{', 'dataset="hopper-expert"',
                  'run="metrics-test"']
        text = _scrape(port, wanted)
        ray.get(ref)
    finally:
        ray.shutdown()
    missing = [w for w in wanted if w not in text]
    assert not missing, f"not in the metrics export: {missing}"
    line = next(l for l in text.splitlines()
                if l.startswith("ray_rl_agnostic_episode_return{") and "CartPole-v1" in l)
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(123.5)


def test_gauges_are_a_no_op_outside_ray():
    assert not ray.is_initialized()
    RunMetrics("no-ray").set("rl_agnostic_env_steps_per_s", 1.0)  # must not start Ray
    assert not ray.is_initialized()
    assert set(GAUGES) >= {"rl_agnostic_episode_return", "rl_agnostic_data_wait_fraction"}
