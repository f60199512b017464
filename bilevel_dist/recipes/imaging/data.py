"""Images and measurements for learned reconstruction.

Built in (no download): scikit-image's bundled photographs in greyscale, split **by image**
into training patches, validation images and held-out test images; for MRI, random-ellipse
phantoms split by seed, with Shepp–Logan among the test images. Local directories: BSDS-style
image folders (``.png``/``.jpg``/``.tif``), Levin et al.'s deblurring set (``.mat`` with the
sharp image ``x`` and kernel ``f``), and fastMRI/IXI-style slices (``.npy`` or ``.h5``, 2-D
magnitude images).

Measurements ``y = A x + n`` are drawn once from ``noise_seed`` (the review's fixed noise
realisations, eq. 1.4): Gaussian noise of standard deviation ``sigma`` on the [0, 1] scale
(complex for k-space).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from bilevel_dist._checks import ConfigError, positive_float, positive_int, setting
from bilevel_dist.distributed import Comm
from bilevel_dist.lightning.data import StepSampler
from bilevel_dist.recipes.imaging.operators import (
    MASKS,
    Blur,
    Identity,
    MaskedFourier,
    Operator,
    gaussian_kernel,
    motion_kernel,
    sampling_mask,
)

TASKS = ("denoise", "deblur", "mri")
SOURCES = ("photos", "phantom", "bsds", "levin", "slices")
KERNELS = ("gaussian", "motion", "file")
#: the bundled photographs, split by image: patches come only from the training ones
TRAIN_PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")
VAL_PHOTOS = ("text", "immunohistochemistry")
TEST_PHOTOS = ("coins", "moon", "clock")
#: random-ellipse phantoms (source ``phantom``), split by seed; Shepp–Logan also tests
TRAIN_PHANTOMS = tuple(range(10, 16))
VAL_PHANTOMS = (0, 1, 2, 3)
TEST_PHANTOMS = (20, 21, 22)  # with Shepp–Logan; training 10–15 and validation 0–3 are disjoint
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
_STEPS_PER_EPOCH = 1000


def grey(image: np.ndarray, name: str, strict: bool = False) -> Tensor:
    """A ``(H, W)`` float64 image on [0, 1]; colour is converted (ITU-R 601 luma) unless
    ``strict``, where only greyscale is accepted."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] in (3, 4) and not strict:
        array = array[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        scale = 255.0 if np.asarray(image).dtype == np.uint8 else 1.0
        return torch.from_numpy(array / scale)
    if array.ndim != 2:
        raise ConfigError("root", f"{name} is not a greyscale image (shape {array.shape}); greyscale is required")
    if np.iscomplexobj(array):
        array = np.abs(array)
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float64) / 255.0)
    array = array.astype(np.float64)
    span = array.max() - array.min()
    return torch.from_numpy((array - array.min()) / (span if span > 0 else 1.0))


def resize(image: Tensor, side: int) -> Tensor:
    """The centre square of ``image`` resized to ``side × side`` (area averaging)."""
    h, w = image.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = image[top : top + s, left : left + s]
    return F.interpolate(square[None, None], size=(side, side), mode="area")[0, 0]


def bundled(name: str) -> Tensor:
    """A scikit-image bundled image in greyscale on [0, 1] (``shepp_logan_phantom`` too)."""
    try:
        from skimage import data
    except ImportError as missing:
        raise ImportError("the built-in images need scikit-image: pip install 'bilevel-dist[imaging]'") from missing
    return grey(getattr(data, name)(), name)


def ellipse_phantom(seed: int, size: int = 64, count: int = 10, oversample: int = 4) -> Tensor:
    """A Shepp–Logan-like phantom on [0, 1]: a bright skull ring and ``count`` random ellipses
    (intensities ±0.05–0.3), drawn at ``oversample``× and downsampled with anti-aliasing."""
    try:
        from skimage import transform
    except ImportError as missing:
        raise ImportError("the built-in phantoms need scikit-image: pip install 'bilevel-dist[imaging]'") from missing
    rng = np.random.default_rng(seed)
    fine = size * oversample
    yy, xx = np.mgrid[-1 : 1 : fine * 1j, -1 : 1 : fine * 1j]
    image = np.zeros((fine, fine))

    def ellipse(cx: float, cy: float, a: float, b: float, angle: float, value: float) -> None:
        c, s = np.cos(angle), np.sin(angle)
        u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
        image[(u / a) ** 2 + (v / b) ** 2 <= 1] += value

    ellipse(0, 0, 0.72, 0.92, 0, 1.0)
    ellipse(0, -0.02, 0.66, 0.86, 0, -0.7)
    for _ in range(count):
        ellipse(
            rng.uniform(-0.4, 0.4), rng.uniform(-0.5, 0.5), rng.uniform(0.05, 0.25), rng.uniform(0.05, 0.3),
            rng.uniform(0, np.pi), rng.choice([-1, 1]) * rng.uniform(0.05, 0.3),
        )  # fmt: skip
    return torch.from_numpy(transform.resize(np.clip(image, 0, 1), (size, size), anti_aliasing=True))


