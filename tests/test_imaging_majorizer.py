"""Parametric majorizers of Geiping's dissertation, ch. 4 (bilevel_dist.recipes.imaging.majorizer)."""

import math

import pytest
import torch

from bilevel_dist.recipes.imaging.energies import FilterEnergy, correlate, dct_filters
from bilevel_dist.recipes.imaging.majorizer import (
    bregman_dual_minimum,
    correlate_adjoint,
    dual_bregman,
    gradient_penalty,
    iterative_surrogate,
    optimal_dual,
    scaling_loss,
    scaling_majorizer,
    scaling_naive_penalty,
    sparse_toy_bregman,
    sparse_toy_gradient_penalty,
    sparse_toy_loss,
    train_majorizer,
    upper_loss,
)
from bilevel_dist.recipes.imaging.metrics import psnr

SIGMA = 25 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_instance(seed: int, eps: float = 0.05, batch: int = 3, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(batch, 1, size, size, generator=g)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)
    filters = 0.3 * torch.randn(6, 1, 3, 3, generator=g)
    beta = 0.5 * torch.randn(6, generator=g) - 2.5
    return FilterEnergy(eps=eps), clean, noisy, filters, beta


# --------------------------------------------------------------------------- building blocks


def test_correlate_adjoint():
    g = torch.Generator().manual_seed(1)
    for size in (2, 3, 4, 5):
        filters = torch.randn(5, 1, size, size, generator=g)
        x, q = torch.randn(2, 1, 9, 7, generator=g), torch.randn(2, 5, 9, 7, generator=g)
        lhs = (correlate(x, filters) * q).sum()
        assert float(lhs - (x * correlate_adjoint(q, filters)).sum()) == pytest.approx(0, abs=1e-12)


def test_sparse_toy_exactness():
    """Correctness test 1: E = ½|x − 1.5|² + θ|x|, x* = 0.3 (§4.3.3, Fig. 4.1)."""
    theta = torch.linspace(0, 3, 30001)
    loss, bregman, penalty = sparse_toy_loss(theta), sparse_toy_bregman(theta), sparse_toy_gradient_penalty(theta)
    below = theta < 1.5
    assert (bregman[below] - 0.5 * (theta[below] - 1.2) ** 2).abs().max() < 1e-10
    assert (bregman[below] - loss[below]).abs().max() < 1e-10  # exact near the optimum
    assert bool((bregman >= loss - 1e-15).all()) and bool((penalty >= bregman - 1e-15).all())
    assert float(bregman[theta >= 1.5].sub(loss[theta >= 1.5]).max()) > 0.4  # strictly above far away
    for curve in (loss, bregman, penalty):
        assert float(theta[curve.argmin()]) == pytest.approx(1.2, abs=1e-12)


def test_ordering_loss_bregman_gradient_penalty():
    """Prop. 4.5 on random filter energies: l ≤ D_Φ = min_q S ≤ S(q) ≤ ½‖∇Φ(x*)‖²; at
    q = ∇G(Cx*) the dual surrogate is the gradient penalty (the partial surrogate (4.16))."""
    for seed in range(5):
        energy, clean, noisy, filters, beta = _random_instance(seed, eps=0.01 if seed % 2 else 0.05)
        x_hat = energy.minimise(noisy, filters, beta, 20000, 1e-11)
        loss = upper_loss(clean, x_hat)
        bregman = energy(clean, noisy, filters, beta) - energy(x_hat, noisy, filters, beta)
        penalty = gradient_penalty(energy, clean, noisy, filters, beta)
        at_x_star = dual_bregman(energy, clean, noisy, filters, beta, optimal_dual(energy, clean, filters))
        assert bool((loss <= bregman).all()) and bool((bregman <= penalty).all())
        assert (at_x_star - penalty).abs().max() < 1e-12
        assert bool((loss < bregman).all()) and bool((bregman < penalty).all())  # strictly, here


def test_bregman_dual_minimum_is_the_bregman_distance():
    """(4.11)–(4.14): min_q S(θ, q) = Φ(x*) − min_x Φ, the dual minimised by accelerated proximal
    gradient (independent of the primal solver), the primal by Nesterov to ‖∇Φ‖ ≤ 1e-11. Measured
    |difference| ≤ 2e-15 on these three instances (L = 38, 185, 349)."""
    for seed, eps in ((0, 0.05), (0, 0.01), (1, 0.01)):
        energy, clean, noisy, filters, beta = _random_instance(seed, eps=eps)
        assert energy.lipschitz(filters, beta, (8, 8)) > 30  # not a trivially conditioned instance
        x_hat = energy.minimise(noisy, filters, beta, 20000, 1e-11)
        gap = energy(clean, noisy, filters, beta) - energy(x_hat, noisy, filters, beta)
        value, p = bregman_dual_minimum(energy, clean, noisy, filters, beta, iterations=600)
        assert (value - gap).abs().max() < 1e-10
        assert float(p.abs().max()) < 1
        # the dual optimum read off the primal solution, q = ∇G(C x̂), is exact as well
        exact = dual_bregman(energy, clean, noisy, filters, beta, optimal_dual(energy, x_hat, filters))
        assert (exact - gap).abs().max() < 1e-12
        # and any other feasible q gives an upper bound (weak duality)
        assert bool((dual_bregman(energy, clean, noisy, filters, beta, 0.9 * p) > gap).all())


