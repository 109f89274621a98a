"""The hand-written policy distributions against torch.distributions."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, Independent, Normal

from rl_agnostic.nn import distributions as D


@pytest.mark.parametrize("n", [2, 5, 32])
def test_categorical_log_prob_and_entropy(n):
    logits = torch.randn(64, n) * 3
    actions = torch.randint(0, n, (64,))
    ref = Categorical(logits=logits)
    torch.testing.assert_close(D.categorical_log_prob(logits, actions), ref.log_prob(actions))
    torch.testing.assert_close(D.categorical_entropy(logits), ref.entropy())
    # float action tensors (as stored in some replay buffers) are accepted
    torch.testing.assert_close(D.categorical_log_prob(logits, actions.float()), ref.log_prob(actions))


def test_categorical_with_extreme_logits_is_finite():
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [-50.0, 50.0, 50.0]])
    actions = torch.tensor([1, 0])
    assert torch.isfinite(D.categorical_log_prob(logits, actions)).all()
    ent = D.categorical_entropy(logits)
    assert torch.isfinite(ent).all()
    torch.testing.assert_close(ent, Categorical(logits=logits).entropy())


@pytest.mark.parametrize("d", [1, 6, 17])
def test_gaussian_log_prob_and_entropy(d):
    mean = torch.randn(64, d)
    log_std = torch.rand(64, d) * 4 - 3
    actions = mean + torch.randn(64, d) * 2
    ref = Independent(Normal(mean, log_std.exp()), 1)
    torch.testing.assert_close(D.gaussian_log_prob(mean, log_std, actions), ref.log_prob(actions))
    torch.testing.assert_close(D.gaussian_entropy(log_std), ref.entropy())
    summed = Normal(mean, log_std.exp())
    torch.testing.assert_close(D.gaussian_log_prob(mean, log_std, actions),
                               summed.log_prob(actions).sum(-1))


def test_dispatch_matches_the_kind_specific_functions():
    logits = torch.randn(8, 4)
    a_d = torch.randint(0, 4, (8,))
    torch.testing.assert_close(D.log_prob(True, logits, a_d), D.categorical_log_prob(logits, a_d))
    torch.testing.assert_close(D.entropy(True, logits), D.categorical_entropy(logits))
    mean, log_std = torch.randn(8, 3), torch.randn(8, 3) * 0.5
    dist = torch.cat([mean, log_std], -1)
    m, s = D.split_gaussian(dist)
    assert torch.equal(m, mean) and torch.equal(s, log_std)
    a_c = torch.randn(8, 3)
    torch.testing.assert_close(D.log_prob(False, dist, a_c), D.gaussian_log_prob(mean, log_std, a_c))
    torch.testing.assert_close(D.entropy(False, dist), D.gaussian_entropy(log_std))


def test_samples_have_right_shapes_and_dtypes():
    logits = torch.randn(10, 5)
    a = D.sample(True, logits)
    assert a.shape == (10,) and a.dtype == torch.int64
    assert a.min() >= 0 and a.max() < 5
    dist = torch.randn(10, 6)
    c = D.sample(False, dist)
    assert c.shape == (10, 3) and c.dtype == torch.float32


def test_deterministic_samples_are_argmax_and_mean():
    logits = torch.randn(10, 5)
    assert torch.equal(D.sample(True, logits, deterministic=True), logits.argmax(-1))
    mean, log_std = torch.randn(10, 3), torch.randn(10, 3)
    out = D.sample(False, torch.cat([mean, log_std], -1), deterministic=True)
    assert torch.equal(out, mean)


def test_categorical_sample_frequencies():
    probs = torch.tensor([0.1, 0.6, 0.3])
    logits = probs.log().expand(20000, 3)
    counts = torch.bincount(D.categorical_sample(logits), minlength=3).float() / 20000
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)


def test_gaussian_sample_moments():
    mean = torch.tensor([1.0, -2.0])
    log_std = torch.tensor([0.0, -1.0])
    x = D.gaussian_sample(mean.expand(20000, 2), log_std.expand(20000, 2))
    torch.testing.assert_close(x.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0), log_std.exp(), atol=0.02, rtol=0)


def test_bounded_log_std_range_and_monotonicity():
    raw = torch.linspace(-1e4, 1e4, 2001)
    out = D.bounded_log_std(raw, -5.0, 2.0)
    assert out.min() >= -5.0 and out.max() <= 2.0
    assert torch.all(out[1:] >= out[:-1])
    torch.testing.assert_close(D.bounded_log_std(torch.zeros(1), -5.0, 2.0), torch.tensor([-1.5]))
    assert out[0] == pytest.approx(-5.0) and out[-1] == pytest.approx(2.0)


def test_bounded_log_std_center_sets_the_output_at_zero():
    torch.testing.assert_close(D.bounded_log_std(torch.zeros(1), -5.0, 2.0, 0.0), torch.zeros(1))
    out = D.bounded_log_std(torch.tensor([-50.0, 50.0]), -5.0, 2.0, 0.0)
    torch.testing.assert_close(out, torch.tensor([-5.0, 2.0]))
    with pytest.raises(ValueError, match="strictly inside"):
        D.bounded_log_std(torch.zeros(1), -5.0, 2.0, 2.0)
