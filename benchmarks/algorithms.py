"""All registered bilevel algorithms on minibatches, at a fixed budget of oracle calls (benchopt's protocol).

Run from the repository root::

    python benchmarks/algorithms.py            # full run: 3 seeds, 4 step sizes per algorithm
    python benchmarks/algorithms.py --quick    # smoke run: 1 seed, tiny budget
    python benchmarks/algorithms.py --out DIR  # write algorithms.md and algorithms.png to DIR

Problems: ``FiniteSumQuadratic.make()`` (64 inner / 64 outer samples, minibatches of 8) and
``HyperCleaning.make(noise=0.5, seed=s)`` on scikit-learn's digits (minibatches of 64 training and
64 validation samples). Minibatches are drawn uniformly with replacement from a ``torch.Generator``
seeded with the run's seed, inner batch then outer batch at every step, so every algorithm sees
the same batch sequence within a seed. Each run stops after the step on which its oracle count
reaches the budget.

Oracle calls are counted per sample, as they happen, not from a cost model. Every evaluation of
``g`` or ``f`` on a batch of ``b`` samples adds ``b`` gradient calls (the losses are wrapped; every
evaluation is differentiated once, ``∇_w`` and ``∇_x`` from one backward). Every backward through a
linearised inner gradient adds ``b`` product calls (the algorithm's ``Oracles`` are swapped for a
subclass that counts them); one such backward returns ``H v`` and ``J v`` together, so they count
once. Two code paths bypass ``Oracles`` and are counted where they run: SABA's per-sample terms,
evaluated once under ``vmap`` (one gradient and one product per sample of the batch), and ITD's
backpropagation through its unrolled inner steps (one product per step and sample). Full passes
(SRBA's and VRBO's periodic refresh) count the full sample sizes. Before the runs, these counts are
checked against autograd's own count over the first steps of every algorithm: an identity
``autograd.Function`` on the inner variable inserts, in its backward, a second identity whose
backward runs exactly when something differentiates through the gradient. That instrumentation
doubles the cost of a step, which is why the timed runs do not use it.

Step sizes: ``inner_lr ∈ {b, b/2} × outer_lr ∈ {b, b/4}`` around the full-batch values tuned in
``tests/test_algorithms.py``. A grid point on which any seed diverges (non-finite values or
``‖∇h‖`` above 10⁴ times its start) is recorded and skipped. For each algorithm and problem the grid
point with the lowest median over seeds of the final metric (``‖∇h‖`` for the quadratic, the full
validation loss for hyper-cleaning) is reported. Times count ``step`` calls and batch draws only,
not the metric evaluations (recorded every ``--record-every`` steps). By default two runs go in
parallel (``--jobs``), each on one torch thread (``--threads``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilevel_dist import algorithms
from bilevel_dist.algorithms import Algorithm, PerStep, State
from bilevel_dist.algorithms.double_loop import DoubleLoop
from bilevel_dist.oracles import Oracles
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.problems import FiniteSumQuadratic, HyperCleaning
from bilevel_dist.tree import Tree

ROOT = Path(__file__).resolve().parent
DIVERGED_FACTOR = 1e4  # ‖∇h‖ this far above its start: stop the run, the point has diverged


class OracleCounter:
    """Per-sample oracle calls of one run; ``vmapped`` scales calls made once for a vmapped batch."""

    def __init__(self) -> None:
        self.grads = 0
        self.products = 0
        self.reference_products = 0  # counted by the autograd instrumentation, in the check only
        self.inner_evaluations = 0
        self.vmapped = 1

    @property
    def total(self) -> int:
        return self.grads + self.products


class _Tick(torch.autograd.Function):
    """Identity on ``∇_w ℓ``: its backward is part of every product through the gradient, so it counts one."""

    generate_vmap_rule = True

    @staticmethod
    def forward(t: Tensor, counter: OracleCounter, n: int) -> Tensor:
        return t.view_as(t)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.counter, ctx.n = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        ctx.counter.reference_products += ctx.n
        return grad, None, None


class _Mark(torch.autograd.Function):
    """Identity on an inner variable whose backward (the gradient) passes through :class:`_Tick`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(t: Tensor, counter: OracleCounter, n: int) -> Tensor:
        return t.view_as(t)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.counter, ctx.n = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _Tick.apply(grad, ctx.counter, ctx.n), None, None


