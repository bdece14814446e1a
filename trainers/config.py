"""Training configuration and the published recipes (as published by RobustWRN/RobustResNet, NARes, TRADES and MART).

Precedence: built-in defaults < recipe < explicit flags. Milestones are stored as fractions of the
run's epochs, so a recipe's 75/90-of-100 schedule scales to short runs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields

from scaler.errors import ScalerError


def parse_eps(value: str | float) -> float:
    """'8/255' -> 0.0313..., '0.031' -> 0.031."""
    if isinstance(value, (int, float)):
        out = float(value)
    else:
        text = value.strip()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*/\s*([0-9]*\.?[0-9]+)", text)
        try:
            out = float(m.group(1)) / float(m.group(2)) if m else float(text)
        except (ValueError, ZeroDivisionError):
            raise ScalerError(f"cannot read {value!r} as a size; use a float or a fraction like 8/255") from None
    if not 0 <= out <= 1:
        raise ScalerError(f"size {value!r} must lie in [0, 1] (inputs are in [0, 1])")
    return out


METHODS = ("standard", "pgd-at", "trades", "mart")
SCHEDULES = ("step", "cosine", "onecycle")
PRECISIONS = ("auto", "fp32", "bf16")


NUMERIC_RANGES = {  # (low, high, (low closed, high closed)): its fields; a NaN or an infinity is never in range
    (0.0, math.inf, (False, False)): ("lr", "war_zeta"),
    (0.0, math.inf, (True, False)): ("weight_decay", "beta", "grad_clip", "warmup_epochs", "eps", "attack_step"),
    (0.0, 1.0, (True, False)): ("momentum", "label_smoothing", "ema"),
    (0.0, 1.0, (False, True)): ("war_alpha",),
    (0.0, 1.0, (True, True)): ("best_from",),
}
"""Ranges of the numeric training options: a bad value is refused before any work."""


def _within(value: float, low: float, high: float, closed: tuple[bool, bool]) -> bool:
    if not math.isfinite(value):
        return False
    above = value >= low if closed[0] else value > low
    below = value <= high if closed[1] else value < high
    return above and below


def _describe_range(low: float, high: float, closed: tuple[bool, bool]) -> str:
    if high == math.inf:
        return f"a finite number {'>=' if closed[0] else '>'} {low:g}"
    return f"in {'[' if closed[0] else '('}{low:g}, {high:g}{']' if closed[1] else ')'}"


def option(default, help: str, *, flag: str | None = None, parse: str | None = None, shown: bool = True):
    """A TrainConfig field that is also a command-line option (scaler_cli.options makes the flag from
    it): its help, its typer declaration where not --name[/--no-name], how its text is parsed
    ("eps": a size such as 8/255, "int_list": e.g. 75,90) and whether help shows the default."""
    return field(default=default, metadata={"help": help, "flag": flag, "parse": parse, "shown": shown})


@dataclass
class TrainConfig:
    model: str = ""  # preset name, path to a model file, or "spec"
    spec: dict | None = None
    dataset: str = option(
        "cifar10", "cifar10, cifar100, tinyimagenet (64x64, 200 classes), digits (scikit-learn, offline) or synthetic."
    )
    data_dir: str | None = option(None, "Directory with the dataset archives (never downloaded).", shown=False)
    val: str = option("holdout", "Validation set: holdout (taken from train) or cifar10.1.")
    val_size: int | None = option(None, "Held-out training points [default: 1000, or 10% of small sets].", shown=False)
    val_n: int = option(500, "Validation points attacked after each validated epoch.")
    method: str = option("pgd-at", "standard, pgd-at, trades or mart.")
    beta: float = option(6.0, "TRADES/MART robust-loss weight.")
    epochs: int = option(100, "Training epochs.")
    batch_size: int = option(128, "Global batch size.")
    drop_last: bool = False
    lr: float = option(0.1, "Peak SGD learning rate.")
    momentum: float = option(0.9, "SGD momentum.")
    nesterov: bool = option(False, "Nesterov momentum.")
    weight_decay: float = option(2e-4, "L2 weight decay.")
    wd_exclude_bn_bias: bool = option(
        False, "Exclude BN weights and biases from weight decay.", flag="--wd-exclude-bn-bias/--wd-all"
    )
    schedule: str = option("step", "Learning-rate schedule: step, cosine or onecycle.")
    milestones: tuple[float, ...] = option(  # fractions of epochs; the flag takes epochs
        (0.75, 0.9),
        "Step schedule: epochs where the LR drops 10x, e.g. 75,90 [default: 75% and 90% of --epochs].",
        parse="int_list",
        shown=False,
    )
    warmup_epochs: float = option(0.0, "onecycle: warm-up epochs.")
    grad_clip: float = option(5.0, "Max gradient norm (0: off).")
    ema: float = option(0.0, "Weight EMA decay, e.g. 0.995 (0: off).")
    label_smoothing: float = option(0.0, "Label smoothing of the clean CE loss.")
    eps: float = option(8 / 255, "L-inf radius [default: 8/255].", parse="eps", shown=False)
    attack_steps: int = option(10, "Training attack steps (0: no attack).")
    attack_step: float = option(2 / 255, "Training attack step size [default: 2/255].", parse="eps", shown=False)
    attack_start: str = option("normal", "Attack start: normal, uniform or none.")  # normal: x + step N(0, I)
    war_zeta: float | None = option(None, "WAR: target l_nat/l_rob ratio (turns WAR on).", shown=False)
    war_alpha: float = 0.1
    war_calibrate: bool = False
    augment: str = option("crop-flip", "crop-flip, crop or none [default: crop-flip; crop on digits].", shown=False)
    best_metric: str = option("pgd20", "Validation metric that picks best.pt: pgd20 or cw40.")
    best_from: float = 0.5  # fraction of epochs before best.pt is tracked
    save_epochs: tuple[int, ...] = option(
        (), "Also keep checkpoints after these epochs, e.g. 75,90.", parse="int_list", shown=False
    )
    eval_every: int = option(1, "Validate every N epochs (and always after the last).")
    seed: int = option(0, "Seed of data order, augmentation, attacks and init.")
    device: str = option("auto", "auto, cpu or cuda.")
    precision: str = option("auto", "auto, fp32 or bf16 (autocast for training; see --val-precision).")
    val_precision: str = option(
        "auto", "Per-epoch validation precision: auto (bf16 when training runs in bf16), fp32 or bf16."
    )
    channels_last: bool = option(True, "channels_last tensors.")
    compile: bool | None = option(  # None: auto, resolved once per run (trainers.step.resolve_compile)
        None,
        "torch.compile the model and attack model [default: auto, on where it measured faster: "
        "basic-block networks on a CPU, runs of >= 2000 steps].",
    )
    fused: bool | None = option(  # None: where measured faster (trainers.fused)
        None,
        "Run the blocks through the fast runtime's fused formulations (the same function) "
        "[default: auto, on where it measured faster: a CPU without --compile].",
    )
    recipe: str | None = None
    init_from: str | None = option(  # run directory or checkpoint whose weights replace the fresh init
        None,
        "Fine-tune: start from the weights of this run directory or checkpoint (e.g. `scaler import`'s); "
        "the model is its own unless MODEL is given.",
        shown=False,
    )
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ScalerError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.schedule not in SCHEDULES:
            raise ScalerError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ScalerError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.val_precision not in PRECISIONS:
            raise ScalerError(f"unknown --val-precision {self.val_precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ScalerError(f"unknown device {self.device!r}; choose auto, cpu or cuda")
        for name in ("epochs", "batch_size", "val_n", "eval_every"):
            if getattr(self, name) < 1:
                raise ScalerError(f"--{name.replace('_', '-')} must be >= 1")
        if self.attack_steps < 0:
            raise ScalerError("--attack-steps must be >= 0")
        for (low, high, closed), names in NUMERIC_RANGES.items():
            for name in names:
                value = getattr(self, name)
                if value is not None and not _within(value, low, high, closed):
                    flag = "--" + name.replace("_", "-")
                    raise ScalerError(f"{flag} must be {_describe_range(low, high, closed)} (got {value})")
        if self.augment not in ("crop-flip", "crop", "none"):
            raise ScalerError("--augment must be crop-flip, crop or none")
        if self.best_metric not in ("pgd20", "cw40"):
            raise ScalerError("--best-metric must be pgd20 or cw40")
        if self.attack_start not in ("normal", "uniform", "none"):
            raise ScalerError("--attack-start must be normal, uniform or none")
        if (self.war_zeta is not None or self.war_calibrate) and self.method not in ("trades", "mart"):
            raise ScalerError("WAR applies to the lambda-form losses: use --method trades or mart")

    def milestone_epochs(self) -> list[int]:
        return sorted({max(1, round(f * self.epochs)) for f in self.milestones})

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.milestones = tuple(cfg.milestones)
        cfg.save_epochs = tuple(cfg.save_epochs)
        return cfg


def config_differences(saved: TrainConfig, wanted: TrainConfig, ignore=()) -> list[str]:
    """'FLAG SAVED vs WANTED' for each setting of `wanted` (a run's command given again) that
    differs from the `saved` run's; `epochs`, the record `extra` and the fields in `ignore` aside.
    Specs compare as specs (their JSON round trip turns tuples into lists)."""
    out = []
    for f in fields(TrainConfig):
        if f.name in {"epochs", "extra", *ignore}:
            continue
        a, b = getattr(saved, f.name), getattr(wanted, f.name)
        if f.name == "spec":
            a, b = (_spec_text(s) for s in (a, b))
        if _same(a, b):
            continue
        flag = {"spec": "the architecture flags", "model": "MODEL"}.get(f.name, "--" + f.name.replace("_", "-"))
        out.append(f"{flag} {a} vs {b}")
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _spec_text(spec: dict | None) -> str:
    """A spec as `describe` writes it, with its knobs that are not the defaults (two specs that
    describe alike can differ in a knob)."""
    from scaler.spec import KNOBS, ArchSpec

    if spec is None:
        return "none"
    arch = ArchSpec.from_dict(spec)
    knobs = [f"{k}={v}" for k, v in arch.to_dict().items() if k in KNOBS and k != "block"]
    return arch.describe() + (f" ({', '.join(knobs)})" if knobs else "")


_TRADES_MART_COMMON = dict(
    eps=0.031,
    attack_step=0.007,
    attack_steps=10,
    beta=6.0,
    lr=0.1,
    batch_size=128,
    schedule="step",
    grad_clip=0.0,
    attack_start="normal",
)
"""What the TRADES and MART papers' CIFAR-10 recipes share (their released training scripts)."""

_PGD_AT_100 = dict(
    lr=0.1,
    momentum=0.9,
    batch_size=128,
    epochs=100,
    schedule="step",
    milestones=(0.75, 0.9),
    grad_clip=5.0,
    attack_step=2 / 255,
    eps=8 / 255,
    attack_start="normal",
    augment="crop-flip",
)
"""What the bat and NARes recipes share: 100 epochs of SGD at 0.1 decayed at 75% and 90%, PGD at
eps 8/255 with steps of 2/255 from a normal start, crop-and-flip augmentation."""

RECIPES: dict[str, dict] = {
    # RobustWRN / RobustResNet baseline adversarial training.
    "bat": dict(
        _PGD_AT_100,
        weight_decay=2e-4,
        wd_exclude_bn_bias=False,
        attack_steps=10,
        beta=6.0,
        best_metric="pgd20",
        best_from=0.5,
    ),
    # NARes: Madry PGD-AT, 7 steps, wd only on non-BN non-bias params, mixed precision, CIFAR-10.1
    # validation, best by CW-40, checkpoints after epochs 75, 90, 100 (their 0-based 74, 89, 99).
    "nares": dict(
        _PGD_AT_100,
        method="pgd-at",
        weight_decay=5e-4,
        wd_exclude_bn_bias=True,
        drop_last=True,
        attack_steps=7,
        precision="auto",
        best_metric="cw40",
        best_from=0.0,
        save_epochs=(75, 90, 100),
    ),
    "trades-paper": dict(_TRADES_MART_COMMON, method="trades", weight_decay=2e-4, epochs=76, milestones=(75 / 76,)),
    "mart-paper": dict(_TRADES_MART_COMMON, method="mart", weight_decay=7e-4, epochs=90, milestones=(75 / 90, 1.0)),
}


def make_config(recipe: str | None, overrides: dict, *, milestone_epochs: tuple[int, ...] | None = None) -> TrainConfig:
    """Defaults, then the recipe, then every explicit (non-None) override, then the policies that
    depend on the result: `milestone_epochs` (step-schedule epochs, e.g. 75,90) become fractions of
    the run's epochs, and digits (not mirror-symmetric) train with crops only unless told."""
    cfg = TrainConfig()
    if recipe is not None:
        if recipe not in RECIPES:
            raise ScalerError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        for k, v in RECIPES[recipe].items():
            setattr(cfg, k, v)
        cfg.recipe = recipe
    known = {f.name for f in fields(TrainConfig)}
    for k, v in overrides.items():
        if k not in known:
            raise ScalerError(f"unknown training option {k!r}")
        if v is not None:
            setattr(cfg, k, v)
    if milestone_epochs is not None:
        if any(m < 1 or m > cfg.epochs for m in milestone_epochs):
            raise ScalerError(
                f"--milestones must lie in 1..{cfg.epochs} (the run's epochs), got {list(milestone_epochs)}"
            )
        cfg.milestones = tuple(m / cfg.epochs for m in milestone_epochs)
    if overrides.get("augment") is None and cfg.dataset == "digits" and cfg.augment == "crop-flip":
        cfg.augment = "crop"
    cfg.validate()
    return cfg
