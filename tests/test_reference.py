"""The optimized layers and the whole agnostic network against plain reference computations."""

from __future__ import annotations

import pytest
import torch
from _reference import actor_reference, randomize_norms, value_reference

from rl_agnostic.nn import AgnosticActorCritic, EnvSpec, NetworkConfig
from rl_agnostic.nn.dropout import softmax_dropout
from rl_agnostic.nn.native import kernels
from rl_agnostic.nn.transformer import (
    NATIVE_ATTENTION_MAX_LEN,
    TransformerLayer,
    _LongSingleHeadAttention,
    _native_attention,
    _NativeAttention,
)

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


@pytest.mark.parametrize("length", [3, 20])
def test_transformer_layer_training_step_equals_torch_reference(length):
    """Training mode without dropout (one head, short sequences: the compiled attention and
    residual-LayerNorm kernels on CPU) gives torch's outputs and parameter gradients."""
    layer = TransformerLayer(16, 1, 24, dropout=0.0).train()
    randomize_norms(layer)
    with torch.no_grad():  # nonzero biases: the kernels add them (in_proj's and out_proj's start at 0)
        for linear in (layer.in_proj, layer.out_proj, layer.linear1, layer.linear2):
            linear.bias.normal_()
    ref = layer.to_reference()
    x = torch.randn(5, length, 16)
    grad = torch.randn(5, length, 16)
    y, y_ref = layer(x), ref(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    y.backward(grad)
    y_ref.backward(grad)
    for got, want in ((layer.in_proj.bias, ref.self_attn.in_proj_bias),
                      (layer.out_proj.bias, ref.self_attn.out_proj.bias),
                      (layer.linear1.bias, ref.linear1.bias), (layer.linear2.bias, ref.linear2.bias)):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.in_proj.weight.grad, ref.self_attn.in_proj_weight.grad,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.norm1.weight.grad, ref.norm1.weight.grad,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.linear2.weight.grad, ref.linear2.weight.grad,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(kernels() is None, reason="no C compiler")
@pytest.mark.parametrize("masked", [False, True])
# Long sequences without dropout take scaled_dot_product_attention, unfused: not here.
@pytest.mark.parametrize(("length", "p"), [(9, 0.0), (9, 0.2), (40, 0.2)])
def test_fused_training_layer_equals_the_layer_op_by_op(monkeypatch, p, masked, length):
    """The training layer as one autograd node (`_NativeTransformerLayer`; with the attention
    kernel at length 9, with `_LongSingleHeadAttention`'s products at 40) gives the op-by-op
    path's output and every gradient (input and parameters) with the same dropout masks."""
    assert (length <= NATIVE_ATTENTION_MAX_LEN) == (length == 9)
    layer = TransformerLayer(32, 1, 48, dropout=p).train()
    randomize_norms(layer)
    with torch.no_grad():
        for linear in (layer.in_proj, layer.out_proj, layer.linear1, layer.linear2):
            linear.bias.normal_()
    x0, grad = torch.randn(6, length, 32), torch.randn(6, length, 32)
    valid = torch.rand(6, length) > 0.3 if masked else None
    if valid is not None:
        valid[:, 0] = True
    results = []
    for fused in (True, False):  # the layer's own choice, then op by op
        if not fused:
            monkeypatch.setattr(TransformerLayer, "_fuses_layer", lambda self, x, p, native: False)
        layer.zero_grad()
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(3)
        y = layer(x, valid)
        assert (y.grad_fn.name() == "_NativeTransformerLayerBackward") == fused
        y.backward(grad)
        results.append([y, x.grad, *(q.grad for q in layer.parameters())])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(kernels() is None, reason="no C compiler")
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("biased", [False, True])
def test_native_attention_equals_softmax_attention_with_its_dropout_mask(p, masked, biased):
    """The compiled attention: softmax(QKᵀ/√H) over the valid keys, dropout on the weights, times
    V, and the packed projection's gradient. V's rows are set to unit vectors e_j, so output
    channel j of row i is the kept weight w_ij·keep_ij/(1-p): that reveals the drawn mask.
    ``biased``: the projection's bias is added by the kernel (to the fresh product, in place)
    and its gradient summed there."""
    torch.manual_seed(4)
    b, length, h = 40, 9, 16
    qkv = torch.randn(b, length, 3 * h)
    qkv[..., 2 * h:] = torch.eye(length, h)
    bias = torch.randn(3 * h) if biased else torch.zeros(3 * h)
    bias[2 * h:] = 0.0  # V stays the unit vectors
    bias.requires_grad_(True)
    xw = (qkv - bias.detach()).requires_grad_(True)
    valid = (torch.rand(b, length) < 0.7) if masked else None
    if masked:
        valid[:, 0] = True
    product = xw * 1.0  # a fresh tensor: the kernel adds the bias to it in place
    torch.manual_seed(8)
    a = _NativeAttention.apply(product, bias if biased else None, valid, p)
    grad = torch.randn_like(a)
    a.backward(grad)
    if not biased:
        assert bias.grad is None
    with torch.no_grad():  # the direct call (no autograd): the same output for the same seed
        torch.manual_seed(8)
        direct = _native_attention(xw * 1.0, bias if biased else None, valid, p)[0]
    torch.testing.assert_close(direct, a.detach())

    ref_qkv = qkv.detach().clone().requires_grad_(True)
    q, k, v = ref_qkv.split(h, dim=-1)
    scores = q @ k.transpose(-1, -2) / h ** 0.5
    if masked:
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    w = torch.softmax(scores, dim=-1)
    kept = a.detach()[..., :length] * (1 - p)
    keep = torch.where(w.detach() > 0, (kept / w.detach().clamp(min=1e-30)).round(),
                       torch.ones_like(kept))
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert abs(keep[w > 0].mean().item() - (1 - p)) < 0.05
    ref = (w * keep / (1 - p)) @ v
    ref.backward(grad)
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xw.grad, ref_qkv.grad, atol=1e-5, rtol=1e-4)
    if biased:
        torch.testing.assert_close(bias.grad, ref_qkv.grad.sum((0, 1)), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(kernels() is None, reason="no C compiler")
@pytest.mark.parametrize("masked", [False, True])
def test_long_single_head_attention_equals_its_autograd_graph(masked):
    """Attention over sequences too long for the compiled kernel: the same output and packed
    gradient as autograd through split, products and the softmax+dropout kernel with the same
    mask (same seed), the gradient written into one tensor without a concatenation."""
    b, length, h = 6, 40, 16
    qkv = torch.randn(b, length, 3 * h, requires_grad=True)
    valid = (torch.rand(b, length) < 0.7) if masked else None
    if masked:
        valid[:, 0] = True
    torch.manual_seed(9)
    a = _LongSingleHeadAttention.apply(qkv, valid, 0.3)
    grad = torch.randn_like(a)
    a.backward(grad)
    ref_qkv = qkv.detach().clone().requires_grad_(True)
    q, k, v = ref_qkv.split(h, dim=-1)
    scores = q @ k.transpose(-1, -2)
    if masked:
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    torch.manual_seed(9)
    kept = softmax_dropout(scores, 0.3, True, scale=h ** -0.5)
    assert (kept == 0).float().mean() > 0.2  # dropout drew a mask
    ref = kept @ v
    ref.backward(grad)
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qkv.grad, ref_qkv.grad, atol=1e-5, rtol=1e-4)
    # and softmax_dropout's scale is softmax of the scaled scores (p = 0: no mask)
    torch.testing.assert_close(softmax_dropout(scores, 0.0, True, scale=0.25),
                               torch.softmax(scores * 0.25, -1))


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


@pytest.mark.parametrize("spec", [DISCRETE, SHORT_CONTINUOUS], ids=lambda s: s.env_id)
def test_agnostic_training_forward_equals_reference_path(spec):
    """The training path (autograd on, dropout 0: the compiled kernels, which add the Linear
    layers' biases themselves) computes the reference network too."""
    cfg = NetworkConfig(d_model=16, d_state=8, dropout=0.0)
    model = randomize_norms(AgnosticActorCritic(cfg, [spec]).train())
    obs = torch.randn(6, spec.obs_dim)
    dist, value = model.actor(obs, spec), model.value(obs, spec)
    assert dist.requires_grad
    torch.testing.assert_close(dist.double(), actor_reference(model, obs, spec), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(value.double(), value_reference(model, obs, spec), atol=1e-5,
                               rtol=1e-5)
