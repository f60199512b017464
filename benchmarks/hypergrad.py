"""Time and peak extra memory of one hypergradient, for every estimator in the registry.

Run from the repository root::

    python benchmarks/hypergrad.py            # full run: T = 10, 100, 1000 inner GD steps
    python benchmarks/hypergrad.py --quick    # smoke run: T = 10, 100, fewer repeats

Two problems: ridge regression with 200 per-feature log penalties (float64) and an MLP
64-32-10 lower level with one log weight decay per weight tensor (float32). Then 64 small
quadratic lower levels solved as one batched problem versus a loop of single solves.

Each (problem, estimator, T) cell runs in a fresh subprocess so that peaks do not leak between
cells. Two peaks are reported. "Tensors" is the peak of live tensor memory counted by PyTorch's
``MemTracker`` (exact and repeatable; on CUDA ``max_memory_allocated`` minus the allocation before
the call); the flat-in-T check uses it. "RSS" is the process high-water mark, which also counts
allocator slack and varies by about ±50 KiB between processes: ``MALLOC_MMAP_THRESHOLD_=65536`` makes
glibc return freed large blocks to the OS, ``malloc_trim(0)`` releases the rest after a warm-up,
``/proc/self/clear_refs`` resets ``VmHWM`` and the peak extra is ``VmHWM - VmRSS`` over one
hypergradient. On CUDA it is ``max_memory_allocated`` minus the allocation before the call.
The Markdown table goes to stdout and to ``--out`` (``benchmarks/results/hypergrad.md``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bilevel_dist import hypergrad, solve
from bilevel_dist.hypergrad.base import Estimator, Solution
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.problems import RidgeRegression
from bilevel_dist.solvers import GD
from bilevel_dist.tree import Tree

ROOT = Path(__file__).resolve().parent
# Iterative linear solves capped at 20 products so that the estimators' costs are comparable.
OPTIONS: dict[str, dict[str, Any]] = {
    "truncated": {"k": 10},
    "cg": {"iters": 20},
    "neumann": {"iters": 20},
    "fixed_point": {"iters": 20},
    "exact": {"chunk_size": 256},
    "penalty": {"newton_steps": 2, "cg_iters": 20},
}
IMPLICIT = ("cg", "neumann", "fixed_point", "exact")
MIB = 2**20
# Peaks of a few hundred KiB vary by about +-50 KiB between processes (heap layout), whatever T is.
# Stop the repeats of a cell once they have taken this long (at least one always runs).
TIME_BUDGET_S = 20.0


# ---------------------------------------------------------------- problems


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), platform.processor())
    return f"CPU {model or 'unknown'}, {torch.get_num_threads()} torch thread(s)"


def ridge(device: torch.device) -> tuple[BilevelProblem, Tree, Tree, float]:
    """The ridge problem of ``bilevel_dist.problems``, d=200, with its 1/L step."""
    data = RidgeRegression.make(n_train=2000, n_val=500, features=200, dtype=torch.float64)
    outer = data.outer_init(-2.0)
    lr = 1.0 / data.lipschitz(outer)
    data = RidgeRegression(*(t.to(device) for t in (data.x_train, data.y_train, data.x_val, data.y_val)))
    inner = {k: v.to(device) for k, v in data.inner_init().items()}
    return data.problem, {k: v.to(device) for k, v in outer.items()}, inner, lr


class MLPProblem:
    """Inner: weights of a tanh MLP 64-32-10 fit by cross-entropy plus ``Σ_k exp(x_k)‖w_k‖²/2``
    on 1000 samples labelled by a random teacher; outer: cross-entropy on 300 validation samples."""

    sizes = (64, 32, 10)

    def __init__(self, device: torch.device, n_train: int = 1000, n_val: int = 300, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        teacher = self.random_weights(gen, scale=3.0)
        x = torch.randn(n_train + n_val, self.sizes[0], generator=gen)
        y = self.forward(teacher, x).argmax(1)
        self.x_train, self.y_train = x[:n_train].to(device), y[:n_train].to(device)
        self.x_val, self.y_val = x[n_train:].to(device), y[n_train:].to(device)
        self.init = {k: v.to(device) for k, v in self.random_weights(gen, scale=1.0).items()}

    def random_weights(self, gen: torch.Generator, scale: float) -> Tree:
        (d_in, hidden, out) = self.sizes
        return {
            "w1": torch.randn(d_in, hidden, generator=gen) * scale / d_in**0.5,
            "b1": torch.zeros(hidden),
            "w2": torch.randn(hidden, out, generator=gen) * scale / hidden**0.5,
            "b2": torch.zeros(out),
        }

    @staticmethod
    def forward(w: Tree, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]

    def inner_loss(self, inner: Tree, outer: Tree, batch: object = None) -> torch.Tensor:
        fit = F.cross_entropy(self.forward(inner, self.x_train), self.y_train)
        return fit + sum(outer[k].exp() * inner[k].pow(2).sum() for k in inner) / 2

    def outer_loss(self, inner: Tree, outer: Tree, batch: object = None) -> torch.Tensor:
        return F.cross_entropy(self.forward(inner, self.x_val), self.y_val)


def mlp(device: torch.device) -> tuple[BilevelProblem, Tree, Tree, float]:
    data = MLPProblem(device)
    outer = {k: torch.tensor(-4.0, device=device) for k in data.init}
    return BilevelProblem(data.inner_loss, data.outer_loss), outer, data.init, 0.5


PROBLEMS: dict[str, Callable[[torch.device], tuple[BilevelProblem, Tree, Tree, float]]] = {"ridge": ridge, "mlp": mlp}


def quadratics(
    device: torch.device, count: int = 64, n: int = 20, m: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``count`` SPD matrices A_i (eigenvalues in [1, 10]), couplings B_i, targets, shared x, 1/L."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(count, n, n, generator=gen, dtype=torch.float64))
    eig = 1 + 9 * torch.rand(count, n, generator=gen, dtype=torch.float64)
    a = q @ torch.diag_embed(eig) @ q.mT
    a = (a + a.mT) / 2
    b = torch.randn(count, n, m, generator=gen, dtype=torch.float64)
    target = torch.randn(count, n, generator=gen, dtype=torch.float64)
    x = torch.randn(m, generator=gen, dtype=torch.float64)
    return a.to(device), b.to(device), target.to(device), x.to(device), 1.0 / float(eig.max())


def quadratic_problem(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, batched: bool) -> BilevelProblem:
    """Σ_i ½ w_iᵀA_i w_i − w_iᵀB_i x below, ½‖w − target‖² above."""

    def inner_loss(inner: Tree, outer: Tree, batch: object = None) -> torch.Tensor:
        w = inner["w"]
        return 0.5 * torch.einsum("bi,bij,bj->", w, a, w) - torch.einsum("bi,bij,j->", w, b, outer["x"])

    def outer_loss(inner: Tree, outer: Tree, batch: object = None) -> torch.Tensor:
        return 0.5 * (inner["w"] - target).pow(2).sum()

    return BilevelProblem(inner_loss, outer_loss, batched=batched)


# ---------------------------------------------------------------- worker


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = call()
    sync(device)
    return time.perf_counter() - start, out


def peak_extra(call: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """Runs ``call`` once; returns (seconds, peak MiB above what was live before, result)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        seconds, out = timed(call, device)
        return seconds, (torch.cuda.max_memory_allocated(device) - before) / MIB, out
    # Hand freed heap pages back so that the measured run has to fault in what it uses.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    if status_kib("VmHWM") > before + 1024:
        raise RuntimeError("VmHWM was not reset by /proc/self/clear_refs; peak memory would be wrong")
    seconds, out = timed(call, device)
    return seconds, (status_kib("VmHWM") - before) / 1024, out


