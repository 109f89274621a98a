"""The CPU dropout: Bernoulli(1-p) keep mask scaled by 1/(1-p), reproducible under torch seeds."""

from __future__ import annotations

import pytest
import torch

from rl_agnostic.nn.dropout import dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_scale(p):
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([400_000]), p)
    kept = mask > 0
    # 400k draws: the keep fraction is within 5 standard deviations of 1 - p.
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / 4e5) ** 0.5
    assert torch.allclose(mask[kept], torch.full_like(mask[kept], 1 / (1 - p)))


def test_backward_uses_the_forward_mask_and_seed_reproduces():
    x = torch.randn(3, 50, 7, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.3, training=True)
    y.sum().backward()
    dropped = y == 0
    assert dropped.any() and (~dropped).any()
    assert torch.equal(x.grad == 0, dropped)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.3, training=True), y)
    assert not torch.equal(dropout(x, 0.3, training=True), y)  # the stream moves on


def test_identity_in_eval_and_at_zero_rate():
    x = torch.randn(4, 5)
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0, training=True) is x
