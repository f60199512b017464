"""Few-shot meta-training under Lightning, 1 or 2 DDP processes with the same global meta-batch.
``python few_shot_fit.py OUT DEVICES`` saves, per run and rank, every step's meta-parameters and
the collectives issued inside each algorithm step."""

import sys
import tempfile

import lightning as L
import torch
import torch.distributed as dist
from collectives import StepCollectives

from bilevel_dist.recipes.few_shot import FewShot, FewShotData

STEPS = 3
RUNS = {
    "maml_sinusoid": ("maml", "sinusoid", {"inner_steps": 3, "inner_lr": 0.01}),
    "imaml_sinusoid": ("imaml", "sinusoid", {"inner_steps": 3, "inner_lr": 0.01, "linear_iters": 3}),
    "anil_digits": ("anil", "rotated_digits", {"inner_steps": 2, "inner_lr": 0.2}),
    "penalty_digits": ("penalty", "rotated_digits", {"inner_steps": 2, "inner_lr": 0.2, "outer_lr": 0.1}),
}


def data(dataset: str) -> FewShotData:
    return FewShotData(dataset, ways=3, shots=2, queries=2, meta_batch=4, val_tasks=4, test_tasks=4)


def model(method: str, algorithm: dict) -> FewShot:
    return FewShot(method, algorithm=algorithm, width=4, baselines=())


class Record(StepCollectives):
    """Every step's meta-parameters, and the collectives inside every algorithm step."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append({k: v.clone() for k, v in module.state["outer"].items()})


def fit(name: str, devices: int) -> tuple[list, list]:
    method, dataset, algorithm = RUNS[name]
    record = Record()
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
        callbacks=[record],
        default_root_dir=tempfile.mkdtemp(prefix="bilevel_dist_test_"),
    )
    trainer.fit(model(method, algorithm), data(dataset))
    return record.steps, record.collectives


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    for name in RUNS:
        steps, collectives = fit(name, devices)
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save({"steps": steps, "collectives": collectives}, f"{out}/{name}_rank{rank}.pt")
