r"""Dropout for CPU training, GELU followed by dropout, and the post-norm residual
LayerNorm(x + dropout(z)), each one pass over memory.

Same distribution as ``F.dropout``: each element is kept with probability 1-p and scaled by
1/(1-p). On CPU (float32) the fused kernels of `rl_agnostic.nn.native` draw the keep bit of
element i as a hash of (seed, i), so backward regenerates the mask instead of storing it, and
``gelu_dropout`` computes GELU, the mask and the scaling in the same loop (backward: GELU' too).
``gelu_dropout`` and ``add_dropout_layernorm`` also take the bias of the Linear layer before them:
the kernels add it and sum its gradient in the same pass, so the layer runs as a plain product
(torch's addmm first copies the bias into the output, and autograd sums the bias gradient in
another pass). Measured side by side, the d_model 256 training step got 2 % (HalfCheetah) and
1 % (CartPole) faster.
The seed comes from torch's default generator, so ``torch.manual_seed`` makes runs reproducible.
The kernels split large tensors among torch's own OpenMP threads (`rl_agnostic.nn.native`); the
mask of an element does not depend on the thread count. (A Python helper thread splitting them
measured slower: it competed with torch's OpenMP worker, which spins between ops.)

Without the compiled kernels the mask is ``U >= p·2³²`` for U uniform 32-bit words from numpy's
SFC64 (still ~4× faster than torch's CPU Bernoulli sampler), stored for backward. On CUDA the
stock fused kernels are used.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl_agnostic.nn.native import kernels


def draw_seed(p: float) -> int:
    """A mask seed for dropout rate p from torch's default generator (so ``torch.manual_seed``
    fixes the masks); 0 without a draw when p = 0 (nothing is dropped: torch's RNG stream is left
    alone)."""
    return int(torch.randint(0, 2**62, (1,)).item()) if p > 0.0 else 0


def mask_args(seed: int, p: float) -> tuple[int, int, float]:
    """The kernels' last three arguments: seed, keep threshold (keep iff hash >= threshold:
    P(drop) = threshold / 2³² = p to 2⁻³²; 0 keeps every element) and 1/(1-p)."""
    return seed, min(round(p * 2**32), 2**32 - 1), 1.0 / (1.0 - p)


def _run(name: str, out: Tensor, *arrays: Tensor, seed: int, p: float) -> Tensor:
    """Kernel ``name`` over contiguous float32 ``arrays`` (inputs) writing ``out``."""
    getattr(kernels(), name)(*(a.data_ptr() for a in arrays), out.data_ptr(), out.numel(),
                             *mask_args(seed, p))
    return out


def use_native(x: Tensor, p: float) -> bool:
    """Whether the compiled kernels serve ``x`` (CPU float32, outside torch.compile) at rate p."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and p < 1.0
            and not torch.compiler.is_compiling() and kernels() is not None)


class _NativeDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:  # type: ignore[override]
        ctx.seed, ctx.p = draw_seed(p), p
        x = x.contiguous()
        return _run("rla_dropout", torch.empty_like(x), x, seed=ctx.seed, p=p)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()  # same shape: index i is the same element as in forward
        return _run("rla_dropout", torch.empty_like(grad), grad, seed=ctx.seed, p=ctx.p), None


