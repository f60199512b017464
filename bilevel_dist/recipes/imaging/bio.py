"""BIO: Bilevel Integrative Optimization (Liu, Ma, Yuan, Zeng & Zhang, "Bilevel Integrative
Optimization for Ill-posed Inverse Problems").

The bilevel problem (Eq. 2) ``min F(x) = f(x) + g(x)`` over ``x ∈ argmin ψ(x) + φ(x)`` with
``ψ = h∘A`` becomes, by Theorem 1, the single-level problem (Eq. 4)

    min f(x) + g(x)   s.t.   A x = ȳ,  φ(x) ≤ φ(x̄)        (ȳ = A x̄, x̄ any lower-level solution)

solved by a proximal ADMM (Eq. 5). ``x̄`` comes from Stage 0, FISTA on the lower level
(:func:`apg_tv`). For imaging the lower level is ``½‖Ax − y‖² + γ‖∇x‖₁`` (anisotropic TV,
polyhedral) and the TV sublevel set is lifted with slacks (App. B.1):
``∇x + s₁ − w = 0``, ``∇x − s₂ + w = 0``, ``⟨e, w⟩ + r = t̄``, ``s₁, s₂, r ≥ 0``.

Two corrections to the printed algorithms (see ``shared/reference/bio-inverse-problems.md`` §2.7):
``d^k`` carries ``∇ᵀ(β(s₂ − s₁) − (λ_{s1} + λ_{s2}))`` (the printed ``∇ᵀ(β(s₂ − λ_{s2}) −
β(s₁ + λ_{s1}))`` diverges for large β; ``literal=True`` keeps it for a regression test) and
``t̄ = ‖∇x̄‖₁`` (the printed ``γ‖∇x̄‖₁`` is the TV sublevel set only when γ = 1).

Every solver is batched over images ``(B, 1, H, W)``: each image is an independent problem, all
advanced together in one vectorised computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel_dist import linalg
from bilevel_dist._checks import ConfigError
from bilevel_dist.recipes.imaging.operators import DCT, Gradient, MaskedFourier, Operator, fourier_solve

GRADIENT = Gradient()


# -- proximal maps and projections -------------------------------------------------------------
def soft_threshold(v: Tensor, threshold: Tensor | float) -> Tensor:
    """``prox_{t‖·‖₁}(v) = sign(v) · max(|v| − t, 0)`` element-wise."""
    return torch.sign(v) * torch.clamp(v.abs() - threshold, min=0)


def project_l1_ball(v: Tensor, radius: Tensor | float) -> Tensor:
    """Euclidean projection of each row of ``v`` (``(B, n)``) onto ``{x : ‖x‖₁ ≤ radius}``
    (Duchi, Shalev-Shwartz, Singer & Chandra 2008: sort, find the threshold θ, soft-threshold).
    ``radius`` is a number or one per row."""
    radius = torch.as_tensor(radius, dtype=v.dtype, device=v.device).expand(v.shape[0])
    mu = torch.sort(v.abs(), dim=1, descending=True).values
    excess = torch.cumsum(mu, dim=1) - radius[:, None]
    j = torch.arange(1, v.shape[1] + 1, dtype=v.dtype, device=v.device)
    # ρ = the largest j with μ_j > (Σ_{i≤j} μ_i − r) / j; μ_1 > 0 makes ρ ≥ 1 whenever ‖v‖₁ > r
    rho = ((mu * j > excess).to(v.dtype) * j).argmax(dim=1, keepdim=True)
    theta = (excess.gather(1, rho) / (rho + 1).to(v.dtype)).clamp(min=0)
    inside = v.abs().sum(dim=1, keepdim=True) <= radius[:, None]
    return torch.where(inside, v, soft_threshold(v, theta))


def sherman_morrison_solve(c: Tensor, a: float, b: float) -> Tensor:
    """``(a I + b e eᵀ)⁻¹ c`` per problem (``e`` all ones over every axis but the first):
    ``(c − b e ⟨e, c⟩ / (a + b N)) / a`` in ``O(N)`` — BIO's w-step with ``a = 2β + τ``, ``b = β``."""
    n = c[0].numel()
    total = c.flatten(1).sum(1).view(-1, *([1] * (c.ndim - 1)))
    return (c - b * total / (a + b * n)) / a


