"""Few-shot dataset folders: tiny fake Omniglot and mini-ImageNet directories in each layout."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bilevel_dist._checks import ConfigError
from bilevel_dist.recipes.few_shot.folders import mini_imagenet, omniglot
from bilevel_dist.recipes.few_shot.tasks import SPLITS

# (set, alphabet, characters): the evaluation alphabet sorts first by name but must come after background
OMNIGLOT = [("images_background", "Beta", 3), ("images_background", "Alpha", 3), ("images_evaluation", "Aaa", 3)]
ORDER = [f"{a}/character0{i}" for a in ("Alpha", "Beta", "Aaa") for i in (1, 2, 3)]  # the loaders' order
DRAWN = [f"{a}/character0{i}" for _, a, count in OMNIGLOT for i in range(1, count + 1)]  # make_omniglot's order


def stroke(index: int, sample: int) -> np.ndarray:
    """A 105×105 bool image, True = white paper: one black 10×20 bar placed by character and sample."""
    paper = np.ones((105, 105), dtype=bool)
    top, left = 5 + 10 * index, 5 + 7 * sample
    paper[top : top + 10, left : left + 20] = False  # not symmetric: rotations differ
    return paper


def make_omniglot(root: Path, extra: bool = True) -> None:
    """9 characters of 3 PNGs (mode "1" as in Omniglot); one character has a 4th PNG that must be dropped."""
    index = 0
    for subset, alphabet, count in OMNIGLOT:
        for i in range(1, count + 1):
            folder = root / subset / alphabet / f"character0{i}"
            folder.mkdir(parents=True)
            for sample in range(3 + (extra and index == 0)):
                Image.fromarray(stroke(index, sample)).convert("1").save(folder / f"{index:04d}_{sample:02d}.png")
            index += 1
    (root / "images_background" / "Alpha" / ".DS_Store").write_bytes(b"junk")


def raises_root(call, path: Path, match: str = "") -> ConfigError:
    with pytest.raises(ConfigError, match=match) as error:
        call()
    assert error.value.key == "data.init_args.root"
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    return error.value


def test_omniglot_splits_rotations_and_pixels(tmp_path):
    make_omniglot(tmp_path)
    pools = omniglot(str(tmp_path), image_size=105, train_classes=5, val_classes=2)
    assert [pools[s].classes for s in SPLITS] == [20, 8, 8]
    names = {s: pools[s].names for s in SPLITS}
    assert names["train"][:4] == [f"Alpha/character01/rot{d}" for d in (0, 90, 180, 270)]
    assert [n.rsplit("/", 1)[0] for n in names["train"] + names["val"] + names["test"]][::4] == ORDER
    assert all(set(names[a]).isdisjoint(names[b]) for a in SPLITS for b in SPLITS if a < b)
    for split in SPLITS:
        pool = pools[split]
        assert pool.images.shape == (pool.classes, 3, 1, 105, 105) and pool.images.dtype == torch.float32
        assert pool.per_class == 3
    # no resize: the drawn bar survives exactly, inverted; rotated classes are exact rot90s
    train = pools["train"].images
    expected = torch.from_numpy(~stroke(DRAWN.index("Alpha/character01"), 2)).float()
    assert torch.equal(train[0, 2, 0], expected)
    for k in range(4):
        assert torch.equal(train[k], torch.rot90(train[0], k, dims=(-2, -1)))
    first_test = DRAWN.index("Aaa/character02")
    assert torch.equal(pools["test"].images[0, 1, 0], torch.from_numpy(~stroke(first_test, 1)).float())


def test_omniglot_resized_without_rotations(tmp_path):
    make_omniglot(tmp_path / "omniglot-py")  # torchvision's layout
    pools = omniglot(str(tmp_path), train_classes=6, val_classes=1, rotations=False)
    assert [pools[s].classes for s in SPLITS] == [6, 1, 2]
    assert pools["val"].names == ["Aaa/character01"]
    images = torch.cat([pools[s].images.flatten() for s in SPLITS])
    assert pools["train"].images.shape == (6, 3, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1
    # Alpha/character01's bar (drawn 4th), sample 0: rows 35-44, cols 5-24 of 105, so about rows 9-11, cols 1-6 of 28
    image = pools["train"].images[0, 0, 0]
    assert image[10:12, 2:6].min() > 0.8 and image[:8].max() < 0.05 and image[14:].max() < 0.05


def test_omniglot_errors(tmp_path):
    missing = tmp_path / "nowhere"
    raises_root(lambda: omniglot(str(missing)), missing, "does not exist")
    make_omniglot(tmp_path / "a")
    raises_root(lambda: omniglot(str(tmp_path / "a"), train_classes=7, val_classes=2), tmp_path / "a", "too few")
    (tmp_path / "b" / "images_background").mkdir(parents=True)
    raises_root(lambda: omniglot(str(tmp_path / "b")), tmp_path / "b", "lacks images_evaluation/")
    bad = next((tmp_path / "a" / "images_evaluation").rglob("*.png"))
    bad.write_bytes(b"not a png")
    raises_root(lambda: omniglot(str(tmp_path / "a"), train_classes=2, val_classes=2), bad, "not a readable image")
    with pytest.raises(ConfigError) as error:
        omniglot(str(tmp_path / "a"), image_size=0)
    assert error.value.key == "data.init_args.image_size"


def colour(split: int, label: int, sample: int) -> tuple[int, int, int]:
    return (40 * split + 10, 50 * label + 20, 30 * sample + 5)


def make_pickles(root: Path, classes=(3, 2, 2), side: int = 84) -> None:
    """Constant-colour images; class 0 of each split has a 5th image that must be dropped."""
    root.mkdir(parents=True, exist_ok=True)
    for s, split in enumerate(SPLITS):
        images, class_dict = [], {}
        for label in range(classes[s]):
            class_dict[f"n{s}{label:07d}"] = []
            for sample in range(4 + (label == 0)):
                class_dict[f"n{s}{label:07d}"].append(len(images))
                images.append(np.full((side, side, 3), colour(s, label, sample), dtype=np.uint8))
        order = np.random.default_rng(s).permutation(len(images))  # rows not grouped by class
        data = np.stack(images)[order]
        where = np.argsort(order)
        cache = {"image_data": data, "class_dict": {k: [int(where[i]) for i in v] for k, v in class_dict.items()}}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump(cache, f)


def test_mini_imagenet_pickles(tmp_path):
    make_pickles(tmp_path)
    pools = mini_imagenet(str(tmp_path))
    assert [pools[s].classes for s in SPLITS] == [3, 2, 2]
    assert all(set(pools[a].names).isdisjoint(pools[b].names) for a in SPLITS for b in SPLITS if a < b)
    assert pools["val"].names == ["n10000000", "n10000001"]
    for s, split in enumerate(SPLITS):
        images = pools[split].images
        assert images.shape == (pools[split].classes, 4, 3, 84, 84) and images.dtype == torch.float32
        for label in range(pools[split].classes):
            for sample in range(4):
                expected = torch.tensor(colour(s, label, sample), dtype=torch.float32) / 255
                assert torch.equal(images[label, sample], expected.view(3, 1, 1).expand(3, 84, 84))
    small = mini_imagenet(str(tmp_path), image_size=20)["train"].images
    assert small.shape == (3, 4, 3, 20, 20)
    assert torch.allclose(small[2, 3, :, 10, 10], torch.tensor(colour(0, 2, 3), dtype=torch.float32) / 255, atol=0.01)


def make_csv(root: Path) -> None:
    """Labels interleaved in the CSVs; JPEGs of two sizes (84 and 100×120)."""
    (root / "images").mkdir(parents=True)
    for s, split in enumerate(SPLITS):
        lines = ["filename,label"]
        for sample in range(3):
            for label in ("b", "a"):
                name = f"{split}_{label}_{sample}.jpg"
                size = (84, 84) if sample else (120, 100)
                rgb = colour(s, ord(label) - ord("a"), sample)
                Image.new("RGB", size, rgb).save(root / "images" / name, quality=95)
                lines.append(f"{name},{split}{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")


def test_mini_imagenet_csv(tmp_path):
    make_csv(tmp_path)
    pools = mini_imagenet(str(tmp_path), image_size=84)
    assert [pools[s].names for s in SPLITS] == [["trainb", "traina"], ["valb", "vala"], ["testb", "testa"]]
    for s, split in enumerate(SPLITS):
        images = pools[split].images
        assert images.shape == (2, 3, 3, 84, 84) and images.dtype == torch.float32
        assert images.min() >= 0 and images.max() <= 1
        mean = images.mean((-2, -1))  # JPEG is lossy: the constant colour survives approximately
        expected = torch.tensor([[colour(s, c, i) for i in range(3)] for c in (1, 0)], dtype=torch.float32) / 255
        assert torch.allclose(mean, expected, atol=0.02)


def test_mini_imagenet_errors(tmp_path):
    missing = tmp_path / "nowhere"
    raises_root(lambda: mini_imagenet(str(missing)), missing, "does not exist")
    (tmp_path / "empty").mkdir()
    raises_root(lambda: mini_imagenet(str(tmp_path / "empty")), tmp_path / "empty", "no mini-ImageNet layout")

    make_pickles(tmp_path / "p")
    (tmp_path / "p" / "mini-imagenet-cache-val.pkl").write_bytes(b"garbage")
    raises_root(lambda: mini_imagenet(str(tmp_path / "p")), tmp_path / "p" / "mini-imagenet-cache-val.pkl", "pickle")
    with open(tmp_path / "p" / "mini-imagenet-cache-val.pkl", "wb") as f:
        pickle.dump({"image_data": np.zeros((2, 84, 84, 3), np.uint8)}, f)
    raises_root(lambda: mini_imagenet(str(tmp_path / "p")), tmp_path / "p", "expected a dict with image_data")
    (tmp_path / "p" / "mini-imagenet-cache-test.pkl").unlink()
    raises_root(lambda: mini_imagenet(str(tmp_path / "p")), tmp_path / "p", "lacks mini-imagenet-cache-test.pkl")

    make_csv(tmp_path / "c")
    (tmp_path / "c" / "images" / "val_a_1.jpg").unlink()
    raises_root(lambda: mini_imagenet(str(tmp_path / "c")), tmp_path / "c" / "images" / "val_a_1.jpg", "lists val_a_1")
    (tmp_path / "c" / "val.csv").write_text("file,class\n")
    raises_root(lambda: mini_imagenet(str(tmp_path / "c")), tmp_path / "c" / "val.csv", "header filename,label")
    (tmp_path / "c" / "val.csv").write_text("filename,label\n")
    raises_root(lambda: mini_imagenet(str(tmp_path / "c")), tmp_path / "c" / "val.csv", "lists no images")
    (tmp_path / "c" / "val.csv").unlink()
    raises_root(lambda: mini_imagenet(str(tmp_path / "c")), tmp_path / "c", "lacks val.csv")
    make_csv(tmp_path / "d")
    (tmp_path / "d" / "images" / "test_b_2.jpg").write_bytes(b"not a jpeg")
    raises_root(lambda: mini_imagenet(str(tmp_path / "d")), tmp_path / "d" / "images" / "test_b_2.jpg", "readable")
