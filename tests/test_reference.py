"""The optimized layers and the whole agnostic network against plain reference computations."""

from __future__ import annotations

import pytest
import torch

from _reference import actor_reference, randomize_norms, value_reference
from rl_agnostic.nn import AgnosticActorCritic, EnvSpec, NetworkConfig
from rl_agnostic.nn.transformer import TransformerLayer

DISCRETE = EnvSpec("CartPole-v1", 4, "discrete", 3)
# obs_dim 600 is past every TOEPLITZ_MAX_LEN setting: the encoder takes the FFT path.
CONTINUOUS = EnvSpec("Long-v0", 600, "continuous", 5, (-2.0,) * 5, (2.0,) * 5)
SHORT_CONTINUOUS = EnvSpec("Hopper-v4", 11, "continuous", 3, (-1.0,) * 3, (1.0,) * 3)


@pytest.mark.parametrize("n_heads", [1, 2, 4])
@pytest.mark.parametrize("grad", [True, False])
def test_transformer_layer_equals_torch_reference(n_heads, grad):
    layer = TransformerLayer(16, n_heads, 24, dropout=0.1).eval()
    randomize_norms(layer)
    ref = layer.to_reference()
    assert isinstance(ref, torch.nn.TransformerEncoderLayer) and not ref.training
    x = torch.randn(3, 7, 16)
    y_ref = ref(x)  # autograd on (parameters require grad): torch's plain, non-fused path
    with torch.set_grad_enabled(grad):  # no_grad + eval: the layer's fused inference path
        y = layer(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_transformer_reference_follows_training_mode():
    layer = TransformerLayer(16, 2, 16, dropout=0.1)
    assert layer.to_reference().training
    assert not layer.eval().to_reference().training


def test_transformer_layer_dropout_only_in_training():
    layer = TransformerLayer(16, 1, 16, dropout=0.5)
    x = torch.randn(2, 5, 16)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


@pytest.mark.parametrize("spec", [DISCRETE, CONTINUOUS, SHORT_CONTINUOUS], ids=lambda s: s.env_id)
@pytest.mark.parametrize("n_heads", [1, 2])
@pytest.mark.parametrize("encoder_position", ["none", "modulated"])
def test_agnostic_actor_critic_equals_reference_path(spec, n_heads, encoder_position):
    """Whole network (eval) == S4 by recurrence, Transformer via nn.TransformerEncoderLayer,
    and everything else written out, with the same weights."""
    cfg = NetworkConfig(d_model=16, d_state=8, n_heads=n_heads, dropout=0.1,
                        encoder_position=encoder_position)
    model = randomize_norms(AgnosticActorCritic(cfg, [spec]).eval())
    obs = torch.randn(3, spec.obs_dim)
    with torch.no_grad():
        dist, value = model.actor(obs, spec), model.value(obs, spec)
    dist_ref, value_ref = actor_reference(model, obs, spec), value_reference(model, obs, spec)
    width = spec.action_dim if spec.is_discrete else 2 * spec.action_dim
    assert dist.shape == dist_ref.shape == (3, width)
    assert value.shape == value_ref.shape == (3,)
    # the comparison must not be trivial: outputs vary across the batch
    assert dist_ref[:, : spec.action_dim].std(0).max() > 1e-4
    torch.testing.assert_close(dist.double(), dist_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value.double(), value_ref, atol=1e-5, rtol=1e-5)
