"""Attacks and losses on tiny models, against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaler.errors import ScalerError
from trainers.attacks import fgsm, frozen_eval, margin_loss, parse_eps, pgd, trades_attack
from trainers.losses import WarLambda, mart_loss, pgd_at_loss, trades_loss


class Logits(nn.Module):
    """The input is the logits: losses can be checked by hand."""

    def forward(self, x):
        return x


def tiny_cnn(classes=3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, classes),
    )


def test_parse_eps():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps("0.031") == 0.031
    assert parse_eps(0.5) == 0.5
    for bad in ("abc", "1/0", "2", "-0.1"):
        with pytest.raises(ScalerError):
            parse_eps(bad)


def test_trades_loss_by_hand():
    a = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    b = torch.tensor([[math.log(3.0), 0.0]])  # q = (3/4, 1/4)
    y = torch.tensor([0])
    total, l_nat, l_rob, _ = trades_loss(Logits(), a, b, y, beta=6.0)
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = ln(4/3) / 2
    assert l_nat.item() == pytest.approx(math.log(2))
    assert l_rob.item() == pytest.approx(kl)
    assert total.item() == pytest.approx(math.log(2) + 6 * kl)


def test_mart_loss_by_hand():
    a = torch.tensor([[0.0, 0.0]])
    b = torch.tensor([[math.log(3.0), 0.0]])
    y = torch.tensor([0])
    total, bce, l_kl, _ = mart_loss(Logits(), a, b, y, beta=6.0)
    expected_bce = -math.log(0.75) - math.log(1.0001 - 0.25)
    expected_kl = 0.5 * math.log(4 / 3) * (1.0000001 - 0.5)
    assert bce.item() == pytest.approx(expected_bce, rel=1e-6)
    assert l_kl.item() == pytest.approx(expected_kl, rel=1e-5)
    assert total.item() == pytest.approx(expected_bce + 6 * expected_kl, rel=1e-5)


def test_pgd_at_loss_is_ce_on_adversarial():
    b = torch.tensor([[math.log(3.0), 0.0]])
    total, *_ = pgd_at_loss(Logits(), None, b, torch.tensor([1]))
    assert total.item() == pytest.approx(-math.log(0.25))


def test_margin_loss_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.5]])
    assert margin_loss(logits[:1], torch.tensor([0])).item() == pytest.approx(-1.0)
    assert margin_loss(logits[1:], torch.tensor([0])).item() == pytest.approx(0.0)  # already wrong: kappa 0


def test_war_lambda_algorithm_1():
    war = WarLambda(zeta=30.0, alpha=0.1)
    assert war.value.item() == 0.0
    war.update(torch.tensor(2.0), torch.tensor(0.1))  # ratio 20 -> 0 + 0.1 * (30 - 20)
    assert war.value.item() == pytest.approx(1.0)
    war.update(torch.tensor(4.0), torch.tensor(0.05))  # ratio 80 -> max(1 + 0.1 * (30 - 80), 0)
    assert war.value.item() == 0.0
    state = war.state_dict()
    other = WarLambda(1.0)
    other.load_state_dict(state)
    assert other.zeta == 30.0


@pytest.mark.parametrize("attack", ["pgd", "cw", "trades", "fgsm"])
def test_attacks_project_and_restore_model_state(attack):
    model = tiny_cnn().train()
    model[0].weight.requires_grad_(False)  # a frozen layer must stay frozen afterwards
    before = model[1].running_mean.clone()
    x = torch.rand(8, 3, 8, 8)
    y = torch.randint(0, 3, (8,))
    eps = 8 / 255
    gen = torch.Generator().manual_seed(0)
    if attack == "trades":
        x_adv = trades_attack(model, x, eps=eps, step=0.1, steps=3, generator=gen)
    elif attack == "fgsm":
        x_adv = fgsm(model, x, y, eps=eps)
    else:
        x_adv = pgd(model, x, y, eps=eps, step=0.1, steps=3, loss="ce" if attack == "pgd" else "cw", generator=gen)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.training and all(m.training for m in model.modules())
    assert not model[0].weight.requires_grad and model[5].weight.requires_grad
    assert torch.equal(model[1].running_mean, before), "attack ran in train mode (BN stats moved)"
    assert not x_adv.requires_grad


def test_fgsm_matches_the_definition():
    model = tiny_cnn().eval()
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(model(xr), y, reduction="sum").backward()
    expected = (x + 0.05 * xr.grad.sign()).clamp(0, 1)
    assert torch.allclose(fgsm(model, x, y, eps=0.05), expected)


def test_pgd_increases_loss_and_is_seeded():
    model = tiny_cnn().eval()
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 3, (16,))
    a = pgd(model, x, y, eps=0.1, step=0.02, steps=10, generator=torch.Generator().manual_seed(3))
    b = pgd(model, x, y, eps=0.1, step=0.02, steps=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with torch.no_grad():
        assert F.cross_entropy(model(a), y) > F.cross_entropy(model(x), y)


def test_frozen_eval_restores_after_errors():
    model = tiny_cnn().train()
    with pytest.raises(RuntimeError):
        with frozen_eval(model):
            raise RuntimeError("boom")
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_folded_batchnorm_is_eval_batchnorm():
    from trainers.attacks import folded_batchnorm

    model = tiny_cnn()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2)
        model[1].bias.uniform_(-1, 1)
    model.eval()
    x = torch.rand(4, 3, 8, 8)
    expected = model(x)
    with folded_batchnorm(model):
        assert "forward" in model[1].__dict__
        assert torch.allclose(model(x), expected, atol=1e-5)
    assert "forward" not in model[1].__dict__  # restored
    y = torch.tensor([0, 1, 2, 0])
    a = pgd(model, x, y, eps=0.1, step=0.02, steps=5, generator=torch.Generator().manual_seed(0))
    b = pgd(model, x, y, eps=0.1, step=0.02, steps=5, generator=torch.Generator().manual_seed(0), fold_bn=True)
    assert (a - b).abs().max() <= 0.02 + 1e-6  # same attack; at most a sign flip on a near-zero gradient
    assert (a == b).float().mean() > 0.99


@pytest.mark.parametrize("fold_bn", [True, False])
def test_folded_attack_builds_an_emitted_models_folds_once(fold_bn, monkeypatch):
    """With `fold_bn` a PGD attack on an emitted model runs its blocks through the fast runtime
    (`fused_blocks`, on by default on a CPU) with `constant_folds`: the conv-BN folds are built on
    the first step only (parameters are frozen throughout), and the attack is the same. Without
    it the model runs as emitted: no folds at all."""
    from scaler.builder import build_model
    from scaler.spec import ArchSpec
    from trainers.fused import folds, fused_blocks

    torch.manual_seed(0)
    model = build_model(ArchSpec("robust", (1, 1, 1), (16, 32, 64))).eval()
    original, builds = folds.fold_into_conv, []
    monkeypatch.setattr(folds, "fold_into_conv", lambda *args: builds.append(1) or original(*args))
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.no_grad(), fused_blocks(model, True):
        model(x)
    per_forward = len(builds)
    builds.clear()
    a = pgd(model, x, y, eps=0.03, step=0.01, steps=3, generator=torch.Generator().manual_seed(0), fold_bn=fold_bn)
    assert per_forward > 0 and len(builds) == (per_forward if fold_bn else 0)  # once for all 4 forwards
    assert not any("forward" in m.__dict__ for m in model.modules())  # restored
    b = pgd(model, x, y, eps=0.03, step=0.01, steps=3, generator=torch.Generator().manual_seed(0))
    if fold_bn:
        assert (a - b).abs().max() <= 0.01 + 1e-6 and (a == b).float().mean() > 0.99
    else:
        assert torch.equal(a, b)


def test_folded_attacks_take_torchscript_models():
    """A TorchScript model has no block the runtime recognises (and its `forward` raises when
    looked up on the class): the folded attack and AutoAttack run it as before."""
    from trainers.attacks import autoattack
    from trainers.fused import fused_blocks

    torch.manual_seed(0)
    model = torch.jit.script(tiny_cnn(classes=10).eval())
    x, y = torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2])
    with fused_blocks(model, True) as installed:
        assert installed == []
    a = pgd(model, x, y, eps=0.1, step=0.02, steps=2, generator=torch.Generator().manual_seed(0), fold_bn=True)
    b = pgd(model, x, y, eps=0.1, step=0.02, steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)  # TorchScript BatchNorms are not patched either
    x_adv, _ = autoattack(model, x, y, eps=0.1, version="compact", seed=0)
    assert x_adv.shape == x.shape
    shown, _ = autoattack(model, x, y, eps=0.1, version="compact", seed=0, progress=True)  # no hooks: per batch
    assert torch.equal(shown, x_adv)


def test_autoattack_runs_inside_the_fast_runtime(monkeypatch):
    import trainers.attacks as attacks

    entered = []
    real = attacks.fused_blocks
    monkeypatch.setattr(attacks, "fused_blocks", lambda m: entered.append(m) or real(m))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(4, 3, 8, 8)
    attacks.autoattack(model, x, model(x).argmax(1), eps=8 / 255, version="compact", seed=0)
    assert entered == [model]


@pytest.mark.parametrize("version", ["compact", "standard"])
def test_autoattack_calls_per_batch_are_what_the_progress_bar_expects(version, monkeypatch):
    """The bar's share of a batch is counted model calls over `attack_calls`: equal when no point
    is fooled (eps tiny), so a batch's bar ends where its work does (fewer steps and queries than
    AutoAttack's, to stay fast; the formula takes them as parameters)."""
    from pyautoattack import AutoAttack

    from trainers import attacks

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(6, 3, 8, 8)
    y = model(x).argmax(1)
    names = ["apgd-ce", "apgd-t"] + (["fab-t", "square"] if version == "standard" else [])
    aa = AutoAttack(model, eps=1e-6, norm="Linf", seed=0, version="custom", attacks=names, device=x.device)
    aa.verbose = False
    aa.apgd.n_iter, aa.apgd.n_restarts, aa.apgd.eot_iter = 7, 2, 2
    aa.apgd_targeted.n_iter, aa.apgd_targeted.n_target_classes = 5, 3
    aa.fab.n_iter, aa.fab.n_target_classes, aa.square.n_queries, aa.square.n_restarts = 4, 2, 30, 2
    seen, wrap = [], attacks._AutoAttackProgress._wrap

    def counting(self, perturb, label, name, attack):
        inner = wrap(self, perturb, label, name, attack)

        def run(*args, **kwargs):
            out = inner(*args, **kwargs)
            seen.append((label, self.calls, attacks.attack_calls(name, attack)))
            return out

        return run

    monkeypatch.setattr(attacks._AutoAttackProgress, "_wrap", counting)
    bars = attacks._AutoAttackProgress(aa, model, x, y, 6)
    aa.run_standard_evaluation(x, y, batch_size=6)
    bars.remove()
    labels = ["APGD-CE", "APGD-T"] + (["FAB-T", "Square"] if version == "standard" else [])
    assert [label for label, _, _ in seen] == labels
    assert all(calls == expected > 10 for _, calls, expected in seen), seen


