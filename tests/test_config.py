"""NetworkConfig: the paper's Appendix B defaults, the CPU preset and validation messages."""

from __future__ import annotations

import pytest

from rl_agnostic.nn import ConfigError, NetworkConfig


def test_paper_defaults_match_appendix_b():
    cfg = NetworkConfig.paper()
    assert cfg == NetworkConfig()
    assert cfg.d_model == 256
    assert cfg.d_state == 256
    assert cfg.dim_feedforward == 256
    assert cfg.n_heads == 1
    assert cfg.transformer_layers == 2
    assert cfg.s4_layers == 2
    assert cfg.mlp_depth == 2
    assert cfg.mlp_hidden == 256
    assert cfg.dropout == pytest.approx(0.1)
    assert cfg.embedding == "s4"
    assert cfg.transformer and cfg.mid_mlp and not cfg.shared_encoder


def test_cpu_preset_is_d_model_64_with_every_width_64():
    cfg = NetworkConfig.cpu()
    assert cfg.d_model == 64
    assert (cfg.d_state, cfg.dim_feedforward, cfg.mlp_hidden) == (64, 64, 64)
    # same layer counts as the paper network
    paper = NetworkConfig.paper()
    for name in ("s4_layers", "transformer_layers", "n_heads", "mlp_depth", "dropout"):
        assert getattr(cfg, name) == getattr(paper, name)
    assert NetworkConfig.cpu(dropout=0.0).dropout == 0.0


def test_explicit_widths_are_kept():
    cfg = NetworkConfig(d_model=32, d_state=8, dim_feedforward=48, mlp_hidden=24)
    assert (cfg.d_state, cfg.dim_feedforward, cfg.mlp_hidden) == (8, 48, 24)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"d_model": -1}, "d_model"),
        ({"d_model": 0}, "d_model"),
        ({"s4_layers": 0}, "s4_layers"),
        ({"embedding": "lstm"}, "embedding"),
        ({"dropout": 1.5}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"d_model": 16, "n_heads": 3}, "n_heads"),
        ({"d_model": 16, "d_state": 15}, "d_state"),
        ({"discretization": "euler"}, "discretization"),
        ({"s4_init": "fourier"}, "s4_init"),
        ({"transformer": "yes"}, "transformer"),
        ({"d_model": 16.0}, "d_model"),
        ({"mlp_depth": -1}, "mlp_depth"),
        ({"dt_min": 0.5, "dt_max": 0.1}, "dt_min"),
        ({"log_std_min": 1.0, "log_std_max": 0.0}, "log_std_min"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_field(values, field):
    with pytest.raises(ConfigError, match=field):
        NetworkConfig(**values)
    with pytest.raises(ConfigError, match=field):
        NetworkConfig.from_dict(values)


def test_unknown_key_in_from_dict_is_named():
    with pytest.raises(ConfigError, match="lstm_layers"):
        NetworkConfig.from_dict({"d_model": 32, "lstm_layers": 2})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_dict_round_trip_and_replace():
    cfg = NetworkConfig(d_model=32, n_heads=2, embedding="bigru", discretization="zoh")
    assert NetworkConfig.from_dict(cfg.to_dict()) == cfg
    smaller = cfg.replace(d_model=16, d_state=16, dim_feedforward=16, mlp_hidden=16)
    assert smaller.d_model == 16 and smaller.embedding == "bigru"
    with pytest.raises(ConfigError, match="n_heads"):
        cfg.replace(n_heads=5)


def test_encoder_position_is_validated():
    with pytest.raises(ConfigError, match="encoder_position"):
        NetworkConfig(encoder_position="sinusoidal")


def test_saved_config_without_a_later_field_keeps_the_network_it_was_saved_with():
    """A policy file written before `encoder_position` existed holds a network without encoder
    codes: reading it back must not switch to today's default."""
    saved = NetworkConfig(d_model=16, encoder_position="none").to_dict()
    del saved["encoder_position"]
    assert NetworkConfig.from_saved(saved).encoder_position == "none"
    assert NetworkConfig.from_dict(saved).encoder_position == "modulated"
    # a run saved before `exact_log_std_init` existed started from the ordinary init
    del saved["exact_log_std_init"]
    assert NetworkConfig.from_saved(saved).exact_log_std_init is False
    current = NetworkConfig(d_model=16).to_dict()
    assert NetworkConfig.from_saved(current) == NetworkConfig.from_dict(current)
