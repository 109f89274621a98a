r"""Dropout whose keep-mask is drawn ~4× faster on CPU than ``F.dropout``.

Same distribution: each element is kept with probability 1-p and scaled by 1/(1-p). The mask is
``U >= p·2³²`` for U uniform on 32-bit integers (p exact to 2⁻³²), drawn from numpy's SFC64
generator — about 1 ns per element, against ~7 ns for torch's CPU Bernoulli sampler, which made
dropout a third of a training step of this network. Each call seeds its generator from torch's
default generator, so ``torch.manual_seed`` still makes runs reproducible. The float mask (already
scaled) is what backward multiplies with. On CUDA the stock fused kernel is fast and used.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def keep_mask(shape: torch.Size, p: float) -> Tensor:
    """float32 tensor of `shape`: 1/(1-p) with probability 1-p, else 0."""
    n = int(np.prod(shape)) if len(shape) else 1
    seed = int(torch.randint(0, 2**62, (1,)).item())
    bits = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.int32)[:n]
    # int32 view of uniform 32-bit words: P(bits < -2^31 + p·2^32) = p.
    keep = (bits >= np.int32(round(-(2**31) + p * 2**32))).view(np.uint8)
    # uint8 → float32 is ~10x faster in torch than bool → float32.
    return torch.from_numpy(keep).to(torch.float32).mul_(1.0 / (1.0 - p)).view(shape)


class _CpuDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:  # type: ignore[override]
        mask = keep_mask(x.shape, p).to(x.dtype)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Drop-in for ``F.dropout(x, p, training)``."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():
        # Under torch.compile, inductor generates its own fused RNG: keep the graph whole.
        return F.dropout(x, p, training)
    return _CpuDropout.apply(x, p)
