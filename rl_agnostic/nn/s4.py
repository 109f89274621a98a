r"""Diagonal structured state space layer (S4D), the agnostic network's dynamic embedding.

Each of the H channels is an independent linear state space model with N/2 complex modes
(conjugate pairs of a real state of size N = ``d_state``):

    x'(t) = A x(t) + B u(t),    y(t) = 2 Re(C x(t)) + D u(t),    A = diag(-exp(a_re) + i a_im).

Discretized with a learnable step Δ = exp(log_dt) (per channel):

    bilinear (paper Eq. 6):  Ā = (1 - ΔA/2)⁻¹ (1 + ΔA/2),   B̄ = (1 - ΔA/2)⁻¹ Δ B
    zero-order hold:         Ā = exp(ΔA),                  B̄ = (exp(ΔA) - 1) / A · B

Unrolled over a sequence of length L this is a causal convolution (paper Eq. 7) with kernel

    K̄_l = 2 Re( Σ_n C_n B̄_n Ā_n^l ),  l = 0 … L-1,       y = K̄ * u + D u,

computed once per forward (independent of the batch; once per optimizer step under
`shared_s4_operators`; reused between parameter updates when acting) — on CPU in float32 with its
gradients by one compiled loop per channel (Ā^l by recurrence), else by torch ops — and applied
with an FFT of size ≥ 2L-1, or, for the lengths where it is cheaper (observation vectors on CPU),
directly: the compiled sum of ``rla_causal_conv`` on the (B, L, H) layout (CPU float32; in
training the whole layer after the operator is then one autograd node, `_NativeS4Layer`) or an
explicit lower-triangular Toeplitz product. All give the same numbers; ``step``
runs the same map one position at a time (x_k = Ā x_{k-1} + B̄ u_k) and is what the tests compare
the convolution with.

Initialization is HiPPO-based: ``legs`` takes the eigenvalues and eigenvector-projected B of the
normal part of the HiPPO-LegS matrix (S4D-LegS), ``lin`` uses A_n = -1/2 + iπn, B = 1 (S4D-Lin).
Δ, A and B are the state-space parameters: `S4DKernel.SSM_PARAMETERS` names them so that
`rl_agnostic.nn.optim.param_groups` gives them their own learning rate and no weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl_agnostic.nn.config import Discretization, S4Init
from rl_agnostic.nn.dropout import (
    _add_dropout_layernorm,
    _add_dropout_layernorm_backward,
    _run,
    add_dropout_layernorm,
    draw_seed,
    fuses_bias,
    gelu_dropout,
    linear_leaving_bias,
    trains_in_one_node,
    use_native,
)
from rl_agnostic.nn.native import kernels

# Up to this length an explicit Toeplitz product beats the FFT: on 2 CPU cores torch's FFT
# convolution (fwd+bwd, B=512, H=64) took 2.4x the Toeplitz bmm at L=100 and 2.2x at L=376.
# cuFFT is fast, so on GPUs the FFT takes over much earlier. Both paths are tested to agree.
TOEPLITZ_MAX_LEN = {"cpu": 512, "cuda": 64}
# Up to this length (float32, CPU) the compiled direct sum (on torch's threads) replaces the
# Toeplitz bmm; forward + backward, operator built: 2.3x faster at L=64 (B=512, H=64), 1.9x at
# L=376 (B=21, H=256: a Humanoid micro-batch at d_model 256), level at L=376 with H=64, B=85. It
# skips the (H, L, B) transposes and the (H, L, L) matrix (145 MB for Humanoid at d_model 256).
NATIVE_CONV_MAX_LEN = 512


def hippo_legs_diagonal(n_state: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (positive-imaginary half) and projected B of the normal part of HiPPO-LegS.

    HiPPO-LegS A = -(M) with M_nk = sqrt(2n+1) sqrt(2k+1) for n > k, n+1 for n = k, is normal plus
    low rank: A + P Pᵀ with P_n = sqrt(n + 1/2) is skew-symmetric shifted by -1/2 I, so its
    eigenvalues are -1/2 + iω. Returns (λ of shape (N/2,), V^H B of shape (N/2,)).
    """
    q = np.arange(n_state, dtype=np.float64)
    col, row = np.meshgrid(q, q)
    r = 2 * q + 1
    m = -(np.where(row >= col, r, 0) - np.diag(q))
    t = np.sqrt(np.diag(2 * q + 1))
    a = t @ m @ np.linalg.inv(t)
    b = np.diag(t)
    p = np.sqrt(0.5 + q)
    normal = a + np.outer(p, p)
    shift = float(np.mean(np.diag(normal)))  # -1/2
    skew = normal - shift * np.eye(n_state)
    lam, vec = np.linalg.eigh(1j * skew)  # i·skew is Hermitian; eig(skew) = -i·lam
    w = shift - 1j * lam
    keep = np.argsort(w.imag)[n_state // 2 :]  # the conjugate partner of each mode is implied
    b_proj = vec.conj().T @ b
    return w[keep], b_proj[keep]


class S4DKernel(nn.Module):
    """Produces the (H, L) convolution kernel K̄ and the discrete (Ā, C·B̄) of H diagonal SSMs."""

    SSM_PARAMETERS = ("log_dt", "log_A_real", "A_imag", "B")

    def __init__(
        self,
        d_model: int,
        d_state: int,
        discretization: Discretization = "bilinear",
        init: S4Init = "legs",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ) -> None:
        super().__init__()
        self.discretization = discretization
        h, n2 = d_model, d_state // 2
        log_dt = torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        if init == "legs":
            w, b = hippo_legs_diagonal(d_state)
            a = torch.as_tensor(w, dtype=torch.complex64)
            b = torch.as_tensor(b, dtype=torch.complex64)
        else:
            a = torch.complex(torch.full((n2,), -0.5), math.pi * torch.arange(n2).float())
            b = torch.ones(n2, dtype=torch.complex64)
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.log(-a.real).repeat(h, 1))
        self.A_imag = nn.Parameter(a.imag.repeat(h, 1).contiguous())
        self.B = nn.Parameter(torch.view_as_real(b.repeat(h, 1)).contiguous())
        self.C = nn.Parameter(torch.view_as_real(torch.randn(h, n2, dtype=torch.complex64)))

    def discrete(self) -> tuple[Tensor, Tensor]:
        """Return (log Ā, C·B̄), each complex (H, N/2)."""
        lr, li, cbr, cbi = self.discrete_parts()
        return torch.complex(lr, li), torch.complex(cbr, cbi)

    def discrete_parts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(Re, Im) of log Ā and of C·B̄, each real (H, N/2), computed in real arithmetic (torch's
        complex CPU kernels are scalar: its complex log alone took longer than all of this)."""
        dt = torch.exp(self.log_dt).unsqueeze(-1)
        ar, ai = -torch.exp(self.log_A_real), self.A_imag
        x, y = dt * ar, dt * ai  # ΔA
        br, bi = self.B.unbind(-1)
        cr, ci = self.C.unbind(-1)
        if self.discretization == "zoh":
            lr, li = x, y
            # B̄ = (exp(ΔA) - 1) / A · B
            grow = torch.exp(x)
            er, ei = grow * torch.cos(y) - 1.0, grow * torch.sin(y)
            norm = ar * ar + ai * ai
            qr, qi = (er * ar + ei * ai) / norm, (ei * ar - er * ai) / norm
            dbr, dbi = qr * br - qi * bi, qr * bi + qi * br
        else:
            # log Ā = log(1 + ΔA/2) - log(1 - ΔA/2);  B̄ = ΔB / (1 - ΔA/2)
            pr, mr, half_y = 1.0 + x / 2, 1.0 - x / 2, y / 2
            p_norm, m_norm = pr * pr + half_y * half_y, mr * mr + half_y * half_y
            lr = 0.5 * (torch.log(p_norm) - torch.log(m_norm))
            li = torch.atan2(half_y, pr) + torch.atan2(half_y, mr)
            dbr, dbi = dt * (br * mr - bi * half_y) / m_norm, dt * (bi * mr + br * half_y) / m_norm
        return lr, li, cr * dbr - ci * dbi, cr * dbi + ci * dbr

    def forward(self, length: int) -> Tensor:
        if use_native(self.log_dt, 0.0):
            return _NativeSSMKernel.apply(self.log_dt, self.log_A_real, self.A_imag, self.B,
                                          self.C, length, self.discretization == "zoh")
        parts = self.discrete_parts()
        # K̄_l = 2 Re Σ_n C_n B̄_n Ā_n^l with l = qM + r split as (C B̄ Ā^r)·(Ā^M)^q, M ≈ sqrt(L):
        # 2·sqrt(L) complex powers per mode instead of L, and the sum over modes becomes one
        # batched real matmul over [Re | Im] — the (H, N/2, L) power table is never built.
        log_da, cb = torch.complex(parts[0], parts[1]), torch.complex(parts[2], parts[3])
        m = max(1, math.isqrt(length - 1) + 1) if length > 1 else 1
        q = -(-length // m)
        dev = log_da.device
        r_pos = torch.arange(m, device=dev, dtype=torch.float32)
        q_pos = torch.arange(q, device=dev, dtype=torch.float32) * m
        inner = cb.unsqueeze(-1) * _cexp(log_da, r_pos)  # (H, N/2, M): C B̄ Ā^r
        outer = _cexp(log_da, q_pos)  # (H, N/2, Q): Ā^(qM)
        lhs = torch.cat([outer.real, outer.imag], dim=1).transpose(1, 2)  # (H, Q, N)
        rhs = torch.cat([inner.real, -inner.imag], dim=1)  # (H, N, M)
        return 2.0 * torch.bmm(lhs, rhs).reshape(log_da.shape[0], q * m)[:, :length]


class _NativeSSMKernel(torch.autograd.Function):
    """K̄ (H, L) straight from the S4D parameters by `rla_ssm_full_kernel`: discretization and
    the powers of Ā (by recurrence over the lags) in one loop per channel; backward likewise."""

    @staticmethod
    def forward(ctx, log_dt: Tensor, log_a_re: Tensor, a_im: Tensor, b: Tensor,  # type: ignore[override]
                c: Tensor, length: int, zoh: bool) -> Tensor:
        params = [t.contiguous() for t in (log_dt, log_a_re, a_im, b, c)]
        h, modes = log_a_re.shape
        kernel = log_dt.new_empty(h, length)
        kernels().rla_ssm_full_kernel(*(t.data_ptr() for t in params), kernel.data_ptr(), h,
                                      modes, length, int(zoh))
        ctx.zoh = zoh
        ctx.save_for_backward(*params)
        return kernel

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        params = ctx.saved_tensors
        grad = grad.contiguous()
        grads = [torch.empty_like(t) for t in params]
        h, modes = params[1].shape
        kernels().rla_ssm_full_kernel_backward(*(t.data_ptr() for t in params), grad.data_ptr(),
                                               *(g.data_ptr() for g in grads), h, modes,
                                               grad.shape[1], int(ctx.zoh))
        return (*grads, None, None)


def _cexp(log_z: Tensor, pos: Tensor) -> Tensor:
    """exp(log_z · pos) for complex log_z (H, N) and real positions (P,) → complex (H, N, P)."""
    return torch.exp(log_z.unsqueeze(-1) * pos)


def conv_operator(kernel: Tensor, device_type: str) -> Tensor:
    """What `apply_conv` convolves with: the kernel transposed to (L, H) for the compiled direct
    sum (CPU float32 up to NATIVE_CONV_MAX_LEN), the (H, L, L) Toeplitz matrix
    T[h, i, j] = K[h, i-j] (0 for j > i) up to TOEPLITZ_MAX_LEN, else the kernel's rFFT
    (n_fft/2+1, H)."""
    length = kernel.shape[-1]
    if (device_type == "cpu" and length <= NATIVE_CONV_MAX_LEN and kernel.dtype == torch.float32
            and not torch.compiler.is_compiling() and kernels() is not None):
        return kernel.t().contiguous()
    if length <= TOEPLITZ_MAX_LEN.get(device_type, 64):
        # Windows of the reversed, zero-padded kernel: R[m] = K[L-1-m], zeros after.
        padded = F.pad(kernel, (length - 1, 0)).flip(-1)
        return padded.unfold(-1, length, 1).flip(-2)
    return torch.fft.rfft(kernel.t(), n=_fast_fft_size(2 * length - 1), dim=0)


def apply_conv(u: Tensor, operator: Tensor) -> Tensor:
    """Causal convolution of u (B, L, H) with the operator from `conv_operator` → (B, L, H)."""
    length = u.shape[1]
    if operator.dim() == 2 and not operator.is_complex():
        u = u.to(operator.dtype)  # the compiled kernel reads float32 (e.g. bf16 under autocast)
        if torch.is_grad_enabled() and (u.requires_grad or operator.requires_grad):
            return _NativeCausalConv.apply(u, operator)
        return _native_conv(u.contiguous(), operator)
    if not operator.is_complex():
        if torch.is_grad_enabled() and (u.requires_grad or operator.requires_grad):
            return _ToeplitzProduct.apply(u, operator)
        return _toeplitz_bmm(operator, u.permute(2, 1, 0).contiguous())
    n_fft = _fast_fft_size(2 * length - 1)
    u_f = torch.fft.rfft(u, n=n_fft, dim=1)
    return torch.fft.irfft(u_f * operator, n=n_fft, dim=1)[:, :length]


def _native_conv(u: Tensor, kernel_t: Tensor) -> Tensor:
    """``rla_causal_conv`` of contiguous float32 u (B, L, H) with the (L, H) kernel."""
    y = torch.empty_like(u)
    kernels().rla_causal_conv(u.data_ptr(), kernel_t.data_ptr(), y.data_ptr(), *u.shape)
    return y


class _NativeCausalConv(torch.autograd.Function):
    """y = K̄ * u by the compiled direct sum; backward gives du and dK in one pass."""

    @staticmethod
    def forward(ctx, u: Tensor, kernel_t: Tensor) -> Tensor:  # type: ignore[override]
        u = u.contiguous()
        ctx.save_for_backward(u, kernel_t)
        return _native_conv(u, kernel_t)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        u, kernel_t = ctx.saved_tensors
        grad_u = torch.empty_like(u) if ctx.needs_input_grad[0] else None
        return grad_u, _native_conv_backward(grad.contiguous(), u, kernel_t, grad_u,
                                             ctx.needs_input_grad[1])


def _native_conv_backward(grad: Tensor, u: Tensor, kernel_t: Tensor, grad_u: Tensor | None,
                          need_kernel: bool = True, accumulate: bool = False) -> Tensor | None:
    """``rla_causal_conv_backward``: writes (``accumulate``: adds) u's gradient into ``grad_u``
    (None: not computed); returns the kernel's gradient (None unless ``need_kernel``)."""
    grad_k = torch.empty_like(kernel_t) if need_kernel else None
    kernels().rla_causal_conv_backward(
        grad.data_ptr(), u.data_ptr(), kernel_t.data_ptr(),
        None if grad_u is None else grad_u.data_ptr(),
        None if grad_k is None else grad_k.data_ptr(), *u.shape, int(accumulate))
    return grad_k


