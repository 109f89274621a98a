"""Baselines: Single-Env, Multi-Env Specific and padded agents, and the factory."""

from __future__ import annotations

import pytest
import torch

from rl_agnostic.nn import (
    KINDS,
    ActorCritic,
    AgnosticActorCritic,
    EnvSpec,
    NetworkConfig,
    build_actor_critic,
)
from rl_agnostic.nn import distributions as D
from rl_agnostic.nn.baselines import (
    PaddedActorCritic,
    SingleEnvActorCritic,
    SpecificActorCritic,
    module_key,
)

CFG = NetworkConfig(d_model=16, dropout=0.0, log_std_min=-4.0, log_std_max=1.0)
CARTPOLE = EnvSpec("CartPole-v1", 4, "discrete", 2)
ACROBOT = EnvSpec("Acrobot-v1", 6, "discrete", 3)
HUMANOID = EnvSpec("Humanoid-v4", 376, "continuous", 17, (-0.4,) * 17, (0.4,) * 17)
HOPPER = EnvSpec("Hopper-v4", 11, "continuous", 3, (-1.0,) * 3, (1.0,) * 3)
ALL = [CARTPOLE, ACROBOT, HUMANOID, HOPPER]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def many_specs(k: int) -> list[EnvSpec]:
    return [
        EnvSpec(f"Env{i}.v{i}", 3 + i, "discrete", 2 + i % 4) if i % 2 else
        EnvSpec(f"Env{i}-v0", 5 + 2 * i, "continuous", 1 + i % 5, (-1.0,) * (1 + i % 5),
                (1.0,) * (1 + i % 5))
        for i in range(k)
    ]


def build(kind: str, specs=ALL) -> ActorCritic:
    torch.manual_seed(0)
    return build_actor_critic(kind, CFG, specs[:1] if kind == "single" else specs)


def check_outputs(model: ActorCritic, spec: EnvSpec, batch: int = 5) -> torch.Tensor:
    obs = torch.randn(batch, spec.obs_dim) * 10
    dist, value = model.actor_critic(obs, spec)
    assert value.shape == (batch,) and torch.isfinite(value).all()
    if spec.is_discrete:
        assert dist.shape == (batch, spec.action_dim)
    else:
        assert dist.shape == (batch, 2 * spec.action_dim)
        _, log_std = D.split_gaussian(dist)
        assert log_std.min() >= CFG.log_std_min and log_std.max() <= CFG.log_std_max
    assert torch.isfinite(dist).all()
    assert dist[:, : spec.action_dim].std(0).max() > 0  # depends on the observation
    return dist


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.env_id)
def test_single_env_outputs(spec):
    check_outputs(build_actor_critic("single", CFG, [spec]), spec)


@pytest.mark.parametrize("kind", ["specific", "padded", "agnostic"])
def test_multi_env_outputs(kind):
    model = build(kind)
    for spec in ALL:
        check_outputs(model, spec)


def test_single_env_rejects_a_second_env():
    model = SingleEnvActorCritic(CFG, CARTPOLE)
    model.add_env(CARTPOLE)  # the same env again is fine
    with pytest.raises(ValueError, match="Acrobot-v1"):
        model.add_env(ACROBOT)
    with pytest.raises((KeyError, ValueError), match="Acrobot-v1"):
        model.actor(torch.randn(2, ACROBOT.obs_dim), ACROBOT)


def test_single_env_is_a_residual_mlp_of_the_configured_size():
    cfg = NetworkConfig(d_model=16, mlp_hidden=24, mlp_depth=3)
    model = SingleEnvActorCritic(cfg, HOPPER)
    h, hid = 16, 24
    block = 2 * h + (h * hid + hid) + (hid * h + h)
    body = (HOPPER.obs_dim * h + h) + 3 * block
    assert n_params(model.policy_net) == body + (h * 6 + 6)  # 3 means + 3 raw log-stds
    assert n_params(model.critic_net) == body + (h + 1)


def test_specific_parameter_count_grows_with_envs():
    counts = [n_params(SpecificActorCritic(CFG, many_specs(k))) for k in (1, 8, 16)]
    assert counts[0] < counts[1] < counts[2]
    assert SpecificActorCritic.adds_layers_per_env


