"""WAR's zeta measured on a thin copy of the model (WAR: zeta is the ratio l_nat / l_rob of the
thin network trained with its tuned beta, at convergence)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from scaler.builder import build_from_source
from scaler.errors import ScalerError
from trainers import checkpoint
from trainers.config import TrainConfig
from trainers.data import NUM_CLASSES, batches
from trainers.step import Stepper, make_optimizer

MEASURE_BATCHES = 8


def thin_config(cfg: TrainConfig) -> TrainConfig:
    """The calibration run's config: the model with planes halved (no lower than each stage's
    minimum), the tuned beta, no WAR of its own."""
    from scaler.spec import ArchSpec, min_planes

    if cfg.spec is None:
        raise ScalerError("--war-calibrate needs a preset or spec model (it trains a thinner copy)")
    spec = ArchSpec.from_dict(cfg.spec)
    lows = [min_planes(k) for k in spec.knobs]
    thin = replace(spec, planes=tuple(max(low, p // 2) for low, p in zip(lows, spec.planes)), name=None)
    return replace(cfg, spec=thin.to_dict(), war_calibrate=False, war_zeta=None, save_epochs=(), extra={})


def measure_ratio(cfg: TrainConfig, run_dir: Path, train_data, device) -> float:
    """l_nat / l_rob of a trained run's last.pt, summed over the first batches of `train_data`."""
    source = (run_dir / "model.py").read_text()
    model = build_from_source(source, NUM_CLASSES.get(cfg.dataset, 10)).to(device)
    model.load_state_dict(checkpoint.restore_model_state(run_dir / "last.pt")["model"])
    x, y = train_data
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    stepper = Stepper(
        model, make_optimizer(model, cfg), cfg, device=device, autocast_dtype=None, attack_generator=gen, war=None
    )
    nat, rob = 0.0, 0.0
    for idx in list(batches(len(y), cfg.batch_size, None, device))[:MEASURE_BATCHES]:
        x_adv = stepper.adversarial(x[idx], y[idx])
        model.train()
        with torch.no_grad():
            _, l_nat, l_rob, _ = stepper.loss_fn(model, x[idx], x_adv, y[idx], cfg.beta)
        nat, rob = nat + float(l_nat), rob + float(l_rob)
    if rob <= 0:
        raise ScalerError("WAR calibration measured a zero robust loss; cannot derive zeta")
    zeta = nat / rob
    checkpoint.write_text(run_dir / "war_zeta.json", json.dumps({"zeta": zeta, "beta": cfg.beta}))
    return zeta
