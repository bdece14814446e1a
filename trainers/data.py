"""Datasets as whole tensors, and batched augmentation on the training device.

`load_split(name, split, data_dir)` returns (images float32 N x 3 x R x R in [0, 1], labels int64),
R = 32, or 64 for Tiny-ImageNet. Nothing is ever downloaded: CIFAR comes from a local directory in
the standard python layout (or its .tar.gz), Tiny-ImageNet from a local directory in its standard
layout (decoded with Pillow), digits from scikit-learn's bundled copy, and `synthetic` is generated.
"""

from __future__ import annotations

import importlib.util
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scaler.errors import ScalerError

DATASETS = ("cifar10", "cifar100", "tinyimagenet", "digits", "synthetic")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "tinyimagenet": 200, "digits": 10, "synthetic": 10}
RESOLUTION = {"tinyimagenet": 64}
"""Image side of the datasets that are not 32 x 32."""
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
CIFAR_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
    ),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], ["test"], b"fine_labels"),
}
NEEDS_PILLOW = "tinyimagenet needs Pillow to decode its JPEGs (pip install pillow)"
NEEDS_SKLEARN = "the digits dataset needs scikit-learn (pip install scikit-learn)"
CIFAR101_FILES = ("cifar10.1_v6_data.npy", "cifar10.1_v6_labels.npy")


def load_split(name: str, split: str, data_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of a dataset as (float32 N x 3 x 32 x 32 in [0, 1], int64 labels), on the CPU."""
    check_split(name, split, data_dir)
    if name in CIFAR_LAYOUT:
        return _load_cifar(name, split, data_dir)
    if name == "tinyimagenet":
        return load_tiny_imagenet(split, data_dir)
    if name == "digits":
        return _load_digits(split)
    if name == "synthetic":
        return _synthetic(split)
    if name == "cifar10.1":
        return load_cifar101(data_dir)
    raise AssertionError(f"check_split passed dataset {name!r} that load_split cannot read")


def check_split(name: str, split: str, data_dir: str | Path | None = None, *, local: bool = True) -> None:
    """Refuse what `load_split` would refuse before reading a file: an unknown dataset or split, a
    missing --data-dir, or a data directory without the dataset's files (cheap: nothing is decoded,
    so a training run checks this before it creates its run directory). `local=False` checks only
    what does not depend on this machine (a cluster's workers read their own --data-dir)."""
    if split not in ("train", "test"):
        raise ScalerError(f"unknown split {split!r}; use train or test")
    if name not in (*DATASETS, "cifar10.1"):
        raise ScalerError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} (or cifar10.1)")
    if name == "cifar10.1" and split != "test":
        raise ScalerError("cifar10.1 has only a test split (use it for validation)")
    if not local:
        if data_dir is None and name not in ("digits", "synthetic"):
            raise ScalerError(f"{name} needs --data-dir (a directory the cluster's nodes read)")
        return
    if name in CIFAR_LAYOUT:
        _cifar_sources(name, data_dir)
    elif name == "tinyimagenet":
        if importlib.util.find_spec("PIL") is None:
            raise ScalerError(NEEDS_PILLOW)
        _tiny_root(data_dir)
    elif name == "digits":
        if importlib.util.find_spec("sklearn") is None:
            raise ScalerError(NEEDS_SKLEARN)
    elif name == "cifar10.1":
        _cifar101_paths(data_dir)


