"""The Serve endpoint over real HTTP on loopback: one agnostic checkpoint acting in its envs and
in a described new one, request batching, and 4xx answers that leave the replica serving."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from rl_agnostic.envs.make import env_spec  # noqa: E402
from rl_agnostic.nn import NetworkConfig  # noqa: E402
from rl_agnostic.nn.agnostic import AgnosticActorCritic  # noqa: E402
from rl_agnostic.online.agent import Agent, policy_file_contents  # noqa: E402
from rl_agnostic.online.normalize import RunningMeanStd  # noqa: E402

ENVS = ("CartPole-v1", "Pendulum-v1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = NetworkConfig.cpu(d_model=16, s4_layers=1, transformer_layers=1, dropout=0.0)
    specs = [env_spec(e) for e in ENVS]
    net = AgnosticActorCritic(cfg, specs)
    stats = RunningMeanStd((4,))
    stats.update(np.random.default_rng(0).normal(3.0, 2.0, (100, 4)))  # CartPole obs stats
    path = tmp_path_factory.mktemp("ckpt") / "policy.pt"
    torch.save(policy_file_contents("agnostic", cfg, specs, net.state_dict(),
                                    {"CartPole-v1": stats}), path)
    return path


@pytest.fixture(scope="module")
def url(checkpoint):
    from ray import serve

    from rl_agnostic.serve import serve_checkpoint

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield serve_checkpoint(str(checkpoint), port=_free_port(), blocking=False)
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(url: str, body, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/act", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_acts_like_the_checkpoint_in_its_envs(url, checkpoint):
    agent = Agent.load(checkpoint)
    rng = np.random.default_rng(1)
    for _ in range(3):
        obs = rng.normal(size=4).astype(np.float32)
        status, out = _post(url, {"env_id": "CartPole-v1", "observation": obs.tolist()})
        assert status == 200
        assert out["action"] == int(agent.act("CartPole-v1", obs[None])[0])
    status, out = _post(url, {"env_id": "Pendulum-v1", "observation": [1.0, 0.0, 0.5]})
    assert status == 200 and len(out["action"]) == 1 and -2.0 <= out["action"][0] <= 2.0
    expected = agent.act("Pendulum-v1", np.array([[1.0, 0.0, 0.5]], np.float32))[0]
    assert out["action"][0] == pytest.approx(float(expected[0]), abs=1e-5)
    with urllib.request.urlopen(url + "/envs", timeout=30) as resp:
        envs = json.loads(resp.read())
    assert envs["kind"] == "agnostic" and set(envs["envs"]) == set(ENVS)


def test_a_described_new_env_is_served_without_new_parameters(url):
    status, out = _post(url, {"env_id": "NewEnv-v0", "observation": [0.1] * 5, "obs_dim": 5,
                              "action_space": {"type": "discrete", "n": 7}})
    assert status == 200 and 0 <= out["action"] < 7
    status, out = _post(url, {"env_id": "NewBox-v0", "observation": [0.0] * 9, "obs_dim": 9,
                              "action_space": {"type": "box", "low": [-1, -3],
                                               "high": [1, 3]}})
    assert status == 200 and len(out["action"]) == 2
    assert -1 <= out["action"][0] <= 1 and -3 <= out["action"][1] <= 3


@pytest.mark.parametrize("body, raw, status, message", [
    ({"env_id": "CartPole-v1", "observation": [0.0] * 3}, None, 422, "has 3 values, expected 4"),
    (None, b'{"env_id": "CartPole-v1", "observation": [0, NaN, 0, 0]}', 422, "NaN or inf"),
    ({"env_id": "Unknown-v9", "observation": [0.0]}, None, 404, "unknown env 'Unknown-v9'"),
    (None, b"{not json", 400, "not valid JSON"),
    ({"env_id": "CartPole-v1", "observation": "abc"}, None, 400, "flat list of numbers"),
    ({"env_id": "X-v0", "observation": [0.0], "obs_dim": 1, "action_space": {"type": "grid"}},
     None, 400, "action_space must be"),
    ({"env_id": "CartPole-v1", "observation": [0.0] * 20000}, None, 413, "exceeds"),
])
def test_bad_requests_get_4xx_and_the_replica_keeps_serving(url, body, raw, status, message):
    code, out = _post(url, body, raw)
    assert code == status and message in out["error"]
    code, out = _post(url, {"env_id": "CartPole-v1", "observation": [0.0] * 4})
    assert code == 200 and out["action"] in (0, 1)


def test_concurrent_mixed_requests_are_batched_and_answered(url, checkpoint):
    agent = Agent.load(checkpoint)
    rng = np.random.default_rng(2)
    requests = []
    for i in range(24):
        env = ENVS[i % 2]
        dim = 4 if env == "CartPole-v1" else 3
        requests.append((env, rng.normal(size=dim).astype(np.float32)))
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(
            lambda r: _post(url, {"env_id": r[0], "observation": r[1].tolist()}), requests))
    for (env, obs), (code, out) in zip(requests, results):
        assert code == 200
        expected = agent.act(env, obs[None])[0]
        if env == "CartPole-v1":
            assert out["action"] == int(expected)
        else:
            assert out["action"][0] == pytest.approx(float(expected[0]), abs=1e-5)