class _NativeBiasGeluDropout(torch.autograd.Function):
    """dropout(GELU(x + bias)) over rows of x (..., C), bias (C)."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor, p: float) -> Tensor:  # type: ignore[override]
        ctx.seed, ctx.p = draw_seed(p), p
        x = x.contiguous()
        ctx.save_for_backward(x, bias)
        return _bias_gelu_dropout(x, bias, ctx.seed, p)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, bias = ctx.saved_tensors
        return (*_bias_gelu_dropout_backward(grad.contiguous(), x, bias, ctx.seed, ctx.p,
                                             ctx.needs_input_grad[1]), None)


def _bias_gelu_dropout_backward(grad: Tensor, x: Tensor, bias: Tensor, seed: int, p: float,
                                need_bias: bool = True) -> tuple[Tensor, Tensor | None]:
    """The backward kernel on contiguous grad, x: (dx, dbias or None)."""
    cols = bias.numel()
    dx = torch.empty_like(x)
    dbias = torch.empty_like(bias) if need_bias else None
    kernels().rla_bias_gelu_dropout_backward(
        grad.data_ptr(), x.data_ptr(), bias.data_ptr(), dx.data_ptr(),
        None if dbias is None else dbias.data_ptr(), x.numel() // cols, cols,
        *mask_args(seed, p))
    return dx, dbias


def _bias_gelu_dropout(x: Tensor, bias: Tensor, seed: int, p: float) -> Tensor:
    """The forward kernel on contiguous x."""
    y = torch.empty_like(x)
    cols = bias.numel()
    kernels().rla_bias_gelu_dropout(x.data_ptr(), bias.data_ptr(), y.data_ptr(), x.numel() // cols,
                                    cols, *mask_args(seed, p))
    return y


class _NativeGeluDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:  # type: ignore[override]
        ctx.seed, ctx.p = draw_seed(p), p
        x = x.contiguous()
        ctx.save_for_backward(x)
        return _run("rla_gelu_dropout", torch.empty_like(x), x, seed=ctx.seed, p=p)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return _run("rla_gelu_dropout_backward", torch.empty_like(x), grad.contiguous(), x,
                    seed=ctx.seed, p=ctx.p), None


def keep_mask(shape: torch.Size, p: float) -> Tensor:
    """The fallback's mask: float32 tensor of `shape`, 1/(1-p) with probability 1-p, else 0."""
    n = int(np.prod(shape)) if len(shape) else 1
    bits = np.random.SFC64(draw_seed(p)).random_raw((n + 1) // 2).view(np.int32)[:n]
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
    if use_native(x, p):
        return _NativeDropout.apply(x, p)
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():
        # Under torch.compile, inductor generates its own fused RNG: keep the graph whole.
        return F.dropout(x, p, training)
    return _CpuDropout.apply(x, p)


def needs_graph(*tensors: Tensor) -> bool:
    """Whether autograd records an op on these inputs (else kernels are called directly: acting
    runs small batches, where an autograd Function's own overhead is most of the cost)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def trains_in_one_node(x: Tensor, params: list[Tensor], *inputs: Tensor) -> bool:
    """Whether a layer's training step may run as one fused autograd node taking ``params``:
    autograd records it, and every parameter is trained (the node returns every gradient) and has
    x's dtype and device."""
    return (needs_graph(x, *inputs, *params) and all(t.requires_grad for t in params)
            and all(t.dtype == x.dtype and t.device == x.device for t in params))


# Without autograd, tensors below this many elements take torch's path: for an acting batch of 8
# the Python side of a kernel call (allocations, ctypes arguments) cost more than torch's own op
# (residual LayerNorm with GLU, 8 x 17 x 64: 74 vs 45 µs).
DIRECT_MIN_ELEMENTS = 32768


def fuses_bias(x: Tensor, p: float) -> bool:
    """Whether a Linear layer whose output (input ``x``'s size) goes to ``gelu_dropout`` or
    ``add_dropout_layernorm`` should leave its bias to them: when their kernels will run (acting
    batches below DIRECT_MIN_ELEMENTS take torch's path, where addmm's bias is cheaper)."""
    return use_native(x, p) and (torch.is_grad_enabled() or x.numel() >= DIRECT_MIN_ELEMENTS)


def linear_leaving_bias(linear: nn.Linear, x: Tensor,
                        fuse: bool) -> tuple[Tensor, Tensor | None]:
    """``linear(x)`` as (product, bias still to add): with ``fuse`` (see `fuses_bias`) the plain
    product x·Wᵀ and the bias, for the kernel that reads the product; else the whole layer and
    None."""
    return (F.linear(x, linear.weight), linear.bias) if fuse else (linear(x), None)


def _fits_bias(bias: Tensor | None, x: Tensor, width: int) -> bool:
    """Whether the kernels can add ``bias`` to rows of ``width`` features of ``x``."""
    return bias is None or (bias.shape == (width,) and bias.dtype == x.dtype
                            and bias.device == x.device and bias.is_contiguous())


def gelu_dropout(x: Tensor, p: float, training: bool, bias: Tensor | None = None) -> Tensor:
    """Drop-in for ``dropout(F.gelu(x + bias), p, training)`` (exact, erf-based GELU; bias over
    the last dimension, None: none)."""
    p = p if training else 0.0
    graph = needs_graph(x) or (bias is not None and needs_graph(bias))
    if (use_native(x, p) and (graph or x.numel() >= DIRECT_MIN_ELEMENTS) and x.numel() < 2**32
            and _fits_bias(bias, x, x.shape[-1])):
        if bias is not None:
            if graph:
                return _NativeBiasGeluDropout.apply(x, bias, p)
            return _bias_gelu_dropout(x.contiguous(), bias, draw_seed(p), p)
        if graph:
            return _NativeGeluDropout.apply(x, p)
        x = x.contiguous()
        return _run("rla_gelu_dropout", torch.empty_like(x), x, seed=draw_seed(p), p=p)
    return dropout(F.gelu(x if bias is None else x + bias), p, training)


def _add_dropout_layernorm(x: Tensor, z: Tensor, z_bias: Tensor | None, weight: Tensor,
                           bias: Tensor, p: float, eps: float,
                           glu: bool) -> tuple[Tensor, Tensor, Tensor, int]:
    """The forward kernel: (y, x̂, rstd, seed) for contiguous x, z."""
    h = x.shape[-1]
    rows = x.numel() // h
    y, xhat, rstd = torch.empty_like(x), torch.empty_like(x), x.new_empty(rows)
    seed = draw_seed(p)
    kernels().rla_add_dropout_layernorm(
        x.data_ptr(), z.data_ptr(), None if z_bias is None else z_bias.data_ptr(),
        weight.data_ptr(), bias.data_ptr(), y.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), rows,
        h, int(glu), eps, *mask_args(seed, p))
    return y, xhat, rstd, seed