def test_specific_add_env_adds_encoder_and_decoder_layers_only():
    model = SpecificActorCritic(CFG, [CARTPOLE])
    shared_before = {n: p.clone() for n, p in model.named_parameters()}
    before = n_params(model)
    model.add_env(HOPPER)
    h, hid, depth = CFG.d_model, CFG.mlp_hidden, CFG.mlp_depth
    block = 2 * h + (h * hid + hid) + (hid * h + h)
    enc = (HOPPER.obs_dim * h + h) + depth * block
    added = 2 * enc + (depth * block + h * 6 + 6) + (depth * block + h + 1)
    assert n_params(model) - before == added
    # registering again adds nothing; existing parameters are untouched
    model.add_env(HOPPER)
    assert n_params(model) - before == added
    for name, p in model.named_parameters():
        if name in shared_before:
            assert torch.equal(p, shared_before[name])
    check_outputs(model, HOPPER)


def test_specific_env_ids_with_dots_and_slashes():
    specs = [EnvSpec("ALE/Pong.v5", 8, "discrete", 6), EnvSpec("ALE/Pong-v5", 8, "discrete", 6),
             EnvSpec("envpool:Ant.v4", 27, "continuous", 8, (-1.0,) * 8, (1.0,) * 8)]
    model = SpecificActorCritic(CFG, specs)
    assert len({module_key(s.env_id) for s in specs}) == 3
    assert module_key("a.b") != module_key("a%2Eb")
    for spec in specs:
        check_outputs(model, spec)
    # the state dict round-trips into a fresh model built with the same envs
    clone = SpecificActorCritic(CFG, specs)
    clone.load_state_dict(model.state_dict())
    obs = torch.randn(3, 8)
    torch.testing.assert_close(clone.actor(obs, specs[0]), model.actor(obs, specs[0]))


def test_specific_unregistered_env_is_named():
    model = SpecificActorCritic(CFG, [CARTPOLE])
    with pytest.raises((KeyError, ValueError), match="Acrobot-v1"):
        model.actor(torch.randn(2, ACROBOT.obs_dim), ACROBOT)
    with pytest.raises((KeyError, ValueError), match="Acrobot-v1"):
        model.value(torch.randn(2, ACROBOT.obs_dim), ACROBOT)


def test_specific_envs_do_not_share_encoders():
    model = SpecificActorCritic(CFG, [CARTPOLE, EnvSpec("CartPole-v0", 4, "discrete", 2)])
    obs = torch.randn(4, 4)
    with torch.no_grad():
        assert not torch.allclose(model.actor(obs, CARTPOLE),
                                  model.actor(obs, EnvSpec("CartPole-v0", 4, "discrete", 2)))


@pytest.mark.parametrize("kind", ["single", "specific", "padded"])
def test_baseline_policies_start_at_exactly_log_std_init(kind):
    """The log-std rows of the last layer start at zero (exact_log_std_init); an env added
    later (transfer) starts there too. The means still depend on the observation."""
    model = build(kind, [HOPPER, CARTPOLE] if kind != "single" else [HOPPER])
    if kind == "specific":
        model.add_env(HUMANOID)
    for spec in [HOPPER] + ([HUMANOID] if kind == "specific" else []):
        dist = check_outputs(model, spec)
        _, log_std = D.split_gaussian(dist)
        torch.testing.assert_close(log_std, torch.full_like(log_std, CFG.log_std_init))
    torch.manual_seed(0)
    ordinary = build_actor_critic(kind, CFG.replace(exact_log_std_init=False), [HOPPER])
    _, log_std = D.split_gaussian(ordinary.actor(torch.randn(5, HOPPER.obs_dim), HOPPER))
    assert (log_std - CFG.log_std_init).abs().max() > 0.05


def test_padded_masks_outputs_to_the_env_action_count():
    model = PaddedActorCritic(CFG, ALL)
    assert model.max_obs_dim == 376 and model.max_discrete == 3 and model.max_continuous == 17
    obs = torch.randn(3, CARTPOLE.obs_dim)
    logits = model.actor(obs, CARTPOLE)
    assert logits.shape == (3, 2)
    full = model.discrete_head(model.policy_body(model._inputs(obs, CARTPOLE)))
    assert full.shape == (3, 3)
    torch.testing.assert_close(logits, full[:, :2])
    # Gaussian: the env's d means and the matching d log-stds of the 2·max_d head
    obs = torch.randn(3, HOPPER.obs_dim)
    dist = model.actor(obs, HOPPER)
    raw = model.gaussian_head(model.policy_body(model._inputs(obs, HOPPER)))
    torch.testing.assert_close(dist[:, :3], raw[:, :3])
    torch.testing.assert_close(dist[:, 3:], D.bounded_log_std(raw[:, 17:20], -4.0, 1.0, CFG.log_std_init))


