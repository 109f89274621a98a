r"""The paper's comparison agents (§4.1, Fig. 3–4) and a padding baseline, behind `ActorCritic`.

    single    obs ─ResMLP(|S|→H→out)→ logits | [μ | log σ]       (one env only; Single-Env Agent)
              obs ─ResMLP(|S|→H→1)→ V(s)

    specific  obs ─enc_env: ResMLP(|S_env|→H)→ ─shared ResMLP(H→H)→ ─dec_env: ResMLP(H→out_env)→
              (Multi-Env Specific Agent: per-env encoder and decoder, one shared middle; the critic
              has its own encoders, middle and decoders with out = 1)

    padded    [obs, 0 … 0 | c(env)] ─ResMLP((max|S| + ctx)→H)→ ─head(H→max n | 2·max d)→ slice
              (zero-pads observations to the largest env, appends the task context of
              `rl_agnostic.nn.context`, and keeps the first n logits / d means and log-stds)

Q networks for IQL (`build_twin_q`) follow the same two patterns over [obs | action features]:
``single`` one residual MLP, ``specific`` per-env encoder and decoder around one shared middle.

Gaussian outputs are [mean | log_std] with the log-std squashed into [log_std_min, log_std_max]
by `distributions.bounded_log_std`, exactly as in the agnostic network. Every critic parameter's
name starts with ``critic`` so that `rl_agnostic.nn.optim.param_groups` finds it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl_agnostic.envs.spec import EnvSpec
from rl_agnostic.nn.agnostic import ContextCache
from rl_agnostic.nn.base import ActorCritic, action_features
from rl_agnostic.nn.blocks import ResidualMLP
from rl_agnostic.nn.config import NetworkConfig
from rl_agnostic.nn.context import context_dim
from rl_agnostic.nn.distributions import bounded_log_std


def policy_out_dim(spec: EnvSpec) -> int:
    """Width of the actor's raw output: n logits, or d means + d raw log-stds."""
    return spec.action_dim if spec.is_discrete else 2 * spec.action_dim


def module_key(env_id: str) -> str:
    """An injective, ModuleDict-safe key for an env id (keys may not contain '.')."""
    return "env_" + env_id.replace("%", "%25").replace(".", "%2E")


def _bound_gaussian(raw: Tensor, cfg: NetworkConfig) -> Tensor:
    """[mean | raw log-std] → [mean | log-std in [log_std_min, log_std_max]]."""
    mean, raw_log_std = raw.chunk(2, dim=-1)
    return torch.cat([mean, bounded_log_std(raw_log_std, cfg.log_std_min, cfg.log_std_max,
                                                 cfg.log_std_init)], -1)


def _start_log_std_at_init(cfg: NetworkConfig, out: nn.Linear, first: int, n: int) -> None:
    """Zero the rows [first, first + n) of the Linear ``out`` that produce raw log-stds, so the
    policy starts at exactly ``log_std_init`` (``NetworkConfig.exact_log_std_init``)."""
    if cfg.exact_log_std_init:
        with torch.no_grad():
            out.weight[first:first + n].zero_()
            out.bias[first:first + n].zero_()


def _mlp(cfg: NetworkConfig, in_dim: int | None = None, out_dim: int | None = None) -> ResidualMLP:
    return ResidualMLP(cfg.d_model, cfg.mlp_hidden, cfg.mlp_depth, in_dim=in_dim, out_dim=out_dim)


def _policy_mlp(cfg: NetworkConfig, spec: EnvSpec, in_dim: int | None = None) -> ResidualMLP:
    """A residual MLP whose output is the env's raw policy output (`policy_out_dim`)."""
    net = _mlp(cfg, in_dim, policy_out_dim(spec))
    if not spec.is_discrete:
        _start_log_std_at_init(cfg, net.out, spec.action_dim, spec.action_dim)
    return net


class _BaselineActorCritic(ActorCritic):
    """Shared checks: an env must be registered (with these spaces) before it is used."""

    def _require(self, obs: Tensor, spec: EnvSpec) -> None:
        known = self.specs.get(spec.env_id)
        if known is None:
            raise KeyError(
                f"{type(self).__name__}: environment {spec.env_id!r} is not registered "
                f"(registered: {sorted(self.specs)}); call add_env(spec) first"
            )
        if known != spec:
            raise ValueError(
                f"{type(self).__name__}: {spec.env_id} is registered with other spaces: {known}"
            )
        self._check_obs(obs, spec)


