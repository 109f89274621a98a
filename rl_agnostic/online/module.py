"""One network behind many RLlib module ids.

RLlib gives every module id its own RLModule with one observation/action space. Here each env
type gets a thin `EnvTypeModule` (its `EnvSpec`, its action-distribution class), and
`SharedNetworkMultiRLModule` builds ONE `rl_agnostic.nn.ActorCritic` and hands the same object to
all of them, so every env type reads and trains the same weights.

The learner's forward (`SharedNetworkMultiRLModule._forward_train`) gives the network every env
type's minibatch at once (`ActorCritic.actor_critic_many`): the agnostic network packs them into
few padded passes, values included, and hands each module its values for the PPO loss.

Shared weights must be shipped and counted once: `SharedNetworkMultiRLModule.get_state` puts the
network's weights under the first module id only (runner weight syncs and checkpoints carry one
copy), and `EnvTypeModule.set_state` ignores the empty states of the others.
"""

from __future__ import annotations

import contextlib
from typing import Any

import gymnasium as gym
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import (
    TorchCategorical,
    TorchDiagGaussian,
)
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModule
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule

from rl_agnostic.envs.spec import EnvSpec
from rl_agnostic.nn import ActorCritic, NetworkConfig, build_actor_critic


class EnvTypeModule(TorchRLModule, ValueFunctionAPI):
    """The view of the shared network for one env type (module id = env id).

    ``model_config``: ``env_id``. The network is attached by `SharedNetworkMultiRLModule`.
    """

    network: ActorCritic

    def setup(self) -> None:
        self.env_spec = EnvSpec.from_spaces(
            self.model_config["env_id"], self.observation_space, self.action_space)
        self._dist_cls = (TorchCategorical if self.env_spec.is_discrete else TorchDiagGaussian)

    def attach(self, network: ActorCritic, owner: bool) -> None:
        self.network = network
        self._owns_weights = owner

    def flat_obs(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch[Columns.OBS].reshape(batch[Columns.OBS].shape[0], -1)

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTION_DIST_INPUTS: self.network.actor(self.flat_obs(batch),
                                                               self.env_spec)}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        """V(s). ``embeddings``: the values `SharedNetworkMultiRLModule._forward_train` already
        computed for this batch (RLlib's PPO loss passes ``fwd_out[EMBEDDINGS]`` on)."""
        if embeddings is not None:
            return embeddings
        return self.network.value(self.flat_obs(batch), self.env_spec)

    def get_inference_action_dist_cls(self):
        return self._dist_cls

    def get_exploration_action_dist_cls(self):
        return self._dist_cls

    def get_train_action_dist_cls(self):
        return self._dist_cls

    def get_state(self, *args, **kwargs) -> dict:
        return super().get_state(*args, **kwargs) if self._owns_weights else {}

    def set_state(self, state: dict) -> None:
        if state:
            super().set_state(state)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Gradients are all-reduced once, flat, by the learner (not per module by DDP)."""
        return contextlib.nullcontext()


def weights_owner(module_ids) -> str:
    """The module id whose state carries the shared weights: the first in sorted order."""
    return sorted(module_ids)[0]


class SharedNetworkMultiRLModule(MultiRLModule):
    """Builds one ``ActorCritic`` of ``model_config["kind"]`` over every sub-module's `EnvSpec`.

    ``model_config``: ``kind`` (agnostic | specific | padded | single) and ``network`` (a
    `NetworkConfig` as dict).
    """

    def setup(self) -> None:
        super().setup()
        cfg = NetworkConfig.from_dict(dict(self.model_config["network"]))
        ids = sorted(self._rl_modules)
        self.network = build_actor_critic(self.model_config["kind"], cfg,
                                          [self._rl_modules[mid].env_spec for mid in ids])
        owner = weights_owner(ids)
        for mid in ids:
            self._rl_modules[mid].attach(self.network, owner=mid == owner)

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        """All env types' training batches through the network at once
        (`ActorCritic.actor_critic_many`: the agnostic network packs them into few passes),
        values included: each module's ``EMBEDDINGS`` are its values, which the PPO loss hands
        back to `EnvTypeModule.compute_values`."""
        mids = [mid for mid in batch if mid in self]
        items = [(self._rl_modules[mid].flat_obs(batch[mid]), self._rl_modules[mid].env_spec)
                 for mid in mids]
        outs = self.network.actor_critic_many(items)
        return {mid: {Columns.ACTION_DIST_INPUTS: dist, Columns.EMBEDDINGS: values}
                for mid, (dist, values) in zip(mids, outs)}

    @property
    def weights_owner(self) -> str:
        return weights_owner(self._rl_modules)

    def num_parameters(self) -> int:
        """Parameters of the shared network, each counted once."""
        return sum(p.numel() for p in self.network.parameters())


def env_module_spec(env_id: str, observation_space: gym.Space,
                    action_space: gym.Space) -> RLModuleSpec:
    """The RLModuleSpec of one env type, with its spaces given explicitly (RLlib would otherwise
    infer every module's spaces from the first env runner's env)."""
    return RLModuleSpec(module_class=EnvTypeModule, observation_space=observation_space,
                        action_space=action_space, model_config={"env_id": env_id})
