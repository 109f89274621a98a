"""Analytic FLOPs per sample of the agnostic network, counted as in ``shared/mfu.md``.

Only matrix products count: a Linear(in, out) applied at T positions is 2·in·out·T, self-attention
over L positions of width H is 2·2·L²·H per layer; S4's FFT convolution, norms and activations
count 0. A PPO training step is 3 × the forward count of every network the loss runs.
"""

from __future__ import annotations

from rl_agnostic.envs.spec import EnvSpec
from rl_agnostic.nn.config import NetworkConfig


def linear(n_in: int, n_out: int, positions: int = 1) -> int:
    return 2 * n_in * n_out * positions


def sequence_block(cfg: NetworkConfig, length: int) -> int:
    h, f = cfg.d_model, cfg.dim_feedforward
    if cfg.embedding == "s4":
        emb = linear(h, 2 * h, length)  # output_linear (the GLU's input)
    else:  # Bi-GRU: two directions, 3 gates, input and hidden projections
        g = h // 2
        emb = 2 * (linear(h, 3 * g, length) + linear(g, 3 * g, length))
    attn = (linear(h, 3 * h, length) + linear(h, h, length) + linear(h, f, length)
            + linear(f, h, length) + 4 * length * length * h)
    n_tf = cfg.transformer_layers if cfg.transformer else 0
    return cfg.s4_layers * emb + n_tf * attn


def encoder(cfg: NetworkConfig, length: int) -> int:
    return linear(1, cfg.d_model, length) + sequence_block(cfg, length)


def middle(cfg: NetworkConfig) -> int:
    """Residual MLP. The task-context projection runs once per batch, not per sample: 0."""
    depth = cfg.mlp_depth if cfg.mid_mlp else 0
    return depth * (linear(cfg.d_model, cfg.mlp_hidden) + linear(cfg.mlp_hidden, cfg.d_model))


def actor_critic_forward(cfg: NetworkConfig, spec: EnvSpec) -> int:
    """Policy (encoder, middle, the decoders this action kind uses) + value network."""
    enc = encoder(cfg, spec.obs_dim)
    n_dec = 1 if spec.is_discrete else 2
    actor = enc + middle(cfg) + n_dec * sequence_block(cfg, spec.action_dim)
    critic = (0 if cfg.shared_encoder else enc) + middle(cfg) + sequence_block(cfg, 1)
    return actor + critic


def ppo_train_step(cfg: NetworkConfig, spec: EnvSpec) -> int:
    """FLOPs per trained sample of a PPO update (forward + backward = 3 × forward)."""
    return 3 * actor_critic_forward(cfg, spec)
