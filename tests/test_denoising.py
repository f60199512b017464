"""The data-denoising recipe: noise generators, dataset readers, configs, and the acceptance check
(Penalty closes half the Train+Val → Oracle gap and its weights separate clean from flipped)."""

import gzip
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bilevel_dist._checks import ConfigError
from bilevel_dist.recipes.data_denoising import CIFAR10Data, Denoising, MNISTData, SVHNData, corrupt, fit_digits

RECIPES = Path(__file__).parents[1] / "recipes" / "data_denoising"


def test_flip_noise_changes_exactly_the_rate_to_other_classes():
    labels = torch.arange(1000) % 10
    noisy, flipped = corrupt(labels, 0.25, "flip", 10, seed=3)
    assert int(flipped.sum()) == 250
    assert bool((noisy[flipped] != labels[flipped]).all()) and torch.equal(noisy[~flipped], labels[~flipped])
    again, _ = corrupt(labels, 0.25, "flip", 10, seed=3)
    assert torch.equal(noisy, again)


def test_uniform_noise_keeps_a_tenth_of_the_drawn_labels():
    labels = torch.arange(100_000) % 10
    noisy, changed = corrupt(labels, 0.36, "uniform", 10, seed=0)
    assert float(changed.double().mean()) == pytest.approx(0.36 * 9 / 10, abs=0.005)
    assert torch.equal(changed, noisy != labels)


@pytest.mark.parametrize("rate, kind", [(1.0, "flip"), (-0.1, "flip"), (0.2, "sideways")])
def test_bad_noise_settings_name_the_key(rate, kind):
    with pytest.raises(ConfigError) as error:
        corrupt(torch.zeros(10, dtype=torch.long), rate, kind, 10, seed=0)
    assert error.value.key in ("noise", "noise_type")


def write_mnist(root: Path, n_train: int = 60, n_test: int = 20, gz: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        arrays[prefix] = (images, labels)
        for kind, array, magic in (("images-idx3", images, 0x803), ("labels-idx1", labels, 0x801)):
            payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
            name = root / f"{prefix}-{kind}-ubyte"
            if gz:
                name.with_name(name.name + ".gz").write_bytes(gzip.compress(payload))
            else:
                name.write_bytes(payload)
    return arrays["train"]


def write_cifar(root: Path, per_batch: int = 12) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), b"labels": list(range(per_batch))}
        batch[b"labels"] = [i % 10 for i in batch[b"labels"]]
        (root / name).write_bytes(pickle.dumps(batch))


def write_svhn(root: Path, n: int = 40) -> None:
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        labels = (np.arange(n) % 10 + 1).reshape(-1, 1)  # 1..10, where 10 is the digit 0
        savemat(root / name, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": labels})


def test_mnist_reader_parses_idx_files_and_splits(tmp_path):
    images, labels = write_mnist(tmp_path / "mnist")
    data = MNISTData(root=str(tmp_path / "mnist"), noise=0.5, n_val=10)
    assert data.x_train.shape == (50, 1, 28, 28) and data.x_val.shape == (10, 1, 28, 28)
    assert data.x_test.shape == (20, 1, 28, 28) and data.n_train == 50 and int(data.flipped.sum()) == 25
    pool = torch.cat([data.y_clean, data.y_val]).sort().values
    assert torch.equal(pool, torch.as_tensor(labels.astype(np.int64)).sort().values)
    assert float(data.x_train.mean((0, 2, 3)).abs().max()) < 1e-5  # standardised with training statistics


def test_mnist_reader_takes_gzipped_files(tmp_path):
    root = tmp_path / "gz"
    write_mnist(root, gz=True)
    for path in root.glob("*-ubyte"):
        path.unlink()
    assert MNISTData(root=str(root), n_val=10).n_train == 50


def test_cifar_and_svhn_readers(tmp_path):
    write_cifar(tmp_path / "cifar")
    cifar = CIFAR10Data(root=str(tmp_path / "cifar"), n_val=10)
    assert cifar.x_train.shape == (50, 3, 32, 32) and cifar.x_test.shape == (12, 3, 32, 32)
    write_svhn(tmp_path / "svhn")
    svhn = SVHNData(root=str(tmp_path / "svhn"), n_val=10, noise=0.0)
    assert svhn.x_train.shape == (30, 1, 32, 32)
    assert set(svhn.y_test.tolist()) == set(range(10)) and int((svhn.y_test == 0).sum()) == 4  # 10 → 0


def test_missing_or_malformed_data_directories_fail_early(tmp_path):
    with pytest.raises(ConfigError, match="MNIST directory '/no/such/dir' does not exist") as error:
        MNISTData(root="/no/such/dir")
    assert error.value.key == "root"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="lacks the CIFAR-10 file 'data_batch_1'"):
        CIFAR10Data(root=str(tmp_path / "empty"))
    write_mnist(tmp_path / "bad")
    (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(ConfigError, match="is not an unsigned-byte IDX file"):
        MNISTData(root=str(tmp_path / "bad"))


@pytest.mark.slow
@pytest.mark.parametrize("noise", [0.5, 0.25])
def test_penalty_closes_half_the_gap_and_separates_flipped_samples(noise):
    torch.set_default_dtype(torch.float32)
    runs = [fit_digits(noise, seed, steps=300) for seed in range(3)]  # Penalty, T = 5: the default
    mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
    print(noise, mean)
    closed = (mean["method"] - mean["train_val"]) / (mean["oracle"] - mean["train_val"])
    assert mean["oracle"] > mean["train_val"]
    assert closed >= 0.5, mean
    assert mean["weight_auroc"] >= 0.9, mean


CONFIGS = sorted(c for c in RECIPES.glob("*.yaml") if c.name != "search.yaml")  # search.yaml is a sweep


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_runs_two_steps(config, tmp_path):
    """Each shipped config, on tiny files in its dataset's format, with small batches on CPU."""
    write_mnist(tmp_path / "data" / "mnist")
    write_cifar(tmp_path / "data" / "cifar-10-batches-py")
    write_svhn(tmp_path / "data" / "svhn")
    small = ["--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    small += ["--trainer.precision", "32-true", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1"]
    small += ["--trainer.enable_progress_bar", "false", "--data.init_args.inner_batch_size", "4"]
    small += ["--data.init_args.outer_batch_size", "4", "--data.init_args.eval_batch_size", "8"]
    if "digits" not in config.stem:
        small += ["--data.init_args.n_val", "10", "--data.init_args.num_workers", "0"]
    result = subprocess.run(
        [sys.executable, "-m", "bilevel_dist.cli", "fit", "--config", str(config), *small],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [dict(zip(header, r.split(","), strict=True)) for r in rows[1:]]
    losses = [float(r["outer_loss"]) for r in steps if r["outer_loss"]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any(r.get("summary/method") for r in steps)  # the end-of-fit summary was logged


def test_dropout_is_off_when_evaluating():
    model = Denoising(model="mnist_cnn", n_train=4, input_shape=(1, 28, 28))
    inner = model.initial_model()
    x = torch.randn(6, 1, 28, 28)
    assert torch.equal(model.logits(inner, x, train=False), model.logits(inner, x, train=False))
    assert not torch.equal(model.logits(inner, x, train=True), model.logits(inner, x, train=True))
    y = model.logits(inner, x, train=False).argmax(1)
    assert model.accuracy(inner, x, y) == pytest.approx(1.0)  # the same deterministic predictions
