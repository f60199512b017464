"""What every reconstruction method's test writes: a CSV of PSNR/SSIM per image and method, a
figure of the test images (truth and each method), and the table it prints."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

from bilevel_dist.figures import log_image, pyplot


def write_scores(
    out: Path,
    methods: dict[str, dict[str, Tensor]],
    truth: Tensor,
    names: list[str],
    loggers: Iterable[Any],
    heading: str,
) -> list[str]:
    """Writes ``test_images.csv`` and ``reconstructions.png`` (also to wandb) under ``out``;
    ``methods`` maps a name to ``{"psnr", "ssim", "x"}``. Returns the table's lines."""
    with open(out / "test_images.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "method", "psnr_db", "ssim"])
        for method, scored in methods.items():
            for i, name in enumerate(names):
                writer.writerow([name, method, f"{float(scored['psnr'][i]):.4f}", f"{float(scored['ssim'][i]):.5f}"])
    figure = reconstruction_grid(truth, methods, names, out / "reconstructions.png")
    log_image(loggers, "reconstructions", figure)
    lines = [heading, "  method     PSNR dB  SSIM"]
    for method, scored in methods.items():
        lines.append(f"  {method:9s}  {float(scored['psnr'].mean()):7.2f}  {float(scored['ssim'].mean()):.4f}")
    lines.append(f"  per image: {out / 'test_images.csv'}; figure: {figure}")
    return lines


def reconstruction_grid(truth: Tensor, methods: dict[str, dict[str, Tensor]], names: list[str], path: Path) -> Path:
    """A PNG: one row per test image, columns truth and each method, titled with PSNR/SSIM."""
    plt = pyplot()
    columns = [("truth", truth, None)] + [(m, s["x"], s) for m, s in methods.items()]
    rows = truth.shape[0]
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 2.3 * rows), squeeze=False)
    for i in range(rows):
        for j, (label, images, scored) in enumerate(columns):
            ax = axes[i][j]
            ax.imshow(images[i, 0].detach().float().clamp(0, 1).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            title = (
                label
                if scored is None
                else f"{label}\n{float(scored['psnr'][i]):.2f} dB / {float(scored['ssim'][i]):.3f}"
            )
            ax.set_title(title, fontsize=8)
        axes[i][0].set_ylabel(names[i], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["reconstruction_grid", "write_scores"]
