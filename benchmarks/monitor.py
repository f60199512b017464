"""What ``HypergradientMonitor`` costs: the denoising recipe's SOBA run (``digits_monitor.yaml``'s
settings) without the monitor and with it every 50 steps, tight and cheap, alternating, in one
process.

    python benchmarks/monitor.py            # about 2 minutes; writes results/monitor.md

Each repeat runs the fits back to back (one torch thread); an overhead is the extra wall time
over the plain run of the same repeat (median and range), and the monitor also reports its own
seconds.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from statistics import median

import lightning as L
import torch

from bilevel_dist.lightning import HypergradientMonitor
from bilevel_dist.recipes.data_denoising import Denoising, DigitsData

RESULTS = Path(__file__).parent / "results"
STEPS, EVERY = 500, 50
SETTINGS = {
    "tight": {"estimator": {"name": "cg", "iters": 200, "tol": 1e-10}, "inner_steps": 2000, "inner_tol": 1e-8},
    "cheap": {"estimator": {"name": "cg", "iters": 20, "tol": 1e-8}, "inner_steps": 10, "inner_tol": None},
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
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # each repeat runs every setting back to back: an overhead is the ratio within one repeat (the
    # machine's speed drifts between repeats), summarised by its median and range
    runs: dict = {name: [] for name in [None, *SETTINGS]}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(fit(name))
    plain = runs[None]
    lines = [
        f"Command: `python benchmarks/monitor.py` — {platform.machine()}, one torch thread, torch {torch.__version__}; "
        f"{args.repeats} repeats, each running the three fits back to back.",
        "",
        f"SOBA on digits denoising (linear model, 128 samples a step), {STEPS} steps, the monitor every {EVERY} "
        "steps on the step's own batches. Tight: GD to an inner gradient norm of 1e-8 (at most 2,000 steps), then "
        "CG to 1e-10 (at most 200 iterations). Cheap: 10 GD steps from the step's inner variables, then 20 CG "
        "iterations. Overhead: the run's extra wall time over the run without the monitor in the same repeat, median "
        "and range over the repeats; beside it, the monitor's own seconds over that run's time. Δcosine: the "
        "largest difference from the tight reference's cosine at the same check.",
        "",
        "| run | fit s (median) | monitor s (its own count) | checks | overhead, median [range] | own count "
        "| cosine at each check | Δcosine | reference's inner gradient norm (median) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| without the monitor | {median(r['seconds'] for r in plain):.2f} | – | – | – | – | – | – | – |",
    ]
    for name in SETTINGS:
        overheads = sorted(r["seconds"] / p["seconds"] - 1 for r, p in zip(runs[name], plain, strict=True))
        own = median(r["monitor_seconds"] / p["seconds"] for r, p in zip(runs[name], plain, strict=True))
        history = runs[name][0]["history"]  # every repeat checks the same numbers
        cosines = ", ".join(f"{h['cosine']:.2f}" for h in history)
        pairs = zip(history, runs["tight"][0]["history"], strict=True)
        shift = max(abs(a["cosine"] - b["cosine"]) for a, b in pairs if a["cosine"] == a["cosine"])
        norms = sorted(h["reference_inner_grad_norm"] for h in history)
        lines.append(
            f"| monitor, {name} | {median(r['seconds'] for r in runs[name]):.2f} | "
            f"{median(r['monitor_seconds'] for r in runs[name]):.2f} | {len(history)} | "
            f"{100 * median(overheads):.1f}% [{100 * overheads[0]:.1f}, {100 * overheads[-1]:.1f}] | "
            f"{100 * own:.1f}% | {cosines} | {shift:.2f} | {norms[len(norms) // 2]:.1e} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "monitor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
