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


def _quadratics(n_problems: int = 4, n: int = 40) -> tuple[bd.BilevelProblem, torch.Tensor, torch.Tensor, float]:
    """Independent ill-conditioned quadratics ``½wᵀH_iw − b_iᵀw`` (condition number 10³)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(n_problems, n, n, generator=generator))[0]
    spectrum = torch.logspace(-3, 0, n)
    h = q @ torch.diag_embed(spectrum.expand(n_problems, n)) @ q.transpose(1, 2)
    b = torch.randn(n_problems, n, generator=generator)

    def inner(w: dict, x: dict, batch: object) -> torch.Tensor:
        return (0.5 * torch.einsum("bi,bij,bj->b", w["w"], h, w["w"]) - (b * w["w"]).sum(1)).sum() * x["s"].sum()

    problem = bd.BilevelProblem(inner, lambda w, x, batch: (w["w"] ** 2).sum() * x["s"].sum(), batched=True)
    return problem, h, b, 1.0


def test_ogm_is_accelerated_and_stops_per_problem():
    """OGM with gradient restart (Kim & Fessler 2018) reaches ‖∇g‖ ≤ 1e-8 on every problem of a
    batch in far fewer steps than gradient descent at the same step 1/L, each problem stopping
    on its own, at the exact minimiser."""
    problem, h, b, lipschitz = _quadratics()
    start, outer = {"w": torch.zeros_like(b)}, {"s": torch.ones(1)}
    ogm = run(solvers.OGM(1 / lipschitz, 2000, 1e-8, batched=True), problem, start, outer, None)
    gd = run(solvers.GD(1 / lipschitz, 2000, 1e-8), problem, start, outer, None)
    exact = torch.linalg.solve(h, b)
    assert bool((ogm.grad_norm <= 1e-8).all())
    assert float((ogm.inner["w"] - exact).norm(dim=1).max()) < 1e-5  # ‖∇g‖ ≤ 1e-8 at μ = 1e-3
    assert int(ogm.steps.max()) < 1000  # GD needs ~κ log(1/ε) ≈ 2·10⁴ steps:
    assert float(gd.grad_norm.min()) > 1e-4  # after 2,000 it is still far
    assert len(set(ogm.steps.tolist())) > 1  # the problems stopped at different steps


def test_ogm_restart_resets_momentum():
    """Where ``⟨∇g(w), y⁺ − y⟩ > 0`` the step restarts: the new point is the gradient step and
    ``θ`` returns to 1; elsewhere the momentum coefficients follow θ⁺ = (1 + √(1 + 4θ²))/2."""
    solver = solvers.OGM(0.5, 1, batched=True)
    inner = {"w": torch.tensor([[1.0, 0.0], [1.0, 0.0]])}
    state = {"y": {"w": torch.tensor([[0.0, 0.0], [2.0, 0.0]])}, "theta": {"theta": torch.tensor([2.0, 2.0])}}
    grad = {"w": torch.tensor([[1.0, 0.0], [1.0, 0.0]])}
    new, after = solver.update(inner, state, grad, 0)
    y = torch.tensor([0.5, 0.0])
    # problem 0: y⁺ − y = (0.5, 0) and ⟨∇g, ·⟩ > 0: restart
    assert torch.equal(new["w"][0], y) and float(after["theta"]["theta"][0]) == 1.0
    # problem 1: y⁺ − y = (−1.5, 0) and ⟨∇g, ·⟩ < 0: momentum
    theta = (1 + (1 + 16) ** 0.5) / 2
    expected = y + (1 / theta) * (y - torch.tensor([2.0, 0.0])) + (2 / theta) * (y - torch.tensor([1.0, 0.0]))
    assert torch.allclose(new["w"][1], expected) and abs(float(after["theta"]["theta"][1]) - theta) < 1e-12
