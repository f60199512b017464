"""Reference problems: closed forms agree with numerical solves; the label noise is what it says."""

import torch

import bilevel_dist as bd
from bilevel_dist import hypergrad, solvers
from bilevel_dist.label_noise import flip_labels
from bilevel_dist.problems import FiniteSumQuadratic, HyperCleaning


def test_quadratic_closed_forms_match_numerical_solve():
    quadratic = FiniteSumQuadratic.make(seed=3)
    outer = {"x": torch.randn(10, generator=torch.Generator().manual_seed(1))}
    solution = bd.solve(
        quadratic.problem, outer, quadratic.inner_init(), solver=solvers.GD(1.0, 500), hypergrad=hypergrad.Exact()
    )
    assert torch.allclose(solution.inner["z"], quadratic.solution(outer)["z"], atol=1e-12)
    assert torch.allclose(solution.grad["x"], quadratic.hypergradient(outer)["x"], atol=1e-11)
    value = float(quadratic.outer_loss(solution.inner, outer))
    assert abs(value - quadratic.value(outer)) < 1e-12


def test_quadratic_minibatches_average_to_the_full_loss():
    quadratic = FiniteSumQuadratic.make()
    inner, outer = {"z": torch.randn(10)}, {"x": torch.randn(10)}
    halves = [{"index": torch.arange(0, 32)}, {"index": torch.arange(32, 64)}]
    full = quadratic.inner_loss(inner, outer)
    assert torch.allclose(sum(quadratic.inner_loss(inner, outer, h) for h in halves) / 2, full, atol=1e-13)


def test_flip_labels_flips_the_rate_to_other_classes():
    labels = torch.arange(1000) % 10
    noisy, flipped = flip_labels(labels, 0.36, 10, torch.Generator().manual_seed(0))
    assert int(flipped.sum()) == 360
    assert bool((noisy[flipped] != labels[flipped]).all()) and bool((noisy[~flipped] == labels[~flipped]).all())


def test_hyper_cleaning_splits_and_noise():
    data = HyperCleaning.make(noise=0.5, n_val=150, n_test=500)
    assert (data.n_inner, data.n_outer, data.x_test.shape[0]) == (1797 - 650, 150, 500)
    assert int(data.flipped.sum()) == data.n_inner // 2


def test_logistic_hypergradient_matches_finite_differences_of_value():
    from bilevel_dist.problems import LogisticRegression

    data = LogisticRegression.make()
    outer = data.outer_init()
    h = 1e-5
    base = outer["log_lambda"]
    fd = torch.tensor(
        [
            (data.value({"log_lambda": base + h * e}) - data.value({"log_lambda": base - h * e})) / (2 * h)
            for e in torch.eye(base.numel())
        ]
    )
    solution = bd.solve(
        data.problem, outer, data.inner_init(), solver=solvers.GD(2.0, 3000, tol=1e-12), hypergrad=hypergrad.CG()
    )
    assert torch.allclose(solution.inner["w"], data.solution(outer)["w"], atol=1e-10)
    assert float((solution.grad["log_lambda"] - fd).norm() / fd.norm()) < 1e-6
