"""S4D layer: convolution == recurrence, both convolution paths, discretizations and HiPPO init."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _reference import randomize_norms, ssm_recurrence
from rl_agnostic.nn import NetworkConfig
from rl_agnostic.nn import s4
from rl_agnostic.nn.agnostic import AgnosticActorCritic
from rl_agnostic.nn.native import kernels
from rl_agnostic.nn.s4 import S4DKernel, S4Layer, causal_conv, hippo_legs_diagonal

H, N = 8, 16
# The compiled direct-sum convolution (rl_agnostic.nn.native): needs the system C compiler.
NATIVE = pytest.param("native", marks=pytest.mark.skipif(kernels() is None,
                                                        reason="no C compiler"))


def toeplitz_max(device: str = "cpu") -> int:
    """The longest sequence convolved by the Toeplitz product on ``device`` (FFT beyond)."""
    limit = s4.TOEPLITZ_MAX_LEN
    return limit.get(device, 64) if isinstance(limit, dict) else int(limit)


def force_conv_path(monkeypatch, path: str) -> None:
    """Route every causal_conv call through one path (``native``, ``toeplitz`` or ``fft``) by
    moving the length thresholds."""
    monkeypatch.setattr(s4, "NATIVE_CONV_MAX_LEN", 10**9 if path == "native" else 0)
    if path == "native":
        return
    value = 10**9 if path == "toeplitz" else 0
    limit = s4.TOEPLITZ_MAX_LEN
    if isinstance(limit, dict):
        monkeypatch.setattr(s4, "TOEPLITZ_MAX_LEN", {**{k: value for k in limit}, "cpu": value})
    else:
        monkeypatch.setattr(s4, "TOEPLITZ_MAX_LEN", value)


def make_layer(discretization: str, init: str, dt_max: float = 0.3) -> S4Layer:
    return S4Layer(H, N, dropout=0.1, discretization=discretization, init=init,
                   dt_min=1e-2, dt_max=dt_max).eval()


def naive_causal_conv(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """y[b, i, c] = Σ_{j ≤ i} K[c, i - j] u[b, j, c], summed term by term in float64."""
    u, kernel = u.double(), kernel.double()
    length = u.shape[1]
    y = torch.zeros_like(u)
    for i in range(length):
        for j in range(i + 1):
            y[:, i] += kernel[:, i - j] * u[:, j]
    return y


def step_outputs(layer: S4Layer, x: torch.Tensor) -> torch.Tensor:
    state, steps = None, []
    for k in range(x.shape[1]):
        y_k, state = layer.step(x[:, k], state)
        steps.append(y_k)
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
@pytest.mark.parametrize("init", ["legs", "lin"])
@pytest.mark.parametrize(("path", "length"),
                         [("toeplitz", 1), ("toeplitz", 11), ("fft", 5), ("fft", 11), ("fft", 70),
                          (NATIVE, 1), (NATIVE, 11), (NATIVE, 40)])
def test_convolution_equals_step_recurrence(discretization, init, path, length, monkeypatch):
    force_conv_path(monkeypatch, path)
    layer = make_layer(discretization, init)
    x = torch.randn(3, length, H)
    with torch.no_grad():
        y_conv = layer(x)
        y_step = step_outputs(layer, x)
    assert y_conv.shape == x.shape
    scale = max(1.0, y_step.abs().max().item())
    torch.testing.assert_close(y_conv, y_step, atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
@pytest.mark.parametrize("init", ["legs", "lin"])
def test_convolution_equals_step_recurrence_past_default_threshold(discretization, init):
    """Default routing: a sequence just longer than TOEPLITZ_MAX_LEN takes the FFT path."""
    length = toeplitz_max() + 3
    layer = make_layer(discretization, init)
    x = torch.randn(2, length, H)
    with torch.no_grad():
        y_conv = layer(x)
        y_step = step_outputs(layer, x)
    scale = max(1.0, y_step.abs().max().item())
    torch.testing.assert_close(y_conv, y_step, atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
@pytest.mark.parametrize("init", ["legs", "lin"])
@pytest.mark.parametrize(("path", "length"), [("toeplitz", 11), ("fft", 70), (NATIVE, 23)])
def test_ssm_convolution_matches_docstring_recurrence(discretization, init, path, length,
                                                      monkeypatch):
    """K̄ * u + D u equals x_k = Ā x_{k-1} + B̄ u_k, y = 2 Re(C x) + D u computed in complex128
    straight from the parameters (checks the discretization formulas, not just self-consistency)."""
    force_conv_path(monkeypatch, path)
    layer = make_layer(discretization, init, dt_max=0.5)
    u = torch.randn(2, length, H)
    with torch.no_grad():
        y = causal_conv(u, layer.kernel(length)) + u * layer.D
    ref = ssm_recurrence(layer.kernel, layer.D, u)
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(y.double(), ref, atol=1e-4 * scale, rtol=0)


def test_zoh_and_bilinear_kernels_differ():
    torch.manual_seed(3)
    bilinear = S4DKernel(H, N, "bilinear", "legs", dt_min=0.05, dt_max=0.5)
    zoh = S4DKernel(H, N, "zoh", "legs", dt_min=0.05, dt_max=0.5)
    zoh.load_state_dict(bilinear.state_dict())  # same parameters, different discretization
    with torch.no_grad():
        kb, kz = bilinear(40), zoh(40)
    assert kb.shape == kz.shape == (H, 40)
    assert (kb - kz).abs().max() > 1e-3 * kb.abs().max()


@pytest.mark.parametrize("length", [1, 5, 33, 200])
def test_kernel_shape_follows_length_and_state_follows_d_state(length):
    for d_state in (8, 32):
        kernel = S4DKernel(H, d_state)
        assert kernel.log_A_real.shape == (H, d_state // 2)
        assert kernel.A_imag.shape == (H, d_state // 2)
        assert kernel.B.shape == kernel.C.shape == (H, d_state // 2, 2)
        with torch.no_grad():
            assert kernel(length).shape == (H, length)


def test_changing_d_state_changes_the_kernel():
    kernels = {}
    for d_state in (8, 16):
        torch.manual_seed(0)
        k = S4DKernel(H, d_state, "bilinear", "lin")
        with torch.no_grad():
            k.C.fill_(1.0)  # identical C, B = 1 and Δ: only the number of modes differs
            kernels[d_state] = k(30)
    assert not torch.allclose(kernels[8], kernels[16], atol=1e-3)


def test_network_s4_layers_use_config_d_state_not_d_model():
    cfg = NetworkConfig(d_model=16, d_state=6, dropout=0.0)
    model = AgnosticActorCritic(cfg)
    kernels = [m for m in model.modules() if isinstance(m, S4DKernel)]
    assert len(kernels) == 6 * cfg.s4_layers  # 2 encoders + 4 decoders
    for k in kernels:
        assert k.log_A_real.shape == (16, 3)


@pytest.mark.parametrize("n_state", [2, 8, 16, 64])
def test_hippo_legs_diagonal_is_the_normal_part_spectrum(n_state):
    w, b = hippo_legs_diagonal(n_state)
    assert w.shape == b.shape == (n_state // 2,)
    np.testing.assert_allclose(w.real, -0.5, atol=1e-9)
    assert np.all(w.imag > 0)
    # Independent construction of HiPPO-LegS: A_nk = -sqrt(2n+1)sqrt(2k+1) (n > k), -(n+1) (n = k).
    q = np.arange(n_state)
    a = -np.sqrt(2 * q[:, None] + 1) * np.sqrt(2 * q[None, :] + 1)
    a = np.tril(a, -1) - np.diag(q + 1.0)
    p = np.sqrt(q + 0.5)
    normal = a + np.outer(p, p)
    eig, vec = np.linalg.eig(normal)
    upper = eig[eig.imag > 0]
    np.testing.assert_allclose(np.sort(upper.imag), np.sort(w.imag), rtol=1e-8, atol=1e-8)
    # |V^H B| is phase-independent: compare the projected B mode by mode.
    b_full = np.sqrt(2 * q + 1.0)
    for lam, bp in zip(w, b):
        i = np.argmin(np.abs(eig - lam))
        v = vec[:, i] / np.linalg.norm(vec[:, i])
        assert abs(abs(v.conj() @ b_full) - abs(bp)) < 1e-6 * max(1.0, abs(bp))


def test_lin_init_eigenvalues():
    k = S4DKernel(4, 8, init="lin")
    np.testing.assert_allclose(torch.exp(k.log_A_real).detach().numpy(), 0.5, rtol=1e-6)
    np.testing.assert_allclose(k.A_imag.detach().numpy()[0], np.pi * np.arange(4), rtol=1e-6)


def test_dt_init_is_within_range():
    k = S4DKernel(256, 8, dt_min=1e-3, dt_max=1e-1)
    dt = torch.exp(k.log_dt.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)


@pytest.mark.parametrize("length", [1, 2, 17, 70])
def test_causal_conv_paths_agree_with_naive_loop(length, monkeypatch):
    u = torch.randn(2, length, 3)
    kernel = torch.randn(3, length)
    ref = naive_causal_conv(u, kernel)
    default = causal_conv(u, kernel)
    force_conv_path(monkeypatch, "toeplitz")
    toeplitz = causal_conv(u, kernel)
    force_conv_path(monkeypatch, "fft")
    fft = causal_conv(u, kernel)
    paths = [default, toeplitz, fft]
    if kernels() is not None:
        force_conv_path(monkeypatch, "native")
        paths.append(causal_conv(u, kernel))
    for y in paths:
        assert y.shape == u.shape
        torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(toeplitz, fft, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(kernels() is None, reason="no C compiler")
@pytest.mark.parametrize(("length", "channels"), [(1, 8), (4, 64), (17, 40), (33, 96), (77, 64)])
def test_native_conv_gradients_equal_autograd_of_toeplitz_path(length, channels, monkeypatch):
    """The compiled kernel and its backward equal autograd through the Toeplitz product;
    ``channels`` covers the 32-channel register blocks and their tail, lengths from 32 on (with
    channels a multiple of 32) the blocked loops, an odd batch their single-row tail."""
    u = torch.randn(5, length, channels)
    kernel = torch.randn(channels, length)
    grad = torch.randn(5, length, channels)
    results = []
    for path in ("toeplitz", "native"):
        force_conv_path(monkeypatch, path)
        uu, kk = u.clone().requires_grad_(), kernel.clone().requires_grad_()
        y = causal_conv(uu, kk)
        y.backward(grad)
        results.append((y, uu.grad, kk.grad))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # only the needed gradient: a kernel that needs none, an input that needs none
    force_conv_path(monkeypatch, "native")
    uu = u.clone().requires_grad_()
    causal_conv(uu, kernel).backward(grad)
    torch.testing.assert_close(uu.grad, results[0][1], atol=1e-5, rtol=1e-5)
    kk = kernel.clone().requires_grad_()
    causal_conv(u, kk).backward(grad)
    torch.testing.assert_close(kk.grad, results[0][2], atol=1e-5, rtol=1e-5)


def test_fft_path_is_exact_for_every_length(monkeypatch):
    """The FFT convolution must not depend on which FFT size the length rounds up to (some
    lengths get odd 3^a·5^b sizes, e.g. L = 5 → 9, L = 65 → 135)."""
    bad = []
    for length in range(1, 90):
        u = torch.randn(1, length, 2, dtype=torch.float64)
        kernel = torch.randn(2, length, dtype=torch.float64)
        force_conv_path(monkeypatch, "toeplitz")
        ref = causal_conv(u, kernel)
        force_conv_path(monkeypatch, "fft")
        try:
            ok = torch.allclose(causal_conv(u, kernel), ref, atol=1e-8)
        except RuntimeError:
            ok = False
        if not ok:
            bad.append(length)
    assert not bad, f"FFT convolution wrong for lengths {bad}"


def test_default_routing_is_exact_past_the_threshold():
    """Lengths just past TOEPLITZ_MAX_LEN (FFT path by default) give the same convolution."""
    start = toeplitz_max() + 1
    bad = []
    for length in range(start, start + 90):
        u = torch.randn(1, length, 2, dtype=torch.float64)
        kernel = torch.randn(2, length, dtype=torch.float64)
        y = causal_conv(u, kernel)
        # Toeplitz reference built directly: T[i, j] = K[i - j] for j <= i
        idx = torch.arange(length)
        lag = idx[:, None] - idx[None, :]
        toeplitz = kernel[:, lag.clamp(min=0)] * (lag >= 0)
        ref = torch.einsum("hij,bjh->bih", toeplitz, u)
        if not torch.allclose(y, ref, atol=1e-8):
            bad.append(length)
    assert not bad, f"default causal_conv wrong for lengths {bad}"


@pytest.mark.parametrize("offset", [0, 1])
def test_causal_conv_default_routing_at_threshold(offset):
    """At L = TOEPLITZ_MAX_LEN (Toeplitz) and L + 1 (FFT) the result is the same convolution."""
    length = toeplitz_max() + offset
    u = torch.randn(1, length, 2)
    kernel = torch.randn(2, length) * torch.exp(-0.05 * torch.arange(length))
    y = causal_conv(u, kernel).double()
    # naive check on a subset of output positions (full loop is O(L^2) in Python)
    for i in (0, 1, length // 2, length - 1):
        expected = (kernel[:, : i + 1].flip(-1).double() * u[0, : i + 1].t().double()).sum(-1)
        torch.testing.assert_close(y[0, i], expected, atol=1e-4, rtol=1e-4)


def test_causal_conv_is_causal():
    u = torch.randn(1, 60, 2)
    kernel = torch.randn(2, 60)
    u2 = u.clone()
    u2[:, 30:] += torch.randn(1, 30, 2)
    y, y2 = causal_conv(u, kernel), causal_conv(u2, kernel)
    torch.testing.assert_close(y[:, :30], y2[:, :30], atol=1e-5, rtol=0)
    assert not torch.allclose(y[:, 30:], y2[:, 30:])


def test_fast_fft_size_is_smallest_5_smooth_at_least_n():
    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for n in range(1, 400):
        got = s4._fast_fft_size(n)
        assert got >= n and smooth(got)
        assert not any(smooth(m) for m in range(n, got))


def test_s4_layer_gradients_reach_ssm_parameters():
    layer = S4Layer(H, N, dropout=0.0)
    layer(torch.randn(2, 20, H)).square().sum().backward()
    for name in S4DKernel.SSM_PARAMETERS + ("C",):
        g = getattr(layer.kernel, name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, name


def _update_in_place(layer, new):
    with torch.no_grad():
        for p, q in zip(layer.parameters(), new.parameters()):
            p.copy_(q)


def _update_load_state_dict(layer, new):
    layer.load_state_dict(new.state_dict())


def _update_load_state_dict_assign(layer, new):
    layer.load_state_dict(new.state_dict(), assign=True)


def _update_through_data(layer, new):
    # e.g. a Polyak target-network update written as target.data.copy_(...)
    for p, q in zip(layer.parameters(), new.parameters()):
        p.data.copy_(q.data)


def _update_fused_adam(layer, new):
    opt = torch.optim.Adam(layer.parameters(), lr=0.05, fused=True)
    layer.train()
    layer(torch.randn(2, 9, H)).square().sum().backward()
    opt.step()
    layer.eval()


@pytest.mark.parametrize("update", [_update_in_place, _update_load_state_dict,
                                    _update_load_state_dict_assign, _update_through_data,
                                    _update_fused_adam])
def test_no_grad_output_follows_parameter_updates(update):
    """Acting (no grad) must use the current parameters however they were updated: the output
    under no_grad equals the output with autograd on, before and after an update."""
    layer = make_layer("bilinear", "legs")
    x = torch.randn(2, 9, H)
    with torch.no_grad():
        before = layer(x).clone()
    update(layer, make_layer("bilinear", "legs"))
    with torch.no_grad():
        acting = layer(x).clone()
    training = layer(x).detach()
    assert not torch.allclose(before, training, atol=1e-4)
    torch.testing.assert_close(acting, training, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 2, 3, 4, 17, 100, 376])
def test_split_power_kernel_equals_direct_vandermonde(length):
    torch.manual_seed(0)
    kern = S4DKernel(H, N)
    with torch.no_grad():
        log_da, cb = kern.discrete()
        pos = torch.arange(length, dtype=torch.float32)
        direct = 2 * torch.einsum("hn,hnl->hl", cb, torch.exp(log_da.unsqueeze(-1) * pos)).real
        got = kern(length)
    assert got.shape == (H, length)
    assert torch.allclose(got, direct, atol=1e-5 * direct.abs().max().item() + 1e-7)


@pytest.mark.skipif(kernels() is None, reason="no C compiler")
@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
@pytest.mark.parametrize("init", ["legs", "lin"])
@pytest.mark.parametrize("length", [1, 4, 30, 376])
def test_compiled_kernel_and_its_gradients_equal_the_torch_path(discretization, init, length,
                                                                monkeypatch):
    """K̄ from the compiled discretization + power recurrence equals the torch path (real-arithmetic
    discretization, split powers), and so do the gradients of all five S4D parameters."""
    torch.manual_seed(1)
    kern = S4DKernel(H, N, discretization, init, dt_min=1e-3, dt_max=0.5)
    grad = torch.randn(H, length)
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(s4, "use_native", lambda *args: False)
        kern.zero_grad()
        k = kern(length)
        (k * grad).sum().backward()
        results.append([k.detach(), *(p.grad.clone() for p in kern.parameters())])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-4 * want.abs().max().item(), rtol=0)


def test_shared_operators_give_the_same_gradients_as_recomputing():
    torch.manual_seed(0)
    spec_kwargs = dict(action_low=(-1.0,) * 3, action_high=(1.0,) * 3)
    from rl_agnostic.envs.spec import EnvSpec

    spec = EnvSpec("Hopper-v5", 11, "continuous", 3, **spec_kwargs)
    # randomized norms: at init the log-std decoder outputs exactly 0 and its S4 layers get no
    # gradient, which would leave their comparison trivial
    net = randomize_norms(AgnosticActorCritic(NetworkConfig(d_model=16, dropout=0.0), [spec]))
    obs, act = torch.randn(12, 11), torch.randn(12, 3)

    def grads(shared: bool) -> dict[str, torch.Tensor]:
        net.zero_grad(set_to_none=True)
        ctx = s4.shared_s4_operators(net) if shared else torch.enable_grad()
        with ctx:
            for lo in range(0, 12, 4):
                dist, value = net.actor_critic(obs[lo:lo + 4], spec)
                (-net.log_prob(spec, dist, act[lo:lo + 4]).sum() + value.square().sum()).backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    plain, shared = grads(False), grads(True)
    assert plain.keys() == shared.keys()
    ssm = [n for n in plain if n.endswith(("kernel.log_dt", "kernel.B", "kernel.C", ".D"))]
    assert ssm and all(plain[n].abs().sum() > 0 for n in ssm)
    for name in plain:
        scale = plain[name].abs().max().item() + 1e-12
        assert (plain[name] - shared[name]).abs().max().item() <= 1e-5 * scale, name
    # Leaving the block resets the layers: the next forward builds its operator afresh.
    assert all(layer._shared is None for layer in net.modules() if isinstance(layer, S4Layer))


def test_shared_operators_skip_the_parameter_backward_on_error():
    layer = S4Layer(H, N)
    x = torch.randn(2, 5, H)
    with pytest.raises(RuntimeError, match="boom"):
        with s4.shared_s4_operators(layer):
            layer(x).sum().backward()
            raise RuntimeError("boom")
    assert layer._shared is None
    assert layer.kernel.log_dt.grad is None  # the collected operator gradient was not applied


@pytest.mark.skipif(kernels() is None, reason="no C compiler")
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("length", [7, 40])  # 40: the blocked convolution, accumulating du too
def test_fused_training_layer_equals_the_layer_op_by_op(monkeypatch, p, length):
    """The S4 layer's training forward as one autograd node (`_NativeS4Layer`) gives the op-by-op
    path's output and every gradient (input, state-space and Linear/LayerNorm parameters) with
    the same dropout masks."""
    torch.manual_seed(0)
    layer = randomize_norms(S4Layer(32, 16, dropout=p)).train()
    with torch.no_grad():
        layer.output_linear.bias.normal_()
    x0, grad = torch.randn(5, length, 32), torch.randn(5, length, 32)
    results = []
    for fused in (True, False):  # the layer's own choice, then op by op
        if not fused:
            monkeypatch.setattr(S4Layer, "_fuses_layer", lambda self, x, operator: False)
        layer.zero_grad()
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(1)
        y = layer(x)
        assert (y.grad_fn.name() == "_NativeS4LayerBackward") == fused
        y.backward(grad)
        results.append([y, x.grad, *(q.grad for q in layer.parameters())])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