class _NativeS4Layer(torch.autograd.Function):
    """The S4 layer's training forward after its operator (CPU float32, the compiled convolution)
    as one autograd node: y = K̄ * x, GELU + dropout, the Linear(H→2H) as a plain product, and the
    residual LayerNorm with the GLU, its bias and dropout (the kernels and masks of the op-by-op
    path, drawn in the same order). Backward adds the convolution's input gradient into the
    residual LayerNorm's (the kernel's accumulate mode) instead of autograd summing the two in
    another pass, and is one Python call instead of three kernel Functions and a product node."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel_t: Tensor, p: float, eps: float, weight: Tensor,  # type: ignore[override]
                bias: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        b, length, h = x.shape
        x = x.contiguous()
        y = _native_conv(x, kernel_t)
        gelu_seed = draw_seed(p)
        g = _run("rla_gelu_dropout", torch.empty_like(y), y, seed=gelu_seed, p=p).view(-1, h)
        z = torch.mm(g, weight.t())
        out, xhat, rstd, ln_seed = _add_dropout_layernorm(x.view(-1, h), z, bias, gamma, beta, p,
                                                          eps, True)
        ctx.p, ctx.seeds = p, (gelu_seed, ln_seed)
        ctx.save_for_backward(x, kernel_t, y, g, z, xhat, rstd, weight, bias, gamma)
        return out.view(b, length, h)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, kernel_t, y, g, z, xhat, rstd, weight, bias, gamma = ctx.saved_tensors
        p, (gelu_seed, ln_seed) = ctx.p, ctx.seeds
        h = x.shape[-1]
        dx, dz, dbias, dgamma, dbeta = _add_dropout_layernorm_backward(
            grad.contiguous().view(-1, h), xhat, rstd, gamma, z, bias, ln_seed, p, True)
        dweight = torch.mm(dz.t(), g)
        dy = _run("rla_gelu_dropout_backward", torch.empty_like(y), torch.mm(dz, weight).view_as(y),
                  y, seed=gelu_seed, p=p)
        dx = dx.view_as(x)
        dkernel = _native_conv_backward(dy, x, kernel_t, dx, ctx.needs_input_grad[1],
                                        accumulate=True)
        return dx, dkernel, None, None, dweight, dbias, dgamma, dbeta


def _toeplitz_bmm(toeplitz: Tensor, u_t: Tensor) -> Tensor:
    """T (H, L, L) @ u_t (H, L, B), returned as a (B, L, H) view."""
    return torch.bmm(toeplitz, u_t).permute(2, 1, 0)


class _ToeplitzProduct(torch.autograd.Function):
    """y[b, i, h] = Σ_j T[h, i, j] u[b, j, h] as one (H, L, L) @ (H, L, B) bmm.

    Autograd's own bmm backward receives the gradient as a permuted (non-contiguous) view, for
    which torch's CPU bmm falls back to one small copy and GEMM per channel; here the gradient
    is made contiguous once and both backward products run batched.
    """

    @staticmethod
    def forward(ctx, u: Tensor, toeplitz: Tensor) -> Tensor:  # type: ignore[override]
        u_t = u.permute(2, 1, 0).contiguous()  # (H, L, B)
        ctx.save_for_backward(u_t, toeplitz)
        return _toeplitz_bmm(toeplitz, u_t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        u_t, toeplitz = ctx.saved_tensors
        g_t = grad.permute(2, 1, 0).contiguous()  # (H, L, B)
        grad_u = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_u = _toeplitz_bmm(toeplitz.transpose(1, 2), g_t)
        if ctx.needs_input_grad[1]:
            grad_t = torch.bmm(g_t, u_t.transpose(1, 2))
        return grad_u, grad_t


def causal_conv(u: Tensor, kernel: Tensor) -> Tensor:
    """y_l = Σ_{j≤l} K_{l-j} u_j per channel; u (B, L, H), kernel (H, L) → (B, L, H)."""
    return apply_conv(u, conv_operator(kernel, u.device.type))


def _fast_fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c ≥ n (pocketfft/MKL are fastest on such sizes)."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


class S4Layer(nn.Module):
    """One S4D block: SSM convolution + D skip, GELU, dropout, Linear(H→2H) + GLU, dropout,
    residual add and post-LayerNorm (the layout of the state-spaces S4 example model)."""

    def __init__(
        self,
        d_model: int,
        d_state: int,
        dropout: float = 0.0,
        discretization: Discretization = "bilinear",
        init: S4Init = "legs",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ) -> None:
        super().__init__()
        self.kernel = S4DKernel(d_model, d_state, discretization, init, dt_min, dt_max)
        self.D = nn.Parameter(torch.randn(d_model))
        self.output_linear = nn.Linear(d_model, 2 * d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = dropout
        self._cached: tuple[tuple, list[Tensor], Tensor] | None = None
        self._shared: dict[tuple[int, str], tuple[Tensor, Tensor]] | None = None

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, H) → (B, L, H)."""
        operator = self.operator(x.shape[1], x.device.type)
        if self._fuses_layer(x, operator):
            return _NativeS4Layer.apply(x, operator, self.dropout, self.norm.eps,
                                        self.output_linear.weight, self.output_linear.bias,
                                        self.norm.weight, self.norm.bias)
        return self._mix(x, apply_conv(x, operator))

    def _fuses_layer(self, x: Tensor, operator: Tensor) -> bool:
        """Whether training runs as `_NativeS4Layer`: the operator is the compiled convolution's
        (L, H) float32 kernel, autograd records the layer, the kernels serve x, and the
        Linear and LayerNorm parameters are trained float32 tensors on x's device."""
        params = [self.output_linear.weight, self.output_linear.bias, self.norm.weight,
                  self.norm.bias]
        return (self.training and operator.dim() == 2 and not operator.is_complex()
                and operator.dtype == x.dtype and fuses_bias(x, self.dropout)
                and trains_in_one_node(x, params, operator) and 2 * x.numel() < 2**32)

    def operator(self, length: int, device_type: str) -> Tensor:
        """The convolution operator of K̄ with the skip D folded into lag 0 (y = K̄*u + Du)."""
        if torch.is_grad_enabled():
            if self._shared is None:
                return self._operator(length, device_type)
            if (length, device_type) not in self._shared:
                full = self._operator(length, device_type)
                self._shared[(length, device_type)] = (full, full.detach().requires_grad_(True))
            return self._shared[(length, device_type)][1]
        # Acting: the operator only changes with the parameters, so reuse it until they do. The
        # check compares values (a few KB): version counters miss fused-optimizer steps and
        # `.data` writes such as Polyak updates.
        params = [*self.kernel.parameters(), self.D]
        cached = self._cached
        if (cached is None or cached[0] != (length, device_type)
                or not all(torch.equal(p, c) for p, c in zip(params, cached[1]))):
            with torch.inference_mode(False):
                cached = ((length, device_type), [p.detach().clone() for p in params],
                          self._operator(length, device_type))
            self._cached = cached
        return cached[2]

    def _operator(self, length: int, device_type: str) -> Tensor:
        kernel = self.kernel(length) + F.pad(self.D.unsqueeze(-1), (0, length - 1))
        return conv_operator(kernel, device_type)

    def _mix(self, x: Tensor, y: Tensor) -> Tensor:
        y = gelu_dropout(y, self.dropout, self.training)
        z, z_bias = linear_leaving_bias(self.output_linear, y,
                                        fuses_bias(x, self.dropout if self.training else 0.0))
        return add_dropout_layernorm(x, z, self.norm, self.dropout, self.training, glu=True,
                                     z_bias=z_bias)

    def step(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Recurrent form for one position: x (B, H), state complex (B, H, N/2) or None."""
        log_da, cb = self.kernel.discrete()
        da = torch.exp(log_da)
        # Fold C·B̄ into the state so that y = 2 Re(Σ state) needs no separate C product.
        drive = cb * x.unsqueeze(-1).to(cb.dtype)
        state = drive if state is None else da * state + drive
        y = 2.0 * state.sum(-1).real + x * self.D
        return self._mix(x, y), state


@contextmanager
def shared_s4_operators(module: nn.Module) -> Iterator[None]:
    """Build each S4 layer's convolution operator once for all forward passes in the block.

    For gradient accumulation over micro-batches: inside the block every S4 layer computes its
    operator (kernel + Toeplitz/FFT) at most once per length, as a leaf that collects the
    micro-batches' gradients; leaving the block back-propagates the collected gradient into the
    state-space parameters once. The parameter gradients equal those of recomputing the
    operator in every micro-batch (tested), at a fraction of the cost. Call ``backward`` inside
    the block, and clip or step the optimizer after it.
    """
    layers = [m for m in module.modules() if isinstance(m, S4Layer)]
    for layer in layers:
        layer._shared = {}
    try:
        yield
        outputs, grads = [], []
        for layer in layers:
            for full, leaf in (layer._shared or {}).values():
                if leaf.grad is not None:
                    outputs.append(full)
                    grads.append(leaf.grad)
        if outputs:
            torch.autograd.backward(outputs, grads)
    finally:
        for layer in layers:
            layer._shared = None
