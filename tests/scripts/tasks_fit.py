"""Independent per-task lower levels under Lightning: 64 ridge heads around a shared centre
(``TaskHeads``), persistent rows sharded across ranks or started afresh every step
(``inner_init``). ``python tasks_fit.py OUT DEVICES`` saves every step's variables per rank."""

import sys
import tempfile

import lightning as L
import torch

from bilevel_dist.lightning import BilevelDataModule, BilevelModule, Samples
from bilevel_dist.problems import TaskHeads

TASKS = 64
RUNS = {
    "aid": ({"name": "aid", "inner_steps": 6, "linear_iters": 4, "inner_lr": 0.2, "outer_lr": 0.01}, False),
    "soba": ({"name": "soba", "inner_lr": 0.2, "outer_lr": 0.01}, False),
    "aid_episodic": ({"name": "aid", "inner_steps": 6, "linear_iters": 4, "inner_lr": 0.2, "outer_lr": 0.01}, True),
    "amigo_episodic": ({"name": "amigo", "inner_steps": 6, "linear_iters": 4, "inner_lr": 0.2, "outer_lr": 0.01}, True),
}
STEPS = 6


class TaskData(BilevelDataModule):
    """Items are tasks: a task's training data (inner) and its validation data (outer)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.heads = TaskHeads.make(tasks=TASKS)

    def datasets(self):
        h = self.heads
        return Samples(a=h.a, b=h.b), Samples(c=h.c, e=h.e), None


class Tasks(BilevelModule):
    """One head per task, losses summed over the batch's tasks (the batched convention)."""

    def __init__(self, algorithm=None, episodic: bool = False) -> None:
        super().__init__(
            algorithm,
            per_sample=() if episodic else ("w",),
            lower_level="batched",
            inner_init=self.fresh_heads if episodic else None,
        )
        self.heads = TaskHeads.make(tasks=TASKS)
        self.is_episodic = episodic

    def configure_variables(self):
        start = self.heads.outer_init(), self.heads.inner_init()
        return start[0], ({} if self.is_episodic else start[1])

    def fresh_heads(self, outer, batch):
        """Every task of the step starts at the shared centre (iMAML)."""
        return {"w": outer["x"].expand(len(batch["index"]), -1).clone()}

    def rows(self, inner, batch):
        return inner["w"] if self.is_episodic else inner["w"][batch["index"]]

    def inner_loss(self, inner, outer, batch):
        heads, lam, n = self.rows(inner, batch), self.heads.lam, batch["a"].shape[1]
        fit = torch.einsum("tnd,td->tn", batch["a"], heads) - batch["b"]
        return (fit.pow(2).sum(1) / (2 * n) + 0.5 * lam * (heads - outer["x"]).pow(2).sum(1)).sum()

    def outer_loss(self, inner, outer, batch):
        heads, n = self.rows(inner, batch), batch["c"].shape[1]
        fit = torch.einsum("tnd,td->tn", batch["c"], heads) - batch["e"]
        return (fit.pow(2).sum(1) / (2 * n)).sum()


class Record(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = {"x": module.state["outer"]["x"].clone()}
        if not module.is_episodic:
            step["w"] = module.gathered("inner")["w"]
        self.steps.append(step)


def trainer(devices: int, steps: int = STEPS, callbacks=(), root=None, validate=False) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision="64-true",
        max_steps=steps,
        limit_val_batches=1.0 if validate else 0,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        logger=False,
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=root or tempfile.mkdtemp(prefix="bilevel_dist_test_"),
    )


def fit(name: str, devices: int) -> list:
    spec, episodic = RUNS[name]
    record = Record()
    run = trainer(devices, callbacks=[record], validate=not episodic)  # episodic: no learned heads to score
    run.fit(Tasks(spec, episodic), TaskData(inner_batch_size=8, shards=2))
    if not episodic:  # the mean outer loss per task over every task, each scored on the rank holding its head
        record.steps[-1]["val"] = run.callback_metrics["val_outer_loss"].clone()
    return record.steps


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    for name in RUNS:
        steps = fit(name, devices)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        torch.save(steps, f"{out}/{name}_rank{rank}.pt")