Loss = Callable[[Tree, Tree, Any], Tensor]


def batch_size(batch: Any, full: int) -> int:
    return full if batch is None else int(batch["index"].shape[0])


def counted(loss: Loss, counter: OracleCounter, full: int, inner_loss: bool, reference: bool = False) -> Loss:
    """``loss`` that adds its batch size to the gradient count; ``reference`` also marks the inner
    tree so that every backward through its gradient (a product) is counted by autograd."""

    def wrapped(inner: Tree, outer: Tree, batch: Any = None) -> Tensor:
        # Under SABA's vmap the index has one logical sample; counter.vmapped restores the batch size.
        n = batch_size(batch, full) * counter.vmapped
        counter.grads += n
        counter.inner_evaluations += inner_loss
        if reference:
            key = min(inner)  # one marked leaf: a backward through the whole gradient crosses it once
            inner = {**inner, key: _Mark.apply(inner[key], counter, n)}
        return loss(inner, outer, batch)

    return wrapped


class CountingOracles(Oracles):
    """The library's oracles, counting each backward through a linearised inner gradient."""

    def __init__(self, problem: BilevelProblem, comm: Any, counter: OracleCounter, sizes: tuple[int, int]) -> None:
        super().__init__(problem, comm)
        self.counter = counter
        self.full_inner = sizes[0]

    def linearize(self, w: Tree, x: Tree, batch: Any, joint: bool = False) -> Any:
        return _CountedProducts(super().linearize(w, x, batch, joint), self.counter, batch_size(batch, self.full_inner))

    def per_sample(self, fn: Callable[[Any], Tree], batch: dict[str, Tensor]) -> Tree:
        n = int(batch["index"].shape[0])
        before = self.counter.inner_evaluations
        self.counter.vmapped = n
        try:
            out = super().per_sample(fn, batch)
        finally:
            self.counter.vmapped = 1
        # SABA linearises g per sample directly (not through these oracles) and takes one (H v, J v) backward.
        if self.counter.inner_evaluations > before:
            self.counter.products += n
        return out


class _CountedProducts:
    """A linearisation whose every backward (``hvp``, ``mixed``, or both at once) adds ``n``."""

    def __init__(self, lin: Any, counter: OracleCounter, n: int) -> None:
        self.lin, self.counter, self.n, self.grad = lin, counter, n, lin.grad

    def _counted(self, method: str, v: Tree) -> Any:
        self.counter.products += self.n
        return getattr(self.lin, method)(v)

    def hvp(self, v: Tree) -> Tree:
        return self._counted("hvp", v)

    def mixed(self, v: Tree) -> Tree:
        return self._counted("mixed", v)

    def both(self, v: Tree) -> tuple[Tree, Tree]:
        return self._counted("both", v)


def instrument(
    algorithm: Algorithm, name: str, counter: OracleCounter, sizes: tuple[int, int]
) -> Callable[[int], None]:
    """Swaps in :class:`CountingOracles`; returns the per-step hook for products outside the oracles."""
    algorithm.oracles = CountingOracles(algorithm.problem, algorithm.comm, counter, sizes)
    if name == "itd":
        steps = algorithm.h["inner_steps"]

        def unrolled(b_inner: int) -> None:
            # Backpropagation through ITD's unrolled GD: one product per inner step.
            counter.products += steps * b_inner

        return unrolled
    return lambda b_inner: None


