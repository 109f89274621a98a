r"""The agnostic network's building blocks (paper §3.1, Fig. 1a).

Shapes: B batch, I input length, O output length, H = d_model.

    Encoder   (B, I) ─lift→ (B, I, H) ─embedding stack→ ─Transformer stack→ ─mean over I→ (B, H)
    Decoder   (B, H) ─repeat O×, mark positions (h ⊙ c_p + PE_p, or the paper's h + PE_p)→ (B, O, H) ─embedding stack→ ─Transformer→
              ─pool over H→ (B, O)   (mean, or Σ/√H: NetworkConfig.decoder_pool)
    Middle    (B, H) + context (B|1, H) ─residual MLP→ (B, H)

Every scalar of the observation is one sequence position; the lift is one shared Linear(1, H), so
no parameter depends on I or O. The embedding stack is S4 (default) or Bi-GRU (the paper's RNN
agent).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from rl_agnostic.nn.config import NetworkConfig
from rl_agnostic.nn.dropout import (
    add_dropout_layernorm,
    fuses_bias,
    gelu_dropout,
    linear_leaving_bias,
)
from rl_agnostic.nn.s4 import S4Layer
from rl_agnostic.nn.transformer import TransformerLayer


class BiGRULayer(nn.Module):
    """Bidirectional GRU (H/2 per direction) with residual add and post-LayerNorm."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.gru = nn.GRU(d_model, d_model // 2, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.gru(x)
        return add_dropout_layernorm(x, y, self.norm, self.dropout, self.training)


class SequenceBlock(nn.Module):
    """Embedding stack (S4 or Bi-GRU) followed by an optional Transformer stack, (B, L, H) → same."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        if cfg.embedding == "s4":
            emb = [
                S4Layer(cfg.d_model, cfg.d_state, cfg.dropout, cfg.discretization, cfg.s4_init,
                        cfg.dt_min, cfg.dt_max)
                for _ in range(cfg.s4_layers)
            ]
        else:
            emb = [BiGRULayer(cfg.d_model, cfg.dropout) for _ in range(cfg.s4_layers)]
        layers = [TransformerLayer(cfg.d_model, cfg.n_heads, cfg.dim_feedforward, cfg.dropout)
                  for _ in range(cfg.transformer_layers if cfg.transformer else 0)]
        self.layers = nn.Sequential(*emb, *layers)
        self.causal_embedding = cfg.embedding == "s4"

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """``valid`` (B, L) bool marks the real positions of sequences padded at the end. The
        real positions' outputs are those of the unpadded sequences: the S4 convolution is
        causal (a position sees only earlier ones) and attention ignores padded keys."""
        if valid is None:
            return self.layers(x)
        if not self.causal_embedding:
            raise ValueError("padded sequences need the causal S4 embedding (a bidirectional "
                             "GRU reads the padding)")
        for layer in self.layers:
            x = layer(x, valid) if isinstance(layer, TransformerLayer) else layer(x)
        return x


def padding_mask(lengths: Tensor, length: int) -> Tensor:
    """(B, length) bool: position p of row b is real, p < lengths[b]."""
    return torch.arange(length, device=lengths.device) < lengths.unsqueeze(-1)


def position_codes(length: int, d_model: int, device: torch.device) -> Tensor:
    """Row p: a fixed ±1 vector drawn from a generator seeded with p — the same in every process,
    and nearly orthogonal for different p, whatever the length."""
    rows = []
    for p in range(length):
        g = torch.Generator().manual_seed(1_000_003 + p)
        rows.append(torch.randint(0, 2, (d_model,), generator=g, dtype=torch.float32) * 2 - 1)
    return torch.stack(rows).to(device)


class PerLength:
    """A fixed (length, H) tensor — ``build(length, d_model, device)`` — cached per (length,
    device). Built as a normal tensor even when first asked for while acting under
    inference_mode, since training forwards use it too."""

    def __init__(self, build: Callable[[int, int, torch.device], Tensor], d_model: int) -> None:
        self.build, self.d_model = build, d_model
        self._cache: dict[tuple[int, torch.device], Tensor] = {}

    def __call__(self, length: int, device: torch.device) -> Tensor:
        key = (length, device)
        if key not in self._cache:
            with torch.inference_mode(False):
                self._cache[key] = self.build(length, self.d_model, device)
        return self._cache[key]


class Encoder(nn.Module):
    """(B, I) → (B, H) for any I ≥ 1."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.lift = nn.Linear(1, cfg.d_model)
        self.block = SequenceBlock(cfg)
        self.codes = (PerLength(position_codes, cfg.d_model)
                      if cfg.encoder_position == "modulated" else None)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``lengths`` (B,): row b is a sequence of lengths[b] values padded at the end to I;
        its output is that of the unpadded sequence. None: every row is I long."""
        if x.dim() != 2 or x.shape[1] < 1:
            raise ValueError(f"encoder input must be (batch, length>=1), got {tuple(x.shape)}")
        w, b = self.lift.weight.view(-1), self.lift.bias
        if self.codes is not None:  # (x·w + b) ⊙ c = x·(w ⊙ c) + b ⊙ c: (I, H) products
            codes = self.codes(x.shape[1], x.device)
            w, b = w * codes, b * codes
        # One op writes the (B, I, H) lift; its backward reads the incoming gradient twice
        # (three separate ops wrote it three times and read it four times).
        h = torch.addcmul(b, x.unsqueeze(-1), w)
        if lengths is None:
            return self.block(h).mean(dim=1)
        valid = padding_mask(lengths, x.shape[1])
        h = self.block(h, valid) * valid.unsqueeze(-1)
        return h.sum(dim=1) / lengths.unsqueeze(-1).to(h.dtype)


def sinusoidal_encoding(length: int, d_model: int, device: torch.device) -> Tensor:
    """PE[p, 2i] = sin(p / 10000^(2i/H)), PE[p, 2i+1] = cos(·) — (length, H)."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : d_model // 2]
    return pe


