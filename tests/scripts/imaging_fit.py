"""Learned filters under Lightning, 1 or 2 DDP processes: 6 training patches (3 a rank), each
its own lower level. ``python imaging_fit.py OUT DEVICES`` saves, per rank, every step's outer
variables and gathered images, and the collectives inside each step."""

import sys
import tempfile

import lightning as L
import torch
import torch.distributed as dist
from collectives import StepCollectives

from bilevel_dist.recipes.imaging import ImagingData, LearnedReconstruction

STEPS = 4


class Record(StepCollectives):
    """Every step's filters, β and images (gathered from every rank), and the collectives inside
    each step."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        outer = module.gathered("outer")
        self.steps.append({"filters": outer["filters"].clone(), "beta": outer["beta"].clone()})
        self.steps[-1]["x"] = module.gathered("inner")["x"].clone()


def model() -> LearnedReconstruction:
    return LearnedReconstruction(
        filter_size=3, beta0=-3.0, init_steps=100, algorithm={"inner_steps": 5, "linear_iters": 10, "outer_lr": 0.01}
    )


def data() -> ImagingData:
    return ImagingData(task="denoise", patch_size=16, patches_per_image=2, image_size=32, train_images=3)


def fit(devices: int) -> tuple[list, list]:
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
    trainer.fit(model(), data())
    return record.steps, record.collectives


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    steps, collectives = fit(devices)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({"steps": steps, "collectives": collectives}, f"{out}/imaging_rank{rank}.pt")