@dataclass(frozen=True)
class Setting:
    """One benchmark problem: batch sizes, oracle budget and tuned base hyperparameters."""

    batch: tuple[int, int]
    budget: int
    base: dict[str, dict[str, Any]]
    inner_factors: tuple[float, ...] = (1.0, 0.5)
    outer_factors: tuple[float, ...] = (1.0, 0.25)


# Base step sizes: the full-batch values of tests/test_algorithms.py (BSA: AID's, which it extends).
FAST = {"inner_lr": 1.0, "outer_lr": 0.06}
SINGLE = {"inner_lr": 1.0, "outer_lr": 0.03}
QUADRATIC_BASE: dict[str, dict[str, Any]] = {
    "aid": FAST,
    "itd": {**FAST, "inner_steps": 20},
    "stocbio": {**FAST, "linear_iters": 30},
    "amigo": FAST,
    "bsa": FAST,
    "hoag": FAST,
    "ttsa": {**FAST, "neumann_terms": 30, "inner_decay": 0.0, "outer_decay": 0.0},
    "soba": SINGLE,
    "saba": SINGLE,
    "srba": SINGLE,
    "fsla": SINGLE,
    "mrbo": {**SINGLE, "neumann_terms": 30},
    "vrbo": {**SINGLE, "neumann_terms": 30},
    "sustain": {**SINGLE, "neumann_terms": 30},
    "f2sa": {"inner_lr": 1.0, "outer_lr": 0.05, "lam_growth": 1.0, "inner_steps": 3},
    "penalty": {"inner_lr": 0.2, "outer_lr": 0.1, "lr_decay": 1.1},
    "bome": {"inner_lr": 1.0, "outer_lr": 0.3, "outer_decay": 0.5},
}
CLEANING = {"inner_lr": 1.0, "outer_lr": 100.0}  # per-sample weight gradients are O(1/n)
CLEANING_EXTRA: dict[str, dict[str, Any]] = {
    "aid": {"inner_steps": 20},
    "itd": {"inner_steps": 20},
    "stocbio": {"inner_steps": 20},
    "amigo": {"inner_steps": 20},
    "bsa": {"inner_steps": 20},
    "ttsa": {"inner_decay": 0.0, "outer_decay": 0.0},
    "penalty": {"inner_lr": 0.5},
}
CLEANING_BASE = {name: {**CLEANING, **CLEANING_EXTRA.get(name, {})} for name in algorithms.REGISTRY}


def settings(quick: bool) -> dict[str, Setting]:
    """The two problems; ``quick`` shrinks the budgets for a smoke run."""
    scale = 0.05 if quick else 1.0
    return {
        "quadratic": Setting((8, 8), int(60_000 * scale), QUADRATIC_BASE),
        "cleaning": Setting((64, 64), int(200_000 * scale), CLEANING_BASE),
    }


@cache
def quadratic_data(seed: int) -> FiniteSumQuadratic:
    del seed  # one fixed problem; the seed only changes the batches
    return FiniteSumQuadratic.make()


@cache
def cleaning_data(seed: int) -> HyperCleaning:
    return HyperCleaning.make(noise=0.5, seed=seed)


def grid(setting: Setting, name: str) -> list[dict[str, Any]]:
    """The step-size grid around the base hyperparameters of ``name``."""
    base = setting.base[name]
    return [
        {**base, "inner_lr": base["inner_lr"] * a, "outer_lr": base["outer_lr"] * b}
        for a in setting.inner_factors
        for b in setting.outer_factors
    ]


def build(name: str, data: Any, problem: BilevelProblem, hparams: dict[str, Any], seed: int) -> Algorithm:
    """``algorithms.get`` with the per-algorithm extras: full batches, SABA's memory size, BSA's seed."""
    extra: dict[str, Any] = {}
    if name in ("srba", "vrbo"):
        extra["full_batches"] = data.full_batches()
    if name == "saba":
        extra |= {"n_inner": data.n_inner, "n_outer": data.n_outer}
    if name == "bsa":
        extra["seed"] = seed
    return algorithms.get(name, problem=problem, **hparams, **extra)