class _NativeAddDropoutLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, z_bias: Tensor | None, weight: Tensor,  # type: ignore[override]
                bias: Tensor, p: float, eps: float, glu: bool) -> Tensor:
        z = z.contiguous()
        y, xhat, rstd, ctx.seed = _add_dropout_layernorm(x.contiguous(), z, z_bias, weight, bias,
                                                         p, eps, glu)
        ctx.p, ctx.glu = p, glu
        ctx.save_for_backward(xhat, rstd, weight, z if glu else None, z_bias)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xhat, rstd, weight, z, z_bias = ctx.saved_tensors
        need_x, need_z, need_zb, need_w, need_b = ctx.needs_input_grad[:5]
        dx, dz, dzb, dw, db = _add_dropout_layernorm_backward(
            grad.contiguous(), xhat, rstd, weight, z, z_bias, ctx.seed, ctx.p, ctx.glu,
            need_z or need_zb, need_zb, need_w or need_b)  # the bias gradient is summed from dz
        return (dx if need_x else None, dz if need_z else None, dzb,
                dw if need_w else None, db if need_b else None, None, None, None)


def _add_dropout_layernorm_backward(
        grad: Tensor, xhat: Tensor, rstd: Tensor, weight: Tensor, z: Tensor | None,
        z_bias: Tensor | None, seed: int, p: float, glu: bool, need_z: bool = True,
        need_z_bias: bool = True, need_affine: bool = True) -> tuple[Tensor | None, ...]:
    """The backward kernel on contiguous grad: (dx, dz, dz_bias, dweight, dbias), None where not
    needed. ``z``: the saved product, with ``glu`` only."""
    dx = torch.empty_like(xhat)
    dz = (torch.empty_like(z) if glu else torch.empty_like(xhat)) if need_z else None
    dzb = torch.empty_like(z_bias) if need_z_bias and z_bias is not None else None
    dw = torch.empty_like(weight) if need_affine else None
    db = torch.empty_like(weight) if need_affine else None
    h = xhat.shape[-1]
    kernels().rla_add_dropout_layernorm_backward(
        grad.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), weight.data_ptr(),
        None if z is None else z.data_ptr(), None if z_bias is None else z_bias.data_ptr(),
        dx.data_ptr(), None if dz is None else dz.data_ptr(),
        None if dzb is None else dzb.data_ptr(), None if dw is None else dw.data_ptr(),
        None if db is None else db.data_ptr(), xhat.numel() // h, h, int(glu),
        *mask_args(seed, p))
    return dx, dz, dzb, dw, db


