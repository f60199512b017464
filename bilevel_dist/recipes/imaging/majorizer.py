"""Energy learning by parametric majorizers (Geiping's dissertation, ch. 4), for the learned-filter
denoising energy of :mod:`~bilevel_dist.recipes.imaging.energies` (``A = I``):

    Φ(x; θ, y) = E₁(x) + G(Cx),   E₁(x) = ½‖x − y‖²,   G(z) = Σ_j w_j φ(z_j),   w = e^{β₀ + β_k},

``C`` stacking the correlations ``c_k ⊛ x`` and ``φ`` the CR1N. The bilevel problem
``min_θ Σ_i l(x_i*, x_i(θ))`` with ``l(x*, x) = ½‖x* − x‖²`` and ``x_i(θ) = argmin_x Φ`` is replaced by
a single-level surrogate ``S ≥ l`` (Definition 4.1) that needs no derivative of the argmin:

* gradient penalty (4.17): ``(1/2m)‖∇_x Φ(x*)‖²`` with ``m = 1`` (``Φ`` is 1-strongly convex);
* dual Bregman surrogate (4.12)–(4.14), the analogue of (4.30):
  ``S(θ, q) = Φ(x*) + E₁*(−Cᵀq) + G*(q)`` with ``min_q S = Φ(x*) − min_x Φ = D_Φ(x*, x(θ)) ≥ l``,
  minimised jointly over ``θ`` and the per-image duals ``q = w ⊙ tanh(u)``;
* the iterative scheme (4.22)–(4.23) (A3), whose first outer step is the Bregman surrogate
  (Corollary 4.9), with backtracking on the upper loss.

Conjugates used: ``E₁*(s) = ½‖s‖² + ⟨s, y⟩`` and, for ``φ(z) = √(z² + ε²) − ε``,
``φ*(p) = ε − ε√(1 − p²)`` on ``|p| ≤ 1``, so ``G*(q) = Σ_j w_j φ*(q_j / w_j)``. Since
``Φ(x) − ⟨v, x⟩`` is ``Φ`` with ``y`` shifted to ``y + v`` (up to a constant), ``Φ*(v)`` comes from the
same dual formula: ``Φ*(v) = min_q ½‖Cᵀq − (y + v)‖² + G*(q) − ½‖y‖²``.

The module also holds the dissertation's two 1-D examples: the sparse toy of §4.3.3
(``E = ½|x − y|² + θ|x|``) and the collapse counterexample of §4.3.1 (``E = (θx − y)²``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel_dist._checks import ConfigError
from bilevel_dist.recipes.imaging.energies import FilterEnergy, correlate
from bilevel_dist.recipes.imaging.operators import Identity

Surrogate = Literal["bregman", "gradient_penalty"]


# --------------------------------------------------------------------------- the filter energy


def correlate_adjoint(q: Tensor, filters: Tensor) -> Tensor:
    """``Cᵀq = Σ_k c_k ⋆ q_k``, the adjoint of :func:`~.energies.correlate` (``(B, K, H, W) → (B, 1,
    H, W)``): correlation with the flipped filters and the mirrored circular padding."""
    sh, sw = filters.shape[-2:]
    padded = F.pad(q, (sw // 2, (sw - 1) // 2, sh // 2, (sh - 1) // 2), mode="circular")
    return F.conv2d(padded, filters.flip(-2, -1).transpose(0, 1))


def _weights(energy: FilterEnergy, beta: Tensor) -> Tensor:
    """``w_k = e^{β₀ + β_k}`` shaped ``(1, K, 1, 1)`` to broadcast over ``(B, K, H, W)``."""
    return (math.exp(energy.beta0) * torch.exp(beta)).reshape(1, -1, 1, 1)


def _check_denoising(energy: FilterEnergy) -> None:
    if not isinstance(energy.operator, Identity):
        raise ConfigError("operator", "the majorizer surrogates are implemented for denoising (A = I) only")


def _cr1n_slope(z: Tensor, eps: float) -> Tensor:
    """``φ'(z) = z / √(z² + ε²)``, in ``(−1, 1)``."""
    return z / torch.sqrt(z * z + eps * eps)