def test_padded_inputs_are_zero_padded_and_carry_the_context():
    model = PaddedActorCritic(CFG, [CARTPOLE, HOPPER])
    obs = torch.randn(2, 4)
    x = model._inputs(obs, CARTPOLE)
    assert x.shape == (2, 11 + CFG.identity_dim + 5)
    torch.testing.assert_close(x[:, :4], obs)
    assert torch.all(x[:, 4:11] == 0)
    # different envs with the same observation get different inputs through the context
    other = EnvSpec("MountainCar-v0", 4, "discrete", 2)
    model2 = PaddedActorCritic(CFG, [CARTPOLE, other])
    assert not torch.equal(model2._inputs(obs, CARTPOLE), model2._inputs(obs, other))


def test_padded_rejects_envs_larger_than_built():
    model = PaddedActorCritic(CFG, [CARTPOLE, HOPPER])
    model.add_env(EnvSpec("Small-v0", 3, "continuous", 2, (-1.0,) * 2, (1.0,) * 2))
    for too_big in (HUMANOID, ACROBOT, EnvSpec("Wide-v0", 12, "discrete", 2)):
        with pytest.raises(ValueError, match="[Rr]ebuild"):
            model.add_env(too_big)
    only_continuous = PaddedActorCritic(CFG, [HOPPER])
    with pytest.raises(ValueError, match="CartPole-v1"):
        only_continuous.add_env(CARTPOLE)
    with pytest.raises(ValueError):
        PaddedActorCritic(CFG, [])


@pytest.mark.parametrize("kind", KINDS)
def test_critic_parameters_are_named_critic_or_value(kind):
    """value() only touches parameters named critic*/value*, actor() only the others."""
    model = build(kind)
    for spec in (ALL[:1] if kind == "single" else ALL):
        obs = torch.randn(4, spec.obs_dim)
        model.zero_grad(set_to_none=True)
        model.value(obs, spec).sum().backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                assert name.startswith(("critic", "value")), f"value() reached {name}"
        model.zero_grad(set_to_none=True)
        model.actor(obs, spec).sum().backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                assert not name.startswith(("critic", "value")), f"actor() reached {name}"


def test_factory_builds_every_kind():
    expected = {"agnostic": AgnosticActorCritic, "specific": SpecificActorCritic,
                "padded": PaddedActorCritic, "single": SingleEnvActorCritic}
    assert set(KINDS) == set(expected)
    for kind, cls in expected.items():
        model = build(kind)
        assert type(model) is cls and model.kind == kind
        assert set(model.specs) == ({CARTPOLE.env_id} if kind == "single" else
                                    {s.env_id for s in ALL})


def test_factory_errors():
    with pytest.raises(ValueError) as err:
        build_actor_critic("transformer", CFG, ALL)
    for kind in KINDS:
        assert kind in str(err.value)
    with pytest.raises(ValueError, match="single"):
        build_actor_critic("single", CFG, ALL)
    with pytest.raises(ValueError, match="single"):
        build_actor_critic("single", CFG, [])


@pytest.mark.parametrize("kind", ["specific", "padded", "single"])
def test_rollout_under_inference_mode_then_training_step(kind):
    model = build(kind)
    obs = torch.randn(4, CARTPOLE.obs_dim)
    with torch.inference_mode():
        model.actor_critic(obs, CARTPOLE)
    dist, value = model.actor_critic(obs, CARTPOLE)
    (dist.sum() + value.sum()).backward()


@pytest.mark.parametrize("kind", ["specific", "padded", "single"])
def test_baseline_learns_a_fixed_target(kind):
    """A few Adam steps reduce a supervised loss on both heads (the outputs are trainable)."""
    model = build(kind)
    spec = HOPPER if kind != "single" else CARTPOLE
    obs = torch.randn(32, spec.obs_dim)
    target = torch.randn(32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        dist, value = model.actor_critic(obs, spec)
        loss = (value - target).square().mean() + (dist[:, 0] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