def _per_image(value: Tensor | float, like: Tensor) -> Tensor:
    """``value`` (a number or one per image) shaped to broadcast over ``like``'s images."""
    value = torch.as_tensor(value, dtype=like.real.dtype, device=like.device)
    return value.reshape(-1, *([1] * (like.ndim - 1))) if value.ndim else value


def _norms(x: Tensor) -> Tensor:
    """``‖x_b‖`` per image (complex entries by modulus)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1)


def tv_l1(x: Tensor) -> Tensor:
    """Anisotropic total variation ``‖∇x‖₁`` per image (periodic forward differences)."""
    return GRADIENT(x).abs().flatten(1).sum(1)


def _adjoint_gradient(p: Tensor) -> Tensor:
    """``∇ᵀp`` for periodic forward differences (as :class:`Gradient`, fewer kernels: FGP's inner
    loop is launch-bound on small images)."""
    down, right = p[:, :1], p[:, 1:]
    return (torch.roll(down, 1, dims=-2) - down) + (torch.roll(right, 1, dims=-1) - right)


def tv_prox(
    v: Tensor,
    weight: Tensor | float,
    iters: int = 100,
    dual: Tensor | None = None,
    tol: Tensor | float = 0.0,
    return_dual: bool = False,
    check_every: int = 5,
) -> Tensor | tuple[Tensor, Tensor]:
    """``prox_{λ‖∇·‖₁}(v) = argmin_x ½‖x − v‖² + λ‖∇x‖₁`` (anisotropic TV) per image, by FGP
    (Beck & Teboulle 2009, fast gradient projection on the dual): ``x = v − λ∇ᵀp`` with
    ``‖p‖_∞ ≤ 1``, gradient steps of ``1/(8λ)`` (``‖∇‖² ≤ 8``) and Nesterov momentum.

    ``weight`` is λ, a number or one per image. ``dual`` warm-starts ``p`` (FISTA's outer loop
    passes the previous one back). Each image stops on its own (and no longer changes) once
    ``‖x_j − x_{j−m}‖ ≤ tol·‖x_j‖`` at a check every ``m = check_every`` iterations (``tol`` a
    number or one per image), or after ``iters`` iterations."""
    lam = _per_image(weight, v)
    step = 1 / (8 * lam.clamp(min=torch.finfo(v.dtype).tiny))
    tol = torch.as_tensor(tol, dtype=v.dtype, device=v.device).reshape(-1)
    p = GRADIENT(torch.zeros_like(v)) if dual is None else dual
    q, t = p, 1.0
    active, frozen, checks = None, False, bool((tol > 0).any())
    x_check = v - lam * _adjoint_gradient(p)
    for j in range(1, iters + 1):
        p_new = torch.addcmul(q, step, GRADIENT(v - lam * _adjoint_gradient(q))).clamp_(-1, 1)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        q_new = torch.lerp(p, p_new, 1 + (t - 1) / t_new)  # p_new + (t−1)/t_new (p_new − p)
        if frozen:  # images that stopped keep their dual
            keep = active.view(-1, 1, 1, 1)
            p_new, q_new = torch.where(keep, p_new, p), torch.where(keep, q_new, q)
        p, q, t = p_new, q_new, t_new
        if checks and j % check_every == 0:
            x = v - lam * _adjoint_gradient(p)
            change = _norms(x - x_check) > tol * _norms(x)
            active = change if active is None else active & change
            if not bool(active.any()):
                break
            frozen, x_check = not bool(active.all()), x
    x = v - lam * _adjoint_gradient(p)
    return (x, p) if return_dual else x


def apg_tv(
    y: Tensor,
    op: Operator,
    gamma: Tensor | float,
    tol: Tensor | float = 1e-4,
    max_iter: int = 20000,
    x0: Tensor | None = None,
    inner_iters: int = 200,
    inner_ratio: float = 0.01,
    restart: bool = True,
) -> tuple[Tensor, Tensor]:
    """Stage 0 of BIO (and the FISTA-TV / TV baselines): FISTA (Beck & Teboulle 2009) on the
    lower level of Eqs. (11)–(12), ``min_x ½‖Ax − y‖² + γ‖∇x‖₁`` (anisotropic TV), step
    ``1/‖A‖²``, the TV prox by warm-started FGP (:func:`tv_prox`).

    Each image stops on its own once ``‖x^{k+1} − x^k‖ / ‖x^{k+1}‖ < tol`` (the paper's APG
    relative error, 1e-2 / 1e-4 / 1e-6; ``tol`` a number or one per image): a stopped image no
    longer changes. Returns ``x`` and the iterations each image ran (``(B,)``, long).

    An inexact prox leaves FISTA a noise floor above small tolerances, so the inner FGP runs to
    ``inner_ratio ×`` the last outer relative change (at most ``inner_iters`` iterations), and
    ``restart`` resets the momentum of an image whose step turns against its last one
    (O'Donoghue & Candès 2015, gradient scheme)."""
    like = op.adjoint(y)
    lipschitz = op.norm_squared(tuple(like.shape[-2:]), like)
    lam = _per_image(gamma, like) / lipschitz
    batch = like.shape[0]
    tol = torch.as_tensor(tol, dtype=like.dtype, device=like.device).expand(batch)
    x = like.clone() if x0 is None else x0.clone()
    z, dual = x, GRADIENT(torch.zeros_like(x))
    t = torch.ones(batch, 1, 1, 1, dtype=x.dtype, device=x.device)
    inner_tol = torch.full((batch,), 1e-2, dtype=x.dtype, device=x.device)
    iterations = torch.zeros(batch, dtype=torch.long, device=x.device)
    active = torch.ones(batch, dtype=torch.bool, device=x.device)
    for _ in range(max_iter):
        v = z - op.adjoint(op(z) - y) / lipschitz
        x_new, dual_new = tv_prox(v, lam, inner_iters, dual, inner_tol, return_dual=True)
        change = _norms(x_new - x) / _norms(x_new).clamp(min=torch.finfo(x.dtype).tiny)
        t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        if restart:
            turned = ((z - x_new) * (x_new - x)).flatten(1).sum(1).view(-1, 1, 1, 1) > 0
            t, t_new = torch.where(turned, 1.0, t), torch.where(turned, 1.0, t_new)
        z_new = x_new + ((t - 1) / t_new) * (x_new - x)
        keep = active.view(-1, 1, 1, 1)
        x, z = torch.where(keep, x_new, x), torch.where(keep, z_new, z)
        dual, t = torch.where(keep, dual_new, dual), torch.where(keep, t_new, t)
        inner_tol = torch.where(active, inner_ratio * change, inner_tol)
        iterations += active
        active = active & (change >= tol)
        if not bool(active.any()):
            break
    return x, iterations


# -- diagnostics --------------------------------------------------------------------------------
@dataclass
class BIOResult:
    """A BIO run: the last iterate and per-iteration diagnostics, each ``(K, B)`` (iteration,
    image): the data residual ``‖A x^k − ȳ‖``, the residual of the lifted/split constraints, the
    upper-level objective ``F(x^k)``, the step ``‖x^k − x^{k−1}‖`` and, given a truth, the PSNR
    (peak 1, unclamped); ``iterations`` (``(B,)``, long) counts the iterations each image ran
    before its stopping rule held (``None`` without one: every image ran them all)."""

    x: Tensor
    residual: Tensor
    constraint: Tensor
    objective: Tensor
    change: Tensor
    psnr: Tensor | None = None
    iterations: Tensor | None = None


class _History:
    """Per-iteration diagnostics kept on the device (no host read inside the loop)."""

    def __init__(self, truth: Tensor | None) -> None:
        self.truth = truth
        self.rows: dict[str, list[Tensor]] = {k: [] for k in ("residual", "constraint", "objective", "change", "psnr")}

    def add(self, x: Tensor, previous: Tensor, residual: Tensor, constraint: Tensor, objective: Tensor) -> None:
        self.rows["residual"].append(residual)
        self.rows["constraint"].append(constraint)
        self.rows["objective"].append(objective)
        self.rows["change"].append(_norms(x - previous))
        if self.truth is not None:
            mse = (x - self.truth).pow(2).flatten(1).mean(1)
            self.rows["psnr"].append(-10 * torch.log10(mse))

    def result(self, x: Tensor, iterations: Tensor | None = None) -> BIOResult:
        def stack(key: str) -> Tensor:
            rows = self.rows[key]
            return torch.stack(rows) if rows else x.new_zeros(0, x.shape[0])

        return BIOResult(
            x=x,
            residual=stack("residual"),
            constraint=stack("constraint"),
            objective=stack("objective"),
            change=stack("change"),
            psnr=stack("psnr") if self.truth is not None else None,
            iterations=iterations,
        )


class _Stopping:
    """The paper's relative-change rule for BIO's own iterations (as Stage 0's): an image stops once
    ``‖x^{k+1} − x^k‖ / ‖x^{k+1}‖ < tol`` (``tol`` a number or one per image; 0 never stops) and
    its whole state is frozen from then on, so a batch gives each image's own early-stopped iterate
    and iteration count (the paper's Time₂ differs per D)."""

    def __init__(self, tol: Tensor | float, like: Tensor) -> None:
        batch = like.shape[0]
        self.tol = torch.as_tensor(tol, dtype=like.real.dtype, device=like.device).expand(batch)
        self.on = bool((self.tol > 0).any())
        self.active = torch.ones(batch, dtype=torch.bool, device=like.device)
        self.iterations = torch.zeros(batch, dtype=torch.long, device=like.device)

    def keep(self, new: Tensor, old: Tensor) -> Tensor:
        """``new`` for the images still running, ``old`` for those that stopped before this step."""
        return torch.where(self.active.view(-1, *([1] * (new.ndim - 1))), new, old) if self.on else new

    def update(self, x: Tensor, previous: Tensor) -> bool:
        """Counts this iteration and applies the rule; ``False`` once every image has stopped."""
        self.iterations += self.active
        if not self.on:
            return True
        change = _norms(x - previous) / _norms(x).clamp(min=torch.finfo(self.tol.dtype).tiny)
        self.active = self.active & (change >= self.tol)
        return bool(self.active.any())

    def count(self) -> Tensor | None:
        return self.iterations if self.on else None


def _check_penalties(beta: float, tau: float, iters: int) -> None:
    if not beta > 0:
        raise ConfigError("beta", f"the ADMM penalty beta must be > 0, got {beta!r}")
    if not tau > 0:
        raise ConfigError("tau", f"the proximal weight tau must be > 0, got {tau!r}")
    if int(iters) != iters or iters < 0:
        raise ConfigError("iters", f"iters must be a non-negative integer, got {iters!r}")


# -- Algorithm 1: the generic proximal ADMM of Eq. (5) --------------------------------------------
def bio_generic(
    A: Tensor,
    y_bar: Tensor,
    d: Tensor,
    prox_g: Callable[[Tensor, float], Tensor],
    project: Callable[[Tensor], Tensor],
    beta: float,
    tau: float,
    iters: int,
    eta: float = 1.0,
    objective: Callable[[Tensor], Tensor] | None = None,
    x0: Tensor | None = None,
) -> BIOResult:
    """Eq. (5) for ``F(x) = η/2‖x − d‖² + g(x)`` over ``{A x = ȳ} ∩ X_φ`` on vectors ``(B, n)``
    (``A`` is ``(m, n)``, shared): with ``L_β`` the augmented Lagrangian of §1.6,

        z ← prox_{g/(β+τ)}((β x + τ z − λ₁)/(β+τ))
        s ← Proj_{X_φ}((β x + τ s − λ₂)/(β+τ))
        x ← ((η + 2β + τ) I + β AᵀA)⁻¹ (η d + λ₁ + λ₂ − Aᵀλ₃ + β(z + s) + β Aᵀȳ + τ x)
        λ₁ += β(z − x),  λ₂ += β(s − x),  λ₃ += β(A x − ȳ)

    (z and s are independent given x: a two-block proximal ADMM, Corollary 1.)
    ``prox_g(v, t) = prox_{t g}(v)``; ``project`` is the projection onto ``X_φ = {φ ≤ φ(x̄)}``;
    ``objective`` maps ``x`` to ``F(x)`` per row for the diagnostics (default ``η/2‖x − d‖²``).
    """
    _check_penalties(beta, tau, iters)
    n = A.shape[-1]
    system = (eta + 2 * beta + tau) * torch.eye(n, dtype=A.dtype, device=A.device) + beta * A.T @ A
    chol = torch.linalg.cholesky(system)
    fixed = eta * d + beta * y_bar @ A  # η d + β Aᵀȳ
    x = torch.zeros_like(d) if x0 is None else x0.clone()
    z, s = x.clone(), x.clone()
    lam1, lam2, lam3 = torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(y_bar)
    objective = objective or (lambda v: eta / 2 * (v - d).pow(2).sum(1))
    history = _History(None)
    for _ in range(iters):
        z = prox_g((beta * x + tau * z - lam1) / (beta + tau), 1 / (beta + tau))
        s = project((beta * x + tau * s - lam2) / (beta + tau))
        rhs = fixed + lam1 + lam2 - lam3 @ A + beta * (z + s) + tau * x
        previous, x = x, torch.cholesky_solve(rhs.T, chol).T
        ax = x @ A.T - y_bar
        lam1, lam2, lam3 = lam1 + beta * (z - x), lam2 + beta * (s - x), lam3 + beta * ax
        split = torch.sqrt((z - x).pow(2).sum(1) + (s - x).pow(2).sum(1))
        history.add(x, previous, _norms(ax), split, objective(x))
    return history.result(x)


# -- Algorithms 2 and 3: the lifted TV sublevel set -----------------------------------------------
class _Lift:
    """The slack block of App. B.1 (``s₁, s₂, r, w`` and their multipliers) with its two updates:
    ``(s₁, s₂, r)`` projections onto ℝ₊ from the old ``(w, x)``, then the w-step (Sherman–Morrison;
    the ``∇x`` terms cancel, so ``w`` does not need the new ``x``)."""

    NAMES = ("s1", "s2", "r", "w", "l1", "l2", "lr")  # the state, multipliers included

    def __init__(self, grad_x: Tensor, t_bar: Tensor, beta: float, tau: float, feasible: bool) -> None:
        self.beta, self.tau = beta, tau
        self.t_bar = t_bar.view(-1, 1, 1, 1)
        if feasible:  # w = |∇x|, slacks that satisfy every lifted constraint at x (x̄ when warm)
            self.w = grad_x.abs()
            self.s1, self.s2 = self.w - grad_x, self.w + grad_x
            self.r = (self.t_bar - self.w.flatten(1).sum(1).view(-1, 1, 1, 1)).clamp(min=0)
        else:
            self.w, self.s1, self.s2 = (torch.zeros_like(grad_x) for _ in range(3))
            self.r = torch.zeros_like(self.t_bar)
        self.l1, self.l2 = torch.zeros_like(grad_x), torch.zeros_like(grad_x)
        self.lr = torch.zeros_like(self.t_bar)

    def state(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name) for name in self.NAMES)

    def keep(self, stopping: _Stopping, old: tuple[Tensor, ...]) -> None:
        """Restores ``old`` for the images that had stopped (see :class:`_Stopping`)."""
        for name, value in zip(self.NAMES, old, strict=True):
            setattr(self, name, stopping.keep(getattr(self, name), value))

    def sum_w(self) -> Tensor:
        return self.w.flatten(1).sum(1).view(-1, 1, 1, 1)

    def step(self, grad_x: Tensor) -> None:
        beta, tau = self.beta, self.tau
        self.s1 = ((beta * (self.w - grad_x) - self.l1 + tau * self.s1) / (beta + tau)).clamp(min=0)
        self.s2 = ((beta * (self.w + grad_x) + self.l2 + tau * self.s2) / (beta + tau)).clamp(min=0)
        self.r = ((beta * (self.t_bar - self.sum_w()) - self.lr + tau * self.r) / (beta + tau)).clamp(min=0)
        c = (
            beta * self.s1
            + self.l1
            + beta * self.s2
            - self.l2
            + (beta * (self.t_bar - self.r) - self.lr)
            + tau * self.w
        )
        self.w = sherman_morrison_solve(c, 2 * beta + tau, beta)

    def rhs(self, literal: bool) -> Tensor:
        """The ``∇ᵀ(·)`` argument of ``d^k``."""
        beta = self.beta
        if literal:  # the paper's printed β(s₂ − λ_{s2}) − β(s₁ + λ_{s1})
            return beta * (self.s2 - self.l2) - beta * (self.s1 + self.l1)
        return beta * (self.s2 - self.s1) - (self.l1 + self.l2)

    def dual_step(self, grad_x: Tensor) -> Tensor:
        """The multiplier updates; returns the lifted constraint residual per image."""
        beta = self.beta
        e1, e2 = grad_x + self.s1 - self.w, grad_x - self.s2 + self.w
        e3 = self.sum_w() + self.r - self.t_bar
        self.l1, self.l2, self.lr = self.l1 + beta * e1, self.l2 + beta * e2, self.lr + beta * e3
        return torch.sqrt(e1.pow(2).flatten(1).sum(1) + e2.pow(2).flatten(1).sum(1) + e3.flatten().pow(2))


