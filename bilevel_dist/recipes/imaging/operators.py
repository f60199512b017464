"""Forward operators of image reconstruction, each with its adjoint (real images ``(B, C, H, W)``).

Boundaries are periodic, so blur, finite differences and the masked Fourier transform all
diagonalise in the 2-D DFT: :meth:`Operator.normal_fourier` gives the eigenvalues of ``AᴴA``,
and :func:`fourier_solve` inverts sums of such normal operators in ``O(N log N)`` (the FFT
solves of BIO's x-step and of Deconv).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bilevel_dist._checks import ConfigError

MASKS = ("cartesian", "gaussian", "radial")


class Operator:
    """A linear map ``A`` on real images with its adjoint ``Aᴴ`` (``⟨Ax, y⟩ = ⟨x, Aᴴy⟩``, the real
    part for complex outputs)."""

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def normal_fourier(self, shape: tuple[int, int], like: Tensor) -> Tensor | None:
        """The DFT eigenvalues of ``AᴴA`` on ``shape`` images (real, ``(H, W)``), or ``None``
        when ``AᴴA`` is not circulant."""
        return None

    def norm_squared(self, shape: tuple[int, int], like: Tensor) -> float:
        """``σ₁(A)²``, the Lipschitz constant of ``∇½‖Ax − y‖²``."""
        eig = self.normal_fourier(shape, like)
        if eig is None:
            raise NotImplementedError(f"{type(self).__name__} has no spectral norm")
        return float(eig.max())


class Identity(Operator):
    """``A = I`` (denoising)."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def adjoint(self, y: Tensor) -> Tensor:
        return y

    def normal_fourier(self, shape: tuple[int, int], like: Tensor) -> Tensor:
        return torch.ones(shape, dtype=like.real.dtype, device=like.device)


