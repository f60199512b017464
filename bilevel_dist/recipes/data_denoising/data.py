"""Noisy-label datasets for the denoising recipe: a noisy training set, a small clean validation
set and a clean test set.

``DigitsData`` needs nothing but scikit-learn's bundled 8×8 digits. ``MNISTData``,
``CIFAR10Data`` and ``SVHNData`` read a local directory in the datasets' standard distributed
formats (IDX files, the CIFAR "python version" pickles, SVHN's ``*_32x32.mat``); nothing is
downloaded. Training labels are corrupted by :func:`corrupt` with a fixed seed; ``flipped``
marks the samples whose label changed.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel_dist._checks import ConfigError
from bilevel_dist.lightning import BilevelDataModule, Samples
from bilevel_dist.recipes.data_denoising.noise import corrupt


class NoisyLabels(BilevelDataModule):
    """Splits ``load()``'s training pool into train and a clean validation set of ``n_val``,
    corrupts the training labels and standardises inputs with training statistics.

    Args:
        noise: rate of corrupted training labels.
        noise_type: ``"flip"`` (to a different class) or ``"uniform"`` (Ren et al.).
        n_val: clean validation samples taken from the training pool.
        split_seed: seed of the split and of the noise.
        **kwargs: :class:`BilevelDataModule` settings (batch sizes, seed, workers).
    """

    classes = 10

    def __init__(
        self, noise: float = 0.5, noise_type: str = "flip", n_val: int = 150, split_seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.noise, self.noise_type, self.n_val, self.split_seed = noise, noise_type, n_val, split_seed
        x_pool, y_pool, self.x_test, self.y_test = self.load()
        if not isinstance(n_val, int) or not 0 < n_val < len(y_pool):
            raise ConfigError(
                "n_val", f"n_val must be > 0 and leave training samples of the {len(y_pool)}, got {n_val}"
            )
        order = torch.randperm(len(y_pool), generator=torch.Generator().manual_seed(split_seed))
        val, train = order[:n_val], order[n_val:]
        self.y_clean = y_pool[train]
        self.y_train, self.flipped = corrupt(self.y_clean, noise, noise_type, self.classes, split_seed + 1)
        dims = (0, 2, 3) if x_pool.ndim == 4 else (0,)  # images: one statistic per channel
        mean = x_pool[train].mean(dims, keepdim=True)
        std = x_pool[train].std(dims, keepdim=True).clamp_min(1e-3)
        self.x_train, self.x_val = (x_pool[train] - mean) / std, (x_pool[val] - mean) / std
        self.y_val = y_pool[val]
        self.x_test = (self.x_test - mean) / std

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x_pool, y_pool, x_test, y_test)``: float inputs in [0, 1] and int64 labels."""
        raise NotImplementedError

    @property
    def n_train(self) -> int:
        """Number of training samples (one importance weight each)."""
        return len(self.y_train)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input."""
        return tuple(self.x_train.shape[1:])

    def datasets(self) -> tuple[Samples, Samples, Samples]:
        train = Samples(x=self.x_train, y=self.y_train, flipped=self.flipped)
        return train, Samples(x=self.x_val, y=self.y_val), Samples(x=self.x_test, y=self.y_test)


class DigitsData(NoisyLabels):
    """scikit-learn's bundled 8×8 digits (1,797): ``n_test`` clean test samples, ``n_val`` clean
    validation samples, the rest (1,147 by default) the noisy training set."""

    def __init__(self, n_test: int = 500, **kwargs: Any) -> None:
        if not isinstance(n_test, int) or not 0 < n_test < 1797:
            raise ConfigError("n_test", f"n_test must be > 0 and leave samples of the 1797 digits, got {n_test}")
        self.n_test = n_test
        super().__init__(**kwargs)

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(self.split_seed))
        x = torch.as_tensor(digits.data, dtype=torch.float32)[order] / 16.0
        y = torch.as_tensor(digits.target)[order]
        return x[self.n_test :], y[self.n_test :], x[: self.n_test], y[: self.n_test]


def _directory(root: str, names: list[str], what: str) -> Path:
    path = Path(os.path.expanduser(root))
    if not path.is_dir():
        raise ConfigError("root", f"{what} directory {root!r} does not exist")
    missing = [n for n in names if not (path / n).is_file() and not (path / f"{n}.gz").is_file()]
    if missing:
        raise ConfigError("root", f"{root!r} lacks the {what} file {missing[0]!r} (standard distribution format)")
    return path


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ConfigError("root", f"{path} is not an unsigned-byte IDX file")
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise ConfigError("root", f"{path} is truncated: {array.size} values for shape {shape}")
    return array.reshape(shape)


def read_mnist(root: str | Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST's four IDX files in ``root`` (each possibly ``.gz``): ``(x, y, x_test, y_test)``,
    images ``(n, 1, 28, 28)`` in [0, 1]."""
    path = _directory(str(root), MNISTData.FILES, "MNIST")

    def read(name: str) -> np.ndarray:
        return read_idx(path / name if (path / name).is_file() else path / f"{name}.gz")

    images, labels, test_images, test_labels = (read(n) for n in MNISTData.FILES)
    to_x = lambda a: torch.as_tensor(a.copy(), dtype=torch.float32).unsqueeze(1) / 255.0  # noqa: E731
    to_y = lambda a: torch.as_tensor(a.astype(np.int64))  # noqa: E731
    return to_x(images), to_y(labels), to_x(test_images), to_y(test_labels)


