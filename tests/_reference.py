"""Plain reference implementations of the agnostic network, written from the paper and the
module docstrings (not from the optimized code paths), used to check the real modules."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl_agnostic.envs.spec import EnvSpec
from rl_agnostic.nn.blocks import BiGRULayer, ResidualMLP
from rl_agnostic.nn.context import context_features
from rl_agnostic.nn.s4 import S4DKernel, S4Layer
from rl_agnostic.nn.transformer import TransformerLayer


def discrete_ssm(kernel: S4DKernel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Ā, B̄, C) in complex128 from the raw parameters, per the s4.py docstring formulas."""
    dt = np.exp(kernel.log_dt.detach().double().numpy())[:, None]
    a = -np.exp(kernel.log_A_real.detach().double().numpy()) + 1j * kernel.A_imag.detach().double().numpy()
    b_raw = kernel.B.detach().double().numpy()
    c_raw = kernel.C.detach().double().numpy()
    b = b_raw[..., 0] + 1j * b_raw[..., 1]
    c = c_raw[..., 0] + 1j * c_raw[..., 1]
    if kernel.discretization == "zoh":
        da = np.exp(dt * a)
        db = (np.exp(dt * a) - 1.0) / a * b
    else:
        da = (1 + dt * a / 2) / (1 - dt * a / 2)
        db = dt * b / (1 - dt * a / 2)
    return da, db, c


def ssm_recurrence(kernel: S4DKernel, d: Tensor, u: Tensor) -> Tensor:
    """Naive recurrence x_k = Ā x_{k-1} + B̄ u_k, y_k = 2 Re(C x_k) + D u_k; u (B, L, H) → float64."""
    da, db, c = discrete_ssm(kernel)
    u_np = u.detach().double().numpy()
    d_np = d.detach().double().numpy()
    batch, length, h = u_np.shape
    state = np.zeros((batch, h, da.shape[-1]), dtype=np.complex128)
    ys = []
    for k in range(length):
        state = da * state + db * u_np[:, k, :, None]
        ys.append(2 * np.real((c * state).sum(-1)) + d_np * u_np[:, k])
    return torch.from_numpy(np.stack(ys, axis=1))


def s4_layer_reference(layer: S4Layer, x: Tensor) -> Tensor:
    """S4Layer in eval mode, by recurrence then GELU → Linear+GLU → residual → LayerNorm."""
    x = x.double()
    y = ssm_recurrence(layer.kernel, layer.D, x)
    y = F.glu(F.linear(F.gelu(y), layer.output_linear.weight.double(),
                       layer.output_linear.bias.double()), dim=-1)
    return F.layer_norm(x + y, x.shape[-1:], layer.norm.weight.double(), layer.norm.bias.double(),
                        layer.norm.eps)


def sequence_block_reference(block: nn.Module, x: Tensor) -> Tensor:
    x = x.double()
    for layer in block.layers:
        if isinstance(layer, S4Layer):
            x = s4_layer_reference(layer, x)
        elif isinstance(layer, TransformerLayer):
            x = layer.to_reference().double().eval()(x)
        elif isinstance(layer, BiGRULayer):
            import copy
            gru = copy.deepcopy(layer.gru).double()
            x = F.layer_norm(x + gru(x)[0], x.shape[-1:], layer.norm.weight.double(),
                             layer.norm.bias.double(), layer.norm.eps)
        else:  # pragma: no cover - an unknown layer type is a test bug
            raise TypeError(type(layer))
    return x


def residual_mlp_reference(mlp: ResidualMLP, x: Tensor) -> Tensor:
    x = x.double()
    if isinstance(mlp.inp, nn.Linear):
        x = F.linear(x, mlp.inp.weight.double(), mlp.inp.bias.double())
    for blk in mlp.blocks:
        z = F.layer_norm(x, x.shape[-1:], blk.norm.weight.double(), blk.norm.bias.double(),
                         blk.norm.eps)
        z = F.linear(F.gelu(F.linear(z, blk.fc1.weight.double(), blk.fc1.bias.double())),
                     blk.fc2.weight.double(), blk.fc2.bias.double())
        x = x + z
    if isinstance(mlp.out, nn.Linear):
        x = F.linear(x, mlp.out.weight.double(), mlp.out.bias.double())
    return x


