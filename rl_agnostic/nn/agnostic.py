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

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
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
        return torch.cat(self._head_outputs(h, spec.is_discrete, spec.action_dim), -1)

    def _head_outputs(self, h: Tensor, discrete: bool, n_out: int,
                      lengths: Tensor | None = None) -> list[Tensor]:
        """[logits] or [mean, bounded log-std], each (B, n_out); ``lengths`` as in `Decoder`."""
        if discrete:
            return [self.discrete_decoder(h, n_out, lengths)]
        mean = self.mean_decoder(h, n_out, lengths)
        raw = self.log_std_decoder(h, n_out, lengths)
        return [mean, bounded_log_std(raw, self.cfg.log_std_min, self.cfg.log_std_max,
                                      self.cfg.log_std_init)]

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

    def actor_critic_many(self, items: Sequence[tuple[Tensor, EnvSpec]]
                          ) -> list[tuple[Tensor, Tensor]]:
        """Every env type's batch through the network in few passes instead of one each.

        Batches whose observation lengths are close (`length_buckets`: padding costs less than
        another pass) are padded at the end to the longest and run as one batch; each action
        kind's decoder then runs once over the bucket, its outputs padded to the longest action
        vector. Real positions compute what the separate passes compute (causal S4, padded keys
        masked out of attention, pooling over real positions only), so only the rounding
        differs; per-op overhead is paid once per bucket, not once per env type. The Bi-GRU
        embedding reads its input backwards, so that network runs one pass per env type."""
        if not packs(self.critic_trunk.encoder, items):
            return super().actor_critic_many(items)
        return self._many(items, actor=True)

    def value_many(self, items: Sequence[tuple[Tensor, EnvSpec]]) -> list[Tensor]:
        """`value` of several env types' batches, packed as in `actor_critic_many`."""
        if not packs(self.critic_trunk.encoder, items):
            return super().value_many(items)
        return self._many(items, actor=False)

    def _many(self, items: Sequence[tuple[Tensor, EnvSpec]], actor: bool) -> list:
        for obs, spec in items:
            self._check_obs(obs, spec)
        return in_buckets([spec.obs_dim for _, spec in items], [obs.shape[0] for obs, _ in items],
                          lambda idx: self._packed([items[i] for i in idx], actor))

    def _packed(self, items: list[tuple[Tensor, EnvSpec]], actor: bool) -> list:
        """One padded pass: [(dist inputs, values), …], or [values, …] when not ``actor``."""
        specs = [spec for _, spec in items]
        x, lengths, ctx, sizes = pad_rows([obs for obs, _ in items], specs, self._contexts)
        critic_enc = self.critic_trunk.encoder(x, lengths)
        values = self.value_decoder(self.critic_trunk(x, ctx, encoded=critic_enc), 1)
        values = values.squeeze(-1).split(sizes)
        if not actor:
            return list(values)
        enc = critic_enc if self.cfg.shared_encoder else self.actor_trunk.encoder(x, lengths)
        h = self.actor_trunk(x, ctx, encoded=enc).split(sizes)
        dists: list[Tensor | None] = [None] * len(items)
        for discrete in (True, False):
            idx = [i for i, spec in enumerate(specs) if spec.is_discrete == discrete]
            if not idx:
                continue
            hs = torch.cat([h[i] for i in idx])
            acts = [specs[i].action_dim for i in idx]
            n_out, rows = max(acts), [sizes[i] for i in idx]
            out_lengths = _per_row(acts, rows, hs.device) if min(acts) < n_out else None
            heads = [out.split(rows) for out in
                     self._head_outputs(hs, discrete, n_out, out_lengths)]
            for j, (i, act) in enumerate(zip(idx, acts)):
                dists[i] = torch.cat([head[j][:, :act] for head in heads], -1)
        return list(zip(dists, values))


def packs(encoder: Encoder, items: Sequence) -> bool:
    """Whether several batches gain from one padded pass: at least two, and a causal embedding
    (the Bi-GRU reads its input backwards, padding included)."""
    return len(items) > 1 and encoder.block.causal_embedding