def measure(problem: str, data: Any, state: State) -> tuple[float, float]:
    """Quadratic: ``(‖∇h(x)‖, h(x))`` in closed form; cleaning: ``(validation loss, test error)``."""
    if problem == "quadratic":
        return float(data.hypergradient(state["outer"])["x"].norm()), data.value(state["outer"])
    return float(data.outer_loss(state["inner"], state["outer"], None)), data.test_error(state["inner"])


def finite(state: State) -> bool:
    return all(bool(torch.isfinite(v).all()) for part in ("inner", "outer") for v in state[part].values())


def setup(
    problem_name: str, name: str, hparams: dict[str, Any], seed: int, reference: bool = False
) -> tuple[Any, Algorithm, OracleCounter, Callable[[int], None]]:
    """The data, the instrumented algorithm, its counter and its per-step product hook."""
    data = quadratic_data(seed) if problem_name == "quadratic" else cleaning_data(seed)
    counter = OracleCounter()
    problem = BilevelProblem(
        counted(data.inner_loss, counter, data.n_inner, True, reference),
        counted(data.outer_loss, counter, data.n_outer, False, reference),
    )
    algorithm = build(name, data, problem, hparams, seed)
    hook = instrument(algorithm, name, counter, (data.n_inner, data.n_outer))
    return data, algorithm, counter, hook


