"""The shape-agnostic policy, value and Q networks (paper §3.1, Fig. 1b).

    policy:  obs ─Encoder→ + ctx ─ResMLP→ h ─┬─ discrete Decoder(O=n)          → logits
                                             ├─ mean Decoder(O=d)             → μ
                                             └─ log-std Decoder(O=d) → bound  → log σ
    value:   obs ─Encoder→ + ctx ─ResMLP→ h ── value Decoder(O=1)           → V(s)
    Q:       [obs | act] ─Encoder→ + ctx ─ResMLP→ h ── Decoder(O=1)         → Q(s, a)

The same parameters serve every observation length and action count; a new environment only
brings its context vector (`rl_agnostic.nn.context`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rl_agnostic.envs.spec import EnvSpec
from rl_agnostic.nn.base import ActorCritic, TwinQ, action_features
from rl_agnostic.nn.blocks import Decoder, Encoder, ResidualMLP
from rl_agnostic.nn.config import NetworkConfig
from rl_agnostic.nn.context import context_dim, context_features
from rl_agnostic.nn.distributions import bounded_log_std


class ContextCache:
    """Context vectors per (env id, device); plain tensors, rebuilt from the spec on demand."""

    def __init__(self, identity_dim: int) -> None:
        self.identity_dim = identity_dim
        self._cache: dict[tuple[EnvSpec, torch.device, torch.dtype], Tensor] = {}

    def __call__(self, spec: EnvSpec, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (spec, device, dtype)
        if key not in self._cache:
            # A normal tensor even when first asked for under inference_mode (acting), so that
            # later training forwards can save it for backward.
            with torch.inference_mode(False):
                self._cache[key] = context_features(spec, self.identity_dim).to(device, dtype)
        return self._cache[key]


class AgnosticTrunk(nn.Module):
    """Encoder, task-context embedding and middle residual MLP: (B, I) → (B, H)."""

    def __init__(self, cfg: NetworkConfig, encoder: Encoder | None = None) -> None:
        super().__init__()
        self.encoder = encoder if encoder is not None else Encoder(cfg)
        self.context = nn.Linear(context_dim(cfg.identity_dim), cfg.d_model)
        self.middle = ResidualMLP(cfg.d_model, cfg.mlp_hidden, cfg.mlp_depth if cfg.mid_mlp else 0)

    def forward(self, x: Tensor, ctx: Tensor, encoded: Tensor | None = None) -> Tensor:
        enc = self.encoder(x) if encoded is None else encoded
        return self.middle(enc + self.context(ctx))


class AgnosticActorCritic(ActorCritic):
    """Multi-Env Agnostic Agent: one policy and one value network for every environment."""

    kind = "agnostic"

    def __init__(self, cfg: NetworkConfig, specs: list[EnvSpec] | tuple[EnvSpec, ...] = ()) -> None:
        super().__init__(cfg)
        self.actor_trunk = AgnosticTrunk(cfg)
        shared = self.actor_trunk.encoder if cfg.shared_encoder else None
        self.critic_trunk = AgnosticTrunk(cfg, encoder=shared)
        self.discrete_decoder = Decoder(cfg)
        self.mean_decoder = Decoder(cfg)
        self.log_std_decoder = Decoder(cfg)
        if cfg.exact_log_std_init:
            self.log_std_decoder.start_at_zero_()
        self.value_decoder = Decoder(cfg)
        self._contexts = ContextCache(cfg.identity_dim)
        for spec in specs:
            self.add_env(spec)

    def _heads(self, h: Tensor, spec: EnvSpec) -> Tensor:
        if spec.is_discrete:
            return self.discrete_decoder(h, spec.action_dim)
        mean = self.mean_decoder(h, spec.action_dim)
        raw = self.log_std_decoder(h, spec.action_dim)
        return torch.cat([mean, bounded_log_std(raw, self.cfg.log_std_min, self.cfg.log_std_max,
                                              self.cfg.log_std_init)], -1)

    def actor(self, obs: Tensor, spec: EnvSpec) -> Tensor:
        self._check_obs(obs, spec)
        return self._heads(self.actor_trunk(obs, self._contexts(spec, obs.device, obs.dtype)), spec)

    def value(self, obs: Tensor, spec: EnvSpec) -> Tensor:
        self._check_obs(obs, spec)
        h = self.critic_trunk(obs, self._contexts(spec, obs.device, obs.dtype))
        return self.value_decoder(h, 1).squeeze(-1)

    def actor_critic(self, obs: Tensor, spec: EnvSpec) -> tuple[Tensor, Tensor]:
        if not self.cfg.shared_encoder:
            return super().actor_critic(obs, spec)
        self._check_obs(obs, spec)
        ctx = self._contexts(spec, obs.device, obs.dtype)
        enc = self.actor_trunk.encoder(obs)
        dist = self._heads(self.actor_trunk(obs, ctx, encoded=enc), spec)
        value = self.value_decoder(self.critic_trunk(obs, ctx, encoded=enc), 1).squeeze(-1)
        return dist, value


class AgnosticQ(nn.Module):
    """Q(s, a) over the concatenated state-action sequence, any (|s|, |a|)."""

    adds_layers_per_env = False

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.trunk = AgnosticTrunk(cfg)
        self.decoder = Decoder(cfg)
        self._contexts = ContextCache(cfg.identity_dim)

    def add_env(self, spec: EnvSpec) -> None:
        """Nothing to add: a new environment only brings its context vector."""

    def forward(self, obs: Tensor, actions: Tensor, spec: EnvSpec) -> Tensor:
        sa = torch.cat([obs, action_features(actions, spec)], dim=-1)
        return self.decoder(self.trunk(sa, self._contexts(spec, obs.device, obs.dtype)), 1).squeeze(-1)


class AgnosticTwinQ(TwinQ):
    """Two independent agnostic Q networks (clipped double-Q as in IQL): returns (Q₁, Q₂)."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__(AgnosticQ(cfg), AgnosticQ(cfg))
