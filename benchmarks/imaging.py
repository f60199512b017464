"""The imaging recipe's per-image lower levels solved as one batched problem against a Python
loop over the images, side by side in one run.

    python benchmarks/imaging.py            # about 3 minutes; writes results/imaging.md
    python benchmarks/imaging.py --quick    # J = 64 only

Workload: one outer step of :class:`~bilevel_dist.recipes.imaging.algorithm.ReconstructionIFT`
on ``J`` denoising patches of 16×16 and 32×32 (σ = 25/255, bundled photographs), 8 3×3 DCT
filters, CR1N ε = 0.01, β₀ = −3: 10 OGM steps warm-started from a converged start, then CG (20
iterations) for the hypergradient. *batched*: the recipe's step, all ``J`` lower levels in one
problem; *looped*: the same algorithm on one patch at a time, the ``J`` hypergradients summed.
Both run the same code per patch (the energy's analytic derivatives, whichever kernel layout
suits the batch size). float32 throughout, data and filters included (``--dtype float64``: the
two agree to 1e-15), one torch thread; every cell is the least CPU time of this process over 5
repeats (the shared CPUs swing by 2×; CPU time leaves out the waits for a core, which would
weigh on the long loop more than on the short batched step, and the minimum is what the code
costs).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from bilevel_dist.problem import BilevelProblem
from bilevel_dist.recipes.imaging.algorithm import ReconstructionIFT
from bilevel_dist.recipes.imaging.data import ImagingData
from bilevel_dist.recipes.imaging.energies import FilterEnergy, dct_filters
from bilevel_dist.solvers import OGM, run

RESULTS = Path(__file__).parent / "results"


def problem_for(energy: FilterEnergy) -> BilevelProblem:
    def inner(w: dict, x: dict, b: dict) -> torch.Tensor:
        return energy(w["x"], b["y"], x["filters"], x["beta"]).sum()

    def outer(w: dict, x: dict, b: dict) -> torch.Tensor:
        return 0.5 * ((w["x"] - b["truth"]) ** 2).sum()

    return BilevelProblem(inner, outer, batched=True)


def setup(n: int, side: int = 32) -> tuple[ReconstructionIFT, dict, dict]:
    data = ImagingData(task="denoise", patch_size=side, patches_per_image=-(-n // 6), image_size=512)
    data.setup()
    dtype = torch.get_default_dtype()  # the data keep float64 patches; the recipe casts them likewise
    batch = {k: v[:n].to(dtype) for k, v in data.train.items() if k != "index"}
    energy = FilterEnergy(eps=0.01, beta0=-3.0)
    outer = {"filters": dct_filters(3).to(dtype), "beta": torch.zeros(8)}
    bound = energy.lipschitz(outer["filters"], outer["beta"], (side, side))
    problem = problem_for(energy)
    start = run(OGM(1 / bound, 2000, 1e-6, batched=True), problem, {"x": batch["y"].clone()}, outer, batch).inner
    algorithm = ReconstructionIFT(problem, inner_steps=10, inner_tol=0.0, linear_iters=20, linear_tol=0.0,
                                  step_bound=lambda o: bound)  # fmt: skip
    return algorithm, algorithm.init(outer, start), batch


def batched(algorithm: ReconstructionIFT, state: dict, batch: dict) -> dict:
    return algorithm.solve(state, batch, batch).grad


def looped(algorithm: ReconstructionIFT, state: dict, batch: dict) -> dict:
    total = None
    for j in range(batch["y"].shape[0]):
        one = {k: v[j : j + 1] for k, v in batch.items()}
        part = {**state, "inner": {"x": state["inner"]["x"][j : j + 1]}, "v": {"x": state["v"]["x"][j : j + 1]}}
        grad = algorithm.solve(part, one, one).grad
        total = grad if total is None else {k: total[k] + grad[k] for k in grad}
    return total


def fastest(fn, *args, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn(*args)
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    args = parser.parse_args()
    torch.set_default_dtype(getattr(torch, args.dtype))
    torch.set_num_threads(1)
    cases = [(16, 64), (32, 64)] if args.quick else [(16, 16), (16, 64), (16, 256), (32, 16), (32, 64), (32, 256)]
    rows = []
    for side, n in cases:
        algorithm, state, batch = setup(n, side)
        a, b = batched(algorithm, state, batch), looped(algorithm, state, batch)
        error = max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in a)
        t_batched, t_looped = fastest(batched, algorithm, state, batch), fastest(looped, algorithm, state, batch)
        rows.append((side, n, t_batched * 1e3, t_looped * 1e3, t_looped / t_batched, error))
        print(f"{side}x{side}, J={n}: batched {t_batched * 1e3:.1f} ms, looped {t_looped * 1e3:.1f} ms, "
              f"{t_looped / t_batched:.1f}x, max relative difference {error:.1e}", flush=True)  # fmt: skip
    lines = [
        "# Imaging: the per-image lower levels batched against a loop over images",
        "",
        f"`python benchmarks/imaging.py`, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"one thread, {args.dtype}; one ReconstructionIFT step (10 OGM steps + 20 CG iterations) on J patches; "
        "least CPU time of 5 repeats.",
        "",
        "| patch | J patches | batched (ms) | looped (ms) | looped / batched | max relative difference |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {s}×{s} | {n} | {tb:.1f} | {tl:.1f} | {r:.1f}× | {e:.1e} |" for s, n, tb, tl, r, e in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "imaging.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
