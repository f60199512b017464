"""The compiled path on a GPU: eager against ``compile=True`` (CUDA graphs), at the CPU benchmark's
size and at sizes where a GPU matters, side by side in one process.

    python benchmarks/gpu.py                 # on a machine with a CUDA GPU; writes results/gpu.md

- **ridge CG-20**: ``solve`` with ``hypergrad.get("cg", iters=20, tol=0)`` on ridge regression at
  the exact ``w*`` (float64): eager, compiled, the hand-written autograd double-backward CG of
  ``benchmarks/overhead.py``, and jaxopt's ``custom_root`` under ``jax.jit`` where jaxopt imports;
- **MLP AID step**: hyper-cleaning with one weight per training sample and a one-hidden-layer
  MLP, AID with 10 inner steps and 10 CG iterations (``algorithms.get("aid", compile=...)``),
  float32.

A cell is the fastest of alternating blocks, timed between ``_sync()`` calls;
the compile time is the first call's. Results are checked against eager.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from compiled import TABLE_HEAD, best_times, jaxopt_hypergradient, table_row
from overhead import ridge_hand_cg

import bilevel_dist as bd
from bilevel_dist import algorithms
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.problems import RidgeRegression

RESULTS = Path(__file__).parent / "results"
RIDGE_SIZES = [(2000, 200), (100_000, 2000)]
MLP_SIZES = [(64, 256, 256), (784, 2048, 8192)]  # (features, hidden, samples per step)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ridge(n: int, d: int, device: str) -> dict:
    cpu = RidgeRegression.make(n_train=n, n_val=n // 4, features=d, seed=0)
    data = RidgeRegression(*(t.to(device) for t in (cpu.x_train, cpu.y_train, cpu.x_val, cpu.y_val)))
    x = {"log_lambda": torch.full((d,), -2.0, dtype=torch.float64, device=device)}
    w = data.solution(x)
    solver, estimator = bd.solvers.GD(0.1, 0), bd.hypergrad.get("cg", iters=20, tol=0.0)

    def run(compile: bool):
        return bd.solve(data.problem, x, w, solver=solver, hypergrad=estimator, check=False, compile=compile)

    start = time.perf_counter()
    fast = run(True)
    _sync()
    compile_s = time.perf_counter() - start
    eager = run(False)

    def hand():
        return ridge_hand_cg(data, w, x, iters=20)

    fns = {"eager": lambda: run(False), "compiled": lambda: run(True), "hand": hand}
    jax_fn = jaxopt_hypergradient(data, x, w)
    if jax_fn is not None:
        fns["jaxopt"] = jax_fn
    times = best_times(fns, blocks=5, sync=_sync)
    reference = eager.grad["log_lambda"]
    diff = float((fast.grad["log_lambda"] - reference).abs().max())
    hand_diff = float((hand() - reference).abs().max())
    return {
        "workload": f"ridge CG-20, n={n}, d={d}",
        "times": times,
        "compile_s": compile_s,
        "diff": diff,
        "hand_diff": hand_diff,
        "scale": float(reference.abs().max()),
    }


def cleaning_mlp(features: int, hidden: int, batch: int, device: str):
    """Synthetic hyper-cleaning: 8 batches of ``batch`` noisy samples (one weight each), an MLP."""
    gen = torch.Generator().manual_seed(0)
    n, classes = 8 * batch, 10
    teacher = torch.randn(features, classes, generator=gen)
    inputs = torch.randn(n + batch, features, generator=gen)
    labels = (inputs @ teacher).argmax(1)
    noisy = torch.rand(n, generator=gen) < 0.5
    labels[:n] = torch.where(noisy, torch.randint(classes, (n,), generator=gen), labels[:n])
    inputs, labels = inputs.to(device), labels.to(device)

    def logits(inner, x):
        return torch.tanh(x @ inner["w1"] + inner["b1"]) @ inner["w2"] + inner["b2"]

    def inner_loss(inner, outer, b):
        losses = F.cross_entropy(logits(inner, inputs[b["index"]]), labels[b["index"]], reduction="none")
        weights = torch.sigmoid(outer["logit"][b["index"]])
        return (weights * losses).mean() + 1e-4 * ((inner["w1"] ** 2).sum() + (inner["w2"] ** 2).sum())

    def outer_loss(inner, outer, b):
        return F.cross_entropy(logits(inner, inputs[n:]), labels[n:])

    inner = {
        "w1": (torch.randn(features, hidden, generator=gen) / features**0.5).to(device),
        "b1": torch.zeros(hidden, device=device),
        "w2": (torch.randn(hidden, classes, generator=gen) / hidden**0.5).to(device),
        "b2": torch.zeros(classes, device=device),
    }
    outer = {"logit": torch.zeros(n, device=device)}
    batches = [{"index": torch.arange(k * batch, (k + 1) * batch, device=device)} for k in range(8)]
    return BilevelProblem(inner_loss, outer_loss), outer, inner, batches


def mlp_aid(features: int, hidden: int, batch: int, device: str) -> dict:
    torch.set_default_dtype(torch.float32)
    problem, outer, inner, batches = cleaning_mlp(features, hidden, batch, device)
    hp = {"inner_steps": 10, "linear_iters": 10, "inner_lr": 0.1, "outer_lr": 10.0}
    runs = {}
    for compiled in (False, True):
        algorithm = algorithms.get("aid", problem=problem, compile=compiled, **hp)
        runs[compiled] = [algorithm, algorithm.init(outer, inner), 0]

    def stepper(compiled: bool):
        def step():
            algorithm, state, k = runs[compiled]
            runs[compiled][1], _ = algorithm.step(state, batches[k % 8], None)
            runs[compiled][2] = k + 1

        return step

    start = time.perf_counter()
    stepper(True)()
    _sync()
    compile_s = time.perf_counter() - start
    stepper(False)()
    diff = max(float((runs[True][1]["outer"][k] - v).abs().max()) for k, v in runs[False][1]["outer"].items())
    scale = max(float(v.abs().max()) for v in runs[False][1]["outer"].values())
    times = best_times({"eager": stepper(False), "compiled": stepper(True)}, blocks=5, steps=5, sync=_sync)
    torch.set_default_dtype(torch.float64)
    return {
        "workload": f"MLP AID step, {features}-{hidden}-10, {batch} samples",
        "times": times,
        "compile_s": compile_s,
        "diff": diff,
        "scale": scale,
    }


SYNC_ALGORITHMS = {
    "aid": {"inner_steps": 10, "linear_iters": 10, "inner_lr": 0.1, "outer_lr": 10.0},
    "itd": {"inner_steps": 10, "inner_lr": 0.1, "outer_lr": 10.0},
    "soba": {"inner_lr": 0.1, "outer_lr": 10.0},
    "penalty": {"inner_lr": 0.1, "outer_lr": 10.0},
    "ttsa": {"inner_lr": 0.1, "outer_lr": 10.0},
}


def syncs(device: str) -> list[dict]:
    """Host-device synchronisations per step of each algorithm (eager, after two warm-up steps),
    with where they happen: ``torch.cuda.set_sync_debug_mode("warn")`` warns at each one."""
    import traceback
    import warnings

    torch.set_default_dtype(torch.float32)
    problem, outer, inner, batches = cleaning_mlp(64, 256, 256, device)
    rows = []
    for name, hp in SYNC_ALGORITHMS.items():
        algorithm = algorithms.get(name, problem=problem, **hp)
        state = algorithm.init(outer, inner)
        for k in range(2):
            state, _ = algorithm.step(state, batches[k], None)
        _sync()
        found: list[str] = []

        def record(message, *args, **kwargs):
            if "synchroniz" in str(message):  # where in this project the synchronising op was called
                ours = [f for f in traceback.extract_stack() if "bilevel_dist" in f.filename]
                found.append(f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "elsewhere")

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            for k in range(3):
                state, _ = algorithm.step(state, batches[k], None)
            torch.cuda.set_sync_debug_mode("default")
        places = sorted(set(found), key=found.index)
        rows.append({"algorithm": name, "syncs_per_step": len(found) / 3, "where": places})
    torch.set_default_dtype(torch.float64)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.md")
    parser.add_argument("--syncs-only", action="store_true", help="only count host-device syncs per step")
    parser.add_argument("--dry-run", action="store_true", help="the smallest sizes on the CPU (checks the script)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (or --dry-run)")
    torch.set_default_dtype(torch.float64)
    device = "cpu" if args.dry_run else "cuda"
    ridge_sizes, mlp_sizes = (RIDGE_SIZES[:1], MLP_SIZES[:1]) if args.dry_run else (RIDGE_SIZES, MLP_SIZES)
    if torch.cuda.is_available():
        sync_rows = syncs(device)
        print(json.dumps(sync_rows), flush=True)
        (args.out.parent / "gpu_syncs.json").write_text(json.dumps(sync_rows, indent=1))
        if args.syncs_only:
            return
    rows = []
    jobs = [partial(ridge, n, d, device) for n, d in ridge_sizes]
    jobs += [partial(mlp_aid, f, h, b, device) for f, h, b in mlp_sizes]
    for job in jobs:
        try:
            row = job()
        except Exception as error:  # noqa: BLE001 - report the failure and go on with the next size
            row = {"workload": repr(job), "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
        _write(rows, device, args.out)  # after every row: a run cut short keeps what it measured


def _write(rows: list[dict], device: str, out: Path) -> None:
    lines = [
        f"Command: `python benchmarks/gpu.py` — {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, "
        f"torch {torch.__version__}, "
        "fastest of 5 alternating blocks.",
        "",
        *TABLE_HEAD,
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | failed: {r['error'][:200]} |||||||")
        else:
            lines.append(table_row(r["workload"], r))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