def test_autoattack_progress_moves_within_a_single_batch(monkeypatch):
    from pyautoattack import AutoAttack

    from trainers import attacks

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(8, 3, 8, 8)
    y = model(x).argmax(1)
    aa = AutoAttack(model, eps=1e-6, norm="Linf", seed=0, version="custom", attacks=["apgd-ce"], device=x.device)
    aa.verbose, aa.apgd.n_iter, aa.apgd.n_restarts = False, 60, 1
    positions, tick = [], attacks._AutoAttackProgress._tick

    def record(self, module, args):
        tick(self, module, args)
        if self.batch is not None:
            positions.append(self.bar.n)

    monkeypatch.setattr(attacks._AutoAttackProgress, "_tick", record)
    bars = attacks._AutoAttackProgress(aa, model, x, y, 250)
    aa.run_standard_evaluation(x, y, batch_size=250)
    assert bars.bar.n == 8  # the whole batch once it returns
    bars.remove()
    assert positions == sorted(positions) and 3 < positions[len(positions) // 2] < 5 and max(positions) <= 0.99 * 8
    assert len(set(positions)) == len(positions) == 62  # it moves with every call, not once per batch


def test_autoattack_progress_shows_a_bar_per_attack_and_changes_nothing(capsys):
    from trainers.attacks import autoattack

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    x, y = torch.rand(12, 3, 8, 8), torch.randint(0, 10, (12,))
    y[:6] = model(x[:6]).argmax(1)  # some points start robust, so the attacks run
    quiet, _ = autoattack(model, x, y, eps=8 / 255, version="compact", seed=0, batch_size=5)
    capsys.readouterr()
    shown, _ = autoattack(model, x, y, eps=8 / 255, version="compact", seed=0, batch_size=5, progress=True)
    err = capsys.readouterr().err
    assert torch.equal(quiet, shown)
    assert "AutoAttack APGD-CE" in err