def energy_gradient(energy: FilterEnergy, x: Tensor, y: Tensor, filters: Tensor, beta: Tensor) -> Tensor:
    """``∇_x Φ = x − y + Cᵀ(w ⊙ φ'(Cx))`` (``A = I``), differentiable in ``θ``."""
    slope = _weights(energy, beta) * _cr1n_slope(correlate(x, filters), energy.eps)
    return x - y + correlate_adjoint(slope, filters)


def upper_loss(x_star: Tensor, x: Tensor) -> Tensor:
    """The upper-level loss ``l(x*, x) = ½‖x* − x‖²`` per image."""
    return 0.5 * (x_star - x).flatten(1).square().sum(1)


def gradient_penalty(energy: FilterEnergy, x_star: Tensor, y: Tensor, filters: Tensor, beta: Tensor) -> Tensor:
    """Gradient penalty (4.17) with the ``1/(2m)`` of its proof (4.A.3): ``½‖∇_x Φ(x*; θ, y)‖²`` per
    image (``m = 1``). For this smooth ``E₂`` it is also the partial surrogate (4.16)."""
    _check_denoising(energy)
    return 0.5 * energy_gradient(energy, x_star, y, filters, beta).flatten(1).square().sum(1)


def _conjugate_part(
    energy: FilterEnergy, target: Tensor, filters: Tensor, beta: Tensor, p: Tensor, root: Tensor
) -> Tensor:
    """``½‖Cᵀq − target‖² + G*(q)`` per image, ``q = w ⊙ p``, ``root = √(1 − p²)`` (passed in so that
    the ``tanh`` parametrisation can use the overflow-free ``sech``)."""
    w = _weights(energy, beta)
    residual = correlate_adjoint(w * p, filters) - target
    conj = energy.eps * (w * (1 - root)).flatten(1).sum(1)
    return 0.5 * residual.flatten(1).square().sum(1) + conj


def _iterative_value(
    energy: FilterEnergy,
    x_star: Tensor,
    x_bar: Tensor,
    y: Tensor,
    filters: Tensor,
    beta: Tensor,
    p: Tensor,
    root: Tensor,
) -> Tensor:
    """``l(x*, x̄) + Φ(x̄) + [½‖Cᵀq − (y + v)‖² + G*(q) − ½‖y‖²] − ⟨v, x̄⟩`` with ``v = x̄ − x*``."""
    v = x_bar - x_star
    dual = _conjugate_part(energy, y + v, filters, beta, p, root) - 0.5 * y.flatten(1).square().sum(1)
    return upper_loss(x_star, x_bar) + energy(x_bar, y, filters, beta) + dual - (v * x_bar).flatten(1).sum(1)


def iterative_surrogate(
    energy: FilterEnergy,
    x_star: Tensor,
    x_bar: Tensor,
    y: Tensor,
    filters: Tensor,
    beta: Tensor,
    p: Tensor,
) -> Tensor:
    """The linearised majorizer of step (4.22) per image, with its dual variables ``p ∈ [−1, 1]``
    (``q = w ⊙ p``, shaped like ``Cx``):

        M(θ, q) = l(x*, x̄) + Φ(x̄; θ) + Φ*(v; θ) − ⟨v, x̄⟩,   v = ∇l(x*, x̄) = x̄ − x*,

    ``Φ*(v)`` replaced by its dual expression (module docstring), so ``M ≥ min_q M ≥
    l(x*, x(θ))`` for every ``q``. The θ-dependent part is ``Φ(x̄) + Φ*(v)`` of (4.22). At ``x̄ = x*``
    (``v = 0``) it is the dual Bregman surrogate (Corollary 4.9)."""
    _check_denoising(energy)
    root = torch.sqrt((1 - p * p).clamp_min(0))
    return _iterative_value(energy, x_star, x_bar, y, filters, beta, p, root)


