"""Trial results as records: NARes's exact format (reference section 4) and a flat row per trial.

Pure functions of a trial's data; `studies.results` reads the store and calls them. Accuracies
are percentages, as `scaler eval` prints them. A metric a study did not measure (an attack not in
--test-attacks, an epoch that did not validate, CIFAR-10-C corruptions) is null, never invented.
NARes numbers epochs from 0 (`best_epoch`, list indices); flat rows keep the trainer's 1-based
epochs.
"""

from __future__ import annotations

import statistics

from scaler.spec import ArchSpec

# NARes per-epoch list -> our metrics.jsonl key (trainers.loop.validate)
HISTORY_KEYS = {
    "train_loss": "train_loss",
    "train_acc": "train_acc",
    "val_loss": "val_loss",
    "val_acc": "val_clean",
    "pgd": "val_pgd20",
    "pgd_stable": "val_stable",
    "pgd_lip": "val_lip",
    "pgd_loss": "val_pgd20_loss",
    "cw": "val_cw40",
    "cw_stable": "val_cw40_stable",
    "cw_lip": "val_cw40_lip",
    "cw_loss": "val_cw40_loss",
}
# NARes test_best key -> (our attack, field)
TEST_KEYS = {
    "test_clean_acc": ("clean", "accuracy"),
    "test_loss": ("clean", "loss"),
    "Linf_fgsm_acc": ("fgsm", "accuracy"),
    "Linf_fgsm_stable": ("fgsm", "stable"),
    "Linf_pgd_acc": ("pgd20", "accuracy"),
    "Linf_pgd_stable": ("pgd20", "stable"),
    "Linf_pgd_lip": ("pgd20", "lip"),
    "Linf_cw_acc": ("cw40", "accuracy"),
    "Linf_cw_stable": ("cw40", "stable"),
    "Linf_cw_lip": ("cw40", "lip"),
    "Linf_aa_acc": ("aa", "accuracy"),  # AutoAttack standard, else AA-Compact (what NARes ran)
}
VAL_COLUMNS = ("val_clean", "val_pgd20", "val_cw40", "val_stable", "val_lip")
TEST_ATTACKS = ("clean", "fgsm", "pgd20", "cw40", "aa")
_SPEC_DEFAULTS = {"block": "basic", "activation": "relu", "stem": 16}


def nares_arch(spec: dict) -> dict:
    """{D1, W1, D2, W2, D3, W3} (widening factors), plus block/activation/stem where a spec leaves
    NARes's pre-activation ReLU WRN with a 16-channel stem."""
    s = ArchSpec.from_dict(spec)
    out = {}
    for i, (d, w) in enumerate(zip(s.depths, s.widths), start=1):
        out[f"D{i}"], out[f"W{i}"] = d, w
    for key, default in _SPEC_DEFAULTS.items():
        if getattr(s, key) != default:
            out[key] = getattr(s, key)
    return out


def epoch_lists(history: list[dict]) -> dict[str, list]:
    """NARes's per-epoch lists from metrics.jsonl records; index i holds epoch i+1 (null if absent)."""
    by_epoch = {int(r["epoch"]): r for r in history}
    n = max(by_epoch, default=0)
    return {nares: [by_epoch.get(e, {}).get(ours) for e in range(1, n + 1)] for nares, ours in HISTORY_KEYS.items()}


def test_metric(test: dict, attack: str, field: str):
    """One test figure; `aa` falls back to `aa-compact`."""
    r = test.get(attack) or (test.get("aa-compact") if attack == "aa" else None)
    return None if r is None else r.get(field)


def to_nares_record(
    *,
    arch_id: int,
    spec: dict,
    params: int,
    flops: int,
    history: list[dict],
    best_epoch: int | None,
    test: dict,
    seed: int,
    device: str,
    finished: str,
    training_days: float,
) -> dict:
    """One NARes-format record. `best_epoch` is the 1-based epoch of the tested checkpoint;
    `training_days` the device-days of training (GPU-days on GPUs, as NARes's training_time)."""
    train = {
        "seed": seed,
        "gpu_type": device,
        "timestamp": finished[:10],
        "training_time": training_days,
        "best_epoch": None if best_epoch is None else best_epoch - 1,
        **epoch_lists(history),
    }
    test_best = {key: test_metric(test, attack, field) for key, (attack, field) in TEST_KEYS.items()}
    test_best["corruptions"] = None  # CIFAR-10-C is not evaluated by studies
    return {
        "arch_id": arch_id,
        "arch": nares_arch(spec),
        "MACs": float(flops),
        "Params": float(params),
        "train": [train],
        "test_best": [test_best],
    }


def trial_throughput(history: list[dict]) -> float | None:
    """A trial's training images/s: the median of its epochs' (trials sharing a GPU slow each
    other down; this is what the trial got). None for runs recorded before it was logged."""
    rates = [r["images_per_s"] for r in history if isinstance(r.get("images_per_s"), (int, float))]
    return statistics.median(rates) if rates else None


def flat_row(row) -> dict:
    """One flat dict per trial (a `store.TrialRow`): the table, --json, CSV and parquet columns."""
    s = ArchSpec.from_dict(row.spec)
    out = {"arch_id": row.arch_id, "status": row.status, "block": s.block, "activation": s.activation}
    for i, (d, w) in enumerate(zip(s.depths, s.widths), start=1):
        out[f"D{i}"], out[f"W{i}"] = d, w
    out.update(params=row.params, flops=row.flops, best_epoch=row.best_epoch, epochs=len(row.history or []))
    best = next((r for r in row.history or [] if r.get("epoch") == row.best_epoch), {})
    out.update({k: best.get(k) for k in VAL_COLUMNS})
    test = row.test or {}
    for attack in TEST_ATTACKS:
        out[f"test_{attack}"] = test_metric(test, attack, "accuracy")
    for attack in ("fgsm", "pgd20", "cw40"):
        out[f"test_{attack}_stable"] = test_metric(test, attack, "stable")
    for attack in ("pgd20", "cw40"):
        out[f"test_{attack}_lip"] = test_metric(test, attack, "lip")
    out["test_loss"] = test_metric(test, "clean", "loss")
    out["test_n"] = next((r.get("n") for r in test.values() if isinstance(r, dict)), None)
    out["images_per_s"] = trial_throughput(row.history or [])
    out.update(
        {k: getattr(row, k) for k in ("seconds", "gpu_hours", "cpu_hours", "attempts", "device", "finished", "error")}
    )
    return out
