"""Optimizer parameter groups and the Adam factory."""

from __future__ import annotations

import pytest
import torch

from _reference import randomize_norms
from rl_agnostic.nn import AgnosticActorCritic, AgnosticTwinQ, EnvSpec, NetworkConfig, build_actor_critic
from rl_agnostic.nn.optim import clipped_step, grad_norm, make_optimizer, param_groups
from rl_agnostic.nn.s4 import S4DKernel

CFG = NetworkConfig(d_model=16, dropout=0.0)
CARTPOLE = EnvSpec("CartPole-v1", 4, "discrete", 2)
HOPPER = EnvSpec("Hopper-v4", 11, "continuous", 3, (-1.0,) * 3, (1.0,) * 3)


def ssm_params(model: torch.nn.Module) -> set[int]:
    return {id(getattr(m, name)) for m in model.modules() if isinstance(m, S4DKernel)
            for name in S4DKernel.SSM_PARAMETERS}


def check_partition(model: torch.nn.Module, groups: list[dict]) -> dict[str, list]:
    by_name = {g["name"]: g["params"] for g in groups}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters()}, "groups do not cover the model"
    assert all(g["params"] for g in groups), "empty group"
    return by_name


@pytest.mark.parametrize("shared", [False, True])
def test_groups_partition_agnostic_parameters(shared):
    model = AgnosticActorCritic(CFG.replace(shared_encoder=shared))
    groups = param_groups(model, actor_lr=1e-4, critic_lr=2e-4, ssm_lr=3e-3, weight_decay=0.01)
    by_name = check_partition(model, groups)
    assert [g["name"] for g in groups] == ["actor", "critic", "ssm"]
    assert {id(p) for p in by_name["ssm"]} == ssm_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for p in by_name["critic"]:
        assert names[id(p)].startswith(("critic", "value"))
    for p in by_name["actor"]:
        assert not names[id(p)].startswith(("critic", "value"))
    # the non-state-space S4 parameters (C, D) stay with their network
    c_ids = {id(m.C) for m in model.modules() if isinstance(m, S4DKernel)}
    assert c_ids.isdisjoint({id(p) for p in by_name["ssm"]})
    settings = {g["name"]: (g["lr"], g["weight_decay"]) for g in groups}
    assert settings == {"actor": (1e-4, 0.01), "critic": (2e-4, 0.01), "ssm": (3e-3, 0.0)}


def test_ssm_group_includes_critic_kernels():
    model = AgnosticActorCritic(CFG)
    ssm = {id(p) for p in param_groups(model)[2]["params"]}
    critic_kernel = model.critic_trunk.encoder.block.layers[0].kernel
    assert id(critic_kernel.log_dt) in ssm and id(model.value_decoder.block.layers[0].kernel.B) in ssm


@pytest.mark.parametrize("kind", ["specific", "padded", "single"])
def test_baselines_have_no_ssm_group(kind):
    model = build_actor_critic(kind, CFG, [HOPPER] if kind == "single" else [CARTPOLE, HOPPER])
    groups = param_groups(model)
    check_partition(model, groups)
    assert [g["name"] for g in groups] == ["actor", "critic"]


def test_q_networks_have_actor_and_ssm_groups_only():
    model = AgnosticTwinQ(CFG)
    groups = param_groups(model)
    check_partition(model, groups)
    assert [g["name"] for g in groups] == ["actor", "ssm"]


def test_bigru_network_has_no_ssm_group():
    model = AgnosticActorCritic(CFG.replace(embedding="bigru"))
    assert [g["name"] for g in param_groups(model)] == ["actor", "critic"]


def ppo_like_loss(model: AgnosticActorCritic) -> torch.Tensor:
    loss = 0.0
    for spec in (CARTPOLE, HOPPER):
        obs = torch.randn(16, spec.obs_dim)
        dist, value = model.actor_critic(obs, spec)
        loss = loss + dist.square().mean() + (value - 1.0).square().mean()
    return loss


@pytest.mark.parametrize("fused", [None, False])
def test_optimizer_step_updates_every_group(fused):
    torch.manual_seed(0)
    model = randomize_norms(AgnosticActorCritic(CFG))  # off the init point (see test_agnostic)
    opt = make_optimizer(model, weight_decay=0.0, fused=fused)
    assert isinstance(opt, torch.optim.Adam)
    assert [g["name"] for g in opt.param_groups] == ["actor", "critic", "ssm"]
    assert [g["lr"] for g in opt.param_groups] == [3e-4, 5e-4, 1e-3]
    if fused is None:
        assert opt.defaults.get("fused")  # CPU supports the fused kernel in torch >= 2.4
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    ppo_like_loss(model).backward()
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        changed = [names[id(p)] for p in group["params"]
                   if not torch.equal(p.detach(), before[names[id(p)]])]
        assert changed, f"no parameter of group {group['name']} changed"
    for kernel in (m for m in model.modules() if isinstance(m, S4DKernel)):
        assert not torch.equal(kernel.log_dt.detach(), before[names[id(kernel.log_dt)]])
    # an Adam step moves each ssm parameter by at most ~lr per element
    for p in opt.param_groups[2]["params"]:
        assert (p.detach() - before[names[id(p)]]).abs().max() <= 1e-3 * 1.01


