"""Data loaders on small generated CIFAR-format files, digits, errors, and batched augmentation."""

import pickle
import tarfile

import numpy as np
import pytest
import torch

from scaler.errors import ScalerError
from tests_support import write_cifar10
from trainers.data import augment, holdout, load_cifar101, load_split


def test_cifar10_folder_and_tarball_agree(tmp_path):
    folder = write_cifar10(tmp_path / "plain")
    x, y = load_split("cifar10", "train", tmp_path / "plain")
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    raw = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")
    # CHW order: the first 1024 bytes are the red plane of image 0.
    assert torch.allclose(x[0, 0].flatten(), torch.tensor(raw[b"data"][0, :1024], dtype=torch.float32) / 255)
    tar_dir = tmp_path / "tar"
    tar_dir.mkdir()
    with tarfile.open(tar_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    x2, y2 = load_split("cifar10", "train", tar_dir)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    xt, _ = load_split("cifar10", "test", tar_dir)
    assert len(xt) == 6


def test_cifar100_layout(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 7), ("test", 3)):
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": list(range(n)),
            b"coarse_labels": [0] * n,
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    x, y = load_split("cifar100", "train", tmp_path)
    assert x.shape == (7, 3, 32, 32) and y.tolist() == list(range(7))


def test_cifar101(tmp_path):
    data = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "cifar10.1_v6_data.npy", data)
    np.save(tmp_path / "cifar10.1_v6_labels.npy", np.arange(5))
    x, y = load_cifar101(tmp_path)
    assert x.shape == (5, 3, 32, 32) and torch.allclose(x[1, 2], torch.tensor(data[1, :, :, 2]) / 255)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "not found: expected"),
        (lambda p: write_cifar10(p, corrupt="data_batch_3"), "corrupt CIFAR file"),
        (
            lambda p: (write_cifar10(p), (p / "cifar-10-batches-py" / "data_batch_5").unlink()),
            "data_batch_5 is missing",
        ),
        (lambda p: (p / "cifar-10-python.tar.gz").write_bytes(b"not a tarball"), "corrupt archive"),
    ],
)
def test_missing_and_corrupt_cifar_errors(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(ScalerError, match=message):
        load_split("cifar10", "train", tmp_path)


def test_no_data_dir_and_unknown_dataset():
    with pytest.raises(ScalerError, match="--data-dir"):
        load_split("cifar10", "train", None)
    with pytest.raises(ScalerError, match="unknown dataset"):
        load_split("imagenet", "train")
    with pytest.raises(ScalerError, match="does not exist"):
        load_split("cifar10", "train", "/nonexistent/dir")


def test_digits_is_fixed_and_disjoint():
    xtr, ytr = load_split("digits", "train")
    xte, yte = load_split("digits", "test")
    assert xtr.shape[1:] == (3, 32, 32) and len(xtr) + len(xte) == 1797
    assert torch.equal(load_split("digits", "test")[0], xte)
    assert set(ytr.tolist()) == set(range(10))
    # No test image appears in train.
    flat_tr = {tuple(v) for v in xtr[:, 0, ::4, ::4].flatten(1).mul(1000).round().int().tolist()}
    overlap = sum(tuple(v) in flat_tr for v in xte[:, 0, ::4, ::4].flatten(1).mul(1000).round().int().tolist())
    assert overlap <= 5  # a few digits in the set are pixel-identical duplicates


def test_holdout_is_seeded_and_disjoint():
    x, y = torch.arange(50).float().view(50, 1, 1, 1), torch.arange(50)
    (tx, ty), (vx, vy) = holdout(x, y, 10, seed=0)
    assert len(vy) == 10 and len(ty) == 40 and not set(ty.tolist()) & set(vy.tolist())
    assert torch.equal(holdout(x, y, 10, seed=0)[1][1], vy)


def test_augment_crops_windows_and_flips():
    x = torch.rand(6, 3, 8, 8)
    a = augment(x, torch.Generator().manual_seed(0), crop=2, flip=True)
    b = augment(x, torch.Generator().manual_seed(0), crop=2, flip=True)
    assert torch.equal(a, b) and a.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(2)) for w in windows)
    flips = augment(x, torch.Generator().manual_seed(1), crop=0, flip=True)
    assert all(torch.equal(flips[i], x[i]) or torch.equal(flips[i], x[i].flip(2)) for i in range(6))
    assert torch.equal(augment(x, torch.Generator(), crop=0, flip=False), x)
