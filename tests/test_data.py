"""Data loaders on small generated CIFAR-format files, digits, errors, and batched augmentation."""

import json
import pickle
import tarfile

import numpy as np
import pytest
import torch

from scaler.errors import ScalerError
from tests_support import write_cifar10, write_tiny_imagenet
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


# --------------------------------------------------------------------------- Tiny-ImageNet
def test_tiny_imagenet_layout_loads_at_64_with_sorted_wnids(tmp_path):
    from PIL import Image

    base = write_tiny_imagenet(tmp_path)
    x, y = load_split("tinyimagenet", "train", tmp_path)
    assert x.shape == (6, 3, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    # Classes are the sorted wnids: n01 -> 0, n02 -> 1, n03 -> 2, and the train images in that order.
    assert y.tolist() == [0, 0, 1, 1, 2, 2]
    first = np.array(Image.open(base / "train" / "n01" / "images" / "n01_0.JPEG").convert("RGB"))
    assert torch.allclose(x[0], torch.from_numpy(first).permute(2, 0, 1).float() / 255)
    xt, yt = load_split("tinyimagenet", "test", base)  # the folder itself works too
    assert xt.shape == (4, 3, 64, 64) and yt.tolist() == [1, 0, 2, 1]  # labels from val_annotations.txt
    assert torch.equal(xt[0, 0], xt[0, 1])  # the grayscale image became RGB


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: (b / "val" / "val_annotations.txt").unlink(), "val_annotations.txt is missing"),
        (lambda b: (b / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\n"), "known wnid"),
        (lambda b: (b / "train" / "n01" / "images" / "n01_0.JPEG").write_bytes(b"not a jpeg"), "cannot read"),
        (lambda b: (b / "wnids.txt").unlink(), "wnids.txt"),
    ],
)
def test_tiny_imagenet_errors_are_one_line(tmp_path, damage, message):
    base = write_tiny_imagenet(tmp_path)
    damage(base)
    with pytest.raises(ScalerError, match=message):
        load_split("tinyimagenet", "test" if "annotations" in message or "wnid" in message else "train", tmp_path)


def test_tiny_imagenet_refuses_other_sizes(tmp_path):
    write_tiny_imagenet(tmp_path, size=32)
    with pytest.raises(ScalerError, match="32x32, not 64x64"):
        load_split("tinyimagenet", "train", tmp_path)


@pytest.mark.slow
def test_train_on_tiny_imagenet_end_to_end(tmp_path, capsys):
    """64x64 inputs, 200 classes: the model is built for the data and its FLOPs counted at 64."""
    from scaler.cost import count
    from scaler.spec import ArchSpec
    from scaler_cli.app import main

    write_tiny_imagenet(tmp_path / "data", per_class=4)
    out = tmp_path / "run"
    args = ["train", "--block", "robust", "--depths", "1,1,1", "--widths", "1,1,1", "--norm", "group"]
    args += ["--base-width", "40", "--dataset", "tinyimagenet", "--data-dir", str(tmp_path / "data")]
    args += ["--epochs", "1", "--batch-size", "4", "--val-size", "2", "--val-n", "2", "--attack-steps", "1"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    spec = ArchSpec.from_dict(config["spec"])
    assert spec.resolution == 64 and spec.num_classes == 200 and spec.norm == "group"
    expected = count(spec)
    source = (out / "model.py").read_text()
    assert (
        f"params: {expected.params:,}" in source
        and f"flops: {expected.flops:,} (fvcore multiply-adds, 1x3x64x64" in source
    )
    ckpt = torch.load(out / "last.pt", weights_only=True)["model"]
    assert ckpt["fc.weight"].shape == (200, 256)
    assert sum(v.numel() for k, v in ckpt.items() if "running" not in k and "num_batches" not in k) == expected.params
    assert main(["eval", str(out), "--n", "3", "--attacks", "clean", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["clean"]["n"] == 3