class SingleEnvActorCritic(_BaselineActorCritic):
    """Single-Env Agent: residual-MLP policy and value networks for exactly one environment."""

    kind = "single"

    def __init__(self, cfg: NetworkConfig, spec: EnvSpec) -> None:
        super().__init__(cfg)
        self.policy_net = _policy_mlp(cfg, spec, spec.obs_dim)
        self.critic_net = _mlp(cfg, spec.obs_dim, 1)
        super().add_env(spec)

    @property
    def spec(self) -> EnvSpec:
        return next(iter(self.specs.values()))

    def add_env(self, spec: EnvSpec) -> None:
        if spec != self.spec:
            raise ValueError(
                f"SingleEnvActorCritic is built for {self.spec.env_id} only and cannot add "
                f"{spec.env_id}; use kind 'specific', 'padded' or 'agnostic' for several envs"
            )

    def actor(self, obs: Tensor, spec: EnvSpec) -> Tensor:
        self._require(obs, spec)
        out = self.policy_net(obs)
        return out if spec.is_discrete else _bound_gaussian(out, self.cfg)

    def value(self, obs: Tensor, spec: EnvSpec) -> Tensor:
        self._require(obs, spec)
        return self.critic_net(obs).squeeze(-1)


class SpecificActorCritic(_BaselineActorCritic):
    """Multi-Env Specific Agent: per-env encoders and decoders around one shared middle MLP.

    Every new environment brings a new encoder and decoder for the actor and for the critic, so
    the parameter count grows linearly with the number of environments (paper Fig. 4).
    """

    kind = "specific"
    adds_layers_per_env = True

    def __init__(self, cfg: NetworkConfig, specs: Iterable[EnvSpec] = ()) -> None:
        super().__init__(cfg)
        self.actor_encoders = nn.ModuleDict()
        self.actor_middle = _mlp(cfg)
        self.actor_decoders = nn.ModuleDict()
        self.critic_encoders = nn.ModuleDict()
        self.critic_middle = _mlp(cfg)
        self.critic_decoders = nn.ModuleDict()
        for spec in specs:
            self.add_env(spec)

    def add_env(self, spec: EnvSpec) -> None:
        super().add_env(spec)
        key = module_key(spec.env_id)
        if key in self.actor_encoders:
            return
        # New layers follow the device/dtype of the existing ones (transfer learning adds envs
        # to a model that may already sit on a GPU).
        like = next(self.actor_middle.parameters())
        new = {
            "actor_encoders": _mlp(self.cfg, in_dim=spec.obs_dim),
            "actor_decoders": _policy_mlp(self.cfg, spec),
            "critic_encoders": _mlp(self.cfg, in_dim=spec.obs_dim),
            "critic_decoders": _mlp(self.cfg, out_dim=1),
        }
        for attr, module in new.items():
            getattr(self, attr)[key] = module.to(device=like.device, dtype=like.dtype)

    def actor(self, obs: Tensor, spec: EnvSpec) -> Tensor:
        self._require(obs, spec)
        key = module_key(spec.env_id)
        h = self.actor_middle(self.actor_encoders[key](obs))
        out = self.actor_decoders[key](h)
        return out if spec.is_discrete else _bound_gaussian(out, self.cfg)

    def value(self, obs: Tensor, spec: EnvSpec) -> Tensor:
        self._require(obs, spec)
        key = module_key(spec.env_id)
        h = self.critic_middle(self.critic_encoders[key](obs))
        return self.critic_decoders[key](h).squeeze(-1)


