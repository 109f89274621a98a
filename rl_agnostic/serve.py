"""``rl-agnostic serve CKPT``: one Ray Serve endpoint that acts in any environment.

    POST /act  {"env_id": "CartPole-v1", "observation": [0.1, 0.0, -0.2, 0.3],
                "deterministic": true}
            → {"env_id": "CartPole-v1", "action": 1}
    POST /act  {"env_id": "MyEnv-v0", "observation": [...5 numbers...],
                "obs_dim": 5, "action_space": {"type": "discrete", "n": 3}}
            → an env the checkpoint never saw, acted in by the same parameters (agnostic
              checkpoints only; the description is all a new env brings, paper §3.1)
    GET  /envs → the checkpoint's envs and their spaces

Requests are batched by Ray Serve (``@serve.batch``); each batch is split by env and acted on with
one forward per env. Observations are standardized with the checkpoint's per-env statistics
(none for a described new env). Bad requests get a 4xx with a message and the replica keeps
serving: malformed JSON or fields (400), unknown env without a description (404), observation of
the wrong length or with NaN/inf (422), payload above ``MAX_BODY_BYTES`` (413).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

import numpy as np

from rl_agnostic.envs.spec import EnvSpec

MAX_BODY_BYTES = 64 * 1024


class RequestError(Exception):
    """A client error: HTTP ``status`` and a message for the response body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def described_spec(env_id: str, body: dict[str, Any]) -> EnvSpec:
    """The `EnvSpec` a request describes with ``obs_dim`` and ``action_space``."""
    obs_dim, space = body.get("obs_dim"), body.get("action_space")
    if not isinstance(obs_dim, int) or isinstance(obs_dim, bool) or obs_dim < 1:
        raise RequestError(400, f"obs_dim must be a positive integer, got {obs_dim!r}")
    if not isinstance(space, dict) or space.get("type") not in ("discrete", "box"):
        raise RequestError(400, "action_space must be {\"type\": \"discrete\", \"n\": N} or "
                                "{\"type\": \"box\", \"low\": [...], \"high\": [...]}")
    try:
        if space["type"] == "discrete":
            return EnvSpec(env_id, obs_dim, "discrete", int(space["n"]))
        low = [float(v) for v in space["low"]]
        high = [float(v) for v in space["high"]]
        if len(low) != len(high) or not low:
            raise ValueError("low and high must be non-empty lists of one length")
        return EnvSpec(env_id, obs_dim, "continuous", len(low), tuple(low), tuple(high))
    except (KeyError, TypeError, ValueError) as exc:
        raise RequestError(400, f"action_space: {exc}") from None


