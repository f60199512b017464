"""The README's denoising results: digits at 25% and 50% flipped labels, 3 seeds, every method
at the full default size (``recipes/data_denoising/digits*.yaml``), plus the baselines.

    python recipes/data_denoising/results.py   # writes recipes/data_denoising/results.md

Each cell is what ``bilevel-dist fit --config recipes/data_denoising/digits.yaml
--data.init_args.noise N --data.init_args.split_seed S --model.algorithm '{...}'`` prints in its
summary; baselines are trained with Penalty's budget (500 steps × T = 5 SGD steps).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from bilevel_dist.recipes.data_denoising import BASELINES, fit_digits

METHODS = {
    "penalty": {"name": "penalty", "inner_steps": 5, "inner_lr": 0.5, "outer_lr": 100.0},
    "aid": {"name": "aid", "inner_steps": 20, "linear_iters": 20, "inner_lr": 0.5, "outer_lr": 100.0},
    "itd": {"name": "itd", "inner_steps": 20, "inner_lr": 0.5, "outer_lr": 100.0},
    "soba": {"name": "soba", "inner_lr": 0.5, "outer_lr": 100.0},
}
NOISES, SEEDS, STEPS = (0.25, 0.5), (0, 1, 2), 500


def run(noise: float, seed: int, algorithm: dict, baselines: bool) -> tuple[dict, float]:
    start = time.perf_counter()
    summary = fit_digits(
        noise, seed, STEPS, algorithm, BASELINES if baselines else (), root="/tmp/bilevel_dist_results"
    )
    return summary, time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)
    cells: dict[tuple[float, str], list[float]] = {}
    auroc: dict[tuple[float, str], list[float]] = {}
    seconds: dict[str, list[float]] = {}
    for noise in NOISES:
        for seed in SEEDS:
            for name, algorithm in METHODS.items():
                summary, took = run(noise, seed, algorithm, baselines=name == "penalty")
                cells.setdefault((noise, name), []).append(summary["method"])
                auroc.setdefault((noise, name), []).append(summary["weight_auroc"])
                seconds.setdefault(name, []).append(took)
                for baseline in ("oracle", "val_only", "train_val"):
                    if baseline in summary:
                        cells.setdefault((noise, baseline), []).append(summary[baseline])
                print(noise, seed, name, summary, f"{took:.1f}s", flush=True)

    def cell(values: list[float]) -> str:
        return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"

    columns = ["oracle", "val_only", "train_val", *METHODS]
    lines = [
        f"Digits (scikit-learn, 1,147 noisy train / 150 clean val / 500 test), linear softmax model, "
        f"{STEPS} outer steps, batches 128/50; test accuracy %, mean ± s.d. over split/noise seeds {SEEDS}; "
        f"`python recipes/data_denoising/results.py`, {torch.get_num_threads()} thread per run, CPU.",
        "",
        "| noise | Oracle | Val-only | Train+Val | " + " | ".join(METHODS) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for noise in NOISES:
        lines.append(f"| {int(100 * noise)}% | " + " | ".join(cell(cells[(noise, c)]) for c in columns) + " |")
    lines += ["", "ROC-AUC of the learned weights, clean against flipped samples:", ""]
    lines += ["| noise | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for noise in NOISES:
        values = [f"{statistics.mean(auroc[(noise, m)]):.3f}" for m in METHODS]
        lines.append(f"| {int(100 * noise)}% | " + " | ".join(values) + " |")
    lines += ["", "Seconds per run (fit, summary and, for Penalty, the three baselines): " + ", ".join(
        f"{m} {statistics.mean(s):.1f}" for m, s in seconds.items())]  # fmt: skip
    out = Path(__file__).with_name("results.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
