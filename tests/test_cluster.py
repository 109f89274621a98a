"""Cluster launch: the launcher YAML passes Ray's own schema, the KubeRay manifest has the shape
the operator expects, and a training job submitted through the Jobs API to a real two-node local
cluster (``ray start --head`` + a second ``ray start``, on loopback) succeeds."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_launcher_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    prepared = prepare_config(config)  # fills provider defaults, as `ray up` does first
    validate_config(prepared)  # then the jsonschema of ray/autoscaler/ray-schema.json
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert any("pip install -e /home/ubuntu/rl_agnostic" in c for c in config["setup_commands"])
    assert "g5" in config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    assert (ROOT / "cluster" / "entry.py").is_file()


def test_kuberay_rayjob_manifest_shape():
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("rl-agnostic train tune_configs/")
    assert (ROOT / spec["entrypoint"].split()[2]).is_file()
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"].startswith("rayproject/ray:2.60.0")
    gpu = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    yaml.safe_load(spec["runtimeEnvYAML"])


_PICKED: set[int] = set()


def _free_port() -> int:
    """A free port below the kernel's ephemeral range (32768-60999 by default). A port the OS
    hands out (bind to 0) is free now but may go to one of Ray's own components before the node
    binds it ("port … used by other components"); these ports are never handed out that way."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32000)  # above Ray's worker ports (10002-19999)
        if port in _PICKED:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PICKED.add(port)
        return port


# Ray ≥ 2.5x turns token authentication on for new clusters; this loopback-only test cluster
# (and its jobs, which inherit the node's environment) runs without it. On a real cluster keep it
# on and give `ray job submit` the token (RAY_AUTH_TOKEN), see cluster/README.md.
AUTH_ENV = {"RAY_AUTH_MODE": "disabled"}


def _ray_start(args: list[str], tmp: Path, name: str) -> subprocess.Popen:
    log = open(tmp / f"{name}.log", "w")
    # Each node's agents on free ports: Ray's fixed defaults (e.g. 52365 for the dashboard agent)
    # collide with any other Ray on the machine, and the job agent then never comes up.
    agent_ports = ["--dashboard-agent-listen-port", str(_free_port()),
                   "--dashboard-agent-grpc-port", str(_free_port()),
                   "--runtime-env-agent-port", str(_free_port()),
                   "--metrics-export-port", str(_free_port())]
    return subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *args, *agent_ports],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **AUTH_ENV})


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its node's processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_job_submitted_to_a_two_node_cluster_trains_and_checkpoints(tmp_path, monkeypatch):
    from ray.job_submission import JobStatus, JobSubmissionClient

    for key, value in AUTH_ENV.items():
        monkeypatch.setenv(key, value)

    gcs, dash = _free_port(), _free_port()
    temp = Path("/tmp") / f"rla_{os.getpid()}"  # short: Ray's socket paths have a length limit
    head = _ray_start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                       "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                       "--include-dashboard", "true", "--num-cpus", "1",
                       "--temp-dir", str(temp), "--disable-usage-stats"], tmp_path, "head")
    worker = None
    try:
        client = None
        deadline = time.time() + 120
        while client is None and time.time() < deadline:
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
            except Exception:  # noqa: BLE001 - the dashboard is still starting
                time.sleep(2)
        assert client is not None, (tmp_path / "head.log").read_text()[-3000:]
        worker = _ray_start(["--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1",
                             "--num-cpus", "1"], tmp_path, "worker")
        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump({
            "name": "cluster_job", "envs": ["CartPole-v1"],
            "model": {"kind": "agnostic", "network": {"preset": "cpu", "d_model": 16,
                                                       "s4_layers": 1, "transformer_layers": 1,
                                                       "dropout": 0.0}},
            "ppo": {"num_epochs": 1, "rollout_steps": 64, "num_minibatches": 2},
            "resources": {"num_env_runners": 1, "num_envs_per_env_runner": 2,
                          "num_cpus_per_env_runner": 1, "learner_torch_threads": 1},
            "run": {"env_steps_per_env": 256, "checkpoint_every": 1,
                    "output_dir": str(tmp_path / "runs")},
        }))
        job, deadline = None, time.time() + 120
        while job is None:
            try:
                job = client.submit_job(entrypoint=f"rl-agnostic train {config}",
                                        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
            except RuntimeError as exc:
                # The head's job agent starts after the dashboard answers (slowly on a loaded
                # machine): Ray answers 500 "No available agent" until then.
                if "No available agent" not in str(exc) or time.time() > deadline:
                    raise
                time.sleep(3)
        status, deadline = None, time.time() + 400
        while time.time() < deadline:
            status = client.get_job_status(job)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(2)
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        nodes = {n["NodeID"] for n in json.loads(subprocess.run(
            [sys.executable, "-c", "import json, ray; ray.init(address='127.0.0.1:%d'); "
             "print(json.dumps([n for n in ray.nodes() if n['Alive']]))" % gcs],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, **AUTH_ENV}).stdout.strip().splitlines()[-1])}
        assert len(nodes) == 2
        run = tmp_path / "runs" / "cluster_job"
        assert (run / "checkpoints" / "latest").is_file()
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert rows and rows[-1]["num_env_steps"] >= 256
        assert "iter" in logs and "CartPole-v1" in logs
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)
