"""Clean-label poisoning by the Penalty method (Mehra & Hamm 2021, §3.4; ``penalty-and-backdoor.md``
A.10.4, A.11.2) and the feature-collision baseline (Poison Frogs, Shafahi et al. 2018).

Problem (5) with one poison ``u`` per target: the victim trains a logistic classifier ``v`` on fixed
features ``r(·)`` of the clean set ∪ ``{(u, y_base)}``; the attacker wants the target ``x_t``
classified as the base's class, with ``‖u − x_base‖₂ ≤ ε``. The inequality becomes an equality
with a slack ``s`` (§2.2): ``h(u) + s² = 0``, ``h = ‖u − x_base‖² − ε²``, and ``Ψ = ‖·‖²`` puts
``γ/2 (h + s²)²`` into ``f̃`` beside the lower-level penalty ``γ/2 ‖∇_v g‖²`` (Eq. 10).

The outer loop is the framework's :class:`~bilevel_dist.algorithms.Penalty` (Algorithm 1 with its
γ/ε schedule, Adam on both levels as the authors' code). It knows ``‖∇_v g‖²`` only; the constraint
term enters the upper-level loss ``f``, whose weight is the algorithm's current ``γ``, handed to ``f``
through the outer batch each step, so the two penalties grow together as Eq. (10) has it. The
outer variables are ``{"u", "s"}``. Penalty's iterates are only ε_k-feasible (γ stays finite), so
the result is projected onto the ℓ₂ ball at the end (:attr:`PenaltyPoison.violation` says how far
outside it was).

The toy (A.11.2): two Gaussian classes in input space, a fixed random feature map
``r(x) = tanh(Wx + b)``, an ℓ₂-regularised logistic victim trained to optimality (Newton), one
poison per target; the base is the adversarial-class test point nearest the target in features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel_dist import algorithms
from bilevel_dist._checks import positive_float, positive_int, setting
from bilevel_dist.problem import BilevelProblem


@dataclass(frozen=True)
class Toy:
    """Training and test sets (labels 0/1) and the fixed feature map ``r(x) = tanh(x Wᵀ + b)``."""

    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    weight: Tensor
    bias: Tensor
    weight_decay: float

    def features(self, x: Tensor) -> Tensor:
        """``r(x)`` for rows ``x``."""
        return torch.tanh(x @ self.weight.T + self.bias)


def toy(
    seed: int = 0,
    dim: int = 10,
    features: int = 40,
    n_train: int = 40,
    n_test: int = 100,
    separation: float = 3.0,
    weight_decay: float = 1e-2,
    dtype: torch.dtype = torch.float64,
) -> Toy:
    """Classes ``N(±separation/2 · e, I)`` in ``ℝ^dim`` (``e`` a random unit vector), ``n_train`` and
    ``n_test`` points per class, features of width ``features`` with ``W ~ N(0, 1/dim)``."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=g, dtype=dtype)
    mean = 0.5 * separation * direction / direction.norm()

    def sample(n: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(2).repeat_interleave(n)
        return torch.randn(2 * n, dim, generator=g, dtype=dtype) + (2 * y[:, None] - 1) * mean, y

    x, y = sample(n_train)
    x_test, y_test = sample(n_test)
    weight = torch.randn(features, dim, generator=g, dtype=dtype) / dim**0.5
    bias = 0.5 * torch.randn(features, generator=g, dtype=dtype)
    return Toy(x, y, x_test, y_test, weight, bias, weight_decay)


# -- the victim ------------------------------------------------------------------------------------


def _design(phi: Tensor) -> Tensor:
    return torch.cat([phi, torch.ones_like(phi[..., :1])], -1)


def victim_loss(v: Tensor, phi: Tensor, y: Tensor, weight_decay: float) -> Tensor:
    """``g``: mean logistic loss of ``v = (w, b)`` on features ``phi`` plus ``weight_decay/2 ‖w‖²``."""
    logits = _design(phi) @ v
    return F.binary_cross_entropy_with_logits(logits, y.to(v.dtype)) + 0.5 * weight_decay * (v[:-1] ** 2).sum()


def train_victim(phi: Tensor, y: Tensor, weight_decay: float, iters: int = 30) -> Tensor:
    """The victim's exact minimiser ``v*`` by Newton's method (``g`` is strongly convex in ``w``;
    the bias's curvature comes from the data)."""
    a = _design(phi)
    reg = torch.full((a.shape[1],), weight_decay, dtype=a.dtype)
    reg[-1] = 0.0
    v = torch.zeros(a.shape[1], dtype=a.dtype)
    for _ in range(iters):
        p = torch.sigmoid(a @ v)
        grad = a.T @ (p - y.to(a.dtype)) / len(a) + reg * v
        hess = (a.T * (p * (1 - p))) @ a / len(a) + torch.diag(reg) + 1e-12 * torch.eye(len(v), dtype=a.dtype)
        v = v - torch.linalg.solve(hess, grad)
    return v


def retrain_flips(data: Toy, u: Tensor, y_base: int, target: Tensor) -> bool:
    """Success: the victim retrained on the clean set ∪ ``{(u, y_base)}`` gives ``target`` the
    base's class."""
    phi = data.features(torch.cat([data.x, u[None]]))
    y = torch.cat([data.y, torch.tensor([y_base])])
    v = train_victim(phi, y, data.weight_decay)
    return bool(((_design(data.features(target)) @ v > 0).long() == y_base).item())


def choose_base(data: Toy, target: int) -> int:
    """The test point of the other class whose features are nearest the target's (Poison Frogs)."""
    phi = data.features(data.x_test)
    distance = (phi - phi[target]).norm(dim=-1)
    distance[data.y_test == data.y_test[target]] = torch.inf
    return int(distance.argmin())


def project_ball(u: Tensor, centre: Tensor, eps: float) -> Tensor:
    """The ℓ₂ projection of ``u`` onto ``{‖u − centre‖ ≤ ε}``."""
    offset = u - centre
    return centre + offset * torch.clamp(eps / offset.norm().clamp_min(1e-300), max=1.0)


# -- the attacks -----------------------------------------------------------------------------------


@dataclass
class PenaltyPoison:
    """``u`` the poison (feasible), ``violation`` how far ``‖u − x_base‖`` exceeded ε before the
    final projection, ``gamma`` the penalty weight reached, ``steps`` Penalty steps taken."""

    u: Tensor
    violation: float
    gamma: float
    steps: int


def _check(eps: float, steps: int) -> tuple[float, int]:
    return setting("eps", positive_float, eps), setting("steps", positive_int, steps)


def penalty_poison(
    data: Toy,
    target: int,
    base: int,
    eps: float,
    *,
    steps: int = 300,
    inner_steps: int = 1,
    inner_lr: float = 0.05,
    outer_lr: float = 0.1,
    gamma: float = 10.0,
    epsilon: float = 1.0,
    collision: float = 1.0,
    lr_decay: float = 1.1,
) -> PenaltyPoison:
    """Penalty's constrained clean-label poison for test point ``target`` from test point ``base``.

    ``f(u, s, v) = CE(target's logit under v, y_base) + collision·‖r(u) − r(x_t)‖²
    + γ/2 (‖u − x_base‖² − ε² + s²)²`` (the paper's f carries the collision term, A.11.1b),
    ``g(u, v)`` = :func:`victim_loss` on clean ∪ ``{(r(u), y_base)}``; the framework's Penalty
    (``algorithms.get("penalty")``) with Adam on both levels runs ``steps`` steps from ``u = x_base``,
    ``s = ε`` (feasible) and ``v`` the clean victim. Each time the tolerance holds, γ ×1.1,
    its tolerance ×0.9 and both step sizes ÷``lr_decay``: Adam's steps do not shrink with the
    gradient, so without the decay ``u`` keeps oscillating across the constraint's boundary. On the
    toy of ``tests/test_security_poison.py`` γ reached about 40 in 200 steps and ``u`` ended at most
    0.11 outside the ball before the final projection."""
    eps, steps = _check(eps, steps)
    x_base, y_base = data.x_test[base], int(data.y_test[base])
    x_target = data.x_test[target]
    phi_clean = data.features(data.x)
    labels = torch.cat([data.y, torch.tensor([y_base])]).to(data.x.dtype)
    goal = torch.tensor([float(y_base)], dtype=data.x.dtype)
    target_features = data.features(x_target).detach()

    def inner_loss(inner, outer, batch):
        phi = torch.cat([phi_clean, data.features(outer["u"][None])])
        return victim_loss(inner["v"], phi, labels, data.weight_decay)

    def outer_loss(inner, outer, batch):
        logit = _design(data.features(x_target[None])) @ inner["v"]
        constraint = ((outer["u"] - x_base) ** 2).sum() - eps**2 + (outer["s"] ** 2).sum()
        attack = F.binary_cross_entropy_with_logits(logit, goal)
        attack = attack + collision * ((data.features(outer["u"]) - target_features) ** 2).sum()
        return attack + 0.5 * batch["gamma"] * constraint**2

    algorithm = algorithms.get(
        "penalty",
        problem=BilevelProblem(inner_loss, outer_loss),
        inner_lr=inner_lr,
        outer_lr=outer_lr,
        inner_steps=inner_steps,
        gamma=gamma,
        epsilon=epsilon,
        lr_decay=lr_decay,
        inner_optimizer="adam",
        outer_optimizer="adam",
    )
    v0 = train_victim(phi_clean, data.y, data.weight_decay)
    state = algorithm.init({"u": x_base.clone(), "s": torch.full((1,), eps, dtype=x_base.dtype)}, {"v": v0})
    for _ in range(steps):
        # the constraint's weight is Penalty's current γ: handed to f through the outer batch
        state, _ = algorithm.step(state, None, {"gamma": state["gamma"]})
    u = state["outer"]["u"].detach()
    violation = max(float((u - x_base).norm()) - eps, 0.0)
    return PenaltyPoison(project_ball(u, x_base, eps), violation, float(state["gamma"]), steps)


def feature_collision(
    data: Toy, target: int, base: int, eps: float, *, steps: int = 300, lr: float = 0.5, beta: float = 0.1
) -> Tensor:
    """Poison Frogs' Algorithm 1 with an ℓ₂ projection: a forward (gradient) step on
    ``‖r(u) − r(x_t)‖²``, the backward (proximal) step of ``β‖u − x_base‖²``, then the projection
    onto the ε-ball around ``x_base``; from ``u = x_base``."""
    eps, steps = _check(eps, steps)
    x_base, goal = data.x_test[base], data.features(data.x_test[target]).detach()
    u = x_base.clone()
    for _ in range(steps):
        u = u.detach().requires_grad_()
        (grad,) = torch.autograd.grad(((data.features(u) - goal) ** 2).sum(), u)
        u = (u.detach() - lr * grad + lr * beta * x_base) / (1 + lr * beta)
        u = project_ball(u, x_base, eps)
    return u


def minimal_eps(successes: Tensor, grid: Tensor) -> Tensor:
    """Per target (rows of ``successes`` ``(targets, len(grid))``), the smallest ε of ``grid`` that
    succeeds, ``inf`` where none does."""
    masked = torch.where(successes, grid.to(torch.float64), torch.tensor(torch.inf, dtype=torch.float64))
    return masked.min(-1).values


def correct_targets(data: Toy) -> Tensor:
    """The test points the clean victim classifies correctly (candidate targets)."""
    v = train_victim(data.features(data.x), data.y, data.weight_decay)
    return ((_design(data.features(data.x_test)) @ v > 0).long() == data.y_test).nonzero().flatten()
