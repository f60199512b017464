"""The audited client's data: its ``n`` images with distinct labels, its local schedule, and the
attack's restarts as the rows of one batched problem.

Built in (no download): ``photos``, 10 of scikit-image's bundled photographs (the ``[privacy]``
extra), centre-cropped and resized to ``size``×``size``, each its own label; ``digits``,
scikit-learn's digits resized to ``size``×``size``. From a local directory: ``cifar10``
(``root``: ``cifar-10-batches-py``, read by the denoising recipe's reader), its test images.
As in the thesis protocol, images in one batch have distinct labels: from ``first`` on, an image
whose label is already taken is skipped.

Every training step's batch is the same: ``{"inner": {"index", "slots", "y"}, "outer":
{"index"}}``, ``index`` the restarts this rank holds (``r, r + W, ...``), ``slots`` the ``(E·n/B,
B)`` local schedule. The attack is a deterministic function of the step, so a resumed run
replays it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from bilevel_dist._checks import ConfigError, positive_int, setting
from bilevel_dist.distributed import Comm
from bilevel_dist.lightning.data import StepSampler
from bilevel_dist.recipes.data_denoising.data import read_cifar10_test
from bilevel_dist.recipes.privacy.attack import local_schedule

DATASETS = ("photos", "digits", "cifar10")
NORMALISATIONS = ("dataset", "none")
PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
    "hubble_deep_field", "colorwheel", "camera", "coins", "moon",
)  # fmt: skip
# normalisation (mean, std) per channel: CIFAR-10's for colour images, as the thesis's code
_CIFAR = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_GREY = ((0.5,), (0.5,))
_STEPS_PER_EPOCH = 1000  # an "epoch" is only a unit for Lightning's loops


def photos(size: int = 32) -> tuple[Tensor, Tensor]:
    """The bundled photographs as ``(10, 3, size, size)`` in [0, 1] (greyscale ones repeated over
    the channels), labels 0–9."""
    try:
        from skimage import data
    except ImportError as missing:
        raise ImportError("the photos need scikit-image: pip install 'bilevel-dist[privacy]'") from missing
    images = []
    for name in PHOTOS:
        image = torch.as_tensor(getattr(data, name)()).float() / 255.0
        image = image[..., None].expand(*image.shape, 3) if image.dim() == 2 else image[..., :3]
        height, width = image.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = image[top : top + side, left : left + side].permute(2, 0, 1)
        images.append(F.interpolate(square[None], size=(size, size), mode="area")[0])
    return torch.stack(images), torch.arange(len(PHOTOS))


def digits(size: int = 32) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``(n, 1, size, size)`` in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1), torch.as_tensor(
        bunch.target, dtype=torch.long
    )


def _count(key: str, value: Any) -> int:
    return positive_int(key, value, allow_zero=True)


def distinct_labels(labels: Tensor, first: int, n: int) -> Tensor:
    """Indices of ``n`` images from ``first`` on whose labels are distinct (a repeated label is
    skipped, as in the thesis protocol)."""
    chosen: list[int] = []
    seen: set[int] = set()
    for i in range(first, len(labels)):  # a scan of the label list, once per audit
        label = int(labels[i])
        if label not in seen:
            chosen.append(i)
            seen.add(label)
            if len(chosen) == n:
                return torch.tensor(chosen)
    raise ConfigError("images", f"only {len(chosen)} images with distinct labels from image {first} on, need {n}")


class AuditData(L.LightningDataModule):
    """The audited client: ``images`` (its ``n``) from ``dataset``, trained for ``epochs`` (E)
    local epochs of minibatches of ``local_batch`` (B; 0: the full set, FedSGD), the minibatch
    order drawn from ``schedule_seed``; ``restarts`` independent reconstructions.

    Args:
        dataset: ``photos``, ``digits`` or ``cifar10`` (with ``root``).
        root: the CIFAR-10 directory (``cifar-10-batches-py``).
        images: n, the client's number of images.
        first: where the images start in the dataset (an audit sweeps it).
        epochs, local_batch: E and B.
        schedule_seed: the seed of the client's minibatch order.
        restarts: independent reconstructions, the min-cost one kept.
        size: the side of the built-in images.
        local: ``(E, n, B)`` at once, over ``epochs``, ``images`` and ``local_batch`` (for sweeps).
        experiment: the ``k``-th of disjoint client batches from ``first`` on (each starts after
            the previous one's last image), so that experiments use different images.
        normalisation: ``dataset`` (the thesis's: CIFAR-10's statistics for colour, 0.5/0.5 for
            digits) or ``none`` (raw [0, 1] pixels, as the federated recipe trains).
    """

    def __init__(
        self,
        dataset: str = "photos",
        root: str | None = None,
        images: int = 1,
        first: int = 0,
        epochs: int = 1,
        local_batch: int = 0,
        schedule_seed: int = 0,
        restarts: int = 1,
        size: int = 32,
        local: tuple[int, int, int] | None = None,
        experiment: int | None = None,
        normalisation: str = "dataset",
    ) -> None:
        super().__init__()
        if local is not None:  # (E, n, B) as one setting: a sweep varies them together (Table 5.2)
            if not isinstance(local, (list, tuple)) or len(local) != 3:
                raise ConfigError("local", f"local is [E, n, B], got {local!r}")
            epochs, images, local_batch = (int(v) for v in local)
        if normalisation not in NORMALISATIONS:
            raise ConfigError("normalisation", f"normalisation must be one of {list(NORMALISATIONS)}")
        if dataset not in DATASETS:
            raise ConfigError("dataset", f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
        self.dataset, self.root, self.normalisation_name = dataset, root, normalisation
        self.experiment = None if experiment is None else setting("experiment", _count, experiment)
        self.n = setting("images", positive_int, images)
        self.first = setting("first", _count, first)
        self.restarts = setting("restarts", positive_int, restarts)
        self.size = setting("size", positive_int, size)
        self.epochs, self.local_batch, self.schedule_seed = epochs, local_batch, schedule_seed
        self.schedule = local_schedule(self.n, local_batch, epochs, schedule_seed)
        if dataset == "cifar10" and (root is None or not Path(root).expanduser().is_dir()):
            raise ConfigError("root", f"dataset 'cifar10' needs root, a cifar-10-batches-py directory; got {root!r}")
        self.truth: Tensor | None = None
        self.true_labels: Tensor | None = None
        self.labels: Tensor | None = None
        self.per_sample: bool | None = None  # set by the model (BilevelModule.configure_model)
        self.lower_level: str | None = None

    # -- what the model takes from the data --------------------------------------------------
    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) of the attack's normalised space (``none``: raw pixels, as the
        federated recipe trains)."""
        stats = _GREY if self.dataset == "digits" else _CIFAR
        if self.normalisation_name == "none":
            return tuple(0.0 for _ in stats[0]), tuple(1.0 for _ in stats[0])
        return stats

    @property
    def input_shape(self) -> tuple[int, int, int]:
        side = 32 if self.dataset == "cifar10" else self.size
        return (len(self.normalisation[0]), side, side)

    @property
    def classes(self) -> int:
        return 10

    def box(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Where [0, 1] pixels lie in normalised space, per channel."""
        mean, std = self.normalisation
        pairs = list(zip(mean, std, strict=True))
        return tuple(-m / s for m, s in pairs), tuple((1 - m) / s for m, s in pairs)

    def algorithm_data(self, needs: dict[str, Any]) -> dict[str, Any]:
        low, high = self.box()
        provided = {"inner_steps": self.schedule.shape[0], "box_low": low, "box_high": high}
        return {k: v for k, v in provided.items() if k in needs}

    def setup(self, stage: str | None = None) -> None:
        if self.truth is not None:
            return
        if self.dataset == "photos":
            x, y = photos(self.size)
        elif self.dataset == "digits":
            x, y = digits(self.size)
        else:  # CIFAR-10's test images
            x, y = read_cifar10_test(Path(self.root).expanduser())
        chosen = distinct_labels(y, self.first, self.n)
        for _ in range(self.experiment or 0):  # experiment k: the batch after experiment k − 1's
            chosen = distinct_labels(y, int(chosen.max()) + 1, self.n)
        self.truth, self.true_labels = x[chosen].contiguous(), y[chosen].contiguous()
        self.labels = self.true_labels.clone()  # what the attacker uses (iDLG may replace it)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        mean, std = (torch.tensor(v, dtype=like.dtype, device=like.device).view(-1, 1, 1) for v in self.normalisation)
        return mean, std

    def normalise(self, images: Tensor) -> Tensor:
        """Pixels in [0, 1] to the attack's normalised space."""
        mean, std = self._stats(images)
        return (images - mean) / std

    def denormalise(self, images: Tensor) -> Tensor:
        """The attack's normalised images back to pixels."""
        mean, std = self._stats(images)
        return images * std + mean

    # -- loaders -----------------------------------------------------------------------------
    def batch(self, rank: int | None = None, world: int | None = None) -> dict[str, dict[str, Tensor]]:
        """Rank ``rank``'s batch (default: this process's): its restarts and the schedule."""
        if rank is None or world is None:
            comm = Comm()
            rank, world = comm.rank, comm.world_size
        assert self.labels is not None, "setup() first"
        mine = torch.arange(rank, self.restarts, world)
        return {"inner": {"index": mine, "slots": self.schedule, "y": self.labels}, "outer": {"index": mine}}

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        position = (lambda: trainer.global_step) if trainer is not None else None
        return DataLoader(_Steps(self), batch_size=None, sampler=StepSampler(_STEPS_PER_EPOCH, position))

    def val_dataloader(self) -> DataLoader:
        return DataLoader([torch.zeros(1)], batch_size=None)  # one step: the module scores the attack

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class _Steps(Dataset):
    """Item ``t``: this rank's batch (the same at every step)."""

    def __init__(self, data: AuditData) -> None:
        self.data = data

    def __len__(self) -> int:
        return _STEPS_PER_EPOCH

    def __getitem__(self, t: int) -> dict[str, dict[str, Tensor]]:
        return self.data.batch()