def tensor_peak(call: Callable[[], Any], device: torch.device) -> float:
    """Peak MiB of live tensors during ``call``, counted by PyTorch's MemTracker (CPU)."""
    if device.type == "cuda":
        return peak_extra(call, device)[1]
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        call()
    return sum(stats.get("Total", 0) for stats in tracker.get_tracker_snapshot("peak").values()) / MIB


def worker_cell(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    problem, outer, inner, lr = PROBLEMS[spec["problem"]](device)
    solver = GD(lr, steps=spec["steps"])
    estimator: Estimator = hypergrad.get(spec["estimator"], **OPTIONS.get(spec["estimator"], {}))

    def call(check: bool = False) -> Solution:
        return solve(problem, outer, inner, solver=solver, hypergrad=estimator, check=check)

    warm = call(check=True)  # validates the problem and pays lazy initialisation outside the measurement
    times: list[float] = []
    peaks: list[float] = []
    # Every repeat measures its own peak (trim and reset sit outside the timed call); medians damp heap noise.
    while len(times) < max(1, spec["repeats"]) and (not times or sum(times) < TIME_BUDGET_S):
        seconds, peak, solution = peak_extra(call, device)
        times.append(seconds)
        peaks.append(peak)
    flat = torch.cat([g.flatten() for g in solution.grad.values()])
    return {
        "seconds": statistics.median(times),
        "repeats": len(times),
        "peak_mib": statistics.median(peaks),
        "tensor_mib": tensor_peak(call, device),
        "peak_mib_max": max(peaks),
        "warmup_seconds": warm.info["seconds"],
        "grad_norm": float(flat.norm()),
        "inner_grad_norm": float(solution.info["inner_grad_norm"]),
    }


def worker_batched(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    a, b, target, x, lr = quadratics(device)
    count, n = target.shape
    solver = GD(lr, steps=100)
    estimator = hypergrad.get("cg")  # defaults (100 iters, rel. tol 1e-10): n=20 converges in full
    outer = {"x": x}
    batched = quadratic_problem(a, b, target, batched=True)
    singles = [quadratic_problem(a[i : i + 1], b[i : i + 1], target[i : i + 1], batched=False) for i in range(count)]

    def run_batched(check: bool = False) -> torch.Tensor:
        inner = {"w": torch.zeros(count, n, dtype=a.dtype, device=device)}
        return solve(batched, outer, inner, solver=solver, hypergrad=estimator, check=check).grad["x"]

    def run_loop(check: bool = False) -> torch.Tensor:
        total = torch.zeros_like(x)
        for single in singles:
            inner = {"w": torch.zeros(1, n, dtype=a.dtype, device=device)}
            total = total + solve(single, outer, inner, solver=solver, hypergrad=estimator, check=check).grad["x"]
        return total

    diff = float((run_batched(check=True) - run_loop(check=True)).abs().max())
    batched_times = [timed(run_batched, device)[0] for _ in range(spec["repeats"] + 2)]
    loop_times = [timed(run_loop, device)[0] for _ in range(spec["repeats"])]
    return {
        "count": count,
        "n": n,
        "batched_seconds": statistics.median(batched_times),
        "loop_seconds": statistics.median(loop_times),
        "max_abs_diff": diff,
    }


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    out = worker_batched(spec, device) if spec["problem"] == "batched" else worker_cell(spec, device)
    out["device"] = device_name(device)
    return out


# ---------------------------------------------------------------- driver


def launch(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one measurement in a fresh interpreter and returns its JSON result."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env, timeout=900
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cell_ms(result: dict[str, Any], repeats: int) -> str:
    ms = result["seconds"] * 1e3
    text = f"{ms:.3g}" if ms < 1e3 else f"{ms:,.0f}"
    # Mark medians taken over fewer runs than asked (slow cells hit TIME_BUDGET_S).
    return text if result["repeats"] >= repeats else f"{text} (n={result['repeats']})"


def table(results: dict[tuple[str, int], dict[str, Any]], steps: tuple[int, ...], repeats: int) -> list[str]:
    head = ["estimator"] + [f"T={t} ms" for t in steps]
    head += [f"T={t} tensors MiB" for t in steps] + [f"T={t} RSS MiB" for t in steps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in hypergrad.REGISTRY:
        times = [cell_ms(results[name, t], repeats) for t in steps]
        tensors = [f"{results[name, t]['tensor_mib']:.2f}" for t in steps]
        peaks = [f"{results[name, t]['peak_mib']:.1f}" for t in steps]
        lines.append("| " + " | ".join([f"`{name}`", *times, *tensors, *peaks]) + " |")
    return lines


def checks(problem: str, results: dict[tuple[str, int], dict[str, Any]], steps: tuple[int, ...]) -> list[str]:
    lo, hi = steps[0], steps[-1]
    lines = []
    for name in IMPLICIT:
        a, b = results[name, lo]["tensor_mib"], results[name, hi]["tensor_mib"]
        verdict = "PASS" if b <= 1.2 * a else "FAIL"
        lines.append(
            f"- {problem} `{name}`: peak T={hi} / T={lo} = {b:.2f} / {a:.2f} MiB"
            f" = {b / a if a > 0 else float('inf'):.2f}x -> {verdict} (flat: <= 1.2x)"
        )
    peaks = [results["reverse", t]["tensor_mib"] for t in steps]
    grows = all(p < q for p, q in zip(peaks, peaks[1:], strict=False))
    shown = " < ".join(f"{p:.1f}" for p in peaks)
    lines.append(f"- {problem} `reverse`: peak MiB over T={steps}: {shown} -> {'PASS' if grows else 'FAIL'} (grows)")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T in 10, 100 and fewer repeats (smoke run)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "hypergrad.md", help="Markdown output")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker; 0 keeps torch's default")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    start = time.perf_counter()
    steps = (10, 100) if args.quick else (10, 100, 1000)
    repeats = 2 if args.quick else 3
    base = {"device": args.device, "threads": args.threads, "repeats": repeats}
    tables: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    for problem in PROBLEMS:
        tables[problem] = {}
        for name in hypergrad.REGISTRY:
            for t in steps:
                result = launch({**base, "problem": problem, "estimator": name, "steps": t})
                tables[problem][name, t] = result
                print(
                    f"[{time.perf_counter() - start:6.1f}s] {problem:5s} {name:11s} T={t:<4d} "
                    f"{result['seconds'] * 1e3:10.2f} ms {result['peak_mib']:8.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    batched = launch({**base, "problem": "batched"})
    tol = 1e-8
    if not batched["max_abs_diff"] <= tol:  # an explicit raise survives python -O
        raise AssertionError(f"looped and batched hypergradients differ by {batched['max_abs_diff']:.3g} > {tol}")

    device = batched["device"]
    options = ", ".join(f"{k}({', '.join(f'{o}={v}' for o, v in opts.items())})" for k, opts in OPTIONS.items())
    lines = [
        "# Hypergradient estimators: time and peak extra memory per hypergradient",
        "",
        f"Device: {device}. Command: `python benchmarks/hypergrad.py{' --quick' if args.quick else ''}`.",
        f"Inner solver `GD(lr, steps=T)`; estimator options: {options}; others default.",
        f"Time: median of up to {repeats} runs after one warm-up"
        f" (`(n=k)`: fewer, {TIME_BUDGET_S:.0f} s budget per cell).",
        "Peaks, one fresh process per cell: *tensors* = peak live tensor memory during the call (PyTorch's"
        " `MemTracker` on CPU, `max_memory_allocated` on CUDA), used by the checks below; *RSS* = median over the"
        " timed runs of the process high-water mark above the RSS before the call (VmHWM - VmRSS; ±50 KiB noise).",
        "",
    ]
    titles = {
        "ridge": "Ridge regression, d=200 (n_train=2000, n_val=500, float64, log λ = -2, lr = 1/L)",
        "mlp": "MLP 64-32-10 tanh, 2410 inner weights, 4 log weight decays (1000/300 samples, float32, lr = 0.5)",
    }
    for problem, results in tables.items():
        lines += [f"## {titles[problem]}", "", *table(results, steps, repeats), ""]
    ratio = batched["loop_seconds"] / batched["batched_seconds"]
    lines += [
        "## Batched vs looped",
        "",
        f"{batched['count']} quadratic lower levels (n={batched['n']}, shared x of size 5), CG defaults, "
        f"GD(steps=100), `check=False`: batched {batched['batched_seconds'] * 1e3:.1f} ms, "
        f"loop of {batched['count']} solves {batched['loop_seconds'] * 1e3:.1f} ms, "
        f"loop/batched = {ratio:.1f}x; summed looped vs batched hypergradient max |diff| = "
        f"{batched['max_abs_diff']:.2g} (<= {tol:g}: PASS).",
        "",
        "## Checks",
        "",
    ]
    for problem, results in tables.items():
        lines += checks(problem, results, steps)
    lines += ["", f"Total wall time: {time.perf_counter() - start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