def parse_request(body: Any, known: dict[str, EnvSpec]) -> tuple[EnvSpec, np.ndarray, bool]:
    """Validate one /act body: (spec, observation (obs_dim,), deterministic)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    env_id = body.get("env_id")
    if not isinstance(env_id, str) or not env_id:
        raise RequestError(400, "env_id must be a non-empty string")
    if env_id in known:
        spec = known[env_id]
    elif "obs_dim" in body or "action_space" in body:
        spec = described_spec(env_id, body)
    else:
        raise RequestError(404, f"unknown env {env_id!r} (known: {sorted(known)}); describe a "
                                f"new env with obs_dim and action_space")
    obs = body.get("observation")
    if not isinstance(obs, list) or not all(isinstance(v, (int, float)) and
                                            not isinstance(v, bool) for v in obs):
        raise RequestError(400, "observation must be a flat list of numbers")
    if len(obs) != spec.obs_dim:
        raise RequestError(422, f"{env_id}: observation has {len(obs)} values, expected "
                                f"{spec.obs_dim}")
    if not all(math.isfinite(v) for v in obs):
        raise RequestError(422, f"{env_id}: observation holds NaN or inf")
    deterministic = body.get("deterministic", True)
    if not isinstance(deterministic, bool):
        raise RequestError(400, "deterministic must be true or false")
    return spec, np.asarray(obs, np.float32), deterministic


def act_batch(agent: Any, items: list[tuple[EnvSpec, np.ndarray, bool]]) -> list[Any]:
    """Actions for a batch of parsed requests: one forward per (env, deterministic) group."""
    out: list[Any] = [None] * len(items)
    groups: dict[tuple[EnvSpec, bool], list[int]] = {}
    for i, (spec, _, det) in enumerate(items):
        groups.setdefault((spec, det), []).append(i)
    for (spec, det), idx in groups.items():
        obs = np.stack([items[i][1] for i in idx])
        actions = agent.act(spec.env_id, obs, det, spec)
        for i, a in zip(idx, actions):
            out[i] = int(a) if spec.is_discrete else [float(v) for v in np.ravel(a)]
    return out


def build_app(checkpoint: str, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005,
              num_replicas: int = 1):
    """The Serve application of ``checkpoint`` (loaded once per replica)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    # A replica must accept at least a full batch of requests at once, or the batch never fills
    # and the proxy backs off and retries (Serve's default max_ongoing_requests is 5). Per-request
    # access logs would cost more than the forward pass at this size.
    @serve.deployment(num_replicas=num_replicas, ray_actor_options={"num_cpus": 1},
                      max_ongoing_requests=4 * max_batch_size,
                      logging_config={"enable_access_log": False})
    class AgnosticPolicy:
        def __init__(self, path: str) -> None:
            import torch

            from rl_agnostic.online.agent import Agent

            torch.set_num_threads(1)
            self.agent = Agent.load(path)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def _act(self, items: list[tuple[EnvSpec, np.ndarray, bool]]) -> list[Any]:
            return act_batch(self.agent, items)

        async def __call__(self, request: Request) -> JSONResponse:
            try:
                if request.method == "GET" and request.url.path.rstrip("/").endswith("envs"):
                    return JSONResponse({"kind": self.agent.kind, "envs": {
                        e: asdict(s) for e, s in self.agent.specs.items()}})
                if request.method != "POST" or not request.url.path.rstrip("/").endswith("act"):
                    raise RequestError(404, "use POST /act or GET /envs")
                size = int(request.headers.get("content-length") or 0)
                if size > MAX_BODY_BYTES:
                    raise RequestError(413, f"payload of {size} bytes exceeds {MAX_BODY_BYTES}")
                raw = await request.body()
                if len(raw) > MAX_BODY_BYTES:
                    raise RequestError(413, f"payload of {len(raw)} bytes exceeds "
                                            f"{MAX_BODY_BYTES}")
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise RequestError(400, f"body is not valid JSON: {exc}") from None
                spec, obs, det = parse_request(body, self.agent.specs)
                if spec.env_id not in self.agent.specs and self.agent.network.adds_layers_per_env:
                    raise RequestError(404, f"a {self.agent.kind} checkpoint has no layers for "
                                            f"the new env {spec.env_id!r}; only agnostic ones "
                                            f"act in new envs")
                action = await self._act((spec, obs, det))
                return JSONResponse({"env_id": spec.env_id, "action": action})
            except RequestError as exc:
                return JSONResponse({"error": str(exc)}, status_code=exc.status)

    return AgnosticPolicy.bind(checkpoint)


def serve_checkpoint(checkpoint: str, host: str = "127.0.0.1", port: int = 8000,
                     blocking: bool = True, **app_kwargs: Any) -> str:
    """Deploy ``checkpoint`` on the local Ray (or ``RAY_ADDRESS``); returns the base URL."""
    import os

    from ray import serve

    from rl_agnostic.distributed import init_ray
    from rl_agnostic.online.trainer import load_policy_file

    load_policy_file(checkpoint)  # a missing or broken checkpoint fails here, before Ray
    init_ray()
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(os.path.abspath(checkpoint), **app_kwargs), name="rl_agnostic",
              route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    print(f"serving {checkpoint} at {url}/act (POST) and {url}/envs (GET)", flush=True)
    if blocking:
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url