# --------------------------------------------------------------------------- CIFAR
def _cifar_sources(name: str, data_dir: str | Path | None):
    folder, archive, *_ = CIFAR_LAYOUT[name]
    if data_dir is None:
        raise ScalerError(f"{name} needs --data-dir: a directory holding {folder}/ or {archive}")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise ScalerError(f"data directory {root} does not exist")
    for candidate in (root / folder, root):
        if candidate.is_dir() and (candidate / CIFAR_LAYOUT[name][3][0]).is_file():
            return candidate, None
    for candidate in (root / archive, root):
        if candidate.is_file() and candidate.name.endswith((".tar.gz", ".tgz", ".tar")):
            return None, candidate
    raise ScalerError(f"{name} not found: expected {root / folder}/ (python version) or {root / archive}")


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        obj = pickle.loads(raw, encoding="bytes")
    except Exception as exc:  # corrupt or truncated file: say which
        raise ScalerError(f"corrupt CIFAR file {where}: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ScalerError(f"corrupt CIFAR file {where}: not a pickled dict")
    return obj


def _decode(batch: dict, label_key: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    if b"data" not in batch or label_key not in batch:
        raise ScalerError(
            f"corrupt CIFAR file {where}: missing {'data' if b'data' not in batch else label_key.decode()}"
        )
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ScalerError(f"corrupt CIFAR file {where}: data {data.shape}, {len(labels)} labels (want N x 3072)")
    return data, labels


def _load_cifar(name: str, split: str, data_dir) -> tuple[torch.Tensor, torch.Tensor]:
    folder_name, _, train_files, test_files, label_key = CIFAR_LAYOUT[name]
    files = train_files if split == "train" else test_files
    folder, archive = _cifar_sources(name, data_dir)
    parts = []
    if folder is not None:
        for f in files:
            path = folder / f
            if not path.is_file():
                raise ScalerError(f"{name}: expected file {path} is missing")
            parts.append(_decode(_unpickle(path.read_bytes(), str(path)), label_key, str(path)))
    else:
        try:
            with tarfile.open(archive) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                for f in files:
                    if f not in members:
                        raise ScalerError(f"{name}: {archive} has no {folder_name}/{f}")
                    raw = tar.extractfile(members[f]).read()
                    parts.append(_decode(_unpickle(raw, f"{archive}:{f}"), label_key, f"{archive}:{f}"))
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ScalerError(f"corrupt archive {archive}: {exc}") from None
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    n_classes = NUM_CLASSES[name]
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ScalerError(f"{name}: labels outside 0..{n_classes - 1}")
    images = torch.from_numpy(data).view(-1, 3, 32, 32).float().div_(255)
    return images, torch.from_numpy(labels)


def load_cifar101(data_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10.1 v6 (2,000 test images, HWC uint8) as a validation set."""
    paths = _cifar101_paths(data_dir)
    root = paths[0].parent
    try:
        data, labels = (np.load(p, allow_pickle=False) for p in paths)
    except Exception as exc:
        raise ScalerError(f"corrupt CIFAR-10.1 file in {root}: {exc}") from None
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] != (32, 32, 3) or len(labels) != len(data):
        raise ScalerError(f"corrupt CIFAR-10.1 data: {data.shape} {data.dtype}, {len(labels)} labels")
    images = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).float().div_(255).contiguous()
    return images, torch.from_numpy(labels.astype(np.int64))


def _cifar101_paths(data_dir) -> list[Path]:
    if data_dir is None:
        raise ScalerError(f"cifar10.1 needs --data-dir holding {CIFAR101_FILES[0]} and {CIFAR101_FILES[1]}")
    root = Path(data_dir).expanduser()
    paths = [root / f for f in CIFAR101_FILES]
    for p in paths:
        if not p.is_file():
            raise ScalerError(f"cifar10.1: expected file {p} is missing")
    return paths


# --------------------------------------------------------------------------- Tiny-ImageNet
def _tiny_root(data_dir) -> Path:
    if data_dir is None:
        raise ScalerError(
            f"tinyimagenet needs --data-dir: a directory holding {TINY_IMAGENET_FOLDER}/ (or its contents)"
        )
    root = Path(data_dir).expanduser()
    for candidate in (root / TINY_IMAGENET_FOLDER, root):
        if (candidate / "wnids.txt").is_file():
            return candidate
    raise ScalerError(f"tinyimagenet not found: expected {root / TINY_IMAGENET_FOLDER}/wnids.txt")


def load_tiny_imagenet(split: str, data_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiny-ImageNet (200 classes, 64 x 64) from its standard layout: wnids.txt,
    train/<wnid>/images/*.JPEG, val/images/*.JPEG with val/val_annotations.txt (file, wnid, box).
    The labelled val split serves as the test split (the official test split has no labels).
    Classes are the sorted wnids (as an ImageFolder on train/ numbers them)."""
    try:
        from PIL import Image
    except ImportError:
        raise ScalerError(NEEDS_PILLOW) from None
    root = _tiny_root(data_dir)
    wnids = sorted({w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()})
    if not wnids:
        raise ScalerError(f"tinyimagenet: {root / 'wnids.txt'} lists no classes")
    index = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        files = []
        for w in wnids:
            folder = root / "train" / w / "images"
            if not folder.is_dir():
                raise ScalerError(f"tinyimagenet: expected folder {folder} is missing")
            files += [(p, index[w]) for p in sorted(folder.glob("*.JPEG"))]
    else:
        notes = root / "val" / "val_annotations.txt"
        if not notes.is_file():
            raise ScalerError(f"tinyimagenet: expected file {notes} is missing")
        files = []
        for n, line in enumerate(notes.read_text().splitlines(), 1):
            parts = line.split("\t")
            if not line.strip():
                continue
            if len(parts) < 2 or parts[1] not in index:
                raise ScalerError(f"tinyimagenet: {notes}, line {n}: not 'file<TAB>wnid...' with a known wnid")
            files.append((root / "val" / "images" / parts[0], index[parts[1]]))
    if not files:
        raise ScalerError(f"tinyimagenet: no {split} images under {root}")
    side = RESOLUTION["tinyimagenet"]
    data = np.empty((len(files), side, side, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as exc:  # missing, truncated or not an image
            raise ScalerError(f"tinyimagenet: cannot read {path}: {exc}") from None
        if pixels.shape != (side, side, 3):
            raise ScalerError(f"tinyimagenet: {path} is {pixels.shape[1]}x{pixels.shape[0]}, not {side}x{side}")
        data[i] = pixels
    images = torch.from_numpy(data).permute(0, 3, 1, 2).float().div_(255).contiguous()
    return images, torch.tensor([label for _, label in files], dtype=torch.int64)


# --------------------------------------------------------------------------- digits / synthetic
def _load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits, upsampled to 3x32x32; fixed seeded 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ScalerError(NEEDS_SKLEARN) from None
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False).clamp_(0, 1)
    images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    n_test = len(labels) // 5
    idx = order[n_test:] if split == "train" else order[:n_test]
    return images[idx].contiguous(), labels[idx].contiguous()


def _synthetic(split: str, n_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny learnable set for tests: per-class smooth templates plus noise (256 train, 128 test)."""
    g = torch.Generator().manual_seed(1234)
    templates = F.interpolate(torch.rand(n_classes, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear")
    n = 256 if split == "train" else 128
    g.manual_seed(1 if split == "train" else 2)
    labels = torch.arange(n) % n_classes
    images = (templates[labels] + 0.15 * torch.randn(n, 3, 32, 32, generator=g)).clamp_(0, 1)
    return images, labels


# --------------------------------------------------------------------------- splits and batches
def holdout(images, labels, n_val: int, seed: int = 0):
    """Split a training set into (train, val) with a fixed seeded permutation."""
    if not 0 < n_val < len(labels):
        raise ScalerError(f"validation size {n_val} must be between 1 and {len(labels) - 1}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val], order[n_val:]
    return (images[train], labels[train]), (images[val], labels[val])


def augment(x: torch.Tensor, generator: torch.Generator, *, crop: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip for a whole batch, as tensor ops."""
    n, _, h, w = x.shape
    if crop:
        padded = F.pad(x, (crop, crop, crop, crop))
        dy = torch.randint(0, 2 * crop + 1, (n,), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * crop + 1, (n,), device=x.device, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if flip:
        mask = torch.rand(n, device=x.device, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def batches(n: int, batch_size: int, generator: torch.Generator | None, device, drop_last: bool = False):
    """Index tensors of a (seeded) shuffled epoch."""
    if generator is None:
        order = torch.arange(n, device=device)
    else:
        order = torch.randperm(n, device=device, generator=generator)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
