"""Image quality per image: PSNR ``10 log10(peak² / MSE)`` and SSIM (Gaussian window 11, σ 1.5),
both from torchmetrics, on a stated data range (1 for images on ``[0, 1]``)."""

from __future__ import annotations

from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

DATA_RANGE = 1.0


def psnr(images: Tensor, truth: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """PSNR in dB of each image of ``(B, C, H, W)`` against the truth, peak ``data_range``."""
    return peak_signal_noise_ratio(
        images.detach(), truth.detach(), data_range=data_range, reduction="none", dim=(1, 2, 3)
    ).reshape(-1)


def ssim(images: Tensor, truth: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """SSIM of each image of ``(B, C, H, W)`` against the truth (``data_range`` as for PSNR)."""
    return structural_similarity_index_measure(
        images.detach(), truth.detach(), data_range=data_range, reduction="none"
    ).reshape(-1)


def scores(images: Tensor, truth: Tensor, data_range: float = DATA_RANGE) -> dict[str, Tensor]:
    """``{"psnr": (B,), "ssim": (B,)}``, images clamped to the data range first."""
    clamped = images.detach().clamp(0, data_range)
    return {"psnr": psnr(clamped, truth, data_range), "ssim": ssim(clamped, truth, data_range)}


__all__ = ["DATA_RANGE", "psnr", "scores", "ssim"]
