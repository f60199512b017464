"""Every estimator against closed forms (ridge), finite differences (logistic) and its known rate."""

import math

import pytest
import torch

import bilevel_dist as bd
from bilevel_dist import hypergrad as hg
from bilevel_dist import solvers
from bilevel_dist.problems import RidgeRegression


@pytest.fixture(scope="module")
def ridge():
    problem = RidgeRegression.make(n_train=200, n_val=50, features=10, spread=30.0, seed=0)
    outer = problem.outer_init(-4.0)
    outer["log_lambda"] = outer["log_lambda"] + 0.3 * torch.randn(10, generator=torch.Generator().manual_seed(1))
    return problem, outer, problem.hypergradient(outer)["log_lambda"]


def rel_err(grad, truth):
    return float((grad["log_lambda"] - truth).norm() / truth.norm())


def ridge_solve(ridge, estimator, steps=2000, solver=None):
    problem, outer, _ = ridge
    solver = solver or solvers.GD(lr=1 / problem.lipschitz(outer), steps=steps)
    return bd.solve(problem.problem, outer, problem.inner_init(), solver=solver, hypergrad=estimator)


@pytest.mark.parametrize(
    "estimator",
    [hg.CG(iters=50, tol=1e-14), hg.Neumann(iters=3000), hg.FixedPoint(iters=3000, tol=1e-14), hg.Exact()],
    ids=repr,
)
def test_implicit_estimators_match_closed_form(ridge, estimator):
    solution = ridge_solve(ridge, estimator)
    assert rel_err(solution.grad, ridge[2]) < 1e-8
    assert solution.info["inner_grad_norm"] < 1e-12
    closed = ridge[0].solution(ridge[1])["w"]
    assert torch.allclose(solution.inner["w"], closed, atol=1e-12)


@pytest.mark.parametrize(
    "solver",
    [
        solvers.GD(lr=0.2, steps=50),
        solvers.Momentum(lr=0.1, momentum=0.5, steps=50),
        solvers.Momentum(lr=0.1, momentum=0.5, steps=50, nesterov=True),
        solvers.Adam(lr=0.05, steps=50),
    ],
    ids=repr,
)
def test_reverse_equals_forward(ridge, solver):
    reverse = ridge_solve(ridge, hg.Reverse(), solver=solver)
    forward = ridge_solve(ridge, hg.Forward(), solver=solver)
    diff = (reverse.grad["log_lambda"] - forward.grad["log_lambda"]).abs().max()
    assert float(diff) < 1e-10
    assert float(reverse.grad["log_lambda"].abs().max()) > 1e-3  # not trivially zero


def test_reverse_truncated_full_equals_reverse(ridge):
    reverse = ridge_solve(ridge, hg.Reverse(), steps=40)
    truncated = ridge_solve(ridge, hg.Truncated(k=40), steps=40)
    assert torch.allclose(reverse.grad["log_lambda"], truncated.grad["log_lambda"], rtol=0, atol=1e-14)


