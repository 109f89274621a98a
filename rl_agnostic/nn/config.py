"""Typed, validated hyperparameters of every network in `rl_agnostic.nn`.

Defaults are the paper's Appendix B (Table 2b). ``NetworkConfig.cpu()`` is the same network at
d_model 64, the size the CPU-scale experiments use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Embedding = Literal["s4", "bigru"]
Discretization = Literal["bilinear", "zoh"]
S4Init = Literal["legs", "lin"]
DecoderPool = Literal["mean", "scaled_sum"]
DecoderPosition = Literal["additive", "modulated"]
EncoderPosition = Literal["none", "modulated"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "embedding": ("s4", "bigru"),
    "discretization": ("bilinear", "zoh"),
    "s4_init": ("legs", "lin"),
    "decoder_pool": ("mean", "scaled_sum"),
    "decoder_position": ("additive", "modulated"),
    "encoder_position": ("none", "modulated"),
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass(frozen=True)
class NetworkConfig:
    """Hyperparameters of the agnostic network and of the baselines built beside it."""

    d_model: int = 256
    """Hidden width H of every block (paper: 256)."""
    d_state: int | None = None
    """Real state size N of each S4 channel (N/2 complex-conjugate modes); None = d_model."""
    s4_layers: int = 2
    """S4 (or Bi-GRU) embedding layers in each encoder/decoder block."""
    transformer_layers: int = 2
    """TransformerEncoder layers in each block (ignored when ``transformer`` is False)."""
    n_heads: int = 1
    """Attention heads; must divide d_model."""
    dim_feedforward: int | None = None
    """Width of the Transformer feed-forward layer; None = d_model."""
    dropout: float = 0.1
    """Dropout inside S4 and Transformer layers; only applied in training mode."""
    mlp_depth: int = 2
    """Residual blocks in the middle MLP (and in the baselines' MLPs)."""
    mlp_hidden: int | None = None
    """Hidden width inside each residual MLP block; None = d_model."""
    embedding: Embedding = "s4"
    """Dynamic embedding in front of the Transformer: ``s4`` or ``bigru`` (the paper's RNN agent)."""
    transformer: bool = True
    """Ablation switch: keep the TransformerEncoder in every block (paper §4.3)."""
    mid_mlp: bool = True
    """Ablation switch: keep the middle residual MLP (paper §4.3)."""
    shared_encoder: bool = False
    """Share one encoder+middle between actor and critic (the paper keeps them separate)."""
    discretization: Discretization = "bilinear"
    """S4 discretization: ``bilinear`` (paper Eq. 6) or ``zoh``."""
    s4_init: S4Init = "legs"
    """Diagonal HiPPO init: ``legs`` (eigenvalues of the normal part of HiPPO-LegS) or ``lin``."""
    dt_min: float = 1e-3
    """Lower end of the log-uniform init of the learnable S4 step Δ."""
    dt_max: float = 1e-1
    """Upper end of the log-uniform init of the learnable S4 step Δ."""
    log_std_min: float = -5.0
    """Lower bound of the Gaussian policy's state-dependent log standard deviation."""
    log_std_max: float = 2.0
    """Upper bound of the Gaussian policy's state-dependent log standard deviation."""
    log_std_init: float = 0.0
    """Log-std the Gaussian policy starts from (decoder output 0): σ = 1 in the [-1, 1] action
    space, CleanRL's PPO init. The midpoint of [log_std_min, log_std_max] (σ ≈ 0.22) explored too
    little: PPO on Pendulum settled below the random policy's return."""
    exact_log_std_init: bool = True
    """Start the Gaussian policy at exactly ``log_std_init`` for every env, state and action
    dimension: the last layer producing the raw log-std starts at zero (CleanRL's and SB3's
    state-independent log-std start at 0 too). False: that layer's ordinary init, under which
    the start was random — at d_model 32 the agnostic network began at σ ≈ 4 for every env with
    one seed and σ ≈ 0.02 with another (its decoder is shared, so one offset for all envs), and
    the baselines with per-state spreads of ±1 in log σ. Only the initialization differs."""
    identity_dim: int = 16
    """Length of the fixed hashed identity code of an environment in the task context."""
    decoder_pool: DecoderPool = "scaled_sum"
    """How a decoder reduces (B, O, H) to (B, O). ``mean``: the paper's average over H. Its
    output is the mean of a LayerNorm's output, so |output − mean bias| ≤ std of the LayerNorm
    weight (≈ 0.5): logit gaps of ~1 and values of ~±0.5 until that weight has drifted by O(1),
    thousands of Adam steps. ``scaled_sum``: Σ_H / √H, the same layer √H times wider in range and
    √H times faster to move — what lets PPO reach a near-deterministic policy and fit values
    within CPU-scale budgets."""
    decoder_position: DecoderPosition = "modulated"
    """How a decoder marks its O positions. ``additive``: the paper's h + PE_p. Every position then
    sees the same h and differs only by a constant, so at init all outputs move together with the
    state: a policy whose action probabilities barely depend on the observation (std across
    states 0.003 for Acrobot, against 0.1 for an MLP), which never reaches Acrobot's goal to get
    a learning signal (sinusoidal PE hardly differs between positions 0..20 in most channels).
    ``modulated``: h ⊙ c_p + PE_p with c_p a fixed ±1 code per position (`blocks.position_codes`),
    so each output starts as its own, nearly uncorrelated, function of h; no parameters."""

    encoder_position: EncoderPosition = "modulated"
    """How the encoder marks which scalar is which. ``none``: the paper's shared lift x_p·w + b;
    the only order information is what the causal S4 kernel mixes in, so the pooled output
    starts as a near-symmetric function of the observation. ``modulated``: (x_p·w + b) ⊙ c_p
    with the decoder's fixed ±1 codes c_p (`blocks.position_codes`), so the mean over positions
    starts as a random projection of the whole observation plus a per-position offset b ⊙ c_p,
    as an MLP's first layer would; no parameters, any length. LunarLander-v3 alone, 100k env
    steps, cpu preset: training return −34 (none) vs 204 (modulated) at 74k steps, against 178
    for a single-env MLP. Networks saved before this field existed are ``none``
    (`NetworkConfig.from_saved`)."""

    def __post_init__(self) -> None:
        # Table 2b ties every width to d_model (all 256); an unset width follows d_model.
        for name in ("d_state", "dim_feedforward", "mlp_hidden"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.d_model)
        for name in ("d_model", "d_state", "s4_layers", "n_heads", "dim_feedforward",
                     "mlp_hidden", "identity_dim"):
            _check_int(self, name, minimum=1)
        for name in ("transformer_layers", "mlp_depth"):
            _check_int(self, name, minimum=0)
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("transformer", "mid_mlp", "shared_encoder", "exact_log_std_init"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.d_state % 2:
            raise ConfigError(f"d_state must be even (N/2 conjugate pairs), got {self.d_state}")
        if self.embedding == "bigru" and self.d_model % 2:
            raise ConfigError(f"d_model must be even for the bigru embedding, got {self.d_model}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.dt_min < self.dt_max:
            raise ConfigError(f"need 0 < dt_min < dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if not self.log_std_min < self.log_std_init < self.log_std_max:
            raise ConfigError(
                f"need log_std_min ({self.log_std_min}) < log_std_init ({self.log_std_init}) < "
                f"log_std_max ({self.log_std_max})"
            )

    @classmethod
    def paper(cls, **overrides: Any) -> NetworkConfig:
        """The paper's Appendix B network (d_model 256)."""
        return cls.from_dict(overrides)

    @classmethod
    def cpu(cls, **overrides: Any) -> NetworkConfig:
        """The paper's network at d_model 64: same layer counts, every width 64."""
        return cls.from_dict({"d_model": 64, **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NetworkConfig:
        """Build from a plain mapping (e.g. a YAML section); unknown keys raise ConfigError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown network config keys: {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> NetworkConfig:
        """A network config read back from a checkpoint or policy file: fields added after it was
        written take the value that reproduces the saved network, not today's default."""
        return cls.from_dict({**_BEFORE_FIELD_EXISTED, **values})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> NetworkConfig:
        return dataclasses.replace(self, **changes)


# Fields that change what the same weights compute (no parameter shape depends on them).
FUNCTION_FIELDS = ("encoder_position", "decoder_position", "decoder_pool", "discretization",
                   "log_std_min", "log_std_max", "log_std_init")

# The value that reproduces networks saved before the field was added.
_BEFORE_FIELD_EXISTED: dict[str, Any] = {"encoder_position": "none", "exact_log_std_init": False}


def _check_int(cfg: NetworkConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
