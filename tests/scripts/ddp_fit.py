"""Runs short hyper-cleaning fits under Lightning (``devices`` processes) and saves, for every
step and rank, the rank's own and the gathered variables: ``python ddp_fit.py OUT DEVICES``."""

import sys
import tempfile

import lightning as L
import torch

from bilevel_dist import algorithms, tree
from bilevel_dist.algorithms.first_order import Penalty
from bilevel_dist.linalg import linearize
from bilevel_dist.recipes.data_denoising import Denoising, DigitsData

RUNS = {
    "aid": ({"name": "aid", "inner_steps": 5, "outer_lr": 10.0}, True),
    "aid_replicated": ({"name": "aid", "inner_steps": 5, "outer_lr": 10.0}, False),
    "soba": ({"name": "soba", "inner_lr": 0.5, "outer_lr": 20.0}, True),
    "penalty": ({"name": "penalty", "inner_lr": 0.2, "outer_lr": 20.0, "gamma": 5.0, "inner_steps": 2}, True),
    "naive_penalty": (
        {"name": "naive_penalty", "inner_lr": 0.2, "outer_lr": 20.0, "gamma": 5.0, "inner_steps": 2},
        True,
    ),
}
STEPS = 8


class NaivePenalty(Penalty):
    """The regression guard: squares each rank's own ``∇_w g_r`` instead of the global mean."""

    name = "naive_penalty"

    def gradients(self, state, w, x, inner_batch, outer_batch, outer=True):
        lin = linearize(self.problem.inner_loss, w, x, inner_batch, joint=True)
        fw, fx = self.oracles.outer_grads(w, x, outer_batch)
        hv, jv = lin.both(tree.scale(lin.grad, state["gamma"]))
        dx = self.oracles.outer_gradient(tree.add(fx, jv))
        return tree.add(fw, self.comm.mean(hv)), dx, self.comm.mean(lin.grad)


class Record(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        own = {level: tree.detach(module.state[level]) for level in ("outer", "inner")}
        full = {level: module.gathered(level) for level in ("outer", "inner")}
        wrapped = trainer.strategy.model is not module  # DDP's wrapper: the module does not use it
        self.steps.append({"own": own, "full": full, "ids": batch["inner"]["index"].clone(), "wrapped": wrapped})


def fit(name: str, devices: int, shards: int, checkpoint: str | None = None, root: str | None = None) -> list:
    spec, sharded = RUNS[name]
    data = DigitsData(inner_batch_size=32, outer_batch_size=25, shards=shards)
    model = Denoising(n_train=data.n_train, algorithm=spec, shard_weights=sharded)
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
        default_root_dir=root or tempfile.gettempdir(),
    )
    trainer.fit(model, data)
    if checkpoint:  # every rank takes part: the per-sample rows are gathered into it
        trainer.save_checkpoint(checkpoint)
    return record.steps


if __name__ == "__main__":
    algorithms.REGISTRY["naive_penalty"] = NaivePenalty
    out, devices = sys.argv[1], int(sys.argv[2])
    for name in RUNS:
        steps = fit(name, devices, shards=2, checkpoint=f"{out}/{name}.ckpt" if name == "aid" else None)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        torch.save(steps, f"{out}/{name}_rank{rank}.pt")
