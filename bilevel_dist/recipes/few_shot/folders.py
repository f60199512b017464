"""Few-shot image datasets read from a local directory in their usual distributed layouts:
Omniglot (Lake et al. 2015) and mini-ImageNet (Vinyals et al. 2016, Ravi & Larochelle's split).
Nothing is downloaded.

Each loader returns one :class:`ClassPool` per split (``"train"``, ``"val"``, ``"test"``) of float32
images in ``[0, 1]`` shaped ``(classes, samples, channels, size, size)``. A bad or missing
directory raises a :class:`ConfigError` on ``data.init_args.root`` that names the path.
"""

from __future__ import annotations

import csv
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from bilevel_dist._checks import ConfigError, positive_int, setting
from bilevel_dist.recipes.few_shot.tasks import SPLITS, ClassPool

ROOT = "data.init_args.root"
OMNIGLOT_SETS = ("images_background", "images_evaluation")
MINI_IMAGENET_PICKLE = "mini-imagenet-cache-{}.pkl"
_RESAMPLE = Image.Resampling.LANCZOS  # MAML's preprocessing of both datasets

_Item = TypeVar("_Item")


def _root(root: str, what: str) -> Path:
    """``root`` as a path, checked to be a directory."""
    path = Path(os.path.expanduser(str(root)))
    if not path.is_dir():
        raise ConfigError(ROOT, f"{what} directory {path} does not exist")
    return path


def _visible(paths: Any) -> list[Path]:
    """``paths`` without hidden entries (``.DS_Store``, macOS ``._*`` files), sorted by name."""
    return sorted((p for p in paths if not p.name.startswith(".")), key=lambda p: p.name)


def _parallel(read: Callable[[_Item], np.ndarray], items: Sequence[_Item]) -> np.ndarray:
    """``read`` of every item, stacked; a few threads because PIL decodes and resizes without the GIL."""
    workers = max(1, min(8, os.cpu_count() or 1, len(items)))
    with ThreadPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(read, items)))


def _resized(image: Image.Image, size: int) -> np.ndarray:
    """``image`` as uint8 pixels, resized to ``size``×``size`` if it is not already."""
    if image.size != (size, size):
        image = image.resize((size, size), _RESAMPLE)
    return np.asarray(image, dtype=np.uint8)


def _read_image(path: Path, mode: str, size: int) -> np.ndarray:
    """The image file at ``path`` in PIL ``mode``, ``size``×``size``, uint8."""
    try:
        with Image.open(path) as image:
            return _resized(image.convert(mode), size)
    except Exception as error:  # any decoding failure (OSError, SyntaxError, bomb check...) means a bad file
        raise ConfigError(ROOT, f"{path} is not a readable image file: {error}") from None


def _float_pool(pixels: np.ndarray, names: list[str]) -> ClassPool:
    """uint8 ``(C, S, H, W, 3)`` pixels as a float32 ``(C, S, 3, H, W)`` pool in ``[0, 1]``."""
    channels_first = np.ascontiguousarray(pixels.transpose(0, 1, 4, 2, 3))  # transposed while still uint8: 4× less
    return ClassPool(torch.from_numpy(channels_first).float().div_(255.0), names)