def add_dropout_layernorm(x: Tensor, z: Tensor, norm: nn.LayerNorm, p: float, training: bool,
                          glu: bool = False, z_bias: Tensor | None = None) -> Tensor:
    """Drop-in for ``norm(x + dropout(z + z_bias, p, training))``, the post-norm residual; with
    ``glu``, for ``norm(x + dropout(F.glu(z + z_bias), p, training))`` (z twice as wide as x).
    ``z_bias`` (z's last dimension; None: none) is the bias of the Linear layer that made z."""
    p = p if training else 0.0
    graph = needs_graph(x, z, norm.weight, norm.bias) or (z_bias is not None
                                                          and needs_graph(z_bias))
    if (use_native(x, p) and (graph or x.numel() >= DIRECT_MIN_ELEMENTS)
            and z.shape[:-1] == x.shape[:-1]
            and z.shape[-1] == x.shape[-1] * (2 if glu else 1) and z.dtype == x.dtype
            and z.numel() < 2**32 and norm.weight is not None and norm.bias is not None
            and norm.normalized_shape == (x.shape[-1],) and _fits_bias(z_bias, z, z.shape[-1])):
        if graph:
            return _NativeAddDropoutLayerNorm.apply(x, z, z_bias, norm.weight, norm.bias, p,
                                                    norm.eps, glu)
        return _add_dropout_layernorm(x.contiguous(), z.contiguous(), z_bias, norm.weight,
                                      norm.bias, p, norm.eps, glu)[0]
    z = z if z_bias is None else z + z_bias
    return norm(x + dropout(F.glu(z, dim=-1) if glu else z, p, training))


def softmax_dropout_forward(x: Tensor, p: float, scale: float) -> tuple[Tensor, Tensor, int]:
    """The forward kernel on contiguous x: (softmax weights, output, mask seed)."""
    w, out = torch.empty_like(x), torch.empty_like(x)
    seed = draw_seed(p)
    length = x.shape[-1]
    kernels().rla_softmax_dropout(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.numel() // length,
                                  length, scale, *mask_args(seed, p))
    return w, out, seed


def softmax_dropout_backward(grad: Tensor, w: Tensor, seed: int, p: float,
                              scale: float) -> Tensor:
    """The gradient of the scores from that of the output (contiguous), the saved weights."""
    ds = torch.empty_like(w)
    length = w.shape[-1]
    kernels().rla_softmax_dropout_backward(grad.data_ptr(), w.data_ptr(), ds.data_ptr(),
                                           w.numel() // length, length, scale,
                                           *mask_args(seed, p))
    return ds


class _NativeSoftmaxDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float, scale: float) -> Tensor:  # type: ignore[override]
        w, out, ctx.seed = softmax_dropout_forward(x.contiguous(), p, scale)
        ctx.p, ctx.scale = p, scale
        ctx.save_for_backward(w)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (w,) = ctx.saved_tensors
        return (softmax_dropout_backward(grad.contiguous(), w, ctx.seed, ctx.p, ctx.scale),
                None, None)


def softmax_dropout(x: Tensor, p: float, training: bool, scale: float = 1.0) -> Tensor:
    """Drop-in for ``dropout(torch.softmax(x * scale, -1), p, training)`` (scale > 0; rows of
    -inf give 0 with the kernel, NaN without)."""
    p = p if training else 0.0
    if p > 0.0 and use_native(x, p) and x.numel() < 2**32:
        return _NativeSoftmaxDropout.apply(x, p, scale)
    return dropout(torch.softmax(x * scale if scale != 1.0 else x, dim=-1), p, training)
