"""Robustness evaluation: accuracy, stable accuracy and empirical Lipschitz constant per attack.

Definitions (Huang et al., NeurIPS 2021; NARes): stable accuracy is the share of points whose prediction under
attack equals the clean prediction, right or wrong; LIP is the mean over samples of
||f(x) - f(x')||_1 / (||x - x'||_inf + 1e-6) on logits. Evaluation runs in fp32.
"""

from __future__ import annotations

import re

import torch

from scaler.errors import ScalerError
from trainers.attacks import autoattack, fgsm, pgd

ATTACKS = ("clean", "fgsm", "pgd20", "cw40", "aa", "aa-compact")
DEFAULT_ATTACKS = ("clean", "pgd20", "cw40")


def parse_attacks(text: str) -> list[str]:
    names = [a.strip().lower() for a in text.split(",") if a.strip()]
    if not names:
        raise ScalerError("--attacks is empty")
    for a in names:
        if a not in ATTACKS:
            raise ScalerError(f"unknown attack {a!r}; choose from {','.join(ATTACKS)}")
    return list(dict.fromkeys(names))


@torch.no_grad()
def logits_of(model, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


def adversarial(
    model, name: str, x, y, *, eps: float, seed: int, batch_size: int, messages: list[str], progress: bool = False
):
    """The adversarial version of (x, y) under attack `name`, in batches, seeded. `progress` shows
    a bar per attack with its ETA on stderr."""
    if name == "clean":
        return x
    if name in ("aa", "aa-compact"):
        x_adv, msgs = autoattack(
            model,
            x,
            y,
            eps=eps,
            version="standard" if name == "aa" else "compact",
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
        messages.extend(f"AutoAttack: {m}" for m in msgs)
        return x_adv
    gen = torch.Generator(device=x.device).manual_seed(seed)
    out = []
    for i in _bar(range(0, len(x), batch_size), name, progress):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        if name == "fgsm":
            out.append(fgsm(model, xb, yb, eps=eps))
        elif name == "pgd20":
            out.append(pgd(model, xb, yb, eps=eps, step=eps / 10, steps=20, loss="ce", generator=gen))
        elif name == "cw40":
            out.append(pgd(model, xb, yb, eps=eps, step=eps / 10, steps=40, loss="cw", generator=gen))
        else:
            raise ScalerError(f"unknown attack {name!r}")
    return torch.cat(out)


def _bar(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    import sys

    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="batch", leave=False, file=sys.stderr)


def lipschitz(f_x: torch.Tensor, f_adv: torch.Tensor, x: torch.Tensor, x_adv: torch.Tensor) -> float:
    num = (f_x - f_adv).flatten(1).abs().sum(1)
    den = (x - x_adv).flatten(1).abs().amax(1) + 1e-6
    return (num / den).mean().item()


def evaluate(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks=DEFAULT_ATTACKS,
    *,
    eps: float = 8 / 255,
    seed: int = 0,
    batch_size: int = 256,
    per_block: bool = False,
    progress: bool = False,
) -> dict:
    """{attack: {accuracy, stable, lip, n}} plus 'warnings' (gradient-masking sanity flags)."""
    results: dict = {}
    messages: list[str] = []
    clean_logits = logits_of(model, x, batch_size)
    clean_pred = clean_logits.argmax(1)
    for name in attacks:
        x_adv = adversarial(
            model, name, x, y, eps=eps, seed=seed, batch_size=batch_size, messages=messages, progress=progress
        )
        adv_logits = clean_logits if name == "clean" else logits_of(model, x_adv, batch_size)
        pred = adv_logits.argmax(1)
        results[name] = {
            "accuracy": 100.0 * (pred == y).float().mean().item(),
            "stable": 100.0 * (pred == clean_pred).float().mean().item(),
            "lip": 0.0 if name == "clean" else lipschitz(clean_logits, adv_logits, x, x_adv),
            "n": len(y),
        }
        if per_block and name == "pgd20":
            results[name]["per_block_lip"] = per_block_lipschitz(model, x, x_adv, batch_size)
    results["warnings"] = messages + sanity_flags(results)
    return results


def sanity_flags(results: dict) -> list[str]:
    """Warnings that suggest gradient masking or a broken evaluation."""
    flags = []
    clean = results.get("clean", {}).get("accuracy")
    for name, r in results.items():
        if name in ("clean", "warnings") or clean is None:
            continue
        if r["accuracy"] > clean + 1e-9:
            flags.append(f"{name} accuracy {r['accuracy']:.2f}% is above clean {clean:.2f}%: evaluation is broken")
    if "fgsm" in results and "pgd20" in results and results["pgd20"]["accuracy"] > results["fgsm"]["accuracy"] + 0.5:
        flags.append("PGD-20 is weaker than FGSM: a sign of gradient masking")
    for strong in ("aa", "aa-compact"):
        for weak in ("pgd20", "cw40"):
            if strong in results and weak in results and results[strong]["accuracy"] > results[weak]["accuracy"] + 0.5:
                flags.append(f"{strong} is weaker than {weak}: check the evaluation")
    return flags


_BLOCK_RE = re.compile(r"^stage\d+\.\d+$")


@torch.no_grad()
def per_block_lipschitz(model, x, x_adv, batch_size: int = 256) -> dict[str, float]:
    """LIP at every residual block output (Huang et al., NeurIPS 2021, Fig. 5): mean ||phi(x) - phi(x')||_1 / ||x - x'||_inf."""
    blocks = {n: m for n, m in model.named_modules() if _BLOCK_RE.match(n)}
    if not blocks:
        raise ScalerError("--per-block-lipschitz needs a model with stageN.M residual blocks (an emitted model)")
    sums = {n: 0.0 for n in blocks}
    was = model.training
    model.eval()
    for i in range(0, len(x), batch_size):
        feats: dict[str, list] = {n: [] for n in blocks}

        def keep(name, store=feats):
            return lambda _m, _i, out: store[name].append(out.float())

        hooks = [m.register_forward_hook(keep(n)) for n, m in blocks.items()]
        try:
            model(x[i : i + batch_size])
            model(x_adv[i : i + batch_size])
        finally:
            for h in hooks:
                h.remove()
        den = (x[i : i + batch_size] - x_adv[i : i + batch_size]).flatten(1).abs().amax(1) + 1e-6
        for n, (a, b) in feats.items():
            sums[n] += ((a - b).flatten(1).abs().sum(1) / den).sum().item()
    model.train(was)
    return {n: s / len(x) for n, s in sums.items()}
