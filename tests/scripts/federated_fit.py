"""Federated rounds under Lightning, 1 or 2 DDP processes with the same sampled clients.
``python federated_fit.py OUT DEVICES`` saves, per run and rank, every round's global model and
the collectives issued inside local training and inside each whole round, and the validation
and test scores after the last round."""

import sys
import tempfile

import lightning as L
import torch
import torch.distributed as dist
from collectives import CountCollectives

from bilevel_dist.recipes.federated import Federated, FederatedData

ROUNDS = 3
RUNS = {
    # 7 sampled clients over 2 ranks: one rank holds a padding row
    "fedavg": ({"local_lr": 0.1}, {"clients": 20, "fraction": 0.35, "partition": "dirichlet", "dropout": 0.2}),
    "fedadam_median": (
        {"local_lr": 0.1, "server_optimizer": "adam", "server_lr": 0.01, "aggregator": "median"},
        {"clients": 20, "fraction": 0.3, "partition": "iid", "faults": {"nan": 1, "scaled": 1}},
    ),
    "fedprox_dp": (
        {"local_lr": 0.1, "prox": 0.1, "clip": 0.5, "noise_multiplier": 1.0},
        {"clients": 20, "fraction": 0.4, "partition": "shards"},
    ),
}


class Record(L.Callback):
    """Every round's global model; the collectives inside local training and inside each round."""

    def __init__(self) -> None:
        self.rounds, self.local, self.whole = [], [], []

    def on_train_start(self, trainer, module):
        algorithm = module.algorithm
        step, local = algorithm.step, algorithm.train_chunk

        def counted_step(*args, **kwargs):
            with CountCollectives() as counter:
                result = step(*args, **kwargs)
            self.whole.append(counter.count)
            return result

        def counted_local(*args, **kwargs):
            with CountCollectives() as counter:
                result = local(*args, **kwargs)
            self.local.append(counter.count)  # per chunk
            return result

        algorithm.step, algorithm.train_chunk = counted_step, counted_local

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rounds.append({k: v.clone() for k, v in module.state["outer"].items()})


def fit(name: str, devices: int) -> tuple[list, list, list]:
    algorithm, data = RUNS[name]
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision="64-true",
        max_steps=ROUNDS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
        default_root_dir=tempfile.mkdtemp(prefix="bilevel_dist_test_"),
    )
    model = Federated("fedavg", algorithm={**algorithm, "client_chunk": 2}, hidden=8)
    federated = FederatedData(epochs=2, local_batch=5, **data)
    trainer.fit(model, federated)
    # evaluation on unpadded per-rank shares: the same numbers whatever the number of processes
    scores = trainer.validate(model, federated, verbose=False)[0]
    trainer.test(model, federated, verbose=False)
    scores |= model.results
    return record.rounds, record.local, record.whole, scores


if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)  # as the test process (conftest): Lightning logs in it
    out, devices = sys.argv[1], int(sys.argv[2])
    for name in RUNS:
        rounds, local, whole, scores = fit(name, devices)
        rank = dist.get_rank() if dist.is_initialized() else 0
        saved = {"rounds": rounds, "local": local, "whole": whole, "scores": scores}
        torch.save(saved, f"{out}/{name}_rank{rank}.pt")