def read_folder(root: Path, suffixes: set[str], strict: bool = False) -> list[tuple[str, Tensor]]:
    """Every image under ``root`` with one of ``suffixes``, sorted by name, in greyscale."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes)
    if not files:
        raise ConfigError("root", f"no {sorted(suffixes)} files under {str(root)!r}")
    out = []
    for path in files:
        if path.suffix.lower() == ".npy":
            array = np.load(path)
        elif path.suffix.lower() == ".h5":
            array = _read_h5(path)
        else:
            from PIL import Image

            with Image.open(path) as opened:
                array = np.asarray(opened.convert("L") if not strict else opened)
        out.append((path.name, grey(array, path.name, strict)))
    return out


def _read_h5(path: Path) -> np.ndarray:
    try:
        import h5py
    except ImportError as missing:
        raise ImportError("reading .h5 slices needs h5py: pip install h5py") from missing
    with h5py.File(path, "r") as handle:
        key = next((k for k in ("reconstruction_rss", "reconstruction_esc", "image") if k in handle), None)
        if key is None:
            raise ConfigError("root", f"{path.name} has none of the datasets reconstruction_rss/_esc or image")
        array = np.asarray(handle[key])
    return array[array.shape[0] // 2] if array.ndim == 3 else array  # a volume: its middle slice


def read_levin(root: Path) -> list[tuple[str, Tensor, Tensor]]:
    """Levin et al.'s ``.mat`` files: ``(name, sharp image, kernel)`` each."""
    from scipy.io import loadmat

    files = sorted(root.glob("*.mat"))
    if not files:
        raise ConfigError("root", f"no .mat files under {str(root)!r} (Levin et al.'s im*_ker*.mat)")
    out = []
    for path in files:
        content = loadmat(path)
        if "x" not in content or "f" not in content:
            raise ConfigError("root", f"{path.name} lacks the sharp image 'x' or the kernel 'f'")
        kernel = torch.as_tensor(np.asarray(content["f"], dtype=np.float64))
        out.append((path.stem, grey(content["x"], path.name, strict=True), kernel / kernel.sum()))
    return out


def _split_by_name(found: list[tuple[str, Tensor]]) -> tuple[list[Tensor], list[Tensor], list[tuple[str, Tensor]]]:
    """Train, validation and test by distinct name (the last name tests, the one before validates),
    so that no image is in two splits."""
    names = sorted({n for n, _ in found})
    if len(names) < 3:
        raise ConfigError("root", f"{len(names)} distinct images; train, val and test need 3 at least")
    val_name, test_name = names[-2], names[-1]
    train = [x for n, x in found if n not in (val_name, test_name)]
    return train, [x for n, x in found if n == val_name], [(n, x) for n, x in found if n == test_name]


