"""GAE with a discount per env type.

RLlib's `GeneralAdvantageEstimation` learner connector applies one γ to every module. Env types
differ in horizon (Pendulum-v1's swing-up is learned within 150k PPO steps at γ = 0.9, not at
0.99), so each module id (= env type) may set its own. Rather than copy RLlib's GAE, this runs it
once per distinct γ on the modules that use it: each module's value forward, GAE and advantage
standardization stay exactly RLlib's.
"""

from __future__ import annotations

from typing import Any

from ray.rllib.connectors.learner import GeneralAdvantageEstimation


class PerEnvGeneralAdvantageEstimation(GeneralAdvantageEstimation):
    """`GeneralAdvantageEstimation` whose γ is ``env_gammas[module_id]`` (default ``gamma``)."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, gamma: float,
                 lambda_: float, env_gammas: dict[str, float] | None = None) -> None:
        super().__init__(input_observation_space, input_action_space, gamma=gamma,
                         lambda_=lambda_)
        self.default_gamma = gamma
        self.env_gammas = dict(env_gammas or {})

    def __call__(self, *, rl_module: Any, episodes: list, batch: dict, **kwargs) -> dict:
        groups: dict[float, dict] = {}
        for mid, module_batch in batch.items():
            groups.setdefault(self.env_gammas.get(mid, self.default_gamma), {})[mid] = module_batch
        try:
            for gamma, modules in groups.items():
                # RLlib's GAE writes its results into each module's batch dict in place.
                self.gamma = gamma
                super().__call__(rl_module=rl_module, episodes=episodes, batch=modules, **kwargs)
        finally:
            self.gamma = self.default_gamma
        return batch
