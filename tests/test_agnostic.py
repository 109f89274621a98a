"""The shape-agnostic actor-critic and Q networks: any observation length and action count."""

from __future__ import annotations

import pytest
import torch

from _reference import randomize_norms
from rl_agnostic.nn import AgnosticActorCritic, AgnosticQ, AgnosticTwinQ, EnvSpec, NetworkConfig
from rl_agnostic.nn import distributions as D

CFG = NetworkConfig(d_model=16, dropout=0.0)
CARTPOLE = EnvSpec("CartPole-v1", 4, "discrete", 2)
HUMANOID = EnvSpec("Humanoid-v4", 376, "continuous", 17, (-0.4,) * 17, (0.4,) * 17)
HOPPER = EnvSpec("Hopper-v4", 11, "continuous", 3, (-1.0,) * 3, (1.0,) * 3)


def discrete(obs_dim: int, n: int) -> EnvSpec:
    return EnvSpec(f"D{obs_dim}x{n}-v0", obs_dim, "discrete", n)


def continuous(obs_dim: int, d: int, bound: float = 1.0) -> EnvSpec:
    return EnvSpec(f"C{obs_dim}x{d}-v0", obs_dim, "continuous", d, (-bound,) * d, (bound,) * d)


SHAPES = [  # (obs length, action count) pairs covering 1..400 and 1..32
    (1, 2), (1, 1), (2, 7), (5, 32), (33, 3), (64, 17), (129, 5), (400, 32), (400, 1),
]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_norms(AgnosticActorCritic(CFG)).eval()


@pytest.mark.parametrize(("obs_dim", "n"), SHAPES)
def test_one_network_handles_any_shape(model, obs_dim, n):
    specs = [continuous(obs_dim, n)]
    if n >= 2:
        specs.append(discrete(obs_dim, n))
    obs = torch.randn(3, obs_dim)
    for spec in specs:
        with torch.no_grad():
            dist, value = model.actor(obs, spec), model.value(obs, spec)
        width = n if spec.is_discrete else 2 * n
        assert dist.shape == (3, width) and value.shape == (3,)
        assert torch.isfinite(dist).all() and torch.isfinite(value).all()
        actions = model.sample(spec, dist)
        assert actions.shape == ((3,) if spec.is_discrete else (3, n))
        assert model.log_prob(spec, dist, actions).shape == (3,)
        assert model.entropy(spec, dist).shape == (3,)