def dual_bregman(energy: FilterEnergy, x_star: Tensor, y: Tensor, filters: Tensor, beta: Tensor, p: Tensor) -> Tensor:
    """Dual Bregman surrogate (4.14) per image, ``S(θ, q) = Φ(x*) + E₁*(−Cᵀq) + G*(q)`` with ``q = w ⊙
    p``, ``|p| ≤ 1``; ``min_q S = Φ(x*) − min_x Φ = D_Φ(x*, x(θ))`` (4.11)–(4.12)."""
    return iterative_surrogate(energy, x_star, x_star, y, filters, beta, p)


def optimal_dual(energy: FilterEnergy, x_hat: Tensor, filters: Tensor) -> Tensor:
    """``p = φ'(C x̂)``: the dual minimiser (``q = ∇G(C x̂)``) when ``x̂`` minimises ``Φ`` for the
    (possibly shifted) data; independent of ``β``."""
    return _cr1n_slope(correlate(x_hat.detach(), filters.detach()), energy.eps)


def _prox_conjugate(b: Tensor, s: Tensor, iterations: int = 20) -> Tensor:
    """``argmin_{|p| ≤ 1} s(1 − √(1 − p²)) + ½(p − b)²`` element-wise. In ``z = p/√(1 − p²)`` the
    optimality condition ``z/√(1 + z²) + s z = |b|`` is concave and increasing in ``z ≥ 0``, so Newton
    from ``z = 0`` increases monotonically to the root (15 steps reach 3e-16 for ``s`` down to 1e-6)."""
    target = b.abs()
    z = torch.zeros_like(target)
    for _ in range(iterations):
        r = torch.rsqrt(1 + z * z)
        z = z - (z * r + s * z - target) / (r * r * r + s)
    return torch.sign(b) * z * torch.rsqrt(1 + z * z)


@torch.no_grad()
def bregman_dual_minimum(
    energy: FilterEnergy,
    x_star: Tensor,
    y: Tensor,
    filters: Tensor,
    beta: Tensor,
    p0: Tensor | None = None,
    iterations: int = 1000,
) -> tuple[Tensor, Tensor]:
    """``min_q S(θ, q)`` per image for a fixed ``θ`` (a check of (4.12)–(4.14), independent of the
    primal solver; training minimises jointly over ``θ`` and ``q`` instead). Accelerated proximal
    gradient on the dual ``min_q ½‖Cᵀq − y‖² + G*(q)``: step ``1/L``, ``L = Σ_k ‖c_k‖₁² ≥ ‖C‖²``,
    exact prox of ``G*`` (:func:`_prox_conjugate`), momentum ``(√κ − 1)/(√κ + 1)`` from ``G*``'s
    strong convexity ``ε / max w``. Starts at ``p0`` (default 0). Returns ``(values (B,), p)``."""
    _check_denoising(energy)
    filters, beta = filters.detach(), beta.detach()
    w = _weights(energy, beta)
    lip = float(filters.abs().flatten(1).sum(1).square().sum())
    kappa = lip * float(w.max()) / energy.eps
    momentum = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    q = w * (torch.zeros_like(correlate(x_star, filters)) if p0 is None else p0)
    z = q.clone()
    for _ in range(iterations):
        grad = correlate(correlate_adjoint(z, filters) - y, filters)
        q_next = w * _prox_conjugate((z - grad / lip) / w, energy.eps / (lip * w))
        z = q_next + momentum * (q_next - q)
        q = q_next
    p = q / w
    return dual_bregman(energy, x_star, y, filters, beta, p), p


# --------------------------------------------------------------------------- training


