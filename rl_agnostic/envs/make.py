"""Build vectorized environments from an id, for both backends, and read their `EnvSpec`.

Two kinds of id:

* a gymnasium id, e.g. ``CartPole-v1``, ``Pendulum-v1``, ``HalfCheetah-v5`` → ``gymnasium.make_vec``
  with ``SyncVectorEnv`` (the copies step in this process, one after the other);
* an envpool id behind the ``envpool:`` prefix, e.g. ``envpool:HalfCheetah-v4``,
  ``envpool:CartPole-v1`` → ``envpool.make_gymnasium`` (the copies step in envpool's C++ threads).

Both give a ``gymnasium.vector.VectorEnv`` with ``num_envs``, ``single_observation_space``,
``single_action_space``, ``reset()`` → ``(obs, info)`` and ``step(actions)`` →
``(obs, reward, terminated, truncated, info)``, batched over the copies, and both reset a finished
copy on the *next* ``step`` (gymnasium's ``AutoresetMode.NEXT_STEP``: that step ignores the
copy's action and returns its first observation with reward 0).

An unknown id raises ``ValueError`` before anything is built.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from typing import Any, Literal

import gymnasium as gym

from rl_agnostic.envs.spec import EnvSpec

ENVPOOL_PREFIX = "envpool:"

Backend = Literal["gymnasium", "envpool"]


def parse_env_id(env_id: str) -> tuple[Backend, str]:
    """``envpool:HalfCheetah-v4`` → ("envpool", "HalfCheetah-v4"); ``CartPole-v1`` → ("gymnasium", "CartPole-v1")."""
    if not isinstance(env_id, str) or not env_id.strip():
        raise ValueError(f"env id must be a non-empty string, got {env_id!r}")
    if env_id.startswith(ENVPOOL_PREFIX):
        name = env_id[len(ENVPOOL_PREFIX):]
        if not name:
            raise ValueError(f"env id {env_id!r} names no envpool environment after the prefix")
        return "envpool", name
    return "gymnasium", env_id


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _envpool_ids() -> list[str]:
    import envpool

    return list(envpool.list_all_envs())


def check_env_id(env_id: str) -> tuple[Backend, str]:
    """Raise ``ValueError`` naming the id and the backend unless the backend knows the id.

    Builds nothing: gymnasium ids are looked up in ``gymnasium.envs.registry`` (a
    ``module:Env-v0`` id first imports ``module``, as ``gymnasium.make`` would), envpool ids in
    ``envpool.list_all_envs()``.
    """
    backend, name = parse_env_id(env_id)
    if backend == "envpool":
        known = _envpool_ids()
        if name not in known:
            raise ValueError(
                f"unknown env id {env_id!r}: envpool has no environment {name!r}"
                f"{_did_you_mean(name, known)}"
            )
        return backend, name
    lookup = name
    if ":" in name:
        module, lookup = name.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(
                f"unknown env id {env_id!r}: gymnasium cannot import module {module!r} ({exc})"
            ) from None
    if lookup not in gym.envs.registry:
        hint = _did_you_mean(lookup, list(gym.envs.registry))
        if not hint and ":" not in env_id and lookup in _envpool_ids():
            hint = f"; envpool has it: use {ENVPOOL_PREFIX}{lookup}"
        raise ValueError(
            f"unknown env id {env_id!r}: not registered in gymnasium{hint} "
            f"(envpool ids take the prefix {ENVPOOL_PREFIX!r})"
        )
    return backend, name


class _SeedOnFirstReset(gym.vector.VectorWrapper):
    """Use the construction seed for the first ``reset()`` that is given none (gymnasium seeds at
    reset time; envpool at construction, so both backends behave alike)."""

    def __init__(self, env: gym.vector.VectorEnv, seed: int | None) -> None:
        super().__init__(env)
        self._pending_seed = seed

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        if seed is None:
            seed = self._pending_seed
        self._pending_seed = None
        return self.env.reset(seed=seed, options=options)


def make_env(env_id: str, num_envs: int = 1, seed: int = 0, **kwargs: Any) -> gym.vector.VectorEnv:
    """A vector env of ``num_envs`` copies of ``env_id`` (see the module docstring for the ids).

    ``seed`` seeds copy i with ``seed + i`` (gymnasium: at the first ``reset()``; envpool: at
    construction). Extra keyword arguments go to the environment constructor.
    """
    if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
    backend, name = check_env_id(env_id)
    if backend == "envpool":
        import envpool

        with warnings.catch_warnings():
            # envpool declares float64 Box spaces; gymnasium warns when it casts their bounds.
            # The spaces are built lazily on first access and cached, so touch them here.
            warnings.filterwarnings("ignore", message=r".*precision lowered by casting.*")
            env = envpool.make_gymnasium(name, num_envs=num_envs, seed=seed, **kwargs)
            env.single_observation_space, env.single_action_space  # noqa: B018
        return env
    env = gym.make_vec(name, num_envs=num_envs, vectorization_mode="sync", **kwargs)
    env.action_space.seed(seed)
    return _SeedOnFirstReset(env, seed)


def env_spec(env_id: str, **kwargs: Any) -> EnvSpec:
    """The `EnvSpec` of ``env_id``: builds one copy, reads its spaces, closes it.

    Raises ``ValueError`` for an unknown id and ``TypeError`` for a space the networks cannot take
    (a non-Box observation, an action space neither Discrete nor Box).
    """
    env = make_env(env_id, num_envs=1, seed=0, **kwargs)
    try:
        return EnvSpec.from_spaces(env_id, env.single_observation_space, env.single_action_space)
    finally:
        env.close()