def test_conjugate_by_shifted_data():
    """Φ*(v) = ⟨v, x_v⟩ − Φ(x_v), x_v = argmin Φ − ⟨v, ·⟩ = x(θ; y + v): the iterative surrogate at the
    dual optimum equals l(x*, x̄) + Φ(x̄) + Φ*(v) − ⟨v, x̄⟩ and majorizes l(x*, x(θ))."""
    energy, clean, noisy, filters, beta = _random_instance(3)
    g = torch.Generator().manual_seed(7)
    x_bar = clean + 0.05 * torch.randn(clean.shape, generator=g)
    v = x_bar - clean
    x_v = energy.minimise(noisy + v, filters, beta, 20000, 1e-11)
    conj = (v * x_v).flatten(1).sum(1) - energy(x_v, noisy, filters, beta)
    expected = upper_loss(clean, x_bar) + energy(x_bar, noisy, filters, beta) + conj - (v * x_bar).flatten(1).sum(1)
    value = iterative_surrogate(energy, clean, x_bar, noisy, filters, beta, optimal_dual(energy, x_v, filters))
    assert (value - expected).abs().max() < 1e-10
    x_hat = energy.minimise(noisy, filters, beta, 20000, 1e-11)
    assert bool((value >= upper_loss(clean, x_hat)).all())
    # v = 0, x̄ = x*: the dual Bregman surrogate (Corollary 4.9)
    p = torch.tanh(torch.randn(x_v.shape[0], 6, 8, 8, generator=g))
    assert torch.equal(
        iterative_surrogate(energy, clean, clean, noisy, filters, beta, p),
        dual_bregman(energy, clean, noisy, filters, beta, p),
    )


# --------------------------------------------------------------------------- collapse (§4.3.1)


def _descend(f, theta0: float, iterations: int = 200) -> float:
    """Gradient descent with Armijo backtracking (trial step: twice the last accepted one)."""
    theta, step = torch.tensor(theta0), 1.0
    for _ in range(iterations):
        t = theta.clone().requires_grad_(True)
        value = f(t)
        (grad,) = torch.autograd.grad(value, t)
        step *= 2
        while f(theta - step * grad) > value - 0.5 * step * grad**2:
            step /= 2
        theta = theta - step * grad
    return float(theta)


def test_collapse_counterexample():
    """E = (θx − y)²: the naive penalty Σ(θ²x* − θy)² is 0 at θ = 0 and gradient descent from θ = 1
    collapses there (|θ| < 1e-12); the reparametrised E = (x − y/θ)² gives the majorizer Σ(x* − y/θ)²
    whose descent from θ = 1 reaches the bilevel optimum Σy²/Σx*y = 4.9733059548 to 1e-7."""
    x_star = torch.tensor([0.3, 0.5, 0.8])
    y = torch.tensor([1.5, 2.6, 3.9])  # noisy ratios 5, 5.2, 4.875: no θ fits all pairs
    optimum = float((y * y).sum() / (x_star * y).sum())
    assert optimum == pytest.approx(24.22 / 4.87, abs=1e-14)
    naive = _descend(lambda t: scaling_naive_penalty(t, x_star, y), 1.0)
    major = _descend(lambda t: scaling_majorizer(t, x_star, y), 1.0)
    assert abs(naive) < 1e-12
    assert float(scaling_naive_penalty(torch.tensor(0.0), x_star, y)) == 0
    assert float(scaling_naive_penalty(torch.tensor(optimum), x_star, y)) > 0.4  # the optimum is not
    assert major == pytest.approx(optimum, abs=1e-7)  # measured 6e-9 (Armijo on a flat minimum)
    # the majorizer bounds the loss (here it is the loss) and is minimal where the loss is
    grid = torch.linspace(1, 10, 9001)
    loss = torch.stack([scaling_loss(t, x_star, y) for t in grid])
    assert float(grid[loss.argmin()]) == pytest.approx(optimum, abs=1e-3)
    assert math.isclose(
        float(scaling_majorizer(torch.tensor(major), x_star, y)), float(scaling_loss(torch.tensor(major), x_star, y))
    )


# --------------------------------------------------------------------------- denoising


