"""Datasets read from a local directory, as ``{"train": (x, y), "val": ..., "test": ...}``
(plus ``"writers"`` for FEMNIST: its natural partition).

- ``mnist``, ``cifar10``: the denoising recipe's readers (IDX files; ``cifar-10-batches-py``).
  Validation is the last 5,000 training images (a tenth of a smaller set); the official test set is the test set.
- ``femnist``: LEAF's JSON format: ``root/train/*.json`` and ``root/test/*.json``, each
  ``{"users": [...], "user_data": {user: {"x": [[784 floats]], "y": [labels]}}}``. Every writer is
  a client (``partition: natural``); a writer's LEAF test samples are its own held-out set, and
  all of them pooled are the global test set; LEAF has no validation split, so validation is
  every tenth writer's test samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from bilevel_dist._checks import ConfigError

Splits = dict[str, tuple[Tensor, Tensor]]
_VAL = 5000


def _with_val(x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor) -> Splits:
    cut = len(y) - min(_VAL, len(y) // 10)
    return {"train": (x[:cut], y[:cut]), "val": (x[cut:], y[cut:]), "test": (x_test, y_test)}


def mnist(root: str) -> Splits:
    from bilevel_dist.recipes.data_denoising.data import read_mnist

    return _with_val(*read_mnist(root))


def cifar10(root: str) -> Splits:
    from bilevel_dist.recipes.data_denoising.data import read_cifar10

    return _with_val(*read_cifar10(root))


def _leaf(folder: Path) -> dict[str, dict[str, list]]:
    files = sorted(folder.glob("*.json"))
    if not files:
        raise ConfigError("root", f"{folder} holds no LEAF .json files")
    users: dict[str, dict[str, list]] = {}
    for file in files:
        try:
            blob = json.loads(file.read_text())
            data = blob["user_data"]
        except (ValueError, KeyError) as error:
            raise ConfigError("root", f"{file} is not a LEAF JSON file ({error})") from None
        for user in blob.get("users", list(data)):
            entry = users.setdefault(user, {"x": [], "y": []})
            entry["x"] += data[user]["x"]
            entry["y"] += data[user]["y"]
    return users


def femnist(root: str) -> tuple[Splits, list[Tensor], list[Tensor]]:
    """The splits, and each writer's training and test indices (into ``train`` and ``test``)."""
    path = Path(root).expanduser()
    for split in ("train", "test"):
        if not (path / split).is_dir():
            raise ConfigError("root", f"{root!r} lacks LEAF's {split}/ folder of JSON files")
    train, test = _leaf(path / "train"), _leaf(path / "test")
    writers = [u for u in train if train[u]["y"]]
    xs, ys, txs, tys, own, own_test = [], [], [], [], [], []
    n = nt = 0
    for user in writers:  # once, at setup
        x, y = train[user]["x"], train[user]["y"]
        xs += x
        ys += y
        own.append(torch.arange(n, n + len(y)))
        n += len(y)
        tx, ty = test.get(user, {"x": [], "y": []})["x"], test.get(user, {"x": [], "y": []})["y"]
        txs += tx
        tys += ty
        own_test.append(torch.arange(nt, nt + len(ty)))
        nt += len(ty)
    side = int(round(len(xs[0]) ** 0.5))
    images = torch.tensor(xs, dtype=torch.float32).view(-1, 1, side, side)
    test_images = torch.tensor(txs, dtype=torch.float32).view(-1, 1, side, side)
    labels, test_labels = torch.tensor(ys), torch.tensor(tys)
    val = torch.cat([own_test[i] for i in range(0, len(writers), 10)]) if own_test else torch.zeros(0, dtype=torch.long)
    splits = {
        "train": (images, labels),
        "val": (test_images[val], test_labels[val]),
        "test": (test_images, test_labels),
    }
    return splits, own, own_test
