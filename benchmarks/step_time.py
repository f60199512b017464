"""Milliseconds per ``algorithm.step`` for every registered algorithm, this checkout against another
one, side by side in one run: fresh interpreters for the two checkouts alternate, each timing
every algorithm in blocks of steps, and a cell is the fastest block (the shared CPUs this runs on
swing by 2x between runs; the minimum is what the code costs).

    python benchmarks/step_time.py --against /path/to/older/checkout   # writes results/step_time.md

Problems: ``FiniteSumQuadratic.make()`` with minibatches of 8, and ``HyperCleaning.make()`` (digits,
linear model) with minibatches of 64; every algorithm at its defaults (SABA/SRBA/VRBO with their
sample counts or full passes), float64, one torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, time, torch
from bilevel_dist import algorithms
from bilevel_dist.problems import FiniteSumQuadratic, HyperCleaning
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
which, steps, blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = FiniteSumQuadratic.make() if which == "quadratic" else HyperCleaning.make(noise=0.5, seed=0)
size = 8 if which == "quadratic" else 64
gen = torch.Generator().manual_seed(0)
batches = [
    ({"index": torch.randint(data.n_inner, (size,), generator=gen)},
     {"index": torch.randint(data.n_outer, (size,), generator=gen)})
    for _ in range(steps)
]
result = {}
for name in sys.argv[4:]:
    extra = {"saba": {"n_inner": data.n_inner, "n_outer": data.n_outer}}.get(name, {})
    if name in ("srba", "vrbo"):
        extra = {"full_batches": data.full_batches()}
    algorithm = algorithms.get(name, problem=data.problem, **extra)
    state = algorithm.init(data.outer_init(), data.inner_init())
    for inner, outer in batches[:3]:
        state, _ = algorithm.step(state, inner, outer)
    best = float("inf")
    for _ in range(blocks):
        start = time.perf_counter()
        for inner, outer in batches:
            state, _ = algorithm.step(state, inner, outer)
        best = min(best, (time.perf_counter() - start) / steps)
    result[name] = 1e3 * best
print(json.dumps(result))
"""

NAMES = "aid itd stocbio amigo bsa hoag ttsa soba saba srba fsla mrbo vrbo sustain penalty bome f2sa".split()
STEPS = {"quadratic": 20, "cleaning": 10}


def measure(checkout: Path, problem: str, blocks: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", WORKER, problem, str(STEPS[problem]), str(blocks), *NAMES],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=checkout,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--against", type=Path, required=True, help="the older checkout to compare with")
    parser.add_argument("--repeats", type=int, default=3, help="interpreters per checkout and problem")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per algorithm and interpreter")
    args = parser.parse_args()
    best: dict[str, dict[str, dict[str, float]]] = {p: {"old": {}, "new": {}} for p in STEPS}
    for _ in range(args.repeats):
        for problem in STEPS:
            for which, checkout in (("old", args.against), ("new", ROOT)):
                for name, ms in measure(checkout, problem, args.blocks).items():
                    best[problem][which][name] = min(ms, best[problem][which].get(name, float("inf")))
    rows = []
    for name in NAMES:
        cells = []
        for problem in STEPS:
            old, new = best[problem]["old"][name], best[problem]["new"][name]
            cells.append(f"{old:.2f} | {new:.2f} | {new / old:.2f}")
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines = [
        f"Command: `python benchmarks/step_time.py --against OLD` ({os.cpu_count()} CPU cores, one torch thread, "
        f"fastest of {args.repeats} × {args.blocks} blocks of {STEPS} steps).",
        "",
        "| algorithm | quadratic old ms | new ms | new/old | cleaning old ms | new ms | new/old |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "step_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