class PaddedActorCritic(_BaselineActorCritic):
    """One residual MLP over zero-padded observations plus the task context; heads sized to the
    largest action spaces of the envs it is built with, sliced to each env's action count."""

    kind = "padded"

    def __init__(self, cfg: NetworkConfig, specs: Iterable[EnvSpec]) -> None:
        super().__init__(cfg)
        specs = list(specs)
        if not specs:
            raise ValueError("PaddedActorCritic needs at least one EnvSpec to size its input and heads")
        self.max_obs_dim = max(s.obs_dim for s in specs)
        self.max_discrete = max((s.action_dim for s in specs if s.is_discrete), default=0)
        self.max_continuous = max((s.action_dim for s in specs if not s.is_discrete), default=0)
        in_dim = self.max_obs_dim + context_dim(cfg.identity_dim)
        self.policy_body = _mlp(cfg, in_dim=in_dim)
        self.discrete_head = nn.Linear(cfg.d_model, self.max_discrete) if self.max_discrete else None
        self.gaussian_head = (
            nn.Linear(cfg.d_model, 2 * self.max_continuous) if self.max_continuous else None
        )
        if self.gaussian_head is not None:
            _start_log_std_at_init(cfg, self.gaussian_head, self.max_continuous,
                                   self.max_continuous)
        self.critic_net = _mlp(cfg, in_dim=in_dim, out_dim=1)
        self._contexts = ContextCache(cfg.identity_dim)
        for spec in specs:
            self.add_env(spec)

    def add_env(self, spec: EnvSpec) -> None:
        limit = self.max_discrete if spec.is_discrete else self.max_continuous
        if spec.obs_dim > self.max_obs_dim or spec.action_dim > limit:
            raise ValueError(
                f"PaddedActorCritic was built for observations up to {self.max_obs_dim} and "
                f"{spec.action_kind} actions up to {limit}; {spec.env_id} has obs_dim "
                f"{spec.obs_dim} and action_dim {spec.action_dim}. Rebuild the network with "
                f"{spec.env_id} among its specs."
            )
        super().add_env(spec)

    def _inputs(self, obs: Tensor, spec: EnvSpec) -> Tensor:
        self._require(obs, spec)
        padded = F.pad(obs, (0, self.max_obs_dim - spec.obs_dim))
        ctx = self._contexts(spec, obs.device, padded.dtype).expand(obs.shape[0], -1)
        return torch.cat([padded, ctx], dim=-1)

    def actor(self, obs: Tensor, spec: EnvSpec) -> Tensor:
        h = self.policy_body(self._inputs(obs, spec))
        n = spec.action_dim
        if spec.is_discrete:
            return self.discrete_head(h)[:, :n]
        out = self.gaussian_head(h)
        mean, raw_log_std = out[:, :n], out[:, self.max_continuous : self.max_continuous + n]
        return torch.cat(
            [mean, bounded_log_std(raw_log_std, self.cfg.log_std_min, self.cfg.log_std_max,
                                   self.cfg.log_std_init)], -1
        )

    def value(self, obs: Tensor, spec: EnvSpec) -> Tensor:
        return self.critic_net(self._inputs(obs, spec)).squeeze(-1)


def q_in_dim(spec: EnvSpec) -> int:
    """Width of a Q network's input [obs | action features] (one-hot for discrete actions)."""
    return spec.obs_dim + spec.action_dim


class SingleEnvQ(nn.Module):
    """Q(s, a) for exactly one environment: a residual MLP over [obs | action features]."""

    adds_layers_per_env = True

    def __init__(self, cfg: NetworkConfig, spec: EnvSpec) -> None:
        super().__init__()
        self.spec = spec
        self.net = _mlp(cfg, q_in_dim(spec), 1)

    def add_env(self, spec: EnvSpec) -> None:
        if spec != self.spec:
            raise ValueError(f"SingleEnvQ is built for {self.spec.env_id} only, not {spec.env_id}")

    def forward(self, obs: Tensor, actions: Tensor, spec: EnvSpec) -> Tensor:
        self.add_env(spec)
        return self.net(torch.cat([obs, action_features(actions, spec)], -1)).squeeze(-1)


class SpecificQ(nn.Module):
    """Q(s, a) with a per-env encoder and decoder around one shared middle MLP."""

    adds_layers_per_env = True

    def __init__(self, cfg: NetworkConfig, specs: Iterable[EnvSpec] = ()) -> None:
        super().__init__()
        self.cfg = cfg
        self.specs: dict[str, EnvSpec] = {}
        self.encoders = nn.ModuleDict()
        self.middle = _mlp(cfg)
        self.decoders = nn.ModuleDict()
        for spec in specs:
            self.add_env(spec)

    def add_env(self, spec: EnvSpec) -> None:
        known = self.specs.get(spec.env_id)
        if known is not None:
            if known != spec:
                raise ValueError(f"{spec.env_id} is already registered with other spaces: {known}")
            return
        like = next(self.middle.parameters())
        key = module_key(spec.env_id)
        self.encoders[key] = _mlp(self.cfg, in_dim=q_in_dim(spec)).to(like.device, like.dtype)
        self.decoders[key] = _mlp(self.cfg, out_dim=1).to(like.device, like.dtype)
        self.specs[spec.env_id] = spec

    def forward(self, obs: Tensor, actions: Tensor, spec: EnvSpec) -> Tensor:
        if self.specs.get(spec.env_id) != spec:
            raise KeyError(f"SpecificQ: environment {spec.env_id!r} is not registered with these "
                           f"spaces (registered: {sorted(self.specs)}); call add_env(spec) first")
        key = module_key(spec.env_id)
        x = torch.cat([obs, action_features(actions, spec)], -1)
        return self.decoders[key](self.middle(self.encoders[key](x))).squeeze(-1)
