"""Milliseconds per ``algorithm.step`` for every registered algorithm, this checkout against another
one, side by side in one run (each measurement in a fresh interpreter, the two checkouts
alternating so that drift hits both alike).

    python benchmarks/step_time.py --against /path/to/older/checkout   # writes results/step_time.md

Problems: ``FiniteSumQuadratic.make()`` with minibatches of 8, and ``HyperCleaning.make()`` (digits,
linear model) with minibatches of 64; every algorithm at its defaults (SABA/SRBA/VRBO with their
sample counts or full passes), float64, one torch thread, ``--repeats`` medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
name, which, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = FiniteSumQuadratic.make() if which == "quadratic" else HyperCleaning.make(noise=0.5, seed=0)
size = 8 if which == "quadratic" else 64
extra = {"saba": {"n_inner": data.n_inner, "n_outer": data.n_outer}}.get(name, {})
if name in ("srba", "vrbo"):
    extra = {"full_batches": data.full_batches()}
algorithm = algorithms.get(name, problem=data.problem, **extra)
state = algorithm.init(data.outer_init(), data.inner_init())
gen = torch.Generator().manual_seed(0)
batches = [
    ({"index": torch.randint(data.n_inner, (size,), generator=gen)},
     {"index": torch.randint(data.n_outer, (size,), generator=gen)})
    for _ in range(steps + 5)
]
for inner, outer in batches[:5]:
    state, _ = algorithm.step(state, inner, outer)
start = time.perf_counter()
for inner, outer in batches[5:]:
    state, _ = algorithm.step(state, inner, outer)
print(json.dumps(1e3 * (time.perf_counter() - start) / steps))
"""

NAMES = "aid itd stocbio amigo bsa hoag ttsa soba saba srba fsla mrbo vrbo sustain penalty bome f2sa".split()
STEPS = {"quadratic": 40, "cleaning": 20}


def measure(checkout: Path, name: str, problem: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", WORKER, name, problem, str(STEPS[problem])],
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
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for name in NAMES:
        cells = []
        for problem in STEPS:
            times: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(args.repeats):
                times["old"].append(measure(args.against, name, problem))
                times["new"].append(measure(ROOT, name, problem))
            old, new = (statistics.median(times[k]) for k in ("old", "new"))
            cells.append(f"{old:.2f} | {new:.2f} | {new / old:.2f}")
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    lines = [
        f"Command: `python benchmarks/step_time.py --against OLD` ({os.cpu_count()} CPU cores, one torch thread, "
        f"medians of {args.repeats}).",
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