def draw(data: Any, batch: tuple[int, int], gen: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """An inner and an outer minibatch, uniform with replacement."""
    return (
        {"index": torch.randint(data.n_inner, (batch[0],), generator=gen)},
        {"index": torch.randint(data.n_outer, (batch[1],), generator=gen)},
    )


def draw_step(data: Any, batch: tuple[int, int], gen: torch.Generator, algorithm: Any) -> tuple[Any, Any]:
    """A step's batches: double-loop algorithms get a fresh inner batch per inner step (``PerStep``)."""
    inner_batch, outer_batch = draw(data, batch, gen)
    if isinstance(algorithm, DoubleLoop):
        extra = [draw(data, batch, gen)[0] for _ in range(algorithm.h["inner_steps"] - 1)]
        inner_batch = PerStep([inner_batch, *extra])
    return inner_batch, outer_batch


def run(task: dict[str, Any]) -> dict[str, Any]:
    """One (problem, algorithm, grid point, seed) run to the oracle budget; never raises."""
    torch.set_default_dtype(torch.float64)
    if task["threads"]:
        torch.set_num_threads(task["threads"])
    problem_name, seed = task["problem"], task["seed"]
    result: dict[str, Any] = {**task, "diverged": None, "curve": []}
    try:
        data, algorithm, counter, hook = setup(problem_name, task["name"], task["hparams"], seed)
        state = algorithm.init(data.outer_init(), data.inner_init())
        gen = torch.Generator().manual_seed(seed)
        budget, every = task["budget"], task["record_every"]
        first = measure(problem_name, data, state)
        result["curve"].append((0, 0.0, *first))
        seconds, steps = 0.0, 0
        while counter.total < budget:
            start = time.perf_counter()
            inner_batch, outer_batch = draw_step(data, task["batch"], gen, algorithm)
            state, _ = algorithm.step(state, inner_batch, outer_batch)
            seconds += time.perf_counter() - start
            hook(task["batch"][0])
            steps += 1
            if steps % every and counter.total < budget:
                continue
            values = measure(problem_name, data, state)
            if not (finite(state) and all(map(math.isfinite, values))):
                result["diverged"] = f"non-finite after {steps} steps"
                break
            if problem_name == "quadratic" and values[0] > DIVERGED_FACTOR * first[0]:
                result["diverged"] = f"‖∇h‖ > {DIVERGED_FACTOR:g}×start after {steps} steps"
                break
            result["curve"].append((counter.total, seconds, *values))
        result |= {"steps": steps, "seconds": seconds, "oracles": counter.total, "products": counter.products}
    except Exception as error:  # a failing grid point is a result, not the end of the benchmark
        result["diverged"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        result["traceback"] = traceback.format_exc()
    return result


def check_counts(task: dict[str, Any], steps: int = 4) -> dict[str, Any]:
    """The products counted by :class:`CountingOracles` and the ITD hook against autograd's own count
    (:class:`_Mark`/:class:`_Tick`) over the first ``steps`` steps, which include the full-pass and
    first-step branches."""
    torch.set_default_dtype(torch.float64)
    if task["threads"]:
        torch.set_num_threads(task["threads"])
    data, algorithm, counter, hook = setup(task["problem"], task["name"], task["hparams"], 0, reference=True)
    state = algorithm.init(data.outer_init(), data.inner_init())
    gen = torch.Generator().manual_seed(0)
    per_step = []
    for _ in range(steps):
        state, _ = algorithm.step(state, *draw(data, task["batch"], gen))
        hook(task["batch"][0])
        per_step.append((counter.grads, counter.products, counter.reference_products))
    return {**task, "per_step": per_step, "match": counter.products == counter.reference_products}


def baseline(seed: int) -> float:
    """Test error of the model trained on the corrupted labels with equal weights."""
    torch.set_default_dtype(torch.float64)
    return cleaning_data(seed).unweighted_error()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def select(runs: list[dict[str, Any]]) -> tuple[int | None, dict[int, str]]:
    """The grid point with the lowest median final metric over seeds, and the diverged points' reasons."""
    by_point: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        by_point.setdefault(r["point"], []).append(r)
    diverged = {
        p: next(r["diverged"] for r in rs if r["diverged"])
        for p, rs in by_point.items()
        if any(r["diverged"] for r in rs)
    }
    scores = {p: median([r["curve"][-1][2] for r in rs]) for p, rs in by_point.items() if p not in diverged}
    return (min(scores, key=scores.__getitem__) if scores else None), diverged


def fmt(x: float, digits: int = 3) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{x:.{digits - 1}e}" if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4) else f"{x:.{digits}g}"


def curves(runs: list[dict[str, Any]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Median over seeds of (oracles, seconds, metric, second metric) at each record, up to the shortest run."""
    length = min(len(r["curve"]) for r in runs)
    cols = [[median([r["curve"][i][c] for r in runs]) for i in range(length)] for c in range(4)]
    return cols[0], cols[1], cols[2], cols[3]


def plot(path: Path, best: dict[str, dict[str, list[dict[str, Any]]]], unweighted: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(algorithms.REGISTRY)
    # tab20 holds 10 hues in dark/light pairs: dark solid lines first, then light dashed ones.
    palette = plt.get_cmap("tab20")([*range(0, 20, 2), *range(1, 20, 2)])
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    for i, name in enumerate(names):
        style = {"color": palette[i % 20], "linestyle": "-" if i < 10 else "--", "linewidth": 1.6, "label": name}
        if best["quadratic"].get(name):
            oracles, seconds, grad_norm, _ = curves(best["quadratic"][name])
            axes[0].plot(oracles, grad_norm, **style)
            axes[1].plot(seconds, grad_norm, **style)
        if best["cleaning"].get(name):
            oracles, _, _, error = curves(best["cleaning"][name])
            axes[2].plot(oracles, error, **style)
    for ax, xlabel in zip(axes[:2], ("oracle calls (per-sample gradients + products)", "seconds"), strict=True):
        ax.set(xlabel=xlabel, ylabel="‖∇h(x)‖ (median over seeds)", yscale="log", title="Finite-sum quadratic, batch 8")
    axes[2].axhline(unweighted, color="black", linestyle=":", label="unweighted baseline")
    axes[2].set(
        xlabel="oracle calls (per-sample gradients + products)",
        ylabel="test error (median over seeds)",
        title="Hyper-cleaning (digits, 50% noise), batch 64",
    )
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[2].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def quadratic_minimum(data: FiniteSumQuadratic) -> float:
    """``min h``: ``h`` is quadratic in ``x`` with ``∇h(x) = (μ I + K C Kᵀ) x − K c``, ``K = B A⁻¹``."""
    a, b, c = data.a.mean(0), data.b.mean(0), data.c.mean(0)
    k = torch.linalg.solve(a, b.T).T  # A is symmetric, so B A⁻¹ = (A⁻¹ Bᵀ)ᵀ
    hessian = data.mu_outer * torch.eye(b.shape[0], dtype=b.dtype) + k @ c @ k.T
    return data.value({"x": torch.linalg.solve(hessian, k @ data.c_lin.mean(0))})


def table(
    names: list[str], best: dict[str, dict[str, list[dict[str, Any]]]], chosen: dict[str, dict[str, str]]
) -> list[str]:
    """One Markdown row per algorithm: medians over seeds at each problem's best grid point."""
    rows = [
        "| algorithm | best hparams (inner_lr/outer_lr) | quadratic ‖∇h‖/‖∇h₀‖ | quadratic h(x) | quadratic s "
        "| cleaning val loss | cleaning test error | cleaning s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        hparams = "; ".join(f"{p[0]} {chosen[p].get(name, 'all diverged')}" for p in ("quadratic", "cleaning"))
        cells = [f"`{name}`", hparams]
        quad, clean = best["quadratic"].get(name), best["cleaning"].get(name)
        if quad:
            start_norm = quad[0]["curve"][0][2]
            cells += [
                fmt(median([r["curve"][-1][2] for r in quad]) / start_norm),
                fmt(median([r["curve"][-1][3] for r in quad]), 5),
                f"{median([r['seconds'] for r in quad]):.2f}",
            ]
        else:
            cells += ["diverged"] * 3
        if clean:
            cells += [
                fmt(median([r["curve"][-1][2] for r in clean]), 4),
                f"{median([r['curve'][-1][3] for r in clean]):.3f}",
                f"{median([r['seconds'] for r in clean]):.2f}",
            ]
        else:
            cells += ["diverged"] * 3
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 5%% of the budgets")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="folder for algorithms.md and .png")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run; 0 keeps torch's default")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 2), help="runs in parallel processes")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, --quick 1)")
    parser.add_argument("--record-every", type=int, default=10, help="steps between two metric records")
    parser.add_argument("--only", nargs="*", default=None, help="a subset of algorithms (for debugging)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.set_default_dtype(torch.float64)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    problems = settings(args.quick)
    names = args.only or sorted(algorithms.REGISTRY)
    common = {"record_every": args.record_every, "threads": args.threads}
    checks = [
        {**common, "problem": problem, "name": name, "hparams": setting.base[name], "batch": setting.batch}
        for problem, setting in problems.items()
        for name in names
    ]
    tasks = [
        {**common, "problem": problem, "name": name, "point": point, "hparams": hparams, "seed": seed}
        | {"batch": setting.batch, "budget": setting.budget}
        for problem, setting in problems.items()
        for name in names
        for point, hparams in enumerate(grid(setting, name))
        for seed in seeds
    ]

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    results: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        unweighted_jobs = [pool.submit(baseline, seed) for seed in seeds]
        mismatches = [
            f"{c['problem']} `{c['name']}`: (gradients, products, autograd's products) after each step {c['per_step']}"
            for c in pool.map(check_counts, checks)
            if not c["match"]
        ]
        log(f"oracle-count check: {len(mismatches)} mismatch(es)")
        for r in pool.map(run, tasks):
            results.append(r)
            note = f"DIVERGED ({r['diverged']})" if r["diverged"] else f"final {r['curve'][-1][2]:.3e}"
            log(
                f"{r['problem']:9s} {r['name']:8s} point {r['point']} seed {r['seed']}: {r.get('steps', 0):6d} steps "
                f"{r.get('oracles', 0):8d} oracles {r.get('seconds', 0.0):6.2f} s {note}"
            )
        unweighted = median([job.result() for job in unweighted_jobs])

    best: dict[str, dict[str, list[dict[str, Any]]]] = {problem: {} for problem in problems}
    chosen: dict[str, dict[str, str]] = {problem: {} for problem in problems}
    skipped: list[str] = []
    for problem, setting in problems.items():
        for name in names:
            runs = [r for r in results if r["problem"] == problem and r["name"] == name]
            point, diverged = select(runs)
            for p, reason in sorted(diverged.items()):
                h = grid(setting, name)[p]
                skipped.append(f"{problem} `{name}` {h['inner_lr']:g}/{h['outer_lr']:g}: {reason}")
            if point is not None:
                best[problem][name] = [r for r in runs if r["point"] == point]
                h = grid(setting, name)[point]
                chosen[problem][name] = f"{h['inner_lr']:g}/{h['outer_lr']:g}"

    quad, clean = problems["quadratic"], problems["cleaning"]
    quad_data, clean_data = quadratic_data(0), cleaning_data(0)
    start_norm = float(quad_data.hypergradient(quad_data.outer_init())["x"].norm())
    command = "python benchmarks/algorithms.py" + (" --quick" if args.quick else "")
    lines = [
        "# Bilevel algorithms on minibatches at a fixed oracle budget",
        "",
        f"Command: `{command}`. CPU {platform.machine()}, {args.threads} torch thread(s) per run, {args.jobs} run(s) "
        f"in parallel; torch {torch.__version__}, float64; {len(seeds)} seed(s).",
        "",
        f"*Quadratic*: `FiniteSumQuadratic.make()` ({quad_data.n_inner}/{quad_data.n_outer} samples), batches "
        f"{quad.batch[0]}/{quad.batch[1]}, budget {quad.budget:,} oracle calls per run; ‖∇h₀‖ = {start_norm:.4g}, "
        f"min h = {quadratic_minimum(quad_data):.5g}. *Hyper-cleaning*: `HyperCleaning.make(noise=0.5, seed=s)` "
        f"(digits, {clean_data.n_inner} train / {clean_data.n_outer} val / {clean_data.x_test.shape[0]} test), "
        f"batches {clean.batch[0]}/{clean.batch[1]}, budget {clean.budget:,} oracle calls per run; validation loss on "
        "the full validation set and test error, both of `state['inner']` after the budget.",
        "",
        "An oracle call is one per-sample gradient (∇_w and ∇_x of g_i or f_j from one backward) or one per-sample "
        "product through ∇_w g_i (H v and J v from one backward count once); see the module docstring. Grid: "
        "inner_lr × {1, 1/2}, outer_lr × {1, 1/4} around the full-batch values of `tests/test_algorithms.py`; best "
        "point (q: quadratic, c: cleaning) = lowest median over seeds of the final ‖∇h‖ or validation loss. Cells: "
        "medians over seeds at the best point; s = seconds spent in `step` (metric evaluations excluded).",
        "",
        f"**Table.** Final metrics per algorithm. Hyper-cleaning baseline, the model trained on the corrupted labels "
        f"with equal weights (`unweighted_error()`, median over seeds): test error {unweighted:.3f}.",
        "",
        *table(names, best, chosen),
        "",
        "Product counts checked against autograd's own count over the first 4 steps of every algorithm on both "
        f"problems: {'all match' if not mismatches else 'MISMATCH'}.",
        *[f"- {line}" for line in mismatches],
        "",
        "Diverged grid points (skipped):" if skipped else "No grid point diverged.",
        *[f"- {line}" for line in skipped],
        "",
        f"Total wall time: {time.perf_counter() - start:.0f} s.",
    ]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    plot(args.out / "algorithms.png", best, unweighted)
    (args.out / "algorithms.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
