"""Log-probabilities, entropies and samples of the two policy kinds, on raw tensors.

Written out instead of building ``torch.distributions`` objects per call (whose argument
validation and broadcasting cost more than the math at small batch); the tests check every
function against ``torch.distributions``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def categorical_log_prob(logits: Tensor, actions: Tensor) -> Tensor:
    """logits (B, n), integer actions (B,) → (B,)."""
    return F.log_softmax(logits, dim=-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


def categorical_entropy(logits: Tensor) -> Tensor:
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def categorical_sample(logits: Tensor, deterministic: bool = False) -> Tensor:
    if deterministic:
        return logits.argmax(-1)
    return torch.multinomial(F.softmax(logits, dim=-1), 1).squeeze(-1)


def gaussian_log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """Diagonal Gaussian, summed over the action vector: (B, d) → (B,)."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - _HALF_LOG_2PI).sum(-1)


def gaussian_entropy(log_std: Tensor) -> Tensor:
    return (log_std + 0.5 + _HALF_LOG_2PI).sum(-1)


def gaussian_sample(mean: Tensor, log_std: Tensor, deterministic: bool = False) -> Tensor:
    if deterministic:
        return mean
    return mean + torch.randn_like(mean) * torch.exp(log_std)


def bounded_log_std(raw: Tensor, low: float, high: float, center: float | None = None) -> Tensor:
    """Squash an unbounded decoder output into [low, high] (SAC-style tanh rescaling).

    ``center``: the log-std that ``raw = 0`` maps to (default: the midpoint). Decoders start with
    outputs near 0, so this is the initial exploration noise; PPO wants it near log σ = 0 (σ = 1
    in the [-1, 1] action space, as CleanRL's initial log-std), not the midpoint of a wide range.
    """
    shift = 0.0
    if center is not None:
        if not low < center < high:
            raise ValueError(f"center {center} must lie strictly inside ({low}, {high})")
        shift = math.atanh(2.0 * (center - low) / (high - low) - 1.0)
    return low + 0.5 * (high - low) * (torch.tanh(raw + shift) + 1.0)


# Dispatch on the action kind. Continuous "dist inputs" are [mean | log_std] concatenated on the
# last axis, the layout RLlib's TorchDiagGaussian expects.


def split_gaussian(dist_inputs: Tensor) -> tuple[Tensor, Tensor]:
    mean, log_std = dist_inputs.chunk(2, dim=-1)
    return mean, log_std


def log_prob(discrete: bool, dist_inputs: Tensor, actions: Tensor) -> Tensor:
    if discrete:
        return categorical_log_prob(dist_inputs, actions)
    return gaussian_log_prob(*split_gaussian(dist_inputs), actions)


def entropy(discrete: bool, dist_inputs: Tensor) -> Tensor:
    if discrete:
        return categorical_entropy(dist_inputs)
    return gaussian_entropy(split_gaussian(dist_inputs)[1])


def sample(discrete: bool, dist_inputs: Tensor, deterministic: bool = False) -> Tensor:
    if discrete:
        return categorical_sample(dist_inputs, deterministic)
    return gaussian_sample(*split_gaussian(dist_inputs), deterministic)
