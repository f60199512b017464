"""The audit sweep's summary (``report:`` of ``recipes/privacy/audit.yaml``): the trials'
final PSNR and SSIM grouped by local setting and DP noise, averaged over the audited images (a
table like the thesis's Table 5.2), and PSNR against the noise multiplier as a PNG."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bilevel_dist.figures import pyplot
from bilevel_dist.tune.sweep import store

IMAGE_KEYS = ("data.first", "data.experiment")
NOISE_KEY = "model.noise_multiplier"
PSNR, SSIM = "val_psnr", "val_ssim"


def audit_table(table: Any, sweep_dir: str) -> None:
    """Prints and writes ``audit.md`` (mean ± std over images per setting) and, where the noise
    multiplier varies, ``psnr_vs_noise.png``, both in ``sweep_dir``."""
    finished = table[table["status"] == "OK"].copy()
    if finished.empty:
        return
    settings = [k for k in finished.columns if k.startswith(("model.", "data.", "trainer.")) and k not in IMAGE_KEYS]
    # rows in the grid's order (a list, an (E, n, B) setting, as a tuple), grouped as text
    order = finished[settings].apply(lambda row: tuple(_sortable(v) for v in row), axis=1) if settings else None
    if order is not None:
        finished = finished.iloc[sorted(range(len(finished)), key=lambda i: order.iloc[i])]
    for key in settings:
        finished[key] = finished[key].map(str)
    grouped = finished.groupby(settings, sort=False) if settings else [((), finished)]
    lines = ["| " + " | ".join([*settings, "images", "PSNR dB (mean ± std)", "SSIM"]) + " |"]
    lines.append("|" + "---|" * (len(settings) + 3))
    curve: dict[str, list[tuple[float, float, float]]] = {}
    for key, rows in grouped:
        key = key if isinstance(key, tuple) else (key,)
        psnr, ssim = rows[PSNR].astype(float), rows[SSIM].astype(float) if SSIM in rows else None
        spread = f"{psnr.mean():.2f} ± {psnr.std(ddof=0):.2f}"
        lines.append(
            "| " + " | ".join([*key, str(len(rows)), spread, f"{ssim.mean():.3f}" if ssim is not None else "–"]) + " |"
        )
        if NOISE_KEY in settings:
            named = zip(settings, key, strict=True)
            label = ", ".join(_label(k, v) for k, v in named if k != NOISE_KEY) or "audit"
            noise = float(dict(zip(settings, key, strict=True))[NOISE_KEY])
            curve.setdefault(label, []).append((noise, float(psnr.mean()), float(psnr.std(ddof=0))))
    text = "\n".join(lines)
    print("\naudit: PSNR of the reconstruction, by setting (mean over the audited images)\n" + text)
    store(f"{sweep_dir}/audit.md", text + "\n")
    if any(len({p[0] for p in points}) > 1 for points in curve.values()):
        with tempfile.TemporaryDirectory() as scratch:  # drawn locally, stored where the sweep is
            path = noise_curve(curve, Path(scratch) / "psnr_vs_noise.png")
            store(f"{sweep_dir}/psnr_vs_noise.png", path.read_bytes())
        print(f"PSNR against the DP noise multiplier: {sweep_dir}/psnr_vs_noise.png")


def _sortable(value: Any) -> tuple[int, Any]:
    """A sort key for a grid value: numbers, lists (as tuples) and text each among their kind."""
    if isinstance(value, list):
        return (1, tuple(value))
    if isinstance(value, (int, float)) and value == value:
        return (0, value)
    return (2, str(value))


def _label(key: str, value: str) -> str:
    return f"(E, n, B) = {value.strip('[]')}" if key == "data.local" else f"{key} = {value}"


def noise_curve(curve: dict[str, list[tuple[float, float, float]]], path: Path) -> Path:
    """Mean PSNR (± std over images) against the noise multiplier, one line per local setting;
    σ = 0 drawn at a tenth of the smallest positive σ on the log axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    positive = [p[0] for points in curve.values() for p in points if p[0] > 0]
    zero_at = min(positive) / 10 if positive else 1e-6
    for label, points in curve.items():
        points = sorted(points)
        xs = [p[0] if p[0] > 0 else zero_at for p in points]
        ax.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(f"DP-FedAvg noise multiplier σ (σ = 0 drawn at {zero_at:g})")
    ax.set_ylabel("reconstruction PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
