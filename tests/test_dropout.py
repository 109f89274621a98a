"""The CPU dropout and GELU+dropout: Bernoulli(1-p) keep mask scaled by 1/(1-p), reproducible
under torch seeds, with the fused kernels and without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rl_agnostic.nn.dropout import (
    add_dropout_layernorm,
    dropout,
    gelu_dropout,
    keep_mask,
    softmax_dropout,
)
from rl_agnostic.nn.native import keep_freed_memory, kernels, openmp_runtimes
from rl_agnostic.nn.s4 import causal_conv


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


# The fused kernels (rl_agnostic.nn.native): built with the system compiler on first use.

native = pytest.mark.skipif(kernels() is None, reason="no C compiler: fused kernels unavailable")


@native
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_native_dropout_keep_rate_scale_and_independent_bits(p):
    torch.manual_seed(0)
    x = torch.rand(400_000) + 0.5
    y = dropout(x, p, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / 4e5) ** 0.5
    assert torch.allclose(y[kept], x[kept] / (1 - p))
    # Neighbouring elements and a second draw are independent: P(both kept) = (1-p)².
    for both in (kept[1:] & kept[:-1], kept & (dropout(x, p, training=True) != 0)):
        assert abs(both.float().mean().item() - (1 - p) ** 2) < 0.005


@native
def test_native_kernels_share_torchs_openmp_runtime_and_ignore_the_thread_count():
    """One OpenMP runtime in the process (the kernels' threads are torch's), and the results do
    not depend on how many threads split the work: the same dropout mask bit for bit, the same
    convolution and input gradient, the kernel gradient (summed per thread) within rounding."""
    assert len(openmp_runtimes()) <= 1
    x = torch.randn(300_000)  # ~9 blocks of 2^15 elements
    u, k, g = torch.randn(64, 12, 40), torch.randn(40, 12), torch.randn(64, 12, 40)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(5)
            uu, kk = u.clone().requires_grad_(), k.clone().requires_grad_()
            y = causal_conv(uu, kk)
            y.backward(g)
            out.append((dropout(x, 0.3, training=True), y, uu.grad, kk.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1]) and torch.equal(out[0][2], out[1][2])
    torch.testing.assert_close(out[0][3], out[1][3], atol=1e-5, rtol=1e-5)


SERIAL_BUILD_CHECK = """
import sys, torch
from rl_agnostic.nn import native
native.OPENMP_FLAGS.clear()  # the build kernels() falls back to beside another OpenMP runtime
sys.path.insert(0, sys.argv[2])
from test_dropout import kernel_outputs
torch.save(kernel_outputs(), sys.argv[1])
"""


def kernel_outputs() -> list[torch.Tensor]:
    """Outputs and gradients of every compiled kernel on fixed inputs (seeded masks)."""
    from rl_agnostic.nn.s4 import S4DKernel
    from rl_agnostic.nn.transformer import _NativeAttention

    torch.manual_seed(11)
    x = torch.randn(70_000)
    norm = torch.nn.LayerNorm(40)
    u, k = torch.randn(32, 12, 40, requires_grad=True), torch.randn(40, 12, requires_grad=True)
    res, z = torch.randn(32, 12, 40, requires_grad=True), torch.randn(32, 12, 80, requires_grad=True)
    qkv = torch.randn(32, 12, 120, requires_grad=True)
    ssm = S4DKernel(40, 16)
    h, z_bias = torch.randn(700, 100, requires_grad=True), torch.randn(80, requires_grad=True)
    h_bias, qkv_bias = torch.randn(100, requires_grad=True), torch.randn(120, requires_grad=True)
    outs = [dropout(x, 0.3, True), gelu_dropout(x, 0.3, True),
            softmax_dropout(x.view(700, 100), 0.3, True)]
    y = (causal_conv(u, k) + add_dropout_layernorm(res, z, norm, 0.2, True, glu=True)
         + add_dropout_layernorm(res, z, norm, 0.2, True, glu=True, z_bias=z_bias)
         + _NativeAttention.apply(qkv, None, None, 0.2)
         + _NativeAttention.apply(qkv * 1.0, qkv_bias, None, 0.2)).sum() + ssm(12).square().sum()
    y = y + gelu_dropout(h, 0.3, True, bias=h_bias).square().sum()
    y.backward()
    grads = [u.grad, k.grad, res.grad, z.grad, qkv.grad, norm.weight.grad, h.grad, z_bias.grad,
             h_bias.grad, qkv_bias.grad, *(p.grad for p in ssm.parameters())]
    return [t.detach() for t in outs + grads]


@native
def test_single_threaded_build_gives_the_same_results(tmp_path):
    """The build without OpenMP (loaded when torch's OpenMP runtime cannot be shared) computes
    the same outputs, masks and gradients as the multi-threaded one (sums within rounding)."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "serial.pt"
    subprocess.run([sys.executable, "-c", SERIAL_BUILD_CHECK, str(out), str(Path(__file__).parent)],
                   check=True, timeout=300)
    serial = torch.load(out)
    for got, want in zip(serial, kernel_outputs()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@native
def test_gelu_dropout_equals_gelu_then_the_same_mask_forward_and_backward():
    torch.manual_seed(1)
    x = (torch.randn(64, 37, 50) * 3).requires_grad_(True)
    y = gelu_dropout(x, 0.2, training=True)
    kept = (y != 0).float()
    assert 0.75 < kept.mean().item() < 0.85
    # The reference is the exact GELU in float64: torch's float32 GELU is itself ~1e-6 off in
    # the tails on some CPUs (AVX-512: -8.7101e-4 at x = -3.48 where the true value is -8.7206e-4).
    ref_x = x.detach().double().requires_grad_(True)
    ref = F.gelu(ref_x) * kept / 0.8
    assert torch.allclose(y.double(), ref, atol=1e-6, rtol=1e-5)
    w = torch.randn_like(ref)
    (y * w.float()).sum().backward()
    (ref * w).sum().backward()
    assert torch.allclose(x.grad.double(), ref_x.grad, atol=1e-5, rtol=1e-5)
    # Strided input: the mask follows the logical element order, gradients stay exact.
    xt = x.detach().transpose(0, 2).requires_grad_(True)
    torch.manual_seed(2)
    yt = gelu_dropout(xt, 0.2, training=True)
    torch.manual_seed(2)
    assert torch.equal(yt, gelu_dropout(xt.contiguous(), 0.2, training=True))


@native
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_gelu_dropout_with_a_bias_equals_gelu_of_the_sum_with_the_same_mask(p):
    """The Linear layer's bias added in the kernel: the mask of the bias-free call (same seed),
    GELU of x + bias, and the bias gradient summed over rows."""
    torch.manual_seed(1)
    x = (torch.randn(64, 37, 50) * 3).requires_grad_(True)
    bias = torch.randn(50, requires_grad=True)
    torch.manual_seed(5)
    y = gelu_dropout(x, p, training=True, bias=bias)
    torch.manual_seed(5)
    kept = (gelu_dropout(torch.ones_like(x), p, training=True) != 0).double()
    ref_x = x.detach().double().requires_grad_(True)
    ref_b = bias.detach().double().requires_grad_(True)
    ref = F.gelu(ref_x + ref_b) * kept / (1 - p)
    assert torch.allclose(y.double(), ref, atol=1e-6, rtol=1e-5)
    w = torch.randn_like(ref)
    (y * w.float()).sum().backward()
    (ref * w).sum().backward()
    assert torch.allclose(x.grad.double(), ref_x.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(bias.grad.double(), ref_b.grad, atol=1e-4, rtol=1e-5)
    # Without autograd (large batches) the same values; eval mode: plain GELU of the sum.
    with torch.no_grad():
        torch.manual_seed(5)
        assert torch.equal(gelu_dropout(x, p, training=True, bias=bias), y.detach())
    assert torch.allclose(gelu_dropout(x, p, training=False, bias=bias).double(),
                          F.gelu(ref_x + ref_b), atol=1e-6, rtol=1e-5)


def test_without_the_kernels_the_numpy_path_gives_the_same_distribution(monkeypatch):
    import rl_agnostic.nn.dropout as module

    monkeypatch.setattr(module, "kernels", lambda: None)
    torch.manual_seed(0)
    x = torch.randn(200_000, requires_grad=True)
    y = gelu_dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.004
    assert torch.allclose(y[kept], F.gelu(x)[kept] / 0.9)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)


def test_freed_activation_memory_is_reused_without_page_faults():
    import resource

    assert keep_freed_memory()  # glibc (Linux): mallopt is there
    for _ in range(3):
        torch.ones(1 << 20).sum()  # 4 MB: above glibc's default mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        torch.ones(1 << 20).sum()
    # Without the tuning every 4 MB block is a fresh mapping: ~1,000 faults per iteration.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2_000


@native
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("width", [7, 64])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("biased", [False, True])
def test_add_dropout_layernorm_equals_layernorm_of_the_same_mask_forward_and_backward(p, width,
                                                                                        glu,
                                                                                        biased):
    """The fused post-norm residual equals F.layer_norm(x + z·keep/(1-p)) (with ``glu``: of
    F.glu(z)) and its gradients, for the keep mask it drew (read off dz: dropped elements get
    exactly 0); p=0 keeps everything. z's GLU gates include ±100 and ±inf. ``biased``: z's
    Linear bias is added in the kernel, its gradient summed there."""
    torch.manual_seed(2)
    norm = torch.nn.LayerNorm(width)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = (torch.randn(300, 5, width) * 2 + 1).requires_grad_(True)
    z = torch.randn(300, 5, width * (2 if glu else 1))
    if glu:
        z[0, 0, width:width + 4] = torch.tensor([100.0, -100.0, float("inf"), float("-inf")])
    z.requires_grad_(True)
    z_bias = torch.randn(z.shape[-1], requires_grad=True) if biased else None
    y = add_dropout_layernorm(x, z, norm, p, training=True, glu=glu, z_bias=z_bias)
    grad = torch.randn_like(y)
    y.backward(grad)
    keep = (z.grad[..., :width] != 0).float()
    assert abs(keep.mean().item() - (1 - p)) < 0.01
    x2, z2 = x.detach().clone().requires_grad_(True), z.detach().clone().requires_grad_(True)
    w2 = norm.weight.detach().clone().requires_grad_(True)
    b2 = norm.bias.detach().clone().requires_grad_(True)
    zb2 = z_bias.detach().clone().requires_grad_(True) if biased else torch.zeros(z.shape[-1])
    branch = F.glu(z2 + zb2, dim=-1) if glu else z2 + zb2
    ref = F.layer_norm(x2 + branch * keep / (1 - p), (width,), w2, b2, norm.eps)
    ref.backward(grad)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for got, want in ((x.grad, x2.grad), (z.grad, z2.grad), (norm.weight.grad, w2.grad),
                      (norm.bias.grad, b2.grad)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if biased:
        torch.testing.assert_close(z_bias.grad, zb2.grad, atol=1e-4, rtol=1e-4)
    # eval mode: no dropout, same as the module; without autograd (the direct kernel call at
    # width 64, torch's ops at width 7) too
    zb = zb2.detach()
    want = norm(x + (F.glu(z + zb, dim=-1) if glu else z + zb))
    torch.testing.assert_close(
        add_dropout_layernorm(x, z, norm, p, training=False, glu=glu, z_bias=z_bias), want,
        atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            add_dropout_layernorm(x, z, norm, p, training=False, glu=glu, z_bias=z_bias), want,
            atol=1e-5, rtol=1e-5)


@native
@pytest.mark.parametrize(("p", "scale"), [(0.1, 1.0), (0.4, 1.0), (0.2, 0.3)])
def test_softmax_dropout_equals_softmax_then_the_same_mask_forward_and_backward(p, scale):
    """Row softmax (of the scores times ``scale``) + dropout in one kernel: torch's softmax times
    the drawn mask / (1-p), and the same input gradient; masked (-inf) keys get weight 0, a fully
    masked row gives zeros."""
    torch.manual_seed(6)
    x = torch.randn(9, 31, 50) * 3
    x[0, 0, 5:9] = float("-inf")
    x[1, 2] = float("-inf")
    x.requires_grad_(True)
    y = softmax_dropout(x, p, training=True, scale=scale)
    grad = torch.randn_like(y)
    y.backward(grad)
    w = torch.softmax(x.detach() * scale, dim=-1).nan_to_num(0.0)
    keep = torch.where(w > 0, (y.detach() * (1 - p) / w.clamp(min=1e-30)).round(),
                       torch.ones_like(w))
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert abs(keep[w > 0].mean().item() - (1 - p)) < 0.02
    assert (y[1, 2] == 0).all() and (y[0, 0, 5:9] == 0).all()
    x2 = x.detach().clone().requires_grad_(True)
    ref = torch.softmax(x2 * scale, dim=-1).nan_to_num(0.0) * keep / (1 - p)
    ref.backward(grad)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad.nan_to_num(0.0), x2.grad.nan_to_num(0.0), atol=1e-6,
                               rtol=1e-5)
    torch.testing.assert_close(softmax_dropout(x, p, training=False, scale=scale),
                               torch.softmax(x * scale, dim=-1), equal_nan=True)


@native
def test_flush_denormals_zeroes_subnormals_on_every_pool_thread_and_can_be_undone(monkeypatch):
    """A product below 1.18e-38 is 0 with the flush, also in the half of a large op that torch's
    second OpenMP thread computes, and subnormal again after ``flush_denormals(False)``;
    RL_AGNOSTIC_FLUSH_DENORMAL=0 leaves the mode alone."""
    import platform

    from rl_agnostic.nn.native import flush_denormals

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("MXCSR is x86")
    x = torch.full((1 << 20,), 1e-30)
    assert (x * 1e-10).min().item() > 0.0  # IEEE: subnormal 1e-40
    try:
        assert flush_denormals(True) == torch.get_num_threads()
        assert (x * 1e-10).abs().max().item() == 0.0
        monkeypatch.setenv("RL_AGNOSTIC_FLUSH_DENORMAL", "0")
        assert flush_denormals(False) == 0
        assert (x * 1e-10).abs().max().item() == 0.0  # untouched
    finally:
        monkeypatch.delenv("RL_AGNOSTIC_FLUSH_DENORMAL", raising=False)
        flush_denormals(False)
    assert (x * 1e-10).min().item() > 0.0
