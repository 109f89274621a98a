"""PPO learner for a `SharedNetworkMultiRLModule`: one optimizer, one flat gradient all-reduce.

RLlib's `TorchLearner` assumes independent module ids. With one network behind all of them:

- ``configure_optimizers``: ONE Adam (actor / critic / S4 groups, `rl_agnostic.nn.optim`)
  registered under the weights-owner module id. Per-module optimizers would step the shared
  weights once per env type; registering under ``ALL_MODULES`` would skip grad clipping, which
  RLlib applies per module id.
- ``_make_modules_ddp_if_necessary``: no per-module DDP wrapper (it would all-reduce the shared
  gradients once per module, and learners that did not see every env type would call mismatched
  collectives). Instead rank 0's weights are broadcast once at build, and ``compute_gradients``
  all-reduces ONE flat vector of every shared gradient (zeros where a learner's batch did not
  touch a parameter), divided by the world size: exactly DDP's mean gradient.
- ``_log_trainable_parameters``: counts the shared parameters once.
- ``postprocess_gradients_for_module`` / ``apply_gradients``: RLlib's global-norm clip with the
  norm from one pass over all gradients and the division by the clip factor done inside fused
  Adam's step (`rl_agnostic.nn.optim.clipped_step`'s parts). RLlib's own path runs a norm and a
  multiply per tensor and then two finiteness checks per tensor (~1,200 ops per update of the
  agnostic network); a finite global norm already proves every gradient finite. With a
  non-finite norm, learning-rate schedulers or AMP grad scalers, RLlib's path runs unchanged.
- ``build``: the GAE piece RLlib's PPO learner appends to its connector pipeline (one γ) is
  swapped for `PerEnvGeneralAdvantageEstimation` (each env type's own γ), and each env type's
  rewards are scaled (`PerEnvRewardScaler`) before they become tensors.

The per-module PPO losses are summed by `TorchLearner.compute_gradients` before one backward: the
paper's J_total of Algorithm 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.common.numpy_to_tensor import NumpyToTensor
from ray.rllib.connectors.learner import GeneralAdvantageEstimation
from ray.rllib.core import ALL_MODULES
from ray.rllib.core.columns import Columns
from ray.rllib.utils.metrics import (
    NUM_NON_TRAINABLE_PARAMETERS,
    NUM_TRAINABLE_PARAMETERS,
)

from rl_agnostic.distributed import all_reduce_gradients, broadcast_from_rank0
from rl_agnostic.nn.native import flush_denormals
from rl_agnostic.nn.optim import (
    clip_divisor,
    grad_norm,
    make_optimizer,
    optimizer_grads,
    step_with_divided_grads,
)
from rl_agnostic.online.gae import PerEnvGeneralAdvantageEstimation
from rl_agnostic.online.normalize import PerEnvRewardScaler


class SharedNetworkPPOLearner(PPOTorchLearner):
    """`PPOTorchLearner` for one network shared by all module ids (see module docstring).

    Learner config (``config.learner_config_dict``): ``actor_lr``, ``critic_lr``, ``ssm_lr``;
    ``anneal_lr_env_steps``: when set, every group's learning rate decays linearly to 0 at that
    many env steps (summed over env types), as CleanRL's PPO does; ``env_gammas``: γ per module
    id; ``scale_rewards``: per-env reward scaling on or off.
    """

    def build(self) -> None:
        super().build()
        flush_denormals()  # this process's training threads (see rl_agnostic.nn.native)
        # Per optimizer, the clip divisor `postprocess_gradients_for_module` leaves for
        # `apply_gradients` (see the module docstring).
        self._grad_divisors: dict[torch.optim.Optimizer, torch.Tensor] = {}
        pipeline = self._learner_connector
        present = {type(c) for c in pipeline.connectors} if pipeline is not None else set()
        if GeneralAdvantageEstimation not in present:  # the default pieces are switched off
            return
        opts, cfg = self.config.learner_config_dict, self.config
        gammas = opts.get("env_gammas", {})
        # RLlib's insert_before/after silently use the last piece when the named one is
        # missing, so each anchor is checked present first.
        pipeline.insert_after(GeneralAdvantageEstimation, PerEnvGeneralAdvantageEstimation(
            gamma=cfg.gamma, lambda_=cfg.lambda_, env_gammas=gammas))
        pipeline.remove(GeneralAdvantageEstimation)
        if opts.get("scale_rewards", False):
            if NumpyToTensor not in present:
                raise RuntimeError("learner connector pipeline has no NumpyToTensor piece")
            pipeline.insert_before(NumpyToTensor,
                                   PerEnvRewardScaler(gamma=cfg.gamma, env_gammas=gammas))

    def configure_optimizers(self) -> None:
        multi = self.module
        opts = self.config.learner_config_dict
        optimizer = make_optimizer(multi.network, actor_lr=opts["actor_lr"],
                                   critic_lr=opts["critic_lr"], ssm_lr=opts["ssm_lr"],
                                   eps=1e-5)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        # No lr schedule: the groups keep their own learning rates.
        self.register_optimizer(module_id=multi.weights_owner, optimizer=optimizer,
                                params=params, lr_or_lr_schedule=None)

    def after_gradient_based_update(self, *, timesteps) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        horizon = self.config.learner_config_dict.get("anneal_lr_env_steps")
        if not horizon:
            return
        from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

        done = float(timesteps.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0))
        frac = max(1.0 - done / horizon, 0.0)
        opts = self.config.learner_config_dict
        for optimizer in self._named_optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = opts[f"{group['name']}_lr"] * frac

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch,
                                               fwd_out=fwd_out)
        # CleanRL's diagnostics of how far one update moved the policy (RLlib logs a KL only
        # when its KL penalty is on): approx KL = E[(r − 1) − log r], and the clipped fraction.
        with torch.no_grad():
            dist_cls = self.module[module_id].unwrapped().get_train_action_dist_cls()
            curr = dist_cls.from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
            log_ratio = curr.logp(batch[Columns.ACTIONS]) - batch[Columns.ACTION_LOGP]
            ratio = log_ratio.exp()
            self.metrics.log_dict({
                "approx_kl": ((ratio - 1) - log_ratio).mean(),
                "clip_fraction": ((ratio - 1).abs() > config.clip_param).float().mean(),
            }, key=module_id, window=1)
        return loss

    def postprocess_gradients_for_module(self, *, module_id, config=None,
                                         module_gradients_dict):
        divisors = self._grad_divisors
        for _, optimizer in self.get_optimizers_for_module(module_id):
            divisors.pop(optimizer, None)  # none left from an update that did not finish
        if (not module_gradients_dict or config.grad_clip is None
                or config.grad_clip_by != "global_norm" or self._lr_scheduler_classes is not None
                or self._grad_scalers is not None):
            return super().postprocess_gradients_for_module(
                module_id=module_id, config=config, module_gradients_dict=module_gradients_dict)
        norm = grad_norm(list(module_gradients_dict.values()))
        if not torch.isfinite(norm):  # RLlib's handling of NaN/inf gradients
            return super().postprocess_gradients_for_module(
                module_id=module_id, config=config, module_gradients_dict=module_gradients_dict)
        for name, optimizer in self.get_optimizers_for_module(module_id):
            divisors[optimizer] = clip_divisor(norm, config.grad_clip)
            self.metrics.log_value(key=(module_id, f"gradients_{name}_global_norm"), value=norm,
                                   window=1)
        return dict(module_gradients_dict)

    def apply_gradients(self, gradients_dict) -> None:
        divisors, self._grad_divisors = self._grad_divisors, {}
        optimizers = [self.get_optimizer(module_id, name)
                      for module_id, names in self._module_optimizers.items() for name in names]
        if not divisors or any(optimizer not in divisors for optimizer in optimizers):
            for optimizer, divisor in divisors.items():  # clip as RLlib's path would have
                torch._foreach_div_(optimizer_grads(optimizer), divisor)
            return super().apply_gradients(gradients_dict)
        for ref, grad in gradients_dict.items():
            self._params[ref].grad = grad
        for optimizer in optimizers:
            step_with_divided_grads(optimizer, divisors[optimizer])

    def _make_modules_ddp_if_necessary(self) -> None:
        if self._is_distributed():
            broadcast_from_rank0(self.module.network)

    def _is_distributed(self) -> bool:
        return self.config.num_learners > 1 and dist.is_available() and dist.is_initialized()

    def compute_gradients(self, loss_per_module, **kwargs):
        grads = super().compute_gradients(loss_per_module, **kwargs)
        if not self._is_distributed():
            return grads
        # Every learner must join the collective, even one whose batch was empty.
        all_reduce_gradients(list(self._params.values()), mean=True)
        return {ref: p.grad for ref, p in self._params.items()}

    def _log_trainable_parameters(self) -> None:
        params = list(self.module.network.parameters())
        self.metrics.log_dict({
            (ALL_MODULES, NUM_TRAINABLE_PARAMETERS):
                sum(p.numel() for p in params if p.requires_grad),
            (ALL_MODULES, NUM_NON_TRAINABLE_PARAMETERS):
                sum(p.numel() for p in params if not p.requires_grad),
        })
