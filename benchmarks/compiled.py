"""The compiled hypergradient path (``compile=True``) against eager, side by side in one process.

    python benchmarks/compiled.py           # about 4 minutes (most of it compiling); writes results/compiled.md

- **ridge CG-20**: ``solve`` with ``hypergrad.get("cg", iters=20, tol=0)`` on ridge regression
  (n = 2000, d = 200, float64) at the exact ``w*``: eager, compiled, the hand-written autograd
  double-backward CG of ``benchmarks/overhead.py``, and jaxopt's ``custom_root`` with the same CG
  under ``jax.jit`` when jax installs (a benchmark-only dependency);
- **MLP AID step**: the engine benchmark's MLP 64-256-10 on digits hyper-cleaning, 256 samples a
  step, AID with 10 inner steps and 10 CG iterations (``algorithms.get("aid", compile=...)``),
  float32 as the recipe (``tests/test_compiled.py`` checks 1e-10 in float64).

The few-shot MAML step is not covered: it differentiates through its unrolled inner steps
(double backward), which ``torch.compile``'s autograd does not support.

A cell is the fastest of alternating blocks (one torch thread); the compile time is the first
call's. Results are checked against eager.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bilevel_dist as bd  # noqa: E402
from bilevel_dist import algorithms  # noqa: E402

RESULTS = Path(__file__).parent / "results"


TABLE_HEAD = [
    "| workload | eager ms | compiled ms | eager / compiled | hand-written ms | jaxopt + jit ms | compile s | "
    "max abs diff compiled vs eager (scale) |",
    "|---|---|---|---|---|---|---|---|",
]


def best_times(fns: dict, blocks: int = 7, steps: int = 10, sync=lambda: None) -> dict[str, float]:
    """Milliseconds per call of each function: the fastest of ``blocks`` alternating blocks
    (``sync`` waits for a device queue around each block)."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(blocks):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) / steps * 1e3)
    return best


def table_row(name: str, r: dict) -> str:
    """One workload's row of :data:`TABLE_HEAD`."""
    t = r["times"]
    hand = f"{t['hand']:.2f}" if "hand" in t else "–"
    jax = f"{t['jaxopt']:.2f}" if "jaxopt" in t else "–"
    return (
        f"| {name} | {t['eager']:.2f} | {t['compiled']:.2f} | {t['eager'] / t['compiled']:.2f}x | {hand} | {jax} | "
        f"{r['compile_s']:.0f} | {r['diff']:.1e} ({r['scale']:.1e}) |"
    )


def ridge() -> dict:
    import overhead

    r = overhead.Ridge()
    solver, estimator = bd.solvers.GD(0.1, 0), bd.hypergrad.get("cg", iters=overhead.CG_ITERS, tol=0.0)

    def run(compile: bool):
        return bd.solve(r.data.problem, r.x, r.w, solver=solver, hypergrad=estimator, check=False, compile=compile)

    start = time.perf_counter()
    fast = run(True)
    compile_s = time.perf_counter() - start
    eager = run(False)
    hand = overhead.RidgeHand()
    fns = {"eager": lambda: run(False), "compiled": lambda: run(True), "hand": hand.step}
    jax_fn = jaxopt_hypergradient(r.data, r.x, r.w)
    if jax_fn is not None:
        fns["jaxopt"] = jax_fn
    times = best_times(fns)
    diff = float((fast.grad["log_lambda"] - eager.grad["log_lambda"]).abs().max())
    return {"times": times, "compile_s": compile_s, "diff": diff, "scale": float(eager.grad["log_lambda"].abs().max())}


def jaxopt_hypergradient(data, x: dict, w: dict):
    """A timed call of jaxopt's ``custom_root`` hypergradient with the same CG-20 under ``jax.jit``
    on ridge ``data`` at the exact ``w``, or ``None`` where jaxopt does not import."""
    try:
        import jax
        import jax.numpy as jnp
        from jaxopt import implicit_diff, linear_solve
    except Exception:  # noqa: BLE001 - a benchmark-only dependency; jax may also fail to start
        return None
    from functools import partial

    jax.config.update("jax_enable_x64", True)
    xt, yt = jnp.asarray(data.x_train.cpu().numpy()), jnp.asarray(data.y_train.cpu().numpy())
    xv, yv = jnp.asarray(data.x_val.cpu().numpy()), jnp.asarray(data.y_val.cpu().numpy())
    w_star = jnp.asarray(w["w"].cpu().numpy())

    def inner(w, log_lambda):
        return 0.5 * jnp.mean((xt @ w - yt) ** 2) + 0.5 * jnp.sum(jnp.exp(log_lambda) * w * w)

    cg = partial(linear_solve.solve_cg, maxiter=20, tol=0.0)

    @implicit_diff.custom_root(jax.grad(inner), solve=cg)
    def solution(init, log_lambda):
        return jax.lax.stop_gradient(w_star)  # the exact w*, as the torch side is given

    def outer(log_lambda):
        w = solution(None, log_lambda)
        return 0.5 * jnp.mean((xv @ w - yv) ** 2)

    hypergradient = jax.jit(jax.grad(outer))
    point = jnp.asarray(x["log_lambda"].cpu().numpy())
    hypergradient(point).block_until_ready()
    return lambda: hypergradient(point).block_until_ready()


def mlp_aid() -> dict:
    import engine

    torch.set_default_dtype(torch.float32)  # the recipe's data are float32
    data, model = engine.make("mlp")
    data.per_sample = True
    steps = data.paired_steps()
    batch = steps[0]
    hp = {"inner_steps": 10, "linear_iters": 10, "inner_lr": 0.1, "outer_lr": 10.0}
    problem = model.problem
    outer, inner = model.configure_variables()
    runs = {}
    for compiled in (False, True):
        algorithm = algorithms.get("aid", problem=problem, compile=compiled, **hp)
        runs[compiled] = [algorithm, algorithm.init(outer, inner)]
    start = time.perf_counter()
    runs[True][1], _ = runs[True][0].step(runs[True][1], batch["inner"], batch["outer"])
    compile_s = time.perf_counter() - start
    runs[False][1], _ = runs[False][0].step(runs[False][1], batch["inner"], batch["outer"])
    diff = max(float((runs[True][1]["outer"][k] - v).abs().max()) for k, v in runs[False][1]["outer"].items())
    scale = max(float(v.abs().max()) for v in runs[False][1]["outer"].values())

    def stepper(compiled: bool):
        def step():
            algorithm, state = runs[compiled]
            runs[compiled][1], _ = algorithm.step(state, batch["inner"], batch["outer"])

        return step

    times = best_times({"eager": stepper(False), "compiled": stepper(True)}, blocks=5, steps=5)
    return {"times": times, "compile_s": compile_s, "diff": diff, "scale": scale}


def main() -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    results = {"ridge CG-20": ridge(), "MLP AID step": mlp_aid()}
    lines = [
        f"Command: `python benchmarks/compiled.py` — {platform.machine()}, one torch thread, "
        f"torch {torch.__version__}, "
        "fastest of alternating blocks.",
        "",
        *TABLE_HEAD,
    ]
    lines += [table_row(name, r) for name, r in results.items()]
    lines += ["", "MAML step: not covered (double backward through the unrolled steps; see the module docstring)."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compiled.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
