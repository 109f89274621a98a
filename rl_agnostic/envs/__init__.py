"""Environments: shape specs (`EnvSpec`) and vector-env construction for gymnasium and envpool."""

from rl_agnostic.envs.make import (
    ENVPOOL_PREFIX,
    check_env_id,
    env_spec,
    make_env,
    parse_env_id,
)
from rl_agnostic.envs.spec import EnvSpec

__all__ = ["ENVPOOL_PREFIX", "EnvSpec", "check_env_id", "env_spec", "make_env", "parse_env_id"]