def omniglot(
    root: str, image_size: int = 28, rotations: bool = True, train_classes: int = 1100, val_classes: int = 100
) -> dict[str, ClassPool]:
    """Omniglot from ``root`` holding ``images_background/`` and ``images_evaluation/``, each
    ``<alphabet>/<character>/*.png`` (torchvision's ``root/omniglot-py/`` is also found).

    Split rule (fixed): characters are ordered by (alphabet, character) name within
    ``images_background``, then likewise within ``images_evaluation``. The first
    ``train_classes`` are meta-train, the next ``val_classes`` meta-val and the rest meta-test.
    The defaults reproduce the standard 1200/423 split of the 1,623 characters, with the
    last 100 of the 1,200 meta-train characters held out as meta-val (so 1100/100/423).

    Images are greyscale, resized to ``image_size``×``image_size`` (LANCZOS) and inverted so strokes
    are 1 and the background 0: float32 ``(1, H, W)``. With ``rotations``, each character at 0, 90,
    180 and 270° (``torch.rot90``, counter-clockwise) counts as 4 classes in its character's split,
    named ``"<alphabet>/<character>/rot<deg>"``. Every class keeps the first ``n`` images (sorted by
    file name), where ``n`` is the smallest number of images of any character (20 in Omniglot).
    """
    size = setting("data.init_args.image_size", positive_int, image_size)
    train_classes = setting("data.init_args.train_classes", positive_int, train_classes)
    val_classes = setting("data.init_args.val_classes", positive_int, val_classes)
    path = _root(root, "Omniglot")
    if not (path / OMNIGLOT_SETS[0]).is_dir() and (path / "omniglot-py" / OMNIGLOT_SETS[0]).is_dir():
        path = path / "omniglot-py"  # torchvision's download layout
    characters: list[Path] = []
    for name in OMNIGLOT_SETS:
        if not (path / name).is_dir():
            raise ConfigError(
                ROOT, f"Omniglot directory {path} lacks {name}/ (expected {name}/<alphabet>/<character>/*.png)"
            )
        alphabets = [a for a in _visible((path / name).iterdir()) if a.is_dir()]
        characters += [c for a in alphabets for c in _visible(a.iterdir()) if c.is_dir()]
    if len(characters) <= train_classes + val_classes:
        raise ConfigError(
            ROOT,
            f"{path} holds {len(characters)} Omniglot characters: too few for train_classes={train_classes} "
            f"plus val_classes={val_classes} and a non-empty test split",
        )
    pngs = [_visible(c.glob("*.png")) for c in characters]
    per = min(len(files) for files in pngs)
    if per == 0:
        empty = characters[[len(files) for files in pngs].index(0)]
        raise ConfigError(ROOT, f"Omniglot character directory {empty} holds no .png images")
    bounds = {"train": (0, train_classes), "val": (train_classes, train_classes + val_classes)}
    bounds["test"] = (train_classes + val_classes, len(characters))
    pools = {}
    for split in SPLITS:
        lo, hi = bounds[split]
        files = [f for character in pngs[lo:hi] for f in character[:per]]
        pixels = _parallel(lambda f: _read_image(f, "L", size), files).reshape(hi - lo, per, 1, size, size)
        images = (255 - torch.from_numpy(pixels)).float().div_(255.0)  # strokes 1, background 0
        names = [f"{c.parent.name}/{c.name}" for c in characters[lo:hi]]
        if rotations:
            images = torch.stack([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)], 1).flatten(0, 1)
            names = [f"{name}/rot{90 * k}" for name in names for k in range(4)]
        pools[split] = ClassPool(images, names)
    return pools


def mini_imagenet(root: str, image_size: int = 84) -> dict[str, ClassPool]:
    """mini-ImageNet from ``root`` in either distributed layout, detected from the files present:

    - ``mini-imagenet-cache-{train,val,test}.pkl``: pickled dicts with ``"image_data"`` (uint8
      ``N×H×W×3``) and ``"class_dict"`` (class name → row indices); classes in the dict's order;
    - ``{train,val,test}.csv`` (header ``filename,label``, Ravi & Larochelle's split) with the
      files under ``images/``; classes in order of first appearance in each CSV.

    Either gives 64/16/20 classes of 600 images. Images are RGB, resized to
    ``image_size``×``image_size`` (LANCZOS) when they differ: float32 ``(3, H, W)`` in ``[0, 1]``.
    Within a split every class keeps its first ``n`` images, ``n`` the split's smallest class.
    """
    size = setting("data.init_args.image_size", positive_int, image_size)
    path = _root(root, "mini-ImageNet")
    pickles = [path / MINI_IMAGENET_PICKLE.format(split) for split in SPLITS]
    csvs = [path / f"{split}.csv" for split in SPLITS]
    if any(p.is_file() for p in pickles):
        read, files = _pickle_split, pickles
    elif any(p.is_file() for p in csvs):
        read, files = _csv_split, csvs
        if not (path / "images").is_dir():
            raise ConfigError(ROOT, f"mini-ImageNet directory {path} has split CSVs but no images/ directory")
    else:
        raise ConfigError(
            ROOT,
            f"{path} holds no mini-ImageNet layout: expected mini-imagenet-cache-{{train,val,test}}.pkl "
            "or {train,val,test}.csv with an images/ directory",
        )
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ConfigError(ROOT, f"mini-ImageNet directory {path} lacks {missing[0].name}")
    return {split: _float_pool(*read(file, size)) for split, file in zip(SPLITS, files, strict=True)}


