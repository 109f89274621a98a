r"""Implicit Q-Learning (Kostrikov et al., 2021) over many datasets at once (paper Appendix A,
Algorithm 2: DD-IQL).

For one dataset's minibatch (s, a, r, s', d), with twin Q networks Q₁, Q₂, their Polyak-averaged
targets Q̄₁, Q̄₂, a value network V and a policy π:

    L_V = E[ |τ − 1(u < 0)| · u² ],       u = min(Q̄₁, Q̄₂)(s, a) − V(s)       (expectile τ)
    L_Q = ½ Σᵢ E[ (Qᵢ(s, a) − (r + γ (1 − d) V(s')))² ]                         (V(s') no grad)
    L_π = E[ −min(exp(β · (min(Q̄₁, Q̄₂)(s, a) − V(s))), 100) · log π(a | s) ]   (weights no grad)

DD-IQL sums L_V + L_Q + L_π over the datasets and takes ONE gradient step of all parameters
(the losses touch disjoint parameters: V only through L_V, Q only through L_Q, π only through L_π,
so one backward equals IQL's three separate updates); after it, Q̄ ← (1 − τ_polyak) Q̄ + τ_polyak Q.
The policy is Categorical for discrete actions and a diagonal Gaussian for continuous ones (RLlib's
IQL is continuous-only). π and V are one `ActorCritic` (its actor and its value head), so the
checkpoint's policy is what `rl_agnostic.online.agent.Agent` loads.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from rl_agnostic.envs.spec import EnvSpec
from rl_agnostic.nn import (
    ActorCritic,
    NetworkConfig,
    TwinQ,
    build_actor_critic,
    build_twin_q,
)
from rl_agnostic.nn.optim import param_groups

EXP_ADV_MAX = 100.0


def expectile_loss(diff: Tensor, expectile: float) -> Tensor:
    """E[|τ − 1(u < 0)| · u²] of u = ``diff`` (IQL Eq. 5's asymmetric L2)."""
    weight = torch.where(diff > 0, expectile, 1.0 - expectile)
    return (weight * diff.pow(2)).mean()


def td_loss(q1: Tensor, q2: Tensor, target: Tensor) -> Tensor:
    """Mean squared TD error of both Q networks to one target, averaged over the two."""
    return 0.5 * ((q1 - target).pow(2).mean() + (q2 - target).pow(2).mean())


def awr_policy_loss(log_prob: Tensor, advantage: Tensor, beta: float,
                    max_weight: float = EXP_ADV_MAX) -> Tensor:
    """Advantage-weighted regression: E[−min(exp(β·A), max_weight) · log π(a|s)], A no grad."""
    weight = torch.exp(beta * advantage.detach()).clamp(max=max_weight)
    return -(weight * log_prob).mean()


class IQLNetworks(nn.Module):
    """Policy + value (one `ActorCritic`), twin Q and its target, of one model kind."""

    def __init__(self, kind: str, cfg: NetworkConfig, specs: Iterable[EnvSpec]) -> None:
        super().__init__()
        specs = list(specs)
        self.kind = kind
        self.cfg = cfg
        self.actor_critic: ActorCritic = build_actor_critic(kind, cfg, specs)
        self.q: TwinQ = build_twin_q(kind, cfg, specs)
        self.q_target: TwinQ = copy.deepcopy(self.q).requires_grad_(False)

    def optimizer_groups(self, actor_lr: float, critic_lr: float, ssm_lr: float) -> list[dict]:
        """Policy at ``actor_lr``; V and Q at ``critic_lr``; every S4 state-space parameter at
        ``ssm_lr`` without weight decay (`rl_agnostic.nn.optim.param_groups`)."""
        groups = param_groups(self.actor_critic, actor_lr, critic_lr, ssm_lr)
        for group in param_groups(self.q, critic_lr, critic_lr, ssm_lr):
            group["name"] = "q_" + group["name"]
            groups.append(group)
        return groups

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """Q̄ ← (1 − τ) Q̄ + τ Q, in place."""
        online = list(self.q.parameters())
        target = list(self.q_target.parameters())
        torch._foreach_lerp_(target, online, tau)

    def iql_losses(self, spec: EnvSpec, batch: Mapping[str, Tensor], *, expectile: float,
                   beta: float, gamma: float) -> dict[str, Tensor]:
        """``value``, ``q``, ``policy`` losses and their sum ``total`` for one minibatch."""
        return self.iql_losses_many([(spec, batch)], expectile=expectile, beta=beta,
                                    gamma=gamma)[0]

    def iql_losses_many(self, items: Sequence[tuple[EnvSpec, Mapping[str, Tensor]]], *,
                        expectile: float, beta: float, gamma: float) -> list[dict[str, Tensor]]:
        """`iql_losses` of several datasets' minibatches, ``[(spec, batch), …]``. Every network
        pass takes all of them at once (`ActorCritic.actor_critic_many`, ``value_many``,
        `TwinQ.forward_many`): the agnostic networks pack them into few padded passes."""
        obs = [(b["observations"], spec) for spec, b in items]
        obs_actions = [(b["observations"], b["actions"], spec) for spec, b in items]
        with torch.no_grad():
            target_q = [torch.minimum(q1, q2) for q1, q2 in self.q_target.forward_many(obs_actions)]
            next_v = self.actor_critic.value_many(
                [(b["next_observations"], spec) for spec, b in items])
        qs = self.q.forward_many(obs_actions)
        out = []
        for (spec, b), tq, nv, (q1, q2), (dist_inputs, v) in zip(
                items, target_q, next_v, qs, self.actor_critic.actor_critic_many(obs)):
            td_target = b["rewards"] + gamma * (1.0 - b["terminals"]) * nv
            advantage = tq - v
            value_loss = expectile_loss(advantage, expectile)
            q_loss = td_loss(q1, q2, td_target)
            log_prob = self.actor_critic.log_prob(spec, dist_inputs, b["actions"])
            policy_loss = awr_policy_loss(log_prob, advantage, beta)
            out.append({"value": value_loss, "q": q_loss, "policy": policy_loss,
                        "total": value_loss + q_loss + policy_loss,
                        "v_mean": v.detach().mean(), "advantage_mean": advantage.detach().mean()})
        return out