def _lower_level_point(
    y: Tensor, op: Operator, x_bar: Tensor | None, t_bar: Tensor | float | None
) -> tuple[Tensor, Tensor]:
    """``ȳ = A x̄`` and ``t̄ = ‖∇x̄‖₁`` (corrected), or ``ȳ = y`` with a given ``t̄``."""
    if x_bar is None:
        if t_bar is None:
            raise ConfigError("t_bar", "without x_bar (ȳ = y) the TV level t_bar must be given")
        y_bar = y
    else:
        y_bar = op(x_bar)
    if t_bar is None:
        t_bar = tv_l1(x_bar)
    t_bar = torch.as_tensor(t_bar, dtype=y.real.dtype, device=y.device).expand(y.shape[0]).clone()
    return y_bar, t_bar


def normal_solver(
    op: Operator,
    diagonal: float,
    grad_weight: float,
    op_weight: float,
    like: Tensor,
    cg_tol: float = 1e-12,
    cg_iters: int = 1000,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``(rhs, start) ↦ (op_weight·AᴴA + diagonal·I + grad_weight·∇ᵀ∇)⁻¹ rhs`` on images shaped like
    ``like``: one FFT division when ``AᴴA`` is circulant (periodic ``∇``), else batched CG from
    ``start`` (each image its own steps, stopping at ``cg_tol·‖rhs‖``)."""
    shape = tuple(like.shape[-2:])
    eig = op.normal_fourier(shape, like)
    if eig is not None:
        total = op_weight * eig + diagonal + grad_weight * GRADIENT.normal_fourier(shape, like)
        return lambda rhs, start: fourier_solve(rhs, total)

    def matvec(v: dict[str, Tensor]) -> dict[str, Tensor]:
        x = v["x"]
        out = op_weight * op.adjoint(op(x)) + diagonal * x + grad_weight * GRADIENT.adjoint(GRADIENT(x))
        return {"x": out}

    def solve(rhs: Tensor, start: Tensor) -> Tensor:
        tol = cg_tol * _norms(rhs)
        return linalg.cg(matvec, {"x": rhs}, iters=cg_iters, tol=tol, batched=True, start={"x": start}).solution["x"]

    return solve


def bio_restoration(
    y: Tensor,
    op: Operator,
    d: Tensor,
    x_bar: Tensor | None,
    beta: float,
    tau: float,
    iters: int,
    literal: bool = False,
    t_bar: Tensor | float | None = None,
    truth: Tensor | None = None,
    warm_start: bool = True,
    cg_tol: float | None = None,
    cg_iters: int = 1000,
    tol: Tensor | float = 0.0,
) -> BIOResult:
    """Algorithm 2 (App. B.1): BIO for ``min ½‖x − d‖²`` over the solutions of
    ``min ½‖Kx − y‖² + γ‖∇x‖₁`` (Eq. 11), ``d = D(y)``, with ``ȳ = K x̄`` and ``t̄ = ‖∇x̄‖₁``:

        s₁ ← max{0, (β(w − ∇x) − λ_{s1} + τ s₁)/(β+τ)},  s₂ ← max{0, (β(w + ∇x) + λ_{s2} + τ s₂)/(β+τ)}
        r  ← max{0, (β(t̄ − ⟨e,w⟩) − λ_r + τ r)/(β+τ)}
        w  ← ((2β+τ)I + β eeᵀ)⁻¹ (β s₁ + λ_{s1} + β s₂ − λ_{s2} + (β t̄ − β r − λ_r) e + τ w)
        x  ← (β KᵀK + (1+τ) I + 2β ∇ᵀ∇)⁻¹ (d + β Kᵀȳ + ∇ᵀ(β(s₂ − s₁) − (λ_{s1} + λ_{s2})) − Kᵀλ_x + τ x)
        λ_x += β(Kx − ȳ),  λ_{s1} += β(∇x + s₁ − w),  λ_{s2} += β(∇x − s₂ + w),  λ_r += β(⟨e,w⟩ + r − t̄)

    Args:
        y: the observation ``(B, 1, H, W)`` (it is ``ȳ`` itself when ``x_bar`` is ``None``).
        op: ``K``; the x-solve is one FFT division when ``op.normal_fourier`` exists, else CG.
        d: ``D(y)``, the upper level's target, ``(B, 1, H, W)``.
        x_bar: an (approximate) lower-level solution, e.g. from :func:`apg_tv`.
        beta, tau: the ADMM penalty and the proximal weight (the paper gives no values).
        iters: ADMM iterations.
        literal: use the paper's printed ``d^k`` (diverges for large β; regression tests only).
        t_bar: overrides ``t̄`` (e.g. the printed ``γ‖∇x̄‖₁``, or the level when ``x_bar`` is None).
        truth: the clean images, for the PSNR diagnostics.
        warm_start: start at ``x̄`` with slacks that satisfy the lift (else everything at 0).
        cg_tol, cg_iters: relative tolerance (default ``max(1e-12, 10·eps)`` of the dtype) and cap
            of the CG x-solve (non-circulant ``K``).
        tol: the paper's relative-change stopping rule, per image (a number or one per image):
            an image stops once ``‖x^{k+1} − x^k‖ / ‖x^{k+1}‖ < tol`` and no longer changes;
            ``iters`` caps it (0, the default: exactly ``iters`` iterations).
    """
    _check_penalties(beta, tau, iters)
    if cg_tol is None:
        cg_tol = max(1e-12, 10 * torch.finfo(d.dtype).eps)
    y_bar, t_bar = _lower_level_point(y, op, x_bar, t_bar)
    solve = normal_solver(op, 1 + tau, 2 * beta, beta, d, cg_tol, cg_iters)
    fixed = d + beta * op.adjoint(y_bar)
    x = x_bar.clone() if warm_start and x_bar is not None else torch.zeros_like(d)
    grad_x = GRADIENT(x)
    lift = _Lift(grad_x, t_bar, beta, tau, feasible=warm_start and x_bar is not None)
    lam_x, residual = torch.zeros_like(y_bar), op(x) - y_bar
    constraint = torch.zeros_like(t_bar)
    history, stopping = _History(truth), _Stopping(tol, d)
    for _ in range(iters):
        old = (x, grad_x, residual, lam_x, constraint, lift.state())
        lift.step(grad_x)
        rhs = fixed + GRADIENT.adjoint(lift.rhs(literal)) - op.adjoint(lam_x) + tau * x
        x = solve(rhs, x)
        grad_x, residual = GRADIENT(x), op(x) - y_bar
        lam_x = lam_x + beta * residual
        constraint = lift.dual_step(grad_x)
        if stopping.on:  # the images that stopped keep their state
            x, grad_x, residual, lam_x, constraint = map(stopping.keep, (x, grad_x, residual, lam_x, constraint), old)
            lift.keep(stopping, old[-1])
        running = stopping.update(x, old[0])
        history.add(x, old[0], _norms(residual), constraint, 0.5 * (x - d).pow(2).flatten(1).sum(1))
        if not running:
            break
    return history.result(x, stopping.count())


def bio_csmri(
    y: Tensor,
    op: MaskedFourier,
    d: Tensor,
    x_bar: Tensor | None,
    beta: float,
    tau: float,
    iters: int,
    eta: float = 1.0,
    rho: float = 1e-3,
    transform: Operator | None = None,
    literal: bool = False,
    t_bar: Tensor | float | None = None,
    truth: Tensor | None = None,
    warm_start: bool = True,
    tol: Tensor | float = 0.0,
) -> BIOResult:
    """Algorithm 3 (App. B.2): BIO for CS-MRI, ``min η/2‖x − d‖² + ρ‖Tx‖₁`` over the solutions of
    ``min ½‖PFx − y‖² + γ‖∇x‖₁`` (Eq. 12), ``T`` an orthonormal transform (default DCT), with the
    lift of Algorithm 2 and ``z = Tx``:

        z ← soft_{ρ/(β+τ)}((β T x − λ_z + τ z)/(β+τ));   s₁, s₂, r, w as in Algorithm 2
        x ← (β FᴴPᵀPF + (η+τ) I + 2β ∇ᵀ∇ + β TᵀT)⁻¹ (β FᴴPᵀȳ + η d − FᴴPᵀλ_x
              + ∇ᵀ(β(s₂ − s₁) − (λ_{s1} + λ_{s2})) + β Tᵀz + Tᵀλ_z + τ x)
        λ_x += β(PFx − ȳ),  λ_z += β(z − Tx),  λ_{s1}, λ_{s2}, λ_r as in Algorithm 2

    For real ``x`` the normal operator ``Re FᴴPᵀPF`` is circulant with the k ↔ −k symmetrised mask
    as eigenvalues and ``TᵀT = I``, so the x-step is one FFT division. ``λ_x`` lives in k-space
    (complex; the real inner product ``Re⟨λ_x, ·⟩``). Other arguments, the stopping rule ``tol``
    included, as in :func:`bio_restoration`.
    """
    _check_penalties(beta, tau, iters)
    if not eta > 0:
        raise ConfigError("eta", f"eta must be > 0, got {eta!r}")
    if not rho >= 0:
        raise ConfigError("rho", f"rho must be >= 0, got {rho!r}")
    transform = transform or DCT()
    y_bar, t_bar = _lower_level_point(y, op, x_bar, t_bar)
    solve = normal_solver(op, eta + tau + beta, 2 * beta, beta, d, 0.0, 0)
    fixed = eta * d + beta * op.adjoint(y_bar)
    x = x_bar.clone() if warm_start and x_bar is not None else torch.zeros_like(d)
    grad_x, tx = GRADIENT(x), transform(x)
    lift = _Lift(grad_x, t_bar, beta, tau, feasible=warm_start and x_bar is not None)
    z = tx
    lam_x, lam_z, residual = torch.zeros_like(y_bar), torch.zeros_like(z), op(x) - y_bar
    constraint = torch.zeros_like(t_bar)
    history, stopping = _History(truth), _Stopping(tol, d)
    for _ in range(iters):
        old = (x, z, grad_x, tx, residual, lam_x, lam_z, constraint, lift.state())
        z = soft_threshold((beta * tx - lam_z + tau * z) / (beta + tau), rho / (beta + tau))
        lift.step(grad_x)
        rhs = (
            fixed
            - op.adjoint(lam_x)
            + GRADIENT.adjoint(lift.rhs(literal))
            + transform.adjoint(beta * z + lam_z)
            + tau * x
        )
        x = solve(rhs, x)
        grad_x, tx, residual = GRADIENT(x), transform(x), op(x) - y_bar
        lam_x, lam_z = lam_x + beta * residual, lam_z + beta * (z - tx)
        constraint = torch.sqrt(lift.dual_step(grad_x).pow(2) + (z - tx).pow(2).flatten(1).sum(1))
        if stopping.on:  # the images that stopped keep their state
            new = (x, z, grad_x, tx, residual, lam_x, lam_z, constraint)
            x, z, grad_x, tx, residual, lam_x, lam_z, constraint = map(stopping.keep, new, old)
            lift.keep(stopping, old[-1])
        running = stopping.update(x, old[0])
        objective = eta / 2 * (x - d).pow(2).flatten(1).sum(1) + rho * tx.abs().flatten(1).sum(1)
        history.add(x, old[0], _norms(residual), constraint, objective)
        if not running:
            break
    return history.result(x, stopping.count())


# -- the upper level's D -------------------------------------------------------------------------
def deconv(y: Tensor, op: Operator, alpha: float = 1e-4, toward_observation: bool = True) -> Tensor:
    """The paper's "Deconv" D (§6.1): ``argmin_x ‖Ax − y‖² + α‖x − y‖² = (AᴴA + αI)⁻¹(Aᴴy + αy)``
    by one FFT division (α = 1e-4 in the paper). ``toward_observation=False`` gives plain
    Tikhonov ``(AᴴA + αI)⁻¹Aᴴy`` (also for k-space ``y``, which is no image)."""
    if not alpha > 0:
        raise ConfigError("alpha", f"alpha must be > 0, got {alpha!r}")
    rhs = op.adjoint(y)
    eig = op.normal_fourier(tuple(rhs.shape[-2:]), rhs)
    if eig is None:
        raise ConfigError("op", f"{type(op).__name__} is not circulant: Deconv needs an FFT-diagonal AᴴA")
    if toward_observation:
        rhs = rhs + alpha * y
    return fourier_solve(rhs, eig + alpha)


def zero_filled(y: Tensor, op: Operator) -> Tensor:
    """The zero-filled reconstruction ``Aᴴy`` (CS-MRI: ``FᴴPᵀy``, real part)."""
    return op.adjoint(y)


__all__ = [
    "BIOResult",
    "apg_tv",
    "bio_csmri",
    "bio_generic",
    "bio_restoration",
    "deconv",
    "normal_solver",
    "project_l1_ball",
    "sherman_morrison_solve",
    "soft_threshold",
    "tv_l1",
    "tv_prox",
    "zero_filled",
]