def test_outputs_are_per_sample(model):
    """Batch rows do not interact (the mean pooling and attention run within a sample)."""
    obs = torch.randn(4, HOPPER.obs_dim)
    with torch.no_grad():
        full = model.actor(obs, HOPPER)
        rows = torch.cat([model.actor(obs[i : i + 1], HOPPER) for i in range(4)])
    torch.testing.assert_close(full, rows, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bounds", [(-5.0, 2.0), (-3.0, 0.5)])
def test_log_std_is_bounded_even_for_huge_inputs(bounds):
    cfg = CFG.replace(log_std_min=bounds[0], log_std_max=bounds[1])
    torch.manual_seed(1)
    net = randomize_norms(AgnosticActorCritic(cfg)).eval()
    for spec in (HOPPER, HUMANOID):
        obs = torch.randn(8, spec.obs_dim) * torch.logspace(0, 8, 8).unsqueeze(1)
        with torch.no_grad():
            dist = net.actor(obs, spec)
        mean, log_std = D.split_gaussian(dist)
        assert torch.isfinite(mean).all()
        assert log_std.min() >= bounds[0] and log_std.max() <= bounds[1]
        assert log_std.std() > 0  # state-dependent, not a constant


def test_policy_and_value_depend_on_observation_at_init():
    """A freshly built network must not map every observation to the same output."""
    torch.manual_seed(0)
    net = AgnosticActorCritic(CFG).eval()
    for spec in (CARTPOLE, HOPPER):
        obs = torch.randn(16, spec.obs_dim)
        with torch.no_grad():
            dist, value = net.actor(obs, spec), net.value(obs, spec)
        assert dist[:, : spec.action_dim].std(0).max() > 1e-4, f"{spec.env_id} policy is constant"
        assert value.std() > 1e-4, f"{spec.env_id} value is constant"


def ppo_loss(net: AgnosticActorCritic, spec: EnvSpec, gen: torch.Generator) -> torch.Tensor:
    obs = torch.randn(32, spec.obs_dim, generator=gen)
    dist, value = net.actor_critic(obs, spec)
    with torch.no_grad():
        actions = net.sample(spec, dist)
    logp = net.log_prob(spec, dist, actions)
    old_logp = logp.detach() + 0.3 * torch.randn(32, generator=gen)
    advantages = torch.randn(32, generator=gen)
    returns = torch.randn(32, generator=gen)
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
    return (-surrogate.mean() + 0.5 * (value - returns).square().mean()
            - 0.01 * net.entropy(spec, dist).mean())


def _ppo_backward(randomized: bool) -> AgnosticActorCritic:
    torch.manual_seed(0)
    net = AgnosticActorCritic(CFG, [CARTPOLE, HOPPER]).train()
    if randomized:
        randomize_norms(net)
    gen = torch.Generator().manual_seed(0)
    (ppo_loss(net, CARTPOLE, gen) + ppo_loss(net, HOPPER, gen)).backward()
    return net


def test_ppo_loss_gradients_reach_every_parameter():
    """With one discrete and one continuous env every decoder is used, so every parameter gets
    a finite, nonzero gradient."""
    net = _ppo_backward(randomized=True)
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().max() > 0, f"{name} has an all-zero gradient"


# Parameters upstream of every decoder's last layer: their gradient is the learning signal
# that shapes the features. For an O(1) loss it is ~1e-2 once the network is off its init.
UPSTREAM = (
    "actor_trunk.encoder.lift.weight",
    "actor_trunk.middle.blocks.0.fc1.weight",
    "critic_trunk.encoder.lift.weight",
    "critic_trunk.context.weight",
    "discrete_decoder.block.layers.0.output_linear.weight",
    "mean_decoder.block.layers.0.output_linear.weight",
    "log_std_decoder.block.layers.0.output_linear.weight",
    "value_decoder.block.layers.0.output_linear.weight",
)


@pytest.mark.parametrize("randomized", [False, True], ids=["at_init", "randomized_norms"])
def test_ppo_gradients_reach_upstream_layers(randomized):
    """The first PPO step must train the encoders and decoders, not only each decoder's final
    LayerNorm: upstream gradients must exceed float round-off (1e-5 for an O(1) loss)."""
    net = _ppo_backward(randomized)
    grads = dict(net.named_parameters())
    # At init the log-std decoder outputs exactly 0 (exact_log_std_init): only its final
    # LayerNorm learns in the first step (test_policy_starts_at_exactly_log_std_init).
    upstream = [n for n in UPSTREAM if randomized or not n.startswith("log_std_decoder")]
    tiny = {n: f"{grads[n].grad.norm():.1e}" for n in upstream if grads[n].grad.norm() <= 1e-5}
    assert not tiny, f"round-off-sized gradients: {tiny}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_starts_at_exactly_log_std_init(seed):
    """Every env, state and action dimension starts at log_std_init (the decoder is shared, so
    an init offset would be the same wrong σ for every env); the first step moves the log-std
    decoder's final LayerNorm, after which the whole decoder learns."""
    cfg = CFG.replace(log_std_init=-0.5)
    torch.manual_seed(seed)
    net = AgnosticActorCritic(cfg, [CARTPOLE, HOPPER, HUMANOID]).train()
    for spec in (HOPPER, HUMANOID):
        _, log_std = D.split_gaussian(net.actor(torch.randn(16, spec.obs_dim) * 3, spec))
        torch.testing.assert_close(log_std, torch.full_like(log_std, -0.5))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    ppo_loss(net, HOPPER, gen).backward()
    assert net.log_std_decoder.final_norm.weight.grad.abs().max() > 0
    opt.step()
    opt.zero_grad()
    ppo_loss(net, HOPPER, gen).backward()
    upstream = net.log_std_decoder.block.layers[0].output_linear.weight.grad
    assert upstream.abs().max() > 1e-6
    # the ordinary init starts each seed somewhere else, the same for every state
    torch.manual_seed(seed)
    spread = AgnosticActorCritic(cfg.replace(exact_log_std_init=False), [HOPPER]).eval()
    with torch.no_grad():
        _, log_std = D.split_gaussian(spread.actor(torch.randn(16, HOPPER.obs_dim), HOPPER))
    assert (log_std + 0.5).abs().max() > 0.05


def test_rollout_under_inference_mode_then_training_step():
    """Acting under torch.inference_mode() (the cheapest rollout mode) must not break a later
    training forward/backward on the same environment."""
    torch.manual_seed(0)
    net = AgnosticActorCritic(CFG, [CARTPOLE])
    obs = torch.randn(4, CARTPOLE.obs_dim)
    with torch.inference_mode():
        net.actor_critic(obs, CARTPOLE)
    dist, value = net.actor_critic(obs, CARTPOLE)
    (dist.sum() + value.sum()).backward()
    assert net.actor_trunk.context.weight.grad is not None


def test_seeded_construction_is_deterministic():
    outs, states = [], []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        net = AgnosticActorCritic(CFG).eval()
        randomize_norms(net, seed=seed)
        obs = torch.randn(5, HOPPER.obs_dim, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            outs.append(torch.cat([net.actor(obs, HOPPER), net.value(obs, HOPPER)[:, None]], -1))
        states.append(net.state_dict())
    assert torch.equal(outs[0], outs[1])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert not torch.allclose(outs[0], outs[2])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_shared_encoder():
    torch.manual_seed(0)
    shared = randomize_norms(AgnosticActorCritic(CFG.replace(shared_encoder=True))).eval()
    separate = AgnosticActorCritic(CFG)
    assert shared.critic_trunk.encoder is shared.actor_trunk.encoder
    assert separate.critic_trunk.encoder is not separate.actor_trunk.encoder
    assert n_params(separate) - n_params(shared) == n_params(separate.critic_trunk.encoder)
    for spec in (CARTPOLE, HUMANOID):
        obs = torch.randn(4, spec.obs_dim)
        with torch.no_grad():
            dist, value = shared.actor_critic(obs, spec)
            torch.testing.assert_close(dist, shared.actor(obs, spec))
            torch.testing.assert_close(value, shared.value(obs, spec))


def _transformer_layer_params(h: int, f: int) -> int:
    return (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h


def _s4_layer_params(h: int, n: int) -> int:
    kernel = h + 2 * h * (n // 2) + 2 * 2 * h * (n // 2)  # log_dt, A (re, im), B and C (complex)
    return kernel + h + (2 * h * h + 2 * h) + 2 * h  # D, output_linear, norm


def _bigru_layer_params(h: int) -> int:
    g = h // 2
    return 2 * (3 * g * h + 3 * g * g + 6 * g) + 2 * h


def test_variants_run_and_parameter_counts_differ_as_expected():
    cfg = NetworkConfig(d_model=16, d_state=8, dim_feedforward=24, mlp_hidden=20, dropout=0.0)
    h, n_blocks = cfg.d_model, 6  # 2 encoders + discrete, mean, log-std and value decoders
    counts = {}
    for name, variant in {
        "full": cfg,
        "bigru": cfg.replace(embedding="bigru"),
        "no_transformer": cfg.replace(transformer=False),
        "no_mid_mlp": cfg.replace(mid_mlp=False),
    }.items():
        torch.manual_seed(0)
        net = AgnosticActorCritic(variant).eval()
        for spec in (CARTPOLE, HOPPER):
            obs = torch.randn(2, spec.obs_dim)
            with torch.no_grad():
                dist, value = net.actor_critic(obs, spec)
            assert torch.isfinite(dist).all() and value.shape == (2,)
        counts[name] = n_params(net)
    full = counts["full"]
    assert full - counts["no_transformer"] == (
        n_blocks * cfg.transformer_layers * _transformer_layer_params(h, cfg.dim_feedforward))
    assert full - counts["no_mid_mlp"] == 2 * cfg.mlp_depth * (
        2 * h + (h * cfg.mlp_hidden + cfg.mlp_hidden) + (cfg.mlp_hidden * h + h))
    assert full - counts["bigru"] == n_blocks * cfg.s4_layers * (
        _s4_layer_params(h, cfg.d_state) - _bigru_layer_params(h))


@pytest.mark.parametrize("shape", [(3, 5), (3,), (2, 3, 4), (3, 0)])
def test_wrong_observation_shape_raises(model, shape):
    with pytest.raises(ValueError, match="CartPole-v1"):
        model.actor(torch.randn(shape), CARTPOLE)
    with pytest.raises(ValueError, match="CartPole-v1"):
        model.value(torch.randn(shape), CARTPOLE)


def test_parameter_count_does_not_depend_on_registered_envs():
    specs = [
        discrete(3 + i, 2 + i) if i % 2 else continuous(3 + 7 * i, 1 + i) for i in range(16)
    ]
    counts = []
    for k in (1, 8, 16):
        net = AgnosticActorCritic(CFG, specs[:k])
        assert len(net.specs) == k
        counts.append(n_params(net))
    net.add_env(HUMANOID)
    counts.append(n_params(net))
    assert len(set(counts)) == 1
    assert not AgnosticActorCritic.adds_layers_per_env


def test_re_registering_an_env_with_other_spaces_is_rejected():
    net = AgnosticActorCritic(CFG, [CARTPOLE])
    net.add_env(CARTPOLE)
    with pytest.raises(ValueError, match="CartPole-v1"):
        net.add_env(EnvSpec("CartPole-v1", 5, "discrete", 2))


@pytest.mark.parametrize(("obs_dim", "act_dim", "kind"),
                         [(1, 1, "continuous"), (4, 2, "discrete"), (17, 6, "continuous"),
                          (376, 17, "continuous"), (9, 32, "discrete"), (400, 32, "continuous")])
def test_q_networks_accept_any_state_action_shape(obs_dim, act_dim, kind):
    spec = (discrete if kind == "discrete" else continuous)(obs_dim, act_dim)
    torch.manual_seed(0)
    q = randomize_norms(AgnosticQ(CFG)).eval()
    twin = randomize_norms(AgnosticTwinQ(CFG), seed=2).eval()
    obs = torch.randn(4, obs_dim)
    if spec.is_discrete:
        actions = torch.arange(4) % act_dim
    else:
        actions = torch.rand(4, act_dim) * 2 - 1
    with torch.no_grad():
        value = q(obs, actions, spec)
        q1, q2 = twin(obs, actions, spec)
    assert value.shape == q1.shape == q2.shape == (4,)
    assert torch.isfinite(value).all()
    assert not torch.allclose(q1, q2)  # two independent critics


def test_discrete_q_depends_on_the_action():
    spec = discrete(6, 4)
    torch.manual_seed(0)
    q = randomize_norms(AgnosticQ(CFG)).eval()
    obs = torch.randn(1, 6).expand(4, 6)
    with torch.no_grad():
        values = q(obs, torch.arange(4), spec)
    assert values.std() > 1e-4


def test_q_gradients_flow_to_both_critics():
    spec = continuous(7, 3)
    torch.manual_seed(0)
    twin = randomize_norms(AgnosticTwinQ(CFG))
    q1, q2 = twin(torch.randn(8, 7), torch.randn(8, 3), spec)
    (q1.square().mean() + q2.square().mean()).backward()
    for name, p in twin.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
