"""What ``HypergradientMonitor`` costs: the denoising recipe's SOBA run (``digits_monitor.yaml``'s
settings) without the monitor and with it every 50 steps, tight and cheap, alternating, in one
process.

    python benchmarks/monitor.py            # about 2 minutes; writes results/monitor.md

A cell is the fastest of the alternating fits (one torch thread); the overhead is the monitor's
share of the run's wall time, and the monitor also reports its own seconds.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from bilevel_dist.lightning import HypergradientMonitor
from bilevel_dist.recipes.data_denoising import Denoising, DigitsData

RESULTS = Path(__file__).parent / "results"
STEPS, EVERY = 500, 50
SETTINGS = {
    "tight": {"estimator": {"name": "cg", "iters": 200, "tol": 1e-10}, "inner_steps": 2000, "inner_tol": 1e-8},
    "cheap": {"estimator": {"name": "cg", "iters": 20, "tol": 1e-8}, "inner_steps": 30, "inner_tol": None},
}


def fit(setting: str | None) -> dict:
    torch.manual_seed(0)
    data = DigitsData(noise=0.5, n_val=150, inner_batch_size=128, outer_batch_size=50)
    model = Denoising(algorithm={"name": "soba", "inner_lr": 0.5, "outer_lr": 20.0}, baselines=())
    monitor = HypergradientMonitor(every_n_steps=EVERY, **SETTINGS.get(setting or "tight"))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor] if setting else [],
        default_root_dir=tempfile.mkdtemp(prefix="bilevel_dist_monitor_"),
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "monitor_seconds": monitor.seconds, "history": monitor.history}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [None, *SETTINGS]
    best: dict = dict.fromkeys(names)
    for _ in range(args.repeats):
        for name in names:
            run = fit(name)
            if best[name] is None or run["seconds"] < best[name]["seconds"]:
                best[name] = run
    plain = best[None]
    lines = [
        f"Command: `python benchmarks/monitor.py` — {platform.machine()}, one torch thread, torch {torch.__version__}; "
        f"fastest of {args.repeats} alternating fits.",
        "",
        f"SOBA on digits denoising (linear model, 128 samples a step), {STEPS} steps, the monitor every {EVERY} "
        "steps on the step's own batches. Tight: GD to an inner gradient norm of 1e-8 (at most 2,000 steps), then "
        "CG to 1e-10 (at most 200 iterations). Cheap: 30 GD steps from the step's inner variables, then 20 CG "
        "iterations.",
        "",
        "| run | fit s | monitor s (its own count) | checks | overhead | cosine at each check | reference's inner "
        "gradient norm (median) |",
        "|---|---|---|---|---|---|---|",
        f"| without the monitor | {plain['seconds']:.2f} | – | – | – | – | – |",
    ]
    for name in SETTINGS:
        run = best[name]
        overhead = run["seconds"] / plain["seconds"] - 1
        cosines = ", ".join(f"{h['cosine']:.2f}" for h in run["history"])
        norms = sorted(h["reference_inner_grad_norm"] for h in run["history"])
        lines.append(
            f"| monitor, {name} | {run['seconds']:.2f} | {run['monitor_seconds']:.2f} | {len(run['history'])} | "
            f"{100 * overhead:.1f}% | {cosines} | {norms[len(norms) // 2]:.1e} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "monitor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
