"""The gradient-inversion audit under Lightning, 1 or 2 DDP processes: 4 restarts (2 a rank)
of a FedAvg update (E = 1, n = 2, B = 1). ``python privacy_fit.py OUT DEVICES`` saves, per rank,
every step's gathered restarts, the collectives inside each step, and the final scores."""

import sys
import tempfile

import lightning as L
import torch
import torch.distributed as dist
from collectives import StepCollectives

from bilevel_dist.recipes.privacy import AuditData, GradientInversion

STEPS = 4


class Record(StepCollectives):
    """Every step's restarts (gathered from every rank) and the collectives inside each step."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append(module.gathered("outer")["images"].clone())


def fit(devices: int) -> tuple[list, list, dict]:
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision="64-true",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[record],
        default_root_dir=tempfile.mkdtemp(prefix="bilevel_dist_test_"),
    )
    model = GradientInversion(model="lenet", local_lr=0.1, tv=1e-3)
    data = AuditData(dataset="digits", images=2, local_batch=1, restarts=4, size=16)
    trainer.fit(model, data)
    scores = {k: model.results[k] for k in ("psnr", "ssim", "cost", "restart")}
    return record.steps, record.collectives, scores


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    steps, collectives, scores = fit(devices)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({"steps": steps, "collectives": collectives, "scores": scores}, f"{out}/privacy_rank{rank}.pt")
