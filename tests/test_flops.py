"""The analytic FLOP count (shared/mfu.md rules) against torch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rl_agnostic.envs.spec import EnvSpec
from rl_agnostic.nn import flops, s4
from rl_agnostic.nn.agnostic import AgnosticActorCritic
from rl_agnostic.nn.config import NetworkConfig

SPECS = [EnvSpec("CartPole-v1", 4, "discrete", 2),
         EnvSpec("HalfCheetah-v4", 17, "continuous", 6, (-1.0,) * 6, (1.0,) * 6)]


def counted_per_sample(net: AgnosticActorCritic, spec: EnvSpec) -> float:
    """Matrix-product FLOPs per sample seen by torch (difference of two batch sizes, so work
    done once per batch — S4 kernels, the context projection — drops out)."""
    totals = []
    for batch in (16, 32):
        with FlopCounterMode(display=False) as counter:
            net.actor_critic(torch.randn(batch, spec.obs_dim), spec)
        totals.append(counter.get_total_flops())
    return (totals[1] - totals[0]) / 16


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.env_id)
@pytest.mark.parametrize("variant", [{}, {"shared_encoder": True}, {"embedding": "bigru"},
                                     {"transformer": False}, {"mid_mlp": False}])
def test_analytic_flops_match_torch_counter(spec, variant, monkeypatch):
    # The FFT convolution and the flash attention kernel are invisible to FlopCounterMode, the
    # first by the counting rules (S4 convolution = 0) and the second by omission: the test adds
    # the attention and the lift (an elementwise product here) from their formulas.
    monkeypatch.setattr(s4, "TOEPLITZ_MAX_LEN", {"cpu": 0, "cuda": 0})
    torch.manual_seed(0)
    cfg = NetworkConfig(d_model=32, dropout=0.0, **variant)
    net = AgnosticActorCritic(cfg, [spec]).train()
    n_tf = cfg.transformer_layers if cfg.transformer else 0
    n_enc = 1 if cfg.shared_encoder else 2
    n_dec = 1 if spec.is_discrete else 2
    attention = n_tf * 4 * cfg.d_model * (n_enc * spec.obs_dim**2 + n_dec * spec.action_dim**2 + 1)
    lift = n_enc * 2 * cfg.d_model * spec.obs_dim
    expected = flops.actor_critic_forward(cfg, spec)
    assert counted_per_sample(net, spec) + attention + lift == pytest.approx(expected, rel=1e-9)
    assert flops.ppo_train_step(cfg, spec) == 3 * expected
