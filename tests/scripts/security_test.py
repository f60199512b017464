"""The security audits under Lightning, 1 or 2 DDP processes: ``python security_test.py OUT
DEVICES AUDIT`` runs a tiny Witches' Brew audit (``brew``: 3 cases × 2 victims) or backdoor audit
(``backdoor``: 2 seeds) and saves, per rank, what the audit holds at the end."""

import sys
import tempfile

import lightning as L
import torch
import torch.distributed as dist

from bilevel_dist.recipes.security import BackdoorAudit, SecurityData, WitchesBrewAudit


def make(audit: str) -> L.LightningModule:
    if audit == "brew":
        return WitchesBrewAudit(cases=3, victims=2, restarts=2, steps=12, training={"epochs": 3})
    return BackdoorAudit(seeds=[0, 1], epochs=2, blo={"iters": 3, "pretrain": 1})


def run(devices: int, audit: str) -> dict:
    model = make(audit)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(prefix="bilevel_dist_test_"),
    )
    trainer.test(model, SecurityData())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if audit == "brew":
        cases = [
            {"delta": r.brew.delta, "poisoned": r.poisoned, "clean": r.clean, "accuracy": r.accuracy}
            for r in model.results["cases"]
        ]
        return {"cases": cases, "metrics": metrics}
    return {"runs": model.results["runs"], "mean": model.results["mean"], "metrics": metrics}


if __name__ == "__main__":
    out, devices, audit = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    held = run(devices, audit)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(held, f"{out}/{audit}_rank{rank}.pt")
