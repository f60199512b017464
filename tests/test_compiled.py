"""The compiled hypergradient path (``compile=True``): the eager path's hypergradient to 1e-10 in
float64, and a clear error for what it does not cover."""

import pytest
import torch

import bilevel_dist as bd
from bilevel_dist import algorithms
from bilevel_dist._checks import ConfigError
from bilevel_dist.problems import HyperCleaning

pytestmark = pytest.mark.slow


def _cleaning():
    data = HyperCleaning.make(noise=0.5, seed=0)
    outer = {"logit": torch.zeros(data.n_inner)}
    inner = {"weight": torch.zeros(64, 10), "bias": torch.zeros(10)}
    batches = {"index": torch.arange(0, 200)}, {"index": torch.arange(data.n_outer)}
    return data, outer, inner, batches


def test_compiled_aid_steps_and_solve_equal_eager_to_1e10():
    data, outer, inner, (ib, ob) = _cleaning()
    hp = {"inner_steps": 4, "linear_iters": 5, "inner_lr": 0.5, "outer_lr": 50.0}
    runs = {}
    for compiled in (False, True):
        aid = algorithms.get("aid", problem=data.problem, compile=compiled, **hp)
        state = aid.init(outer, inner)
        for _ in range(3):
            state, _ = aid.step(state, ib, ob)
        runs[compiled] = state
    for level in ("outer", "inner"):
        for key, eager in runs[False][level].items():
            diff = float((runs[True][level][key] - eager).abs().max())
            assert diff < 1e-10, (level, key, diff)
    assert float(runs[True]["outer"]["logit"].abs().max()) > 1e-3  # it moved
    solver, estimator = bd.solvers.GD(0.5, 4), bd.hypergrad.get("cg", iters=5, tol=0.0)
    eager = bd.solve(data.problem, outer, inner, solver=solver, hypergrad=estimator, inner_batch=ib, outer_batch=ob)
    fast = bd.solve(
        data.problem, outer, inner, solver=solver, hypergrad=estimator, inner_batch=ib, outer_batch=ob, compile=True
    )
    assert float((fast.grad["logit"] - eager.grad["logit"]).abs().max()) < 1e-10


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"linear_solver": "neumann"}, "compile=True needs linear_solver='cg'"),
    ],
)
def test_what_compile_does_not_cover_is_named_before_any_step(settings, message):
    data, *_ = _cleaning()
    with pytest.raises(ConfigError, match=message):
        algorithms.get("aid", problem=data.problem, compile=True, **settings)


def test_solve_names_a_solver_tolerance_or_an_early_exit():
    data, outer, inner, (ib, ob) = _cleaning()
    cases = [
        (bd.solvers.GD(0.5, 4, tol=1e-3), bd.hypergrad.get("cg", iters=5, tol=0.0), "GD solver without a tolerance"),
        (bd.solvers.GD(0.5, 4), bd.hypergrad.get("cg", iters=5), "cg estimator with tol=0"),
        (bd.solvers.GD(0.5, 4), bd.hypergrad.get("neumann", iters=5), "cg estimator with tol=0"),
    ]
    for solver, estimator, message in cases:
        with pytest.raises(ConfigError, match=message):
            bd.solve(data.problem, outer, inner, solver=solver, hypergrad=estimator, inner_batch=ib,
                     outer_batch=ob, compile=True)  # fmt: skip
