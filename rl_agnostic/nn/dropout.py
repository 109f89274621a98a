r"""Dropout whose keep-mask is drawn 3× faster on CPU than ``F.dropout``.

Same distribution: each element is kept with probability 1-p and scaled by 1/(1-p). The mask is
``U >= p·2³¹`` for U uniform on the 31-bit integers (exact to 2⁻³¹), drawn with ``random_`` on an
int32 buffer — torch's CPU Bernoulli sampler draws a double per element, which made dropout a
third of a training step of this network. On CUDA the stock fused kernel is already fast and used.
Only the 1-byte mask is kept for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_INT31 = float(2**31)


class _CpuDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:  # type: ignore[override]
        keep = torch.empty(x.shape, dtype=torch.int32).random_() >= int(p * _INT31)
        scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Drop-in for ``F.dropout(x, p, training)``."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return _CpuDropout.apply(x, p)