@dataclass
class MajorizerResult:
    """Learned ``(filters, beta)`` and the history: per logged Adam iteration ``step`` (outer step),
    ``iteration``, ``surrogate`` (``Σ_i`` of the minimised majorizer, an upper bound on the upper loss)
    and ``time`` (s since the start); per accepted outer step (iterative scheme) ``upper_loss``
    (``Σ_i ½‖x_i* − x_i(θ^k)‖²``, entry 0 at the initial ``θ``) and ``lr``."""

    filters: Tensor
    beta: Tensor
    history: dict[str, list[float]] = field(default_factory=dict)


def _adam_stage(
    energy: FilterEnergy,
    clean: Tensor,
    noisy: Tensor,
    x_bar: Tensor,
    raw: Tensor,
    beta: Tensor,
    p0: Tensor | None,
    surrogate: Surrogate,
    iterations: int,
    lr: float,
    dual_lr: float,
    learn_filters: bool,
    zero_mean: bool,
    log_every: int,
    log: dict[str, list[float]],
    step: int,
    start: float,
) -> tuple[Tensor, Tensor]:
    """Adam on ``Σ_i`` surrogate jointly over ``θ`` and (Bregman) the duals ``u`` (``p = tanh u``)."""
    raw = raw.detach().clone().requires_grad_(learn_filters)
    beta = beta.detach().clone().requires_grad_(True)
    groups = [{"params": [beta] + ([raw] if learn_filters else []), "lr": lr}]
    u = None
    if surrogate == "bregman":
        # atanh(±1) would be infinite; p0 = φ'(·) is strictly inside, the clamp only guards rounding.
        u = torch.atanh(p0.clamp(-1 + 1e-12, 1 - 1e-12)).requires_grad_(True)
        groups.append({"params": [u], "lr": dual_lr})
    opt = torch.optim.Adam(groups)

    init = raw.detach().clone()  # Adam updates raw in place

    def filters_of(r: Tensor) -> Tensor:
        # The thesis's filters live in the DCT basis without the constant atom: the update keeps
        # each filter's mean (zero for DCT atoms) by projecting out its constant part.
        return r - (r - init).mean(dim=(-2, -1), keepdim=True) if zero_mean else r

    for it in range(iterations + 1):
        filters = filters_of(raw)
        if u is None:
            value = gradient_penalty(energy, clean, noisy, filters, beta).sum()
        else:
            # 1/cosh(u) is √(1 − tanh²u) without cancellation or overflow.
            value = _iterative_value(energy, clean, x_bar, noisy, filters, beta, torch.tanh(u), 1 / torch.cosh(u)).sum()
        if it % log_every == 0 or it == iterations:
            log["step"].append(step)
            log["iteration"].append(it)
            log["surrogate"].append(float(value.detach()))
            log["time"].append(time.perf_counter() - start)
        if it == iterations:
            break
        opt.zero_grad()
        value.backward()
        opt.step()
    return filters_of(raw).detach(), beta.detach()


