"""The RLlib `AlgorithmConfig` of a `TrainConfig`: PPO on the new API stack with one env type per
module id, one shared network, per-env normalization, and one synchronized learner group."""

from __future__ import annotations

from typing import Any

from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.tune.registry import register_env

from rl_agnostic.online.config import TrainConfig
from rl_agnostic.online.envs import (
    SingleEnvTypeMultiAgentEnv,
    assign_env_types,
    make_rllib_env,
)
from rl_agnostic.online.learner import SharedNetworkPPOLearner
from rl_agnostic.online.module import SharedNetworkMultiRLModule, env_module_spec
from rl_agnostic.online.normalize import PerEnvObsNormalizer

ENV_NAME = "rl_agnostic_env_type"


def _obs_normalizer(env=None, spaces=None, device=None):
    return [PerEnvObsNormalizer()]


def _policy_mapping(agent_id, episode=None, **kwargs):
    return agent_id


def env_spaces(cfg: TrainConfig, probe_steps: int = 16) -> dict[str, tuple[Any, Any]]:
    """(observation, action) space of every env type, read from one real copy each, which also
    runs ``probe_steps`` random steps: unknown ids, unsupported spaces and NaN/inf observations
    fail here, before any actor starts."""
    spaces = {}
    for entry in cfg.envs:
        env_id = entry.env_id
        env = SingleEnvTypeMultiAgentEnv(env_id, seed=cfg.run.seed, env_kwargs=entry.kwargs)
        try:
            act_space = env.action_spaces[env_id]
            act_space.seed(cfg.run.seed)
            env.reset()
            for _ in range(probe_steps):
                _, _, term, trunc, _ = env.step({env_id: act_space.sample()})
                if term["__all__"] or trunc["__all__"]:
                    env.reset()
            spaces[env_id] = (env.observation_spaces[env_id], act_space)
        finally:
            env.close()
    return spaces


def batch_sizes(cfg: TrainConfig) -> tuple[int, int]:
    """(train batch per learner, minibatch rows per env type per learner)."""
    r = cfg.num_env_runners
    per_runner = assign_env_types(cfg.env_ids, r)
    copies = cfg.resources.num_envs_per_env_runner
    steps_per_iter = len(per_runner) * copies * cfg.ppo.rollout_steps
    learners = max(cfg.resources.num_learners, 1)
    per_type = steps_per_iter // len(cfg.envs)
    return steps_per_iter // learners, max(per_type // learners // cfg.ppo.num_minibatches, 1)


def build_algorithm_config(cfg: TrainConfig, spaces: dict[str, tuple[Any, Any]] | None = None,
                           stop_env_steps: int | None = None) -> PPOConfig:
    """``stop_env_steps`` (per env type, default ``run.env_steps_per_env``) sets the horizon of the
    learning-rate annealing."""
    spaces = env_spaces(cfg) if spaces is None else spaces
    register_env(ENV_NAME, make_rllib_env)
    p, res = cfg.ppo, cfg.resources
    train_batch, minibatch = batch_sizes(cfg)
    ids = cfg.env_ids
    module_spec = MultiRLModuleSpec(
        multi_rl_module_class=SharedNetworkMultiRLModule,
        model_config={"kind": cfg.model.kind, "network": cfg.model.network.to_dict()},
        rl_module_specs={i: env_module_spec(i, *spaces[i]) for i in ids},
    )
    return (
        PPOConfig()
        .environment(ENV_NAME, env_config={
            "env_ids": ids, "num_env_runners": cfg.num_env_runners, "seed": cfg.run.seed,
            "env_kwargs": {e.env_id: dict(e.kwargs) for e in cfg.envs if e.kwargs},
            "spaces": spaces},
            disable_env_checking=True)
        .framework("torch", torch_compile_learner=False)
        .env_runners(
            num_env_runners=cfg.num_env_runners,
            num_envs_per_env_runner=res.num_envs_per_env_runner,
            num_cpus_per_env_runner=res.num_cpus_per_env_runner,
            rollout_fragment_length=p.rollout_steps,
            sample_timeout_s=res.sample_timeout_s,
            env_to_module_connector=_obs_normalizer if p.normalize_observations else None,
        )
        .multi_agent(policies=set(ids), policy_mapping_fn=_policy_mapping)
        .rl_module(rl_module_spec=module_spec)
        .learners(num_learners=res.num_learners, num_gpus_per_learner=res.num_gpus_per_learner)
        .training(
            learner_class=SharedNetworkPPOLearner,
            train_batch_size_per_learner=train_batch,
            minibatch_size=minibatch,
            num_epochs=p.num_epochs,
            gamma=p.gamma,
            lambda_=p.gae_lambda,
            clip_param=p.clip,
            entropy_coeff=p.entropy_coef,
            vf_loss_coeff=p.vf_coef,
            vf_clip_param=p.vf_clip,
            grad_clip=p.max_grad_norm,
            grad_clip_by="global_norm",
            use_kl_loss=False,
            shuffle_batch_per_epoch=True,
            learner_config_dict={"actor_lr": p.actor_lr, "critic_lr": p.critic_lr,
                                 "ssm_lr": p.ssm_lr, "scale_rewards": p.scale_rewards,
                                 "env_gammas": cfg.env_gammas,
                                 "anneal_lr_env_steps": (
                                     (stop_env_steps or cfg.run.env_steps_per_env) * len(ids)
                                     if p.anneal_lr else None)},
        )
        .fault_tolerance(restart_failed_env_runners=True, max_num_env_runner_restarts=100)
        .debugging(seed=cfg.run.seed, log_level="WARN")
    )