def _pickle_split(file: Path, size: int) -> tuple[np.ndarray, list[str]]:
    """One split of the pickled cache: uint8 ``(C, S, size, size, 3)`` pixels and the class names."""
    try:
        with open(file, "rb") as f:
            cache = pickle.load(f, encoding="latin1")  # latin1: also reads Python 2 pickles of numpy arrays
    except Exception as error:  # any unpickling failure means a bad file
        raise ConfigError(ROOT, f"{file} is not a readable pickle: {error}") from None
    if not isinstance(cache, dict) or "image_data" not in cache or "class_dict" not in cache:
        raise ConfigError(ROOT, f"{file} is not a mini-ImageNet cache: expected a dict with image_data and class_dict")
    data, classes = cache["image_data"], cache["class_dict"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3:
        raise ConfigError(ROOT, f"{file}: image_data is not a uint8 array of shape (N, H, W, 3)")
    if not isinstance(classes, dict) or not classes:
        raise ConfigError(ROOT, f"{file}: class_dict is not a non-empty dict of class name -> row indices")
    try:
        rows = [np.asarray(indices, dtype=np.int64).reshape(-1) for indices in classes.values()]
    except (TypeError, ValueError):
        raise ConfigError(ROOT, f"{file}: class_dict values are not lists of row indices") from None
    per = min(len(r) for r in rows)
    index = np.stack([r[:per] for r in rows])
    if per == 0 or index.min() < 0 or index.max() >= len(data):
        raise ConfigError(ROOT, f"{file}: class_dict has an empty class or a row index outside image_data")
    pixels = data[index]  # (C, S, H, W, 3)
    if pixels.shape[2:4] != (size, size):
        flat = pixels.reshape(-1, *pixels.shape[2:])
        pixels = _parallel(lambda a: _resized(Image.fromarray(a), size), flat).reshape(*index.shape, size, size, 3)
    return pixels, [str(name) for name in classes]


def _csv_split(file: Path, size: int) -> tuple[np.ndarray, list[str]]:
    """One split listed by a Ravi & Larochelle CSV: uint8 ``(C, S, size, size, 3)`` pixels and the class names."""
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ConfigError(ROOT, f"{file} is not a readable CSV file: {error}") from None
    if not rows or [cell.strip() for cell in rows[0]] != ["filename", "label"]:
        raise ConfigError(ROOT, f"{file} does not start with the header filename,label")
    by_label: dict[str, list[str]] = {}
    for line, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != 2:
            raise ConfigError(ROOT, f"{file} line {line}: expected filename,label, got {','.join(row)}")
        by_label.setdefault(row[1].strip(), []).append(row[0].strip())
    if not by_label:
        raise ConfigError(ROOT, f"{file} lists no images")
    images = file.parent / "images"
    for names in by_label.values():
        for name in names:
            if not (images / name).is_file():
                raise ConfigError(ROOT, f"{file} lists {name}, but {images / name} does not exist")
    per = min(len(names) for names in by_label.values())
    paths = [images / name for names in by_label.values() for name in names[:per]]
    pixels = _parallel(lambda p: _read_image(p, "RGB", size), paths)
    return pixels.reshape(len(by_label), per, size, size, 3), list(by_label)