def test_unrolled_converges_to_implicit_as_steps_grow(ridge):
    errors = [rel_err(ridge_solve(ridge, hg.Reverse(), steps=t).grad, ridge[2]) for t in (10, 100, 1000)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-8 and errors[0] > 1e-2


def test_truncated_error_decreases_in_k(ridge):
    errors = [rel_err(ridge_solve(ridge, hg.Truncated(k=k), steps=1000).grad, ridge[2]) for k in (1, 10, 100, 1000)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-8 and errors[0] > 0.1


def one_step_hypergradient(problem, outer):
    """DARTS' target at w*, in closed form: ∇_x f − ξ ∇²_xw g ∇_w f = −ξ eˣ ⊙ w* ⊙ ∇_w f(w*)."""
    w = problem.solution(outer)["w"]
    grad_w = problem.x_val.T @ (problem.x_val @ w - problem.y_val) / problem.x_val.shape[0]
    return -outer["log_lambda"].exp() * w * grad_w / problem.lipschitz(outer)


def test_finite_diff_exact_for_ridge_one_step_hypergradient(ridge):
    one_step = one_step_hypergradient(ridge[0], ridge[1])
    for eps in (1e-1, 1e-2, 1e-3):
        solution = ridge_solve(ridge, hg.FiniteDiff(eps=eps))
        err = float((solution.grad["log_lambda"] - one_step).norm() / one_step.norm())
        assert err < 1e-9  # ∇_x g is quadratic in w: central differences are exact


def weighted_logistic(n=60, d=5, seed=0):
    """Per-sample weights σ(x_i) on a logistic loss: ∇_x g is not polynomial in w."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=gen)
    labels = (torch.rand(n, generator=gen) < 0.5).double()
    val_x = torch.randn(30, d, generator=gen)
    val_y = (val_x[:, 0] > 0).double()

    def inner_loss(inner, outer, batch):
        logits = features @ inner["w"]
        losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return (torch.sigmoid(outer["s"]) * losses).mean() + 0.05 * (inner["w"] ** 2).sum()

    def outer_loss(inner, outer, batch):
        return torch.nn.functional.binary_cross_entropy_with_logits(val_x @ inner["w"], val_y)

    outer = {"s": torch.randn(n, generator=gen)}
    return bd.BilevelProblem(inner_loss, outer_loss), outer, {"w": torch.zeros(d)}


def test_finite_diff_converges_quadratically_in_eps():
    problem, outer, inner = weighted_logistic()
    solver = solvers.GD(lr=1.0, steps=300)
    w = bd.solve(problem, outer, inner, solver=solver, hypergrad=hg.CG()).inner
    # The exact one-step hypergradient, by double backward (independent of the estimator code).
    x = outer["s"].clone().requires_grad_()
    wv = w["w"].clone().requires_grad_()
    g_w = torch.autograd.grad(problem.inner_loss({"w": wv}, {"s": x}, None), wv, create_graph=True)[0]
    w1 = (wv - solver.lr * g_w).detach().requires_grad_()
    d = torch.autograd.grad(problem.outer_loss({"w": w1}, {"s": x}, None), w1)[0]
    exact = -solver.lr * torch.autograd.grad(g_w, x, d)[0]
    errors = []
    epsilons = [1e-1, 3e-2, 1e-2, 3e-3]
    for eps in epsilons:
        approx = bd.solve(problem, outer, inner, solver=solver, hypergrad=hg.FiniteDiff(eps=eps)).grad["s"]
        errors.append(float((approx - exact).norm() / exact.norm()))
    slope = (math.log(errors[-1]) - math.log(errors[0])) / (math.log(epsilons[-1]) - math.log(epsilons[0]))
    assert slope == pytest.approx(2.0, abs=0.2), errors
    assert errors[-1] < 1e-4


def test_penalty_error_is_order_one_over_gamma(ridge):
    gammas = [1e2, 1e3, 1e4]
    errors = [rel_err(ridge_solve(ridge, hg.PenaltyGradient(gamma=g)).grad, ridge[2]) for g in gammas]
    slope = (math.log(errors[-1]) - math.log(errors[0])) / (math.log(gammas[-1]) - math.log(gammas[0]))
    assert slope == pytest.approx(-1.0, abs=0.1), errors
    assert errors[-1] < 1e-2


def newton_solve(problem, outer, w, iters=50):
    """An independent damped-Newton reference solver with dense Hessians."""
    for _ in range(iters):
        w = w.detach().requires_grad_()
        loss = problem.inner_loss({"w": w}, outer, None)
        grad = torch.autograd.grad(loss, w, create_graph=True)[0]
        hess = torch.stack([torch.autograd.grad(grad[i], w, retain_graph=True)[0] for i in range(w.numel())])
        w = w - torch.linalg.solve(hess, grad)
    final = torch.autograd.grad(problem.inner_loss({"w": w.requires_grad_()}, outer, None), w)[0]
    assert float(final.norm()) < 1e-13  # the reference must itself be converged
    return w.detach()


def logistic_regularised(n=80, d=6, seed=3):
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=gen)
    x = torch.randn(n + 40, d, generator=gen)
    y = (torch.sigmoid(x @ w_true) > torch.rand(n + 40, generator=gen)).double()

    def inner_loss(inner, outer, batch):
        fit = torch.nn.functional.binary_cross_entropy_with_logits(x[:n] @ inner["w"], y[:n])
        return fit + 0.5 * (outer["log_lambda"].exp() * inner["w"] ** 2).sum()

    def outer_loss(inner, outer, batch):
        return torch.nn.functional.binary_cross_entropy_with_logits(x[n:] @ inner["w"], y[n:])

    return bd.BilevelProblem(inner_loss, outer_loss), {"log_lambda": torch.full((d,), -3.0) + 0.2 * torch.randn(d)}


@pytest.mark.parametrize(
    "estimator", [hg.CG(), hg.Exact(), hg.Neumann(iters=2000), hg.Reverse(), hg.Forward()], ids=repr
)
def test_logistic_against_central_finite_differences(estimator):
    problem, outer = logistic_regularised()
    inner = {"w": torch.zeros(6)}

    def value(x):
        w = newton_solve(problem, {"log_lambda": x}, inner["w"])
        return float(problem.outer_loss({"w": w}, {"log_lambda": x}, None))

    h = 1e-5
    base = outer["log_lambda"]
    fd = torch.tensor([(value(base + h * e) - value(base - h * e)) / (2 * h) for e in torch.eye(6)])
    solver = solvers.GD(lr=2.0, steps=1500, tol=1e-13)
    solution = bd.solve(problem, outer, inner, solver=solver, hypergrad=estimator)
    assert solution.info["inner_grad_norm"] <= 1e-13
    assert float((solution.grad["log_lambda"] - fd).norm() / fd.norm()) < 1e-6


def quadratic_batch(count=64, n=4, seed=0):
    """``count`` independent quadratics ``½ wᵢᵀ Aᵢ wᵢ − wᵢᵀ Bᵢ x`` with a shared outer ``x``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(count, n, n, generator=gen)
    a = q @ q.transpose(1, 2) / n + torch.eye(n) * torch.linspace(0.5, 2.0, count)[:, None, None]
    b = torch.randn(count, n, 3, generator=gen)
    target = torch.randn(count, n, generator=gen)

    def inner_loss(inner, outer, batch):
        w = inner["w"]
        return (0.5 * torch.einsum("bi,bij,bj->b", w, a, w) - torch.einsum("bi,bij,j->b", w, b, outer["x"])).sum()

    def outer_loss(inner, outer, batch):
        return 0.5 * ((inner["w"] - target) ** 2).sum() + 0.1 * (outer["x"] ** 2).sum()

    return inner_loss, outer_loss, {"x": torch.randn(3, generator=gen)}, {"w": torch.zeros(count, n)}


@pytest.mark.parametrize(
    "estimator",
    [hg.CG(), hg.Exact(), hg.Neumann(iters=200, alpha=0.2), hg.FixedPoint(alpha=0.2), hg.Reverse(), hg.Forward()],
    ids=repr,
)
def test_batched_equals_sum_of_single_solves(estimator):
    inner_loss, outer_loss, outer, inner = quadratic_batch()
    solver = solvers.GD(lr=0.2, steps=400, tol=1e-6)
    batched = bd.solve(
        bd.BilevelProblem(inner_loss, outer_loss, batched=True), outer, inner, solver=solver, hypergrad=estimator
    )
    total = torch.zeros(3)
    steps = []
    for i in range(inner["w"].shape[0]):
        # The i-th problem alone, as a batch of one: same losses restricted by slicing the data.
        def one_inner(w, x, batch, i=i):
            padded = inner["w"].clone()
            padded = torch.cat([padded[:i], w["w"], padded[i + 1 :]])
            return inner_loss({"w": padded}, x, batch)

        def one_outer(w, x, batch, i=i):
            padded = torch.cat([inner["w"][:i], w["w"], inner["w"][i + 1 :]])
            return outer_loss({"w": padded}, x, batch) - 0.1 * (x["x"] ** 2).sum() * (i > 0)

        single = bd.solve(
            bd.BilevelProblem(one_inner, one_outer, batched=True),
            outer,
            {"w": inner["w"][i : i + 1]},
            solver=solver,
            hypergrad=estimator,
        )
        total += single.grad["x"]
        steps.append(int(single.info["inner_steps"][0]))
    assert torch.allclose(batched.grad["x"], total, rtol=1e-10, atol=1e-12)
    assert batched.info["inner_steps"].tolist() == steps  # each problem stopped on its own
    assert len(set(steps)) > 1


@pytest.mark.parametrize("name", sorted(hg.REGISTRY))
def test_every_estimator_reachable_by_name_and_accurate(ridge, name):
    options = {
        "truncated": {"k": 2000},
        "neumann": {"iters": 3000},
        "gradient_descent": {"iters": 3000},
        "fixed_point": {"iters": 3000},
        "penalty": {"gamma": 1e6},
    }
    estimator = hg.get(name, **options.get(name, {}))
    assert isinstance(estimator, hg.REGISTRY[name]) and estimator.name == name
    solution = ridge_solve(ridge, estimator)
    problem, outer, truth = ridge
    if name == "finite_diff":  # DARTS approximates the one-step hypergradient, not ∇F
        truth = one_step_hypergradient(problem, outer)
    tolerance = {"penalty": 1e-4}.get(name, 1e-8)
    assert rel_err(solution.grad, truth) < tolerance
