"""SOBA on the denoising recipe with a ``HypergradientMonitor`` every 3 steps, under Lightning
(``devices`` processes): ``python monitor_fit.py OUT DEVICES`` saves each rank's checks."""

import sys
import tempfile

import lightning as L
import torch

from bilevel_dist.lightning import HypergradientMonitor
from bilevel_dist.recipes.data_denoising import Denoising, DigitsData

STEPS = 9


def fit(devices: int) -> list[dict[str, float]]:
    data = DigitsData(inner_batch_size=32, outer_batch_size=25, shards=2)
    model = Denoising(algorithm={"name": "soba", "inner_lr": 0.5, "outer_lr": 20.0}, baselines=())
    monitor = HypergradientMonitor(every_n_steps=3, estimator={"name": "cg", "iters": 100, "tol": 1e-10})
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision="64-true",
        max_steps=STEPS,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
        default_root_dir=tempfile.gettempdir(),
    )
    trainer.fit(model, data)
    return monitor.history


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    history = fit(devices)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save(history, f"{out}/monitor_rank{rank}.pt")
