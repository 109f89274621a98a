"""Online multi-env DD-PPO on RLlib (paper §3.3, Algorithm 1).

`config` (TrainConfig from YAML) → `algo` (the RLlib PPO config: one env type per EnvRunner,
`module` shared-network MultiRLModule, `learner` one optimizer + flat all-reduce, `normalize`
per-env connectors) → `trainer` (loop, metrics, checkpoints) → `agent` (the policy without Ray).
"""

from rl_agnostic.online.config import TrainConfig, load_train_config

__all__ = ["TrainConfig", "load_train_config"]