def _patches():
    data = pytest.importorskip("skimage.data")
    color = pytest.importorskip("skimage.color")
    camera = torch.tensor(data.camera() / 255.0)
    corners = [(144, 240), (240, 288), (384, 288), (432, 432)]  # textured parts of the cameraman
    clean = torch.stack([camera[i : i + 16, j : j + 16] for i, j in corners])[:, None]
    g = torch.Generator().manual_seed(0)
    noisy = clean + SIGMA * torch.randn(clean.shape, generator=g)
    astronaut = torch.tensor(color.rgb2gray(data.astronaut()))  # a different image for testing
    test_clean = astronaut[None, None, 200:264, 200:264]
    test_noisy = test_clean + SIGMA * torch.randn(test_clean.shape, generator=g)
    return clean, noisy, test_clean, test_noisy


ENERGY = FilterEnergy(eps=0.01, beta0=-4.0)  # weak initial regularisation (cf. the thesis's small init)
SETTINGS = dict(iterations=300, lr=1e-2, dual_lr=0.1, log_every=100)


def test_iterative_first_step_is_bregman():
    clean, noisy, _, _ = _patches()
    filters, beta = dct_filters(3), torch.zeros(8)
    settings = {**SETTINGS, "iterations": 100}
    plain = train_majorizer(clean, noisy, ENERGY, filters, beta, "bregman", **settings)
    first = train_majorizer(clean, noisy, ENERGY, filters, beta, "bregman", iterative_steps=1, **settings)
    assert torch.equal(plain.filters, first.filters) and torch.equal(plain.beta, first.beta)
    assert plain.history["surrogate"] == first.history["surrogate"]
    # the duals start at their optimum: the first value is Σ D_Φ(x*, x(θ⁰))
    x_hat = ENERGY.minimise(noisy, filters, beta, 5000, 1e-11)
    gap = (ENERGY(clean, noisy, filters, beta) - ENERGY(x_hat, noisy, filters, beta)).sum()
    assert plain.history["surrogate"][0] == pytest.approx(float(gap), abs=1e-8)


def test_iterative_scheme_denoising():
    """4 cameraman patches 16×16, σ = 25/255, 8 3×3 DCT filters, β⁰ = 0, β₀ = −4, ε = 0.01; 4 outer
    steps of 300 Adam iterations. Measured: upper loss Σ½‖x* − x̄‖² 2.7398 → 1.6687 (Bregman step)
    → 1.4729 → 1.4632 → 1.4583, no backtracking; astronaut test patch 64×64: PSNR 23.39 dB
    (initial θ) → 28.82 dB (train 22.73 → 25.52 dB; noisy 20.15 dB)."""
    clean, noisy, test_clean, test_noisy = _patches()
    filters, beta = dct_filters(3), torch.zeros(8)
    result = train_majorizer(clean, noisy, ENERGY, filters, beta, "bregman", iterative_steps=4, **SETTINGS)
    upper = result.history["upper_loss"]
    assert len(upper) == 5 and result.history["lr"][1:] == [1e-2] * 4  # every step accepted at full step
    assert all(b <= a for a, b in zip(upper, upper[1:], strict=False))
    assert upper[0] == pytest.approx(2.7398, abs=1e-3) and upper[1] == pytest.approx(1.6687, abs=1e-3)
    assert upper[-1] == pytest.approx(1.4583, abs=1e-3)
    # each logged surrogate value bounds the upper loss at the θ it was reached with
    ends = [s for s, i in zip(result.history["surrogate"], result.history["iteration"], strict=True) if i == 300]
    assert all(s >= u for s, u in zip(ends, upper[1:], strict=True))

    def test_psnr(f, b):
        return float(psnr(ENERGY.minimise(test_noisy, f, b, 5000, 1e-8), test_clean))

    before, after = test_psnr(filters, beta), test_psnr(result.filters, result.beta)
    assert before == pytest.approx(23.39, abs=0.05) and after == pytest.approx(28.82, abs=0.05)
    assert after > before + 5
    assert float(psnr(test_noisy, test_clean)) < before
    assert result.filters.mean(dim=(-2, -1)).abs().max() < 1e-12  # zero-mean kept


def test_gradient_penalty_training_decreases_its_surrogate():
    clean, noisy, _, _ = _patches()
    result = train_majorizer(clean, noisy, ENERGY, dct_filters(3), torch.zeros(8), "gradient_penalty", **SETTINGS)
    values = result.history["surrogate"]
    assert values[-1] < values[0] and len(result.history["time"]) == len(values)
    x_hat = ENERGY.minimise(noisy, result.filters, result.beta, 5000, 1e-8)
    assert float(upper_loss(clean, x_hat).sum()) <= values[-1]  # still a majorizer