def pad_rows(xs: Sequence[Tensor], specs: Sequence[EnvSpec], contexts: ContextCache
             ) -> tuple[Tensor, Tensor | None, Tensor, list[int]]:
    """Batches xs[i] (rows_i, L_i) of env specs[i] as one: (Σ rows, max L) padded at the end
    with zeros, each row's length (None when all are equal), each row's context vector, and
    the batches' row counts."""
    x0 = xs[0]
    sizes = [x.shape[0] for x in xs]
    dims = [x.shape[1] for x in xs]
    width = max(dims)
    x = torch.cat([F.pad(x, (0, width - x.shape[1])) for x in xs])
    lengths = _per_row(dims, sizes, x0.device) if min(dims) < width else None
    ctx = torch.cat([contexts(spec, x0.device, x0.dtype).expand(n, -1)
                     for spec, n in zip(specs, sizes)])
    return x, lengths, ctx, sizes


def in_buckets(lengths: Sequence[int], rows: Sequence[int],
               run: Callable[[list[int]], list]) -> list:
    """``run(indices)`` once per `length_buckets` bucket; its results back in input order."""
    out: list = [None] * len(lengths)
    for bucket in length_buckets(lengths, rows):
        for i, result in zip(bucket, run(bucket)):
            out[i] = result
    return out


def _per_row(values: list[int], rows: list[int], device: torch.device) -> Tensor:
    """values[i] repeated rows[i] times: (Σ rows,)."""
    return torch.repeat_interleave(torch.tensor(values, device=device),
                                   torch.tensor(rows, device=device))


# What one more pass costs, in padded positions (rows × length) of work: a forward + backward
# of the agnostic network on 2 CPU cores took about a + b·positions with a/b ≈ 1,500–1,900
# positions at d_model 32, 64 and 128 (cpu presets), per-op overhead growing with the layers as
# the per-position work does.
PASS_OVERHEAD_POSITIONS = 1500


def length_buckets(lengths: Sequence[int], rows: Sequence[int],
                   pass_overhead: int = PASS_OVERHEAD_POSITIONS) -> list[list[int]]:
    """Group batches (``lengths[i]`` positions × ``rows[i]`` rows) into buckets, each run as one
    pass padded to its longest length. Minimizes Σ over buckets of (``pass_overhead`` + the
    bucket's rows × its longest length) over runs of the length order (exact, by dynamic
    programming). Returns indices, each bucket in length order."""
    order = sorted(range(len(lengths)), key=lambda k: lengths[k])
    best = [0.0] + [float("inf")] * len(order)  # best[j]: cost of the first j in order
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        n_rows = 0
        for i in range(j, 0, -1):  # bucket = order[i-1:j], padded to lengths[order[j-1]]
            n_rows += rows[order[i - 1]]
            cost = best[i - 1] + pass_overhead + n_rows * lengths[order[j - 1]]
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    buckets, j = [], len(order)
    while j > 0:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1]


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

    def forward_many(self, items: Sequence[tuple[Tensor, Tensor, EnvSpec]]) -> list[Tensor]:
        """Q of several env types' (obs, actions) batches in few padded passes over the
        state-action sequences (as `AgnosticActorCritic.actor_critic_many`)."""
        if not packs(self.trunk.encoder, items):
            return [self(obs, actions, spec) for obs, actions, spec in items]
        sas = [torch.cat([obs, action_features(actions, spec)], dim=-1)
               for obs, actions, spec in items]
        specs = [spec for _, _, spec in items]

        def run(idx: list[int]) -> list[Tensor]:
            x, lengths, ctx, sizes = pad_rows([sas[i] for i in idx], [specs[i] for i in idx],
                                              self._contexts)
            h = self.trunk(x, ctx, encoded=self.trunk.encoder(x, lengths))
            return list(self.decoder(h, 1).squeeze(-1).split(sizes))

        return in_buckets([sa.shape[1] for sa in sas], [sa.shape[0] for sa in sas], run)


class AgnosticTwinQ(TwinQ):
    """Two independent agnostic Q networks (clipped double-Q as in IQL): returns (Q₁, Q₂)."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__(AgnosticQ(cfg), AgnosticQ(cfg))

    def forward_many(self, items: Sequence[tuple[Tensor, Tensor, EnvSpec]]
                     ) -> list[tuple[Tensor, Tensor]]:
        return list(zip(self.q1.forward_many(items), self.q2.forward_many(items)))
