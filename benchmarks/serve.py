"""Serve load test: requests/s and p50/p99 latency of ``rl-agnostic serve`` for mixed-env
requests (CartPole, Acrobot, Pendulum, LunarLander, and a described new env) at concurrency 1, 8
and 32, over real HTTP on loopback.

The checkpoint is ``--checkpoint`` or, by default, an untrained agnostic network at the cpu
preset (d_model 64, the size the cpu-scale runs train; latency does not depend on the weights).
Observations are real ones, from random-policy rollouts of each env. Writes
``results/serve.json`` (``{"rows": [{"concurrency", "requests_per_s", "p50_ms", "p99_ms",
"errors"}]}``) and ``results/serve.md``.

    python benchmarks/serve.py [--checkpoint CKPT] [--requests 400]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENVS = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1", "LunarLander-v3")
NEW_ENV = {"env_id": "Described-v0", "obs_dim": 7,
           "action_space": {"type": "box", "low": [-1.0, -1.0], "high": [1.0, 1.0]}}


def default_checkpoint(directory: Path) -> Path:
    import torch

    from rl_agnostic.envs.make import env_spec
    from rl_agnostic.nn import NetworkConfig
    from rl_agnostic.nn.agnostic import AgnosticActorCritic
    from rl_agnostic.online.agent import policy_file_contents

    torch.manual_seed(0)
    cfg = NetworkConfig.cpu(dropout=0.0)
    specs = [env_spec(e) for e in ENVS]
    path = directory / "policy.pt"
    torch.save(policy_file_contents("agnostic", cfg, specs,
                                    AgnosticActorCritic(cfg, specs).state_dict(), {}), path)
    return path


def observations(per_env: int = 50, seed: int = 0) -> list[dict]:
    """Request bodies: real observations of every env (random policy), plus the new env."""
    from rl_agnostic.envs.make import make_env

    bodies = []
    rng = np.random.default_rng(seed)
    for env_id in ENVS:
        env = make_env(env_id, num_envs=1, seed=seed)
        obs, _ = env.reset()
        for _ in range(per_env):
            bodies.append({"env_id": env_id, "observation": obs[0].astype(float).tolist(),
                           "deterministic": True})
            obs, *_ = env.step(env.action_space.sample())
        env.close()
    for _ in range(per_env):
        bodies.append({**NEW_ENV, "observation": rng.normal(size=7).tolist()})
    order = rng.permutation(len(bodies))
    return [bodies[i] for i in order]


def load(host: str, port: int, bodies: list[dict], concurrency: int, total: int) -> dict:
    """``total`` requests from ``concurrency`` clients, each on one keep-alive connection."""
    per_client = total // concurrency

    def client(k: int) -> tuple[list[float], int]:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        latencies, errors = [], 0
        for i in range(per_client):
            body = json.dumps(bodies[(k * per_client + i) % len(bodies)])
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/act", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                errors += resp.status != 200
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=60)
            latencies.append(time.perf_counter() - t0)
        conn.close()
        return latencies, errors

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - t0
    lat = np.concatenate([r[0] for r in results]) * 1000.0
    return {"concurrency": concurrency, "requests_per_s": len(lat) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "errors": int(sum(r[1] for r in results)), "requests": int(len(lat))}


def main() -> None:
    import ray
    from ray import serve

    from rl_agnostic.serve import serve_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--requests", type=int, default=640, help="requests per concurrency level")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or str(default_checkpoint(Path(tmp)))
        bodies = observations()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        try:
            serve_checkpoint(ckpt, port=port, blocking=False)
            load("127.0.0.1", port, bodies, 4, 64)  # warm-up
            rows = []
            for c in (1, 8, 32):
                row = load("127.0.0.1", port, bodies, c, args.requests)
                rows.append(row)
                print(f"concurrency {c:>2}: {row['requests_per_s']:7.1f} req/s, p50 "
                      f"{row['p50_ms']:6.1f} ms, p99 {row['p99_ms']:6.1f} ms, errors "
                      f"{row['errors']}", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    (out / "serve.json").write_text(json.dumps({"rows": rows, "checkpoint": args.checkpoint
                                                or "untrained agnostic, cpu preset",
                                                "envs": [*ENVS, NEW_ENV["env_id"]]}, indent=2))
    lines = ["# Serve: one endpoint, mixed environments", "",
             "`rl-agnostic serve` (Ray Serve, one replica with 1 CPU, dynamic batching up to 32, "
             "5 ms wait) on loopback; requests cycle through real observations of CartPole-v1, "
             "Acrobot-v1, Pendulum-v1, LunarLander-v3 and a described new env (obs 7, box 2). "
             f"Checkpoint: {args.checkpoint or 'untrained agnostic network, cpu preset'}. "
             "Clients: one keep-alive connection each.", "",
             "| concurrency | requests/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
    lines += [f"| {r['concurrency']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['errors']} |" for r in rows]
    lines += ["", "Reproduce: `python benchmarks/serve.py`.", ""]
    (out / "serve.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
