"""Bad input fails early with a ValueError/TypeError naming the problem."""

import time

import pytest
import torch

import bilevel_dist as bd
from bilevel_dist import hypergrad as hg
from bilevel_dist import solvers
from bilevel_dist.problems import RidgeRegression

HUGE = solvers.GD(lr=0.1, steps=10**9)  # any check that ran after the solve would time out


@pytest.fixture
def ridge():
    problem = RidgeRegression.make(features=4)
    return problem, problem.outer_init(), problem.inner_init()


def solve_quickly(problem, outer, inner, solver=HUGE, estimator=None, **kwargs):
    start = time.perf_counter()
    try:
        return bd.solve(problem, outer, inner, solver=solver, hypergrad=estimator or hg.CG(), **kwargs)
    finally:
        assert time.perf_counter() - start < 5.0


def test_mismatched_inner_shape(ridge):
    problem, outer, _ = ridge
    with pytest.raises(ValueError, match="inner_loss failed.*mismatched shapes"):
        solve_quickly(problem.problem, outer, {"w": torch.zeros(5)})


def test_mismatched_batched_leading_axes():
    problem = bd.BilevelProblem(
        lambda w, x, b: (w["a"] ** 2).sum() + (w["b"] ** 2).sum() * x["s"].sum(),
        lambda w, x, b: w["a"].sum(),
        batched=True,
    )
    inner = {"a": torch.zeros(8, 2), "b": torch.zeros(7, 2)}
    with pytest.raises(ValueError, match=r"mismatched shapes, inner\['b'\] has leading size 7"):
        solve_quickly(problem, {"s": torch.ones(1)}, inner)


def test_non_scalar_loss(ridge):
    problem, outer, inner = ridge
    bad = bd.BilevelProblem(lambda w, x, b: w["w"] * x["log_lambda"], problem.outer_loss)
    with pytest.raises(ValueError, match=r"inner_loss must return a scalar tensor, got shape \(4,\)"):
        solve_quickly(bad, outer, inner)


def test_loss_not_a_tensor(ridge):
    problem, outer, inner = ridge
    bad = bd.BilevelProblem(problem.inner_loss, lambda w, x, b: 1.0)
    with pytest.raises(TypeError, match="outer_loss must return a tensor, got float"):
        solve_quickly(bad, outer, inner)


@pytest.mark.parametrize("which", ["inner_loss", "outer_loss"])
def test_loss_independent_of_inner(ridge, which):
    problem, outer, inner = ridge
    constant = lambda w, x, b: (x["log_lambda"] ** 2).sum()  # noqa: E731
    losses = {"inner_loss": problem.inner_loss, "outer_loss": problem.outer_loss, which: constant}
    with pytest.raises(ValueError, match=f"{which} does not depend on the inner variables"):
        solve_quickly(bd.BilevelProblem(**losses), outer, inner)


@pytest.mark.parametrize("where", ["inner", "outer"])
def test_non_finite_variables(ridge, where):
    problem, outer, inner = ridge
    variables = {"inner": inner, "outer": outer}
    key = next(iter(variables[where]))
    variables[where][key][1] = float("nan")
    with pytest.raises(ValueError, match=rf"{where}\['{key}'\] contains non-finite values"):
        solve_quickly(problem.problem, variables["outer"], variables["inner"])


def test_non_finite_loss(ridge):
    problem, outer, inner = ridge
    bad = bd.BilevelProblem(lambda w, x, b: problem.inner_loss(w, x) / 0.0 * 0.0, problem.outer_loss)
    with pytest.raises(ValueError, match="inner_loss is not finite"):
        solve_quickly(bad, outer, inner)


def test_variables_must_be_float_tensor_dicts(ridge):
    problem, outer, inner = ridge
    with pytest.raises(TypeError, match="outer must be a non-empty dict"):
        solve_quickly(problem.problem, [outer["log_lambda"]], inner)
    with pytest.raises(TypeError, match=r"inner\['w'\] must be floating point"):
        solve_quickly(problem.problem, outer, {"w": torch.zeros(4, dtype=torch.long)})
    with pytest.raises(TypeError, match=r"inner\['w'\] must be a torch.Tensor"):
        solve_quickly(problem.problem, outer, {"w": [0.0] * 4})


def test_unknown_estimator_name():
    with pytest.raises(ValueError, match="unknown hypergradient estimator 'implicit'; choose one of cg, exact"):
        hg.get("implicit")
    with pytest.raises(TypeError, match="estimator 'cg' has no option 'iterations'"):
        hg.get("cg", iterations=3)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: solvers.GD(lr=0.1, steps=-1), "steps must be >= 0, got -1"),
        (lambda: solvers.GD(lr=-0.1, steps=1), "lr must be a finite number > 0"),
        (lambda: solvers.Momentum(lr=0.1, momentum=1.5, steps=1), r"momentum must lie in \[0, 1\)"),
        (lambda: solvers.Adam(lr=0.1, steps=1, betas=(0.9, 1.0)), r"betas\[1\] must lie in \[0, 1\)"),
        (lambda: solvers.GD(lr=0.1, steps=2.5), "steps must be an int"),
        (lambda: hg.Truncated(k=-3), "k must be >= 0, got -3"),
        (lambda: hg.CG(iters=-1), "iters must be > 0, got -1"),
        (lambda: hg.Neumann(iters=0), "iters must be > 0, got 0"),
        (lambda: hg.PenaltyGradient(gamma=0.0), "gamma must be a finite number > 0"),
        (lambda: hg.FiniteDiff(eps=float("inf")), "eps must be a finite number > 0"),
    ],
)
def test_bad_hyperparameters(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_truncation_longer_than_run(ridge):
    problem, outer, inner = ridge
    with pytest.raises(ValueError, match=r"Truncated\(k=20\) needs k <= solver steps \(10\)"):
        bd.solve(problem.problem, outer, inner, solver=solvers.GD(0.1, 10), hypergrad=hg.Truncated(20))


def test_wrong_solver_or_estimator_type(ridge):
    problem, outer, inner = ridge
    with pytest.raises(TypeError, match="solver must be"):
        bd.solve(problem.problem, outer, inner, solver=torch.optim.SGD, hypergrad=hg.CG())
    with pytest.raises(TypeError, match="hypergrad must be"):
        bd.solve(problem.problem, outer, inner, solver=solvers.GD(0.1, 1), hypergrad="cg")


def test_divergent_solver_is_reported(ridge):
    problem, outer, inner = ridge
    with pytest.raises(ValueError, match="not finite.*diverged, lower its lr"):
        bd.solve(problem.problem, outer, inner, solver=solvers.GD(lr=1e3, steps=2000), hypergrad=hg.CG())
