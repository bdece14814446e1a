"""Adversarial training losses (outer minimisation, model in train mode) and WAR's adaptive lambda.

Each loss returns (total, l_nat, l_rob, logits_adv): the lambda form total = l_nat + lambda * l_rob,
so WAR (Algorithm 1) can steer lambda from the measured ratio l_nat / l_rob, and the
adversarial logits give the training accuracy without another forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pgd_at_loss(model, x, x_adv, y, beta=None):
    """Madry PGD-AT: CE on the adversarial batch. In lambda form: l_nat = CE(x_adv), l_rob = 0."""
    logits_adv = model(x_adv).float()
    loss = F.cross_entropy(logits_adv, y)
    return loss, loss, torch.zeros((), device=loss.device), logits_adv


def trades_loss(model, x, x_adv, y, beta: float):
    """TRADES: CE(f(x), y) + beta * (1/B) sum_i KL(p(x_i) || p(x'_i)); p(x) is not detached."""
    logits_nat = model(x).float()
    logits_adv = model(x_adv).float()
    l_nat = F.cross_entropy(logits_nat, y)
    l_rob = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="sum") / len(x)
    return l_nat + beta * l_rob, l_nat, l_rob, logits_adv


def mart_loss(model, x, x_adv, y, beta: float):
    """MART: BCE + beta * L_kl, with
    BCE  = CE(f(x'), y) + mean_i[-log(1.0001 - max_{k != y} p_k(x'_i))],
    L_kl = (1/B) sum_i KL(p(x_i) || p(x'_i)) * (1.0000001 - p_{y_i}(x_i))."""
    logits_nat = model(x).float()
    logits_adv = model(x_adv).float()
    p_adv = F.softmax(logits_adv, dim=1)
    p_nat = F.softmax(logits_nat, dim=1)
    true_mask = F.one_hot(y, p_adv.shape[1]).bool()
    p_wrong = p_adv.masked_fill(true_mask, float("-inf")).amax(1)
    bce = F.cross_entropy(logits_adv, y) + (-torch.log(1.0001 - p_wrong)).mean()
    kl = (p_nat * (torch.log(p_nat + 1e-12) - torch.log(p_adv + 1e-12))).sum(1)
    true_nat = p_nat.gather(1, y[:, None]).squeeze(1)
    l_kl = (kl * (1.0000001 - true_nat)).sum() / len(x)
    return bce + beta * l_kl, bce, l_kl, logits_adv


LOSSES = {"pgd-at": pgd_at_loss, "trades": trades_loss, "mart": mart_loss}


class WarLambda:
    """WAR (Algorithm 1): lambda_t = max(lambda_{t-1} + alpha (zeta - l_nat / l_rob), 0),
    lambda_0 = 0. Kept as a device tensor so the update needs no host sync."""

    def __init__(self, zeta: float, alpha: float = 0.1, device="cpu"):
        self.zeta, self.alpha = float(zeta), float(alpha)
        self.value = torch.zeros((), device=device)

    def update(self, l_nat: torch.Tensor, l_rob: torch.Tensor) -> None:
        ratio = l_nat.detach() / l_rob.detach().clamp_min(1e-12)
        self.value = (self.value + self.alpha * (self.zeta - ratio)).clamp_min(0.0)

    def state_dict(self) -> dict:
        return {"zeta": self.zeta, "alpha": self.alpha, "value": self.value.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.zeta, self.alpha = float(state["zeta"]), float(state["alpha"])
        self.value = state["value"].to(self.value.device)
