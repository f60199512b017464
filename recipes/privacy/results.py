"""The privacy recipe's CPU-scale results: single-image FedSGD inversions of the bundled
photographs (``fedsgd_photo.yaml``, one run per image), and the FedAvg attack replaying the
local steps against the FedSGD-style attack that ignores them (``fedavg_photo.yaml``).

    python recipes/privacy/results.py            # about 7 minutes on 2 cores; writes results.md, results.json
                                                 # and inversion_photos.png next to this file

Each row's command is in the table. The audit sweep (``audit.yaml``) is run by
``bilevel-dist tune`` and summarised by its own report.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
IMAGES = range(5)


def fit(config: str, *overrides: str) -> dict:
    """One CLI run in a scratch directory; its logged final scores and the reconstruction."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "bilevel_dist.cli", "fit", "--config", str(HERE / config), *overrides]
        command += ["--trainer.enable_progress_bar", "false", "--model.init_args.save_update", "update.pt"]
        done = subprocess.run(command, cwd=scratch, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        (metrics,) = Path(scratch).glob("logs/**/metrics.csv")
        rows = metrics.read_text().splitlines()
        header = rows[0].split(",")
        last = [dict(zip(header, row.split(","), strict=True)) for row in rows[1:]]
        final = next(row for row in reversed(last) if row.get("psnr"))
        (picture,) = Path(scratch).glob("logs/**/reconstruction.pt")
        saved = torch.load(picture, weights_only=True)
    scores = {"psnr": float(final["psnr"]), "ssim": float(final["ssim"]), "init_psnr": float(final["init_psnr"])}
    return {"truth": saved["truth"], "reconstruction": saved["reconstruction"], **scores}


def main() -> None:
    from bilevel_dist.recipes.privacy.module import grid

    rows, truths, reconstructions, psnrs = [], [], [], []
    for first in IMAGES:
        run = fit("fedsgd_photo.yaml", "--data.init_args.first", str(first))
        command = f"bilevel-dist fit --config recipes/privacy/fedsgd_photo.yaml --data.init_args.first {first}"
        scores = {k: run[k] for k in ("psnr", "ssim", "init_psnr")}
        rows.append({"setting": "FedSGD, 1 image", "image": first, **scores, "command": command})
        truths.append(run["truth"])
        reconstructions.append(run["reconstruction"])
        psnrs.append(torch.tensor([run["psnr"]]))
    grid(torch.cat(truths), torch.cat(reconstructions), torch.cat(psnrs), HERE / "inversion_photos.png")
    for unrolled in ("true", "false"):
        run = fit("fedavg_photo.yaml", "--model.init_args.unrolled", unrolled)
        command = f"bilevel-dist fit --config recipes/privacy/fedavg_photo.yaml --model.init_args.unrolled {unrolled}"
        label = "FedAvg E=1 n=4 B=2, " + ("replaying the 2 local steps" if unrolled == "true" else "as one gradient")
        scores = {k: run[k] for k in ("psnr", "ssim", "init_psnr")}
        rows.append({"setting": label, "image": "0–3", **scores, "command": command})
    lines = [
        "| setting | image | PSNR dB | SSIM | start PSNR dB | command |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['setting']} | {row['image']} | {row['psnr']:.2f} | {row['ssim']:.3f} | {row['init_psnr']:.2f} | "
            f"`{row['command']}` |"
        )
    fedsgd = [row["psnr"] for row in rows if row["setting"].startswith("FedSGD")]
    mean = sum(fedsgd) / len(fedsgd)
    std = (sum((p - mean) ** 2 for p in fedsgd) / len(fedsgd)) ** 0.5
    lines.append("")
    lines.append(f"FedSGD over the {len(fedsgd)} photographs: {mean:.2f} ± {std:.2f} dB.")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    (HERE / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