class ImagingData(L.LightningDataModule):
    """Training patches, validation and test images, and their measurements.

    Args:
        task: ``denoise`` (A = I), ``deblur`` (circular blur) or ``mri`` (undersampled Fourier).
        source: ``photos`` (bundled, split by image), ``phantom`` (random-ellipse phantoms split
            by seed to train and validate; Shepp–Logan and three more to test; MRI), or a local
            ``root``: ``bsds`` (image folder with ``train``/``val``/``test`` subfolders, or one
            folder split in order), ``levin`` (``.mat`` files, split by sharp image),
            ``slices`` (``.npy``/``.h5`` MRI slices, greyscale).
        root: the local directory.
        sigma: noise standard deviation on the [0, 1] scale (25/255 in the review).
        patch_size, patches_per_image: training patches cut from each training image.
        image_size: the side the images are resized to (their centre square); training patches
            are cut from them.
        eval_crop: the side of the centre crop of validation and test images (``None``: whole).
        kernel, kernel_size, kernel_sigma, kernel_angle: the blur: a simulated ``gaussian`` or
            linear ``motion`` kernel, or ``file``: Levin et al.'s own kernel number
            ``levin_kernel`` (1–8) read from the ``im*_ker{levin_kernel}.mat`` files, which then
            are the images (a sweep over ``levin_kernel`` covers their 4 images × 8 kernels).
        mask, rate, mask_seed: the MRI sampling (``cartesian``, ``gaussian``, ``radial``; the
            fraction of k-space kept, in (0, 1]).
        noise_seed, patch_seed: the measurement noise and patch positions.
    """

    def __init__(
        self,
        task: str = "denoise",
        source: str = "photos",
        root: str | None = None,
        sigma: float = 25 / 255,
        patch_size: int = 32,
        patches_per_image: int = 4,
        image_size: int = 128,
        eval_crop: int | None = None,
        train_images: int | None = None,
        kernel: str = "gaussian",
        kernel_size: int = 9,
        kernel_sigma: float = 1.6,
        kernel_angle: float = 30.0,
        levin_kernel: int = 1,
        mask: str = "gaussian",
        rate: float = 0.3,
        mask_seed: int = 0,
        noise_seed: int = 0,
        patch_seed: int = 0,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ConfigError("task", f"unknown task {task!r}; choose one of {list(TASKS)}")
        if source not in SOURCES:
            raise ConfigError("source", f"unknown source {source!r}; choose one of {list(SOURCES)}")
        if source in ("bsds", "levin", "slices") and (root is None or not Path(root).expanduser().is_dir()):
            raise ConfigError("root", f"source {source!r} needs root, an existing directory; got {root!r}")
        if kernel not in KERNELS:
            raise ConfigError("kernel", f"unknown kernel {kernel!r}; choose one of {list(KERNELS)}")
        if kernel == "file" and source != "levin":
            raise ConfigError("kernel", "kernel: file reads Levin et al.'s kernels; it needs source: levin")
        self.levin_kernel = setting("levin_kernel", positive_int, levin_kernel)
        self._file_kernel: Tensor | None = None
        if mask not in MASKS:
            raise ConfigError("mask", f"unknown mask {mask!r}; choose one of {list(MASKS)}")
        if not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ConfigError("rate", f"the sampling rate must be in (0, 1], got {rate!r}")
        self.task, self.source = task, source
        self.root = None if root is None else Path(root).expanduser()
        self.sigma = setting("sigma", lambda k, v: positive_float(k, v, allow_zero=True), sigma)
        self.patch_size = setting("patch_size", positive_int, patch_size)
        self.patches_per_image = setting("patches_per_image", positive_int, patches_per_image)
        self.image_size = setting("image_size", positive_int, image_size)
        self.eval_crop = None if eval_crop is None else setting("eval_crop", positive_int, eval_crop)
        if self.eval_crop is not None and self.eval_crop > self.image_size:
            raise ConfigError("eval_crop", f"eval_crop {eval_crop} exceeds image_size {image_size}")
        self.train_images = None if train_images is None else setting("train_images", positive_int, train_images)
        if self.patch_size > self.image_size:
            raise ConfigError("patch_size", f"patch_size {patch_size} exceeds image_size {image_size}")
        self.kernel_name, self.kernel_size = kernel, kernel_size
        self.kernel_sigma, self.kernel_angle = kernel_sigma, kernel_angle
        if task == "deblur" and kernel != "file":  # a file's kernel is checked when it is read
            smallest = min(self.patch_size, self.eval_crop or self.image_size)
            if kernel_size > smallest:
                raise ConfigError(
                    "kernel_size",
                    f"the {kernel_size}x{kernel_size} kernel is larger than the {smallest}x{smallest} images it blurs",
                )
            self.blur_kernel()  # checks the kernel settings now
        self.mask_name, self.rate, self.mask_seed = mask, float(rate), mask_seed
        self.noise_seed, self.patch_seed = noise_seed, patch_seed
        self._operators: dict[int, Operator] = {}
        self.train: dict[str, Tensor] | None = None
        self.val: dict[str, Tensor] | None = None
        self.test: dict[str, Tensor] | None = None
        self.test_names: list[str] = []
        self.per_sample: bool | None = None  # set by the model (BilevelModule.configure_model)
        self.lower_level: str | None = None

    # -- the forward model -------------------------------------------------------------------
    def blur_kernel(self) -> Tensor:
        if self.kernel_name == "file":
            assert self._file_kernel is not None, "setup() reads the kernel"
            return self._file_kernel
        if self.kernel_name == "gaussian":
            return gaussian_kernel(self.kernel_size, self.kernel_sigma)
        return motion_kernel(self.kernel_size, self.kernel_angle)

    def operator(self, side: int) -> Operator:
        """``A`` for ``side × side`` images, one per size: the measurements and the model's
        energy use the same one."""
        if side not in self._operators:
            if self.task == "denoise":
                self._operators[side] = Identity()
            elif self.task == "deblur":
                self._operators[side] = Blur(self.blur_kernel())
            else:
                self._operators[side] = MaskedFourier(
                    sampling_mask(self.mask_name, (side, side), self.rate, self.mask_seed)
                )
        return self._operators[side]

    def measure(self, truth: Tensor, op: Operator, seed: int) -> Tensor:
        """``y = A x + σ n`` with the noise drawn from ``seed`` (complex in k-space)."""
        clean = op(truth)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64)
        if clean.is_complex():
            noise = torch.complex(noise, torch.randn(clean.shape, generator=generator, dtype=torch.float64)) / 2**0.5
            noise = noise * op.mask  # k-space outside the mask is not measured
        return clean + self.sigma * noise

    # -- images ------------------------------------------------------------------------------
    def _images(self) -> tuple[list[Tensor], list[Tensor], list[tuple[str, Tensor]]]:
        """Training, validation and named test images (``(H, W)`` each), split by image."""
        side = self.image_size
        if self.source == "photos":
            names = TRAIN_PHOTOS[: self.train_images] if self.train_images else TRAIN_PHOTOS
            train = [resize(bundled(n), side) for n in names]
            val = [resize(bundled(n), side) for n in VAL_PHOTOS]
            test = [(n, resize(bundled(n), side)) for n in TEST_PHOTOS]
            if self.task == "mri":  # the phantom is the held-out MRI image, photos train
                test = [("shepp_logan_phantom", resize(bundled("shepp_logan_phantom"), side))] + test[:1]
            return train, val, test
        if self.source == "phantom":
            seeds = TRAIN_PHANTOMS[: self.train_images] if self.train_images else TRAIN_PHANTOMS
            return (
                [ellipse_phantom(seed, side) for seed in seeds],
                [ellipse_phantom(seed, side) for seed in VAL_PHANTOMS],
                [("shepp_logan_phantom", resize(bundled("shepp_logan_phantom"), side))]
                + [(f"ellipses_{seed}", ellipse_phantom(seed, side)) for seed in TEST_PHANTOMS],
            )
        assert self.root is not None
        if self.source == "levin":
            # one file per (image, kernel): split by the sharp image (the stem before "_ker")
            files = read_levin(self.root)
            if self.kernel_name == "file":
                files = self._with_file_kernel(files)
            return _split_by_name([(n.split("_ker")[0], resize(x, side)) for n, x, _ in files])
        else:
            suffixes = {".npy", ".h5"} if self.source == "slices" else _IMAGE_SUFFIXES
            splits = [self.root / s for s in ("train", "val", "test")]
            if all(s.is_dir() for s in splits):
                parts = [read_folder(s, suffixes, strict=self.source == "slices") for s in splits]
                return (
                    [resize(x, side) for _, x in parts[0]],
                    [resize(x, side) for _, x in parts[1]],
                    [(n, resize(x, side)) for n, x in parts[2]],
                )
            found = [(n, resize(x, side)) for n, x in read_folder(self.root, suffixes, strict=self.source == "slices")]
        if len(found) < 3:
            raise ConfigError(
                "root", f"{str(self.root)!r} has {len(found)} images; train, val and test need 3 at least"
            )
        n_test = max(1, len(found) // 5)
        return [x for _, x in found[: -2 * n_test]], [x for _, x in found[-2 * n_test : -n_test]], found[-n_test:]

    def _with_file_kernel(self, files: list[tuple[str, Tensor, Tensor]]) -> list[tuple[str, Tensor, Tensor]]:
        """The files blurred by kernel number ``levin_kernel``; that kernel becomes ``A``'s. The
        images are resized, the kernel is not: its pixels are the resized image's."""
        mine = [f for f in files if f[0].split("_ker")[-1] == str(self.levin_kernel)]
        if not mine:
            numbers = sorted({n.split("_ker")[-1] for n, _, _ in files})
            raise ConfigError("levin_kernel", f"no im*_ker{self.levin_kernel}.mat file; the kernels here: {numbers}")
        kernel = mine[0][2]
        smallest = min(self.patch_size, self.eval_crop or self.image_size)
        if max(kernel.shape) > smallest:
            raise ConfigError(
                "levin_kernel",
                f"kernel {self.levin_kernel} is {kernel.shape[0]}x{kernel.shape[1]}, larger than the "
                f"{smallest}x{smallest} images it blurs",
            )
        self._file_kernel = kernel
        return mine

    def patches(self, images: list[Tensor]) -> Tensor:
        """``patches_per_image`` random ``patch_size`` crops of each image, ``(J, 1, p, p)``."""
        generator = torch.Generator().manual_seed(self.patch_seed)
        p, out = self.patch_size, []
        for image in images:
            h, w = image.shape
            tops = torch.randint(0, h - p + 1, (self.patches_per_image,), generator=generator).tolist()
            lefts = torch.randint(0, w - p + 1, (self.patches_per_image,), generator=generator).tolist()
            out += [image[t : t + p, s : s + p] for t, s in zip(tops, lefts, strict=True)]
        return torch.stack(out)[:, None]

    def crop(self, images: Tensor) -> Tensor:
        """The centre ``eval_crop`` square of each image."""
        if self.eval_crop is None:
            return images
        h, w = images.shape[-2:]
        top, left = (h - self.eval_crop) // 2, (w - self.eval_crop) // 2
        return images[..., top : top + self.eval_crop, left : left + self.eval_crop]

    def _split(self, truth: Tensor, seed: int) -> dict[str, Tensor]:
        op = self.operator(truth.shape[-1])
        return {"index": torch.arange(truth.shape[0]), "truth": truth, "y": self.measure(truth, op, seed)}

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        train, val, test = self._images()
        self.train = self._split(self.patches(train), self.noise_seed)
        self.val = self._split(self.crop(torch.stack(val)[:, None]), self.noise_seed + 1)
        self.test = self._split(self.crop(torch.stack([x for _, x in test])[:, None]), self.noise_seed + 2)
        self.test_names = [n for n, _ in test]

    @property
    def n_train(self) -> int:
        assert self.train is not None, "setup() first"
        return int(self.train["index"].shape[0])

    # -- loaders -----------------------------------------------------------------------------
    def batch(self, rank: int | None = None, world: int | None = None) -> dict[str, dict[str, Tensor]]:
        """Rank ``rank``'s training patches (every step: the whole shard, the review's
        deterministic full-batch upper level)."""
        if rank is None or world is None:
            comm = Comm()
            rank, world = comm.rank, comm.world_size
        assert self.train is not None, "setup() first"
        mine = torch.arange(rank, self.n_train, world)
        part = {k: v[mine] for k, v in self.train.items()}
        return {"inner": part, "outer": part}

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        position = (lambda: trainer.global_step) if trainer is not None else None
        return DataLoader(_Steps(self), batch_size=None, sampler=StepSampler(_STEPS_PER_EPOCH, position))

    def val_dataloader(self) -> DataLoader:
        return DataLoader([torch.zeros(1)], batch_size=None)  # one step: the model solves every image

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def imaging_data(module: L.LightningModule) -> ImagingData:
    """The :class:`ImagingData` a model runs on (its trainer's data module), or a one-line error."""
    trainer = module._trainer
    data = getattr(trainer, "datamodule", None) if trainer is not None else None
    if data is None or not hasattr(data, "operator"):
        raise ConfigError("data", f"{type(module).__name__} needs an ImagingData data module")
    return data


class _Steps(Dataset):
    """Item ``t``: this rank's training batch (the same at every step)."""

    def __init__(self, data: ImagingData) -> None:
        self.data = data

    def __len__(self) -> int:
        return _STEPS_PER_EPOCH

    def __getitem__(self, t: int) -> dict[str, dict[str, Tensor]]:
        return self.data.batch()


__all__ = [
    "SOURCES",
    "TASKS",
    "ImagingData",
    "bundled",
    "ellipse_phantom",
    "grey",
    "imaging_data",
    "read_folder",
    "read_levin",
    "resize",
]
