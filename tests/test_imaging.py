"""Learned image reconstruction (issue 17): operators, the learned-filter hypergradient, the
double loop, the recipe end to end."""

from __future__ import annotations

import pytest
import torch

from bilevel_dist.problem import BilevelProblem
from bilevel_dist.recipes.imaging.algorithm import ReconstructionIFT
from bilevel_dist.recipes.imaging.energies import FilterEnergy, dct_filters
from bilevel_dist.recipes.imaging.operators import (
    DCT,
    Blur,
    Gradient,
    Identity,
    Inpaint,
    MaskedFourier,
    fourier_solve,
    gaussian_kernel,
    motion_kernel,
    sampling_mask,
)
from bilevel_dist.solvers import OGM, run

SHAPE = (12, 16)


def _operators() -> dict[str, object]:
    generator = torch.Generator().manual_seed(3)
    ops = {
        "identity": Identity(),
        "blur_gaussian": Blur(gaussian_kernel(5, 1.3)),
        "blur_motion": Blur(motion_kernel(7, 30.0)),
        "inpaint": Inpaint((torch.rand(SHAPE, generator=generator) > 0.4).double()),
        "gradient": Gradient(),
        "dct": DCT(),
    }
    for kind in ("cartesian", "gaussian", "radial"):
        ops[f"mri_{kind}"] = MaskedFourier(sampling_mask(kind, SHAPE, 0.3, seed=1))
    return ops


@pytest.mark.parametrize("name", sorted(_operators()))
def test_adjoint(name: str) -> None:
    """⟨Ax, y⟩ = ⟨x, Aᴴy⟩ (the real part for k-space) to 1e-10, and where AᴴA is circulant
    its DFT eigenvalues solve (I + AᴴA) exactly."""
    op = _operators()[name]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, *SHAPE, generator=generator)
    ax = op(x)
    y = torch.randn(ax.shape, generator=generator, dtype=ax.dtype)
    lhs = (ax.conj() * y).real.sum() if ax.is_complex() else (ax * y).sum()
    rhs = (x * op.adjoint(y)).sum()
    assert abs(float(lhs - rhs)) <= 1e-10 * max(1.0, abs(float(lhs)))
    eig = op.normal_fourier(SHAPE, x)
    if eig is not None:
        assert float((fourier_solve(x + op.adjoint(op(x)), 1 + eig) - x).abs().max()) < 1e-10


def test_masks_keep_the_rate() -> None:
    for kind in ("cartesian", "gaussian", "radial"):
        for rate in (0.2, 0.3):
            kept = float(sampling_mask(kind, (64, 64), rate).mean())
            assert abs(kept - rate) < 0.02, (kind, rate, kept)


# -- the learned-filter hypergradient -----------------------------------------------------------
def _tiny() -> tuple[BilevelProblem, dict, dict, dict]:
    generator = torch.Generator().manual_seed(0)
    truth = torch.rand(2, 1, 8, 8, generator=generator)
    batch = {"y": truth + 0.1 * torch.randn(truth.shape, generator=generator), "truth": truth}
    energy = FilterEnergy(Identity(), eps=0.1, beta0=-1.0)

    def inner_loss(inner: dict, outer: dict, b: dict) -> torch.Tensor:
        return energy(inner["x"], b["y"], outer["filters"], outer["beta"]).sum()

    def outer_loss(inner: dict, outer: dict, b: dict) -> torch.Tensor:
        return 0.5 * ((inner["x"] - b["truth"]) ** 2).sum()

    outer = {"filters": dct_filters(3), "beta": 0.3 * torch.randn(8, generator=generator)}
    problem = BilevelProblem(inner_loss, outer_loss, batched=True)
    bound = lambda o: energy.lipschitz(o["filters"], o["beta"], (8, 8))  # noqa: E731
    return problem, outer, {"x": batch["y"].clone()}, batch | {"bound": bound}


def _solved(problem: BilevelProblem, outer: dict, inner: dict, batch: dict) -> dict:
    solver = OGM(1 / batch["bound"](outer), 20000, 1e-13, batched=True)
    end = run(solver, problem, inner, outer, batch)
    assert float(end.grad_norm.max()) <= 1e-13  # the reference must be converged (review §9.3 test 4)
    return end.inner


def test_hypergradient_matches_central_differences() -> None:
    """The IFT hypergradient (OGM to ‖∇Φ‖ ≤ 1e-13, CG to 1e-14) against central differences of
    ℓ(γ) = ½Σ‖x̂(γ) − x‖² along random directions and single coordinates: relative error ≤ 1e-6."""
    problem, outer, inner, batch = _tiny()
    algorithm = ReconstructionIFT(
        problem, inner_steps=20000, inner_tol=1e-13, linear_iters=500, linear_tol=1e-14, step_bound=batch["bound"]
    )
    state = algorithm.init(outer, inner)
    grad = algorithm.solve(state, batch, batch).grad

    def loss(at: dict) -> float:
        return float(problem.outer_loss(_solved(problem, at, inner, batch), at, batch))

    generator = torch.Generator().manual_seed(1)
    directions = [{k: torch.randn(v.shape, generator=generator) for k, v in outer.items()} for _ in range(2)]
    for key, index in (("beta", 3), ("filters", (5, 0, 1, 2))):
        one = {k: torch.zeros_like(v) for k, v in outer.items()}
        one[key][index] = 1.0
        directions.append(one)
    h = 1e-5
    for d in directions:
        plus = loss({k: v + h * d[k] for k, v in outer.items()})
        minus = loss({k: v - h * d[k] for k, v in outer.items()})
        numeric = (plus - minus) / (2 * h)
        analytic = float(sum((grad[k] * d[k]).sum() for k in outer))
        assert abs(numeric - analytic) <= 1e-6 * abs(numeric), (numeric, analytic)