def train_majorizer(
    clean: Tensor,
    noisy: Tensor,
    energy: FilterEnergy,
    filters: Tensor,
    beta: Tensor,
    surrogate: Surrogate = "bregman",
    iterations: int = 500,
    lr: float = 1e-2,
    dual_lr: float | None = None,
    iterative_steps: int = 0,
    learn_filters: bool = True,
    zero_mean: bool = True,
    backtracking: int = 5,
    inner_iterations: int = 5000,
    inner_tol: float = 1e-8,
    log_every: int = 50,
) -> MajorizerResult:
    """Learn ``θ = (filters, beta)`` of ``energy`` from pairs ``(clean, noisy)`` (``(B, 1, H, W)``) by a
    single-level majorizer, batched over the images (A2/A3 of the dissertation, Adam as in 4.B.3).

    ``surrogate="gradient_penalty"``: ``min_θ Σ_i ½‖∇Φ(x_i*)‖²`` (4.17). ``surrogate="bregman"``:
    ``min_{θ, q} Σ_i S(θ, q_i)`` (4.14), the duals started at their optimum for the initial ``θ``
    (``p = φ'(C x_i(θ⁰))``, so the first logged value is ``Σ_i D_Φ(x_i*, x_i(θ⁰))`` up to the
    accuracy ``inner_tol`` of the inner solve).

    ``iterative_steps = n > 0`` (Bregman only) runs ``n`` outer steps of (4.22)–(4.23): ``x̄_i ← x_i*``;
    each step minimises ``Σ_i Φ(x̄_i; θ) + Φ*(x̄_i − x_i*; θ)`` jointly with its duals by ``iterations``
    Adam steps from the current ``θ``, then sets ``x̄_i ← x_i(θ)`` (:meth:`FilterEnergy.minimise`). A step
    that increases the upper loss ``Σ_i ½‖x_i* − x̄_i‖²`` is retried with half the learning rates,
    at most ``backtracking`` times, after which the scheme stops at the last accepted ``θ``. The first
    step is the Bregman surrogate training (Corollary 4.9).

    ``zero_mean`` keeps each filter's mean at its initial value (zero for the DCT atoms: the
    thesis's DCT basis without the constant atom);
    ``dual_lr`` (default ``lr``) is Adam's step on the duals' ``u`` (``p = tanh u``)."""
    _check_denoising(energy)
    if surrogate not in ("bregman", "gradient_penalty"):
        raise ConfigError("surrogate", f"unknown surrogate {surrogate!r} (bregman or gradient_penalty)")
    if iterative_steps > 0 and surrogate != "bregman":
        raise ConfigError("iterative_steps", "the iterative scheme (4.22) builds on the Bregman surrogate")
    dual_lr = lr if dual_lr is None else dual_lr
    clean, noisy = clean.detach(), noisy.detach()
    log: dict[str, list[float]] = {"step": [], "iteration": [], "surrogate": [], "time": []}
    start = time.perf_counter()
    filters, beta = filters.detach().clone(), beta.detach().clone()

    def solve(data: Tensor, f: Tensor, b: Tensor) -> Tensor:
        return energy.minimise(data, f, b, inner_iterations, inner_tol)

    x_hat = solve(noisy, filters, beta) if surrogate == "bregman" else None
    if iterative_steps == 0:
        p0 = None if x_hat is None else optimal_dual(energy, x_hat, filters)
        filters, beta = _adam_stage(
            energy, clean, noisy, clean, filters, beta, p0, surrogate, iterations, lr, dual_lr,
            learn_filters, zero_mean, log_every, log, 0, start,
        )  # fmt: skip
        return MajorizerResult(filters, beta, log)

    log.update(upper_loss=[float(upper_loss(clean, x_hat).sum())], lr=[0.0])
    x_bar = clean
    for step in range(iterative_steps):
        # Warm start of the duals of Φ*(v): their optimum at the current θ (for v = 0, x(θ)).
        x_shift = x_hat if step == 0 else solve(noisy + (x_bar - clean), filters, beta)
        p0 = optimal_dual(energy, x_shift, filters)
        scale = 1.0
        for _ in range(backtracking + 1):
            cand_filters, cand_beta = _adam_stage(
                energy, clean, noisy, x_bar, filters, beta, p0, "bregman", iterations, lr * scale,
                dual_lr * scale, learn_filters, zero_mean, log_every, log, step, start,
            )  # fmt: skip
            x_new = solve(noisy, cand_filters, cand_beta)
            loss = float(upper_loss(clean, x_new).sum())
            if loss <= log["upper_loss"][-1]:
                break
            scale /= 2  # backtrack: a smaller step of the θ-subproblem
        else:
            break  # reducing the step failed repeatedly: terminate (A3)
        filters, beta, x_bar = cand_filters, cand_beta, x_new
        log["upper_loss"].append(loss)
        log["lr"].append(lr * scale)
    return MajorizerResult(filters, beta, log)