def _transfer(kernel: Tensor, shape: tuple[int, int]) -> Tensor:
    """The DFT of a centred kernel embedded in an image of ``shape`` (circular convolution)."""
    h, w = kernel.shape
    if h > shape[0] or w > shape[1]:
        raise ConfigError("kernel", f"the {h}x{w} kernel is larger than the {shape[0]}x{shape[1]} image")
    padded = kernel.new_zeros(shape)
    padded[:h, :w] = kernel
    return torch.fft.fft2(torch.roll(padded, (-(h // 2), -(w // 2)), dims=(0, 1)))


class Blur(Operator):
    """Circular convolution with ``kernel`` (``(h, w)``, centred at ``(h // 2, w // 2)``)."""

    def __init__(self, kernel: Tensor) -> None:
        if kernel.ndim != 2:
            raise ConfigError("kernel", f"a blur kernel is 2-D, got shape {tuple(kernel.shape)}")
        self.kernel = kernel
        self._cache: dict[tuple, Tensor] = {}

    def transfer(self, shape: tuple[int, int], like: Tensor) -> Tensor:
        key = (tuple(shape), like.real.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = _transfer(self.kernel.to(like.real.dtype).to(like.device), tuple(shape))
        return self._cache[key]

    def forward(self, x: Tensor) -> Tensor:
        return torch.fft.ifft2(self.transfer(x.shape[-2:], x) * torch.fft.fft2(x)).real

    def adjoint(self, y: Tensor) -> Tensor:
        return torch.fft.ifft2(self.transfer(y.shape[-2:], y).conj() * torch.fft.fft2(y)).real

    def normal_fourier(self, shape: tuple[int, int], like: Tensor) -> Tensor:
        return self.transfer(shape, like).abs() ** 2


class MaskedFourier(Operator):
    """CS-MRI: ``A x = P F x``, the unitary 2-D DFT kept at the ``mask``'s frequencies (k-space
    with zeros elsewhere, complex). For real ``x`` the normal operator's eigenvalues are the mask
    symmetrised over ``k ↔ −k`` (``|X(k)| = |X(−k)|``)."""

    def __init__(self, mask: Tensor) -> None:
        if mask.ndim != 2:
            raise ConfigError("mask", f"a sampling mask is 2-D, got shape {tuple(mask.shape)}")
        self.mask = mask

    def _mask(self, like: Tensor) -> Tensor:
        return self.mask.to(device=like.device, dtype=like.real.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self._mask(x) * torch.fft.fft2(x, norm="ortho")

    def adjoint(self, y: Tensor) -> Tensor:
        return torch.fft.ifft2(self._mask(y) * y, norm="ortho").real

    def normal_fourier(self, shape: tuple[int, int], like: Tensor) -> Tensor:
        mask = self._mask(like)
        flipped = torch.roll(torch.flip(mask, dims=(0, 1)), (1, 1), dims=(0, 1))  # m(−k)
        return (mask + flipped) / 2


class Inpaint(Operator):
    """Pixel selection ``A x = m ⊙ x`` (self-adjoint; not circulant)."""

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask

    def forward(self, x: Tensor) -> Tensor:
        return self.mask.to(x) * x

    def adjoint(self, y: Tensor) -> Tensor:
        return self.mask.to(y) * y

    def norm_squared(self, shape: tuple[int, int], like: Tensor) -> float:
        return 1.0


class Gradient(Operator):
    """Periodic forward differences ``(B, C, H, W) → (B, 2C, H, W)``: vertical, then horizontal."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([torch.roll(x, -1, dims=-2) - x, torch.roll(x, -1, dims=-1) - x], dim=1)

    def adjoint(self, y: Tensor) -> Tensor:
        c = y.shape[1] // 2
        down, right = y[:, :c], y[:, c:]
        return (torch.roll(down, 1, dims=-2) - down) + (torch.roll(right, 1, dims=-1) - right)

    def normal_fourier(self, shape: tuple[int, int], like: Tensor) -> Tensor:
        dtype = like.real.dtype
        wy = 2 * math.pi * torch.arange(shape[0], dtype=dtype, device=like.device) / shape[0]
        wx = 2 * math.pi * torch.arange(shape[1], dtype=dtype, device=like.device) / shape[1]
        return (2 - 2 * torch.cos(wy))[:, None] + (2 - 2 * torch.cos(wx))[None, :]


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The orthonormal DCT-II matrix ``C`` (``C Cᵀ = I``): row ``k`` is the ``k``-th cosine."""
    k = torch.arange(n, dtype=dtype)[:, None]
    i = torch.arange(n, dtype=dtype)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    c[0] /= math.sqrt(2)
    return c


class DCT(Operator):
    """The orthonormal 2-D DCT-II ``T x = C X Cᵀ`` per image (``TᵀT = I``): BIO's sparsifying
    transform in CS-MRI."""

    def _c(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, w = x.shape[-2:]
        return dct_matrix(h, x.dtype).to(x.device), dct_matrix(w, x.dtype).to(x.device)

    def forward(self, x: Tensor) -> Tensor:
        ch, cw = self._c(x)
        return ch @ x @ cw.T

    def adjoint(self, y: Tensor) -> Tensor:
        ch, cw = self._c(y)
        return ch.T @ y @ cw

    def norm_squared(self, shape: tuple[int, int], like: Tensor) -> float:
        return 1.0


def fourier_solve(rhs: Tensor, eigenvalues: Tensor) -> Tensor:
    """``M⁻¹ rhs`` for a circulant ``M`` with DFT ``eigenvalues`` (real, positive, ``(H, W)``)."""
    return torch.fft.ifft2(torch.fft.fft2(rhs) / eigenvalues).real


# -- kernels and masks ---------------------------------------------------------------------------
def _odd_size(key: str, size: int) -> int:
    if int(size) != size or size < 1 or size % 2 == 0:
        raise ConfigError(key, f"{key} must be an odd positive number of pixels, got {size!r}")
    return int(size)


def gaussian_kernel(size: int, sigma: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """A ``size × size`` Gaussian blur of standard deviation ``sigma`` pixels, summing to 1."""
    size = _odd_size("kernel_size", size)
    if not sigma > 0:
        raise ConfigError("kernel_sigma", f"kernel_sigma must be > 0, got {sigma!r}")
    r = torch.arange(size, dtype=dtype) - size // 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


def motion_kernel(size: int, angle: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """A linear motion blur: a line of ``size`` pixels through the centre at ``angle`` degrees,
    drawn with bilinear weights, summing to 1."""
    size = _odd_size("kernel_size", size)
    kernel = torch.zeros(size, size, dtype=dtype)
    c, theta = size // 2, math.radians(angle)
    for t in torch.linspace(-c, c, 4 * size, dtype=dtype).tolist():
        y, x = c - t * math.sin(theta), c + t * math.cos(theta)
        y0, x0 = math.floor(y), math.floor(x)
        for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
            yy, xx = y0 + dy, x0 + dx
            if 0 <= yy < size and 0 <= xx < size:
                kernel[yy, xx] += (1 - abs(y - yy)) * (1 - abs(x - xx))
    return kernel / kernel.sum()


def _rate(rate: float) -> float:
    if not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ConfigError("rate", f"the sampling rate must be in (0, 1], got {rate!r}")
    return float(rate)


def _centred(h: int, w: int) -> tuple[Tensor, Tensor]:
    """Frequency coordinates in cycles, ``[-1/2, 1/2)``, in the DFT's (unshifted) order."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None].expand(h, w)
    fx = torch.fft.fftfreq(w, dtype=torch.float64)[None, :].expand(h, w)
    return fy, fx


def sampling_mask(kind: str, shape: tuple[int, int], rate: float, seed: int = 0) -> Tensor:
    """A k-space mask (``(H, W)`` of 0/1 in the DFT's order) keeping about ``rate`` of it:

    - ``cartesian``: whole phase-encoding rows, the central 8% always, the rest at random;
    - ``gaussian``: points drawn with a Gaussian density around the centre (variable density);
    - ``radial``: spokes through the centre at golden-angle steps until the rate is reached.
    """
    if kind not in MASKS:
        raise ConfigError("mask", f"unknown mask {kind!r}; choose one of {list(MASKS)}")
    rate = _rate(rate)
    with torch.device("cpu"):  # a CPU generator draws it, also under a model's GPU init context
        return _draw_mask(kind, shape, rate, seed)


def _draw_mask(kind: str, shape: tuple[int, int], rate: float, seed: int) -> Tensor:
    h, w = shape
    generator = torch.Generator().manual_seed(seed)
    target = round(rate * h * w)
    fy, fx = _centred(h, w)
    mask = torch.zeros(h, w, dtype=torch.float64)
    if kind == "cartesian":
        rows = max(1, round(rate * h))
        centre = min(rows, max(1, round(0.08 * h)))
        order = torch.argsort(fy[:, 0].abs(), stable=True)
        chosen = order[:centre].tolist()
        rest = order[centre:]
        chosen += rest[torch.randperm(len(rest), generator=generator)[: rows - centre]].tolist()
        mask[chosen] = 1
    elif kind == "gaussian":
        density = torch.exp(-(fy**2 + fx**2) / (2 * 0.15**2)).flatten()
        density[0] = density.max() * 1e6  # always the DC term
        chosen = torch.multinomial(density, target, replacement=False, generator=generator)
        mask.view(-1)[chosen] = 1
    else:
        golden = math.pi * (math.sqrt(5) - 1) / 2
        spoke, cap = 0, 4 * (h + w)
        for reach in (0.5, math.sqrt(0.5)):  # the inscribed disc first; the corners if the rate needs them
            radius = torch.linspace(
                -reach, reach, 2 * max(h, w) if reach == 0.5 else 3 * max(h, w), dtype=torch.float64
            )
            while mask.sum() < target and spoke < cap:
                angle = spoke * golden
                ys = torch.round(radius * math.sin(angle) * h).long() % h
                xs = torch.round(radius * math.cos(angle) * w).long() % w
                mask[ys, xs] = 1
                spoke += 1
            spoke, cap = 0, 8 * (h + w)
        if mask.sum() < target:
            raise ConfigError("rate", f"radial spokes cover {float(mask.mean()):.3f} of k-space, short of {rate}")
    return mask


__all__ = [
    "DCT",
    "MASKS",
    "Blur",
    "Gradient",
    "Identity",
    "Inpaint",
    "MaskedFourier",
    "Operator",
    "dct_matrix",
    "fourier_solve",
    "gaussian_kernel",
    "motion_kernel",
    "sampling_mask",
]