def test_acting_after_optimizer_step_uses_the_new_parameters():
    """The outputs under no_grad (acting) after a step equal those computed with autograd on."""
    torch.manual_seed(0)
    model = randomize_norms(AgnosticActorCritic(CFG)).eval()
    opt = make_optimizer(model, actor_lr=0.05, critic_lr=0.05, ssm_lr=0.05)
    obs = torch.randn(4, HOPPER.obs_dim)
    with torch.no_grad():
        model.actor(obs, HOPPER)  # acting before the update
    for _ in range(2):
        opt.zero_grad()
        ppo_like_loss(model).backward()
        opt.step()
    with torch.no_grad():
        acting = model.actor(obs, HOPPER)
    training = model.actor(obs, HOPPER).detach()
    torch.testing.assert_close(acting, training, atol=1e-5, rtol=1e-5)


def test_explicit_fused_false_gives_default_adam():
    opt = make_optimizer(AgnosticActorCritic(CFG), fused=False)
    assert not opt.defaults.get("fused")


def test_optimizer_state_dict_round_trip():
    torch.manual_seed(0)
    model = AgnosticActorCritic(CFG)
    opt = make_optimizer(model)
    ppo_like_loss(model).backward()
    opt.step()
    opt2 = make_optimizer(model)
    opt2.load_state_dict(opt.state_dict())
    assert [g["name"] for g in opt2.param_groups] == ["actor", "critic", "ssm"]
    assert len(opt2.state) == len(opt.state)


def test_fallback_after_an_unsupported_fused_kernel_builds_plain_adam(monkeypatch):
    """On a device without the fused kernel, Adam has already filled fused=True into the group
    dicts when it raises; the fallback must not inherit that."""
    from rl_agnostic.nn.optim import adam

    real_adam = torch.optim.Adam

    def adam_without_fused_kernel(params, **kwargs):
        opt = real_adam(params, **kwargs)  # fills the defaults into the groups, as torch does
        if kwargs.get("fused"):
            raise RuntimeError("fused Adam is not supported on this device")
        return opt

    monkeypatch.setattr(torch.optim, "Adam", adam_without_fused_kernel)
    opt = adam(param_groups(AgnosticActorCritic(CFG)))
    assert not opt.defaults.get("fused")
    assert not any(g.get("fused") for g in opt.param_groups)


def _with_grads(model: torch.nn.Module, scale: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * scale


@pytest.mark.parametrize("device_path", ["kernel", "torch"])
def test_grad_norm_equals_torch_total_norm(device_path, monkeypatch):
    import rl_agnostic.nn.optim as optim

    if device_path == "torch":
        monkeypatch.setattr(optim, "kernels", lambda: None)
    model = AgnosticActorCritic(CFG, [CARTPOLE, HOPPER])
    _with_grads(model, 3.0)
    grads = [p.grad for p in model.parameters()] + [None]
    want = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None]))
    torch.testing.assert_close(grad_norm(grads), want, rtol=1e-6, atol=0)
    grads[3].view(-1)[7] = float("nan")
    assert torch.isnan(grad_norm(grads))
    grads[3].view(-1)[7] = float("inf")
    assert torch.isinf(grad_norm(grads))
    assert grad_norm([None]).item() == 0.0


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("scale", [1e-4, 1.0])  # below the clip norm (no clip) and above it
def test_clipped_step_equals_clip_grad_norm_then_step(fused, scale):
    torch.manual_seed(0)
    models = [AgnosticActorCritic(CFG, [CARTPOLE, HOPPER]) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [make_optimizer(m, fused=fused) for m in models]
    for step in range(3):
        for m in models:
            _with_grads(m, scale, seed=step)
        torch.nn.utils.clip_grad_norm_(models[0].parameters(), 0.5)
        opts[0].step()
        total = clipped_step(opts[1], 0.5)
        want = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in models[1].parameters()]))
        if scale < 1e-3:
            torch.testing.assert_close(total, want, rtol=1e-5, atol=0)
        for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=2e-6 * max(1.0, a.abs().max().item()),
                                       msg=name)
            # the gradients left behind are the clipped ones in both
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-9)
        assert not hasattr(opts[1], "grad_scale")