# --------------------------------------------------------------------------- 1-D examples


def sparse_toy_solution(theta: Tensor, y: float = 1.5) -> Tensor:
    """``x(θ) = argmin_x ½|x − y|² + θ|x|``, soft thresholding (§4.3.3, App. 4.A.4)."""
    return torch.sign(torch.as_tensor(y)) * (abs(y) - theta).clamp_min(0)


def sparse_toy_loss(theta: Tensor, x_star: float = 0.3, y: float = 1.5) -> Tensor:
    """The true bilevel loss ``½|x* − x(θ)|²`` of the sparse toy."""
    return 0.5 * (x_star - sparse_toy_solution(theta, y)) ** 2


def sparse_toy_bregman(theta: Tensor, x_star: float = 0.3, y: float = 1.5) -> Tensor:
    """Dual Bregman surrogate (4.14) of the toy, ``E₁ = ½|x − y|²``, ``E₂ = θ|x|``:
    ``E(x*) + min_{|q| ≤ θ} E₁*(−q) = E(x*) + min_{|q| ≤ θ} ½q² − qy`` (``E₂*`` is the indicator of
    ``[−θ, θ]``), attained at ``q = clip(y, −θ, θ)``; equals ``½(θ − 1.2)²`` for ``θ < 1.5`` at the
    thesis's data."""
    q = torch.minimum(torch.maximum(torch.as_tensor(y, dtype=theta.dtype), -theta), theta)
    energy = 0.5 * (x_star - y) ** 2 + theta * abs(x_star)
    return energy + 0.5 * q * q - q * y


def sparse_toy_gradient_penalty(theta: Tensor, x_star: float = 0.3, y: float = 1.5) -> Tensor:
    """Gradient penalty (4.17), ``m = 1``: ``½ dist(0, ∂E(x*))² = ½(x* − y + θ sign x*)²`` (``x* ≠ 0``)."""
    return 0.5 * (x_star - y + theta * math.copysign(1.0, x_star)) ** 2


def scaling_loss(theta: Tensor, x_star: Tensor, y: Tensor) -> Tensor:
    """Collapse example (§4.3.1): ``Σ_i (x_i* − x_i(θ))²`` with ``x(θ) = y/θ`` (both ``E = (θx − y)²``
    and ``E = (x − y/θ)²``)."""
    return ((x_star - y / theta) ** 2).sum()


def scaling_naive_penalty(theta: Tensor, x_star: Tensor, y: Tensor) -> Tensor:
    """The naive penalty (4.6) of ``E = (θx − y)²``: ``Σ_i (θ² x_i* − θ y_i)²`` (``= ¼ Σ‖∇E(x_i*)‖²``),
    zero at ``θ = 0`` whatever the data: the energy *collapses*."""
    return ((theta**2 * x_star - theta * y) ** 2).sum()


def scaling_majorizer(theta: Tensor, x_star: Tensor, y: Tensor) -> Tensor:
    """The same penalty for the reparametrised ``E = (x − y/θ)²``: ``Σ_i (x_i* − y_i/θ)²``
    (``= ¼ Σ‖∇E(x_i*)‖²``, a majorizer of the loss, here equal to it)."""
    return ((x_star - y / theta) ** 2).sum()


__all__ = [
    "MajorizerResult",
    "bregman_dual_minimum",
    "correlate_adjoint",
    "dual_bregman",
    "energy_gradient",
    "gradient_penalty",
    "iterative_surrogate",
    "optimal_dual",
    "scaling_loss",
    "scaling_majorizer",
    "scaling_naive_penalty",
    "sparse_toy_bregman",
    "sparse_toy_gradient_penalty",
    "sparse_toy_loss",
    "sparse_toy_solution",
    "train_majorizer",
    "upper_loss",
]