def sinusoid_reference(length: int, d_model: int) -> Tensor:
    pe = np.zeros((length, d_model))
    for p in range(length):
        for i in range(0, d_model, 2):
            angle = p / 10000 ** (i / d_model)
            pe[p, i] = math.sin(angle)
            if i + 1 < d_model:
                pe[p, i + 1] = math.cos(angle)
    return torch.from_numpy(pe)


def codes_reference(length: int, d_model: int) -> Tensor:
    """Row p: a ±1 vector from a generator seeded with 1_000_003 + p."""
    return torch.stack([
        torch.randint(0, 2, (d_model,), generator=torch.Generator().manual_seed(1_000_003 + p))
        for p in range(length)]).double() * 2 - 1


def encoder_reference(encoder: nn.Module, x: Tensor) -> Tensor:
    h = F.linear(x.double().unsqueeze(-1), encoder.lift.weight.double(), encoder.lift.bias.double())
    if encoder.codes is not None:  # (x_p·w + b) ⊙ c_p
        h = h * codes_reference(x.shape[1], h.shape[-1])
    return sequence_block_reference(encoder.block, h).mean(dim=1)


def decoder_reference(decoder: nn.Module, h: Tensor, out_len: int) -> Tensor:
    pe = sinusoid_reference(out_len, h.shape[-1])
    if decoder.modulated:  # h ⊙ c_p + PE_p
        z = h.double().unsqueeze(1) * codes_reference(out_len, h.shape[-1]) + pe
    else:
        z = h.double().unsqueeze(1) + pe
    return sequence_block_reference(decoder.block, z).sum(dim=-1) * decoder.pool_scale


def trunk_reference(trunk: nn.Module, x: Tensor, spec: EnvSpec, identity_dim: int) -> Tensor:
    ctx = context_features(spec, identity_dim).double()
    task = F.linear(ctx, trunk.context.weight.double(), trunk.context.bias.double())
    return residual_mlp_reference(trunk.middle, encoder_reference(trunk.encoder, x) + task)


def actor_reference(model: nn.Module, obs: Tensor, spec: EnvSpec) -> Tensor:
    cfg = model.cfg
    h = trunk_reference(model.actor_trunk, obs, spec, cfg.identity_dim)
    if spec.is_discrete:
        return decoder_reference(model.discrete_decoder, h, spec.action_dim)
    mean = decoder_reference(model.mean_decoder, h, spec.action_dim)
    raw = decoder_reference(model.log_std_decoder, h, spec.action_dim)
    # low + (high - low) * (tanh(r) + 1) / 2  ==  low + (high - low) * sigmoid(2 r)
    # shift so that raw = 0 gives log_std_init; written with a sigmoid (0.5(tanh x + 1) = σ(2x))
    shift = math.atanh(2 * (cfg.log_std_init - cfg.log_std_min)
                       / (cfg.log_std_max - cfg.log_std_min) - 1)
    log_std = cfg.log_std_min + (cfg.log_std_max - cfg.log_std_min) * torch.sigmoid(2 * (raw + shift))
    return torch.cat([mean, log_std], dim=-1)


def value_reference(model: nn.Module, obs: Tensor, spec: EnvSpec) -> Tensor:
    h = trunk_reference(model.critic_trunk, obs, spec, model.cfg.identity_dim)
    return decoder_reference(model.value_decoder, h, 1).squeeze(-1)


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every LayerNorm a random affine map.

    At initialization (weight 1, bias 0) the mean over H of a LayerNorm output is exactly 0, so
    the decoders' outputs would not depend on their input and equality checks against a
    reference would hold trivially. Randomized norms make every output input-dependent.
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
            module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
    return model
