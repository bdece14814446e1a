"""Small shared builders for the trainer tests (a module, not conftest: importable by name)."""

from scaler.spec import ArchSpec
from trainers.config import make_config

TINY = ArchSpec("basic", (1, 1, 1), (16, 32, 64)).to_dict()
TINY_ARGS = [
    "--block",
    "basic",
    "--depths",
    "1,1,1",
    "--widths",
    "1,1,1",
    "--dataset",
    "synthetic",
    "--batch-size",
    "64",
    "--attack-steps",
    "1",
    "--val-n",
    "16",
    "--epochs",
    "1",
]


def tiny_config(**overrides):
    base = dict(
        model="spec",
        spec=TINY,
        dataset="synthetic",
        epochs=3,
        batch_size=64,
        lr=0.05,
        attack_steps=2,
        attack_step=2 / 255,
        val_n=32,
        eval_every=1,
        seed=0,
    )
    base.update(overrides)
    return make_config(None, base)