def read_cifar10(root: str | Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CIFAR-10's python batches in ``root`` (``cifar-10-batches-py``): ``(x, y, x_test, y_test)``,
    images ``(n, 3, 32, 32)`` in [0, 1]."""
    path = _directory(str(root), CIFAR10Data.FILES, "CIFAR-10")
    parts = [_cifar_batch(path, name) for name in CIFAR10Data.FILES[:5]]
    x_test, y_test = _cifar_batch(path, "test_batch")
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), x_test, y_test


def read_cifar10_test(root: str | Path) -> tuple[Tensor, Tensor]:
    """CIFAR-10's test batch alone (``test_batch`` in ``root``): ``(x_test, y_test)``."""
    return _cifar_batch(_directory(str(root), ["test_batch"], "CIFAR-10"), "test_batch")


def _cifar_batch(path: Path, name: str) -> tuple[Tensor, Tensor]:
    with open(path / name, "rb") as f:
        try:
            batch = pickle.load(f, encoding="bytes")
        except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
            raise ConfigError("root", f"{path / name} is not a CIFAR-10 python pickle: {error}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ConfigError("root", f"{path / name} has no b'data' / b'labels' entries")
    x = torch.as_tensor(np.asarray(batch[b"data"], dtype=np.uint8)).reshape(-1, 3, 32, 32).float() / 255.0
    return x, torch.as_tensor(batch[b"labels"], dtype=torch.int64)


class MNISTData(NoisyLabels):
    """MNIST from ``root`` holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each possibly ``.gz``); the paper's
    split is 59,000 train / 1,000 validation (``n_val: 1000``)."""

    FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]

    def __init__(self, root: str, **kwargs: Any) -> None:
        self.root = _directory(root, self.FILES, "MNIST")
        super().__init__(**kwargs)

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return read_mnist(self.root)


class CIFAR10Data(NoisyLabels):
    """CIFAR-10 from ``root`` = the extracted ``cifar-10-batches-py`` directory (``data_batch_1``
    … ``data_batch_5``, ``test_batch``); the paper's split is 40,000 / 10,000 (``n_val: 10000``)."""

    FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

    def __init__(self, root: str, **kwargs: Any) -> None:
        self.root = _directory(root, self.FILES, "CIFAR-10")
        super().__init__(**kwargs)

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return read_cifar10(self.root)


class SVHNData(NoisyLabels):
    """SVHN from ``root`` holding ``train_32x32.mat`` and ``test_32x32.mat`` (label 10 is the
    digit 0); ``grey`` converts to one channel as the paper did (72,257 / 1,000 / 26,032)."""

    FILES = ["train_32x32.mat", "test_32x32.mat"]

    def __init__(self, root: str, grey: bool = True, **kwargs: Any) -> None:
        self.root, self.grey = _directory(root, self.FILES, "SVHN"), grey
        super().__init__(**kwargs)

    def _read(self, name: str) -> tuple[Tensor, Tensor]:
        from scipy.io import loadmat

        try:
            mat = loadmat(self.root / name)
        except Exception as error:  # noqa: BLE001 - any parse failure means a bad file
            raise ConfigError("root", f"{self.root / name} is not a MATLAB file: {error}") from None
        if "X" not in mat or "y" not in mat:
            raise ConfigError("root", f"{self.root / name} has no 'X' / 'y' arrays")
        x = torch.as_tensor(mat["X"]).permute(3, 2, 0, 1).float() / 255.0
        if self.grey:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        y = torch.as_tensor(mat["y"].reshape(-1).astype(np.int64)) % 10
        return x, y

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (*self._read(self.FILES[0]), *self._read(self.FILES[1]))
