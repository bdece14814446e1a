"""Small shared builders for the tests (a module, not conftest: importable by name)."""

import pickle

import numpy as np

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


def write_cifar10(root, n=6, corrupt=None):
    """A CIFAR-10 python-version folder in the standard layout with `n` random images per batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"] * 10}))
    if corrupt:
        (folder / corrupt).write_bytes(b"\x80\x04garbage")
    return folder


def write_tiny_imagenet(root, wnids=("n02", "n01", "n03"), per_class=2, n_val=4, size=64):
    """A small Tiny-ImageNet in its standard layout (random JPEGs; one val image is grayscale)."""
    from PIL import Image

    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(0)
    for w in wnids:
        folder = base / "train" / w / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{w}_{i}.JPEG")
    lines = []
    for i in range(n_val):
        name = f"val_{i}.JPEG"
        pixels = rng.integers(0, 256, (size, size) if i == 0 else (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(base / "val" / "images" / name)
        lines.append(f"{name}\t{wnids[i % len(wnids)]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base