class Decoder(nn.Module):
    """(B, H), O → (B, O) for any O ≥ 1."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.block = SequenceBlock(cfg)
        self.pool_scale = 1.0 / (cfg.d_model if cfg.decoder_pool == "mean" else cfg.d_model ** 0.5)
        self.modulated = cfg.decoder_position == "modulated"
        self.codes = PerLength(position_codes, cfg.d_model)
        self.positional = PerLength(sinusoidal_encoding, cfg.d_model)
        # The output is the mean over H of a LayerNorm's output: with the default weight 1 that
        # is exactly the mean bias, for every input, and no gradient reaches any earlier layer
        # until the weight has moved. A spread-out weight makes the decoder start as a function
        # of its input, with outputs of std ~0.5/sqrt(H) (small logits, values near 0).
        nn.init.normal_(self.final_norm.weight, 1.0, 0.5)

    @property
    def final_norm(self) -> nn.LayerNorm:
        """The block's last LayerNorm, whose output the decoder pools."""
        return [m for m in self.block.modules() if isinstance(m, nn.LayerNorm)][-1]

    def start_at_zero_(self) -> Decoder:
        """Output exactly 0 for every input until trained: the final LayerNorm's weight and bias
        start at 0. Their gradients (normalized features, 1) are not zero, so the first step
        moves them, and the rest of the decoder learns from the second step on."""
        nn.init.zeros_(self.final_norm.weight)
        nn.init.zeros_(self.final_norm.bias)
        return self

    def forward(self, h: Tensor, out_len: int, lengths: Tensor | None = None) -> Tensor:
        """``lengths`` (B,): row b needs only its first lengths[b] ≤ out_len outputs, which are
        those of ``forward(h[b], lengths[b])``; the rest of the row is padding."""
        if out_len < 1:
            raise ValueError(f"decoder output length must be >= 1, got {out_len}")
        pe = self.positional(out_len, h.device)
        h = h.unsqueeze(1)
        z = torch.addcmul(pe, h, self.codes(out_len, h.device)) if self.modulated else h + pe
        valid = None if lengths is None else padding_mask(lengths, out_len)
        return self.block(z, valid).sum(dim=-1) * self.pool_scale


class ResidualBlock(nn.Module):
    """x + W₂ GELU(W₁ LayerNorm(x))."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        # With the compiled kernels, fc1's bias is added by the GELU kernel (see dropout.py).
        u, u_bias = linear_leaving_bias(self.fc1, self.norm(x), fuses_bias(x, 0.0))
        return x + self.fc2(gelu_dropout(u, 0.0, self.training, bias=u_bias))


class ResidualMLP(nn.Module):
    """Linear(in→H) (identity when in is None), ``depth`` residual blocks, Linear(H→out) when
    out is not None. The middle of the agnostic network and the body of every baseline."""

    def __init__(self, d_model: int, hidden: int, depth: int,
                 in_dim: int | None = None, out_dim: int | None = None) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, d_model) if in_dim is not None else nn.Identity()
        self.blocks = nn.Sequential(*(ResidualBlock(d_model, hidden) for _ in range(depth)))
        self.out = nn.Linear(d_model, out_dim) if out_dim is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.blocks(self.inp(x)))
