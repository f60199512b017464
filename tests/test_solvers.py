"""The differentiable solvers take exactly the steps torch.optim takes, and stop on their tolerance."""

import pytest
import torch

import bilevel_dist as bd
from bilevel_dist import solvers
from bilevel_dist.solvers import run

TARGET = torch.linspace(-1, 1, 6)
SCALE = torch.linspace(0.5, 3.0, 6)
PROBLEM = bd.BilevelProblem(
    lambda w, x, b: 0.5 * (SCALE * (w["w"] - TARGET * x["s"]) ** 2).sum() + 0.1 * (w["w"] ** 4).sum(),
    lambda w, x, b: w["w"].sum(),
)


@pytest.mark.parametrize(
    ("solver", "reference"),
    [
        (solvers.GD(lr=0.1, steps=25), lambda p: torch.optim.SGD(p, lr=0.1)),
        (solvers.Momentum(lr=0.1, momentum=0.8, steps=25), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8)),
        (
            solvers.Momentum(lr=0.1, momentum=0.8, steps=25, nesterov=True),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, nesterov=True),
        ),
        (solvers.Adam(lr=0.05, steps=25, betas=(0.8, 0.99)), lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.99))),
    ],
    ids=repr,
)
def test_matches_torch_optim(solver, reference):
    outer = {"s": torch.tensor(1.5)}
    end = run(solver, PROBLEM, {"w": torch.zeros(6)}, outer, None)
    w = torch.zeros(6, requires_grad=True)
    optimizer = reference([w])
    for _ in range(25):
        optimizer.zero_grad()
        PROBLEM.inner_loss({"w": w}, outer, None).backward()
        optimizer.step()
    assert torch.allclose(end.inner["w"], w.detach(), rtol=0, atol=1e-12)
    assert int(end.steps) == 25


def test_stops_at_first_step_below_tolerance():
    outer = {"s": torch.tensor(1.0)}
    tol = 1e-6
    end = run(solvers.GD(lr=0.1, steps=10_000, tol=tol), PROBLEM, {"w": torch.zeros(6)}, outer, None)
    # Reference: count plain GD steps until the gradient norm first drops to tol.
    w, count = torch.zeros(6, requires_grad=True), 0
    while True:
        (grad,) = torch.autograd.grad(PROBLEM.inner_loss({"w": w}, outer, None), w)
        if float(grad.norm()) <= tol:
            break
        w = (w - 0.1 * grad).detach().requires_grad_()
        count += 1
    assert int(end.steps) == count
    assert float(end.grad_norm) <= tol
    assert torch.equal(end.inner["w"], w.detach())


def test_batched_problems_stop_independently():
    scales = torch.tensor([0.2, 1.0, 5.0])[:, None]
    problem = bd.BilevelProblem(
        lambda w, x, b: 0.5 * (scales * (w["w"] - x["t"]) ** 2).sum(), lambda w, x, b: w["w"].sum(), batched=True
    )
    end = run(solvers.GD(lr=0.15, steps=1000, tol=1e-8), problem, {"w": torch.zeros(3, 4)}, {"t": torch.ones(4)}, None)
    steps = end.steps.tolist()
    assert steps[0] > steps[1] > steps[2]  # the flattest problem needs the most steps
    assert bool((end.grad_norm <= 1e-8).all())
    # A problem's own run, alone, takes the same number of steps.
    single = bd.BilevelProblem(
        lambda w, x, b: 0.5 * (scales[2] * (w["w"] - x["t"]) ** 2).sum(), lambda w, x, b: w["w"].sum(), batched=True
    )
    alone = run(solvers.GD(lr=0.15, steps=1000, tol=1e-8), single, {"w": torch.zeros(1, 4)}, {"t": torch.ones(4)}, None)
    assert int(alone.steps[0]) == steps[2]
