"""Hypergradient estimators, one signature, reachable by name.

=============== ===================================================== =========================
name            estimator                                             family
=============== ===================================================== =========================
``reverse``     :class:`Reverse` — backprop through all steps         unrolled
``truncated``   :class:`Truncated` ``(k)`` — through the last k steps unrolled
``forward``     :class:`Forward` — forward-mode tangents              unrolled
``cg``          :class:`CG` ``(iters, tol)``                          implicit
``neumann``     :class:`Neumann` ``(iters, alpha)``                   implicit
``gradient_descent`` :class:`GradientDescent` ``(iters)``, warm start implicit
``fixed_point`` :class:`FixedPoint` ``(iters, tol)``                  implicit
``exact``       :class:`Exact` — dense solve, an oracle               implicit
``finite_diff`` :class:`FiniteDiff` ``(eps)`` — DARTS                 finite difference
``penalty``     :class:`PenaltyGradient` ``(gamma)`` — Mehra & Hamm   penalty
=============== ===================================================== =========================
"""

from __future__ import annotations

import inspect
from typing import Any

from bilevel_dist.hypergrad.base import Estimator, Solution
from bilevel_dist.hypergrad.finite_diff import FiniteDiff
from bilevel_dist.hypergrad.implicit import CG, Exact, FixedPoint, GradientDescent, Implicit, Neumann
from bilevel_dist.hypergrad.penalty import PenaltyGradient
from bilevel_dist.hypergrad.unrolled import Forward, Reverse, Truncated

REGISTRY: dict[str, type[Estimator]] = {
    cls.name: cls
    for cls in (
        Reverse,
        Truncated,
        Forward,
        CG,
        Neumann,
        GradientDescent,
        FixedPoint,
        Exact,
        FiniteDiff,
        PenaltyGradient,
    )
}


def get(name: str, **options: Any) -> Estimator:
    """The estimator registered as ``name``, built with ``options`` (e.g. ``get("cg", iters=20)``)."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown hypergradient estimator {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"estimator {name!r} has no option {unknown[0]!r}; its options are {sorted(accepted)}")
    return cls(**options)


__all__ = [
    "CG",
    "REGISTRY",
    "Estimator",
    "Exact",
    "FiniteDiff",
    "FixedPoint",
    "Forward",
    "Implicit",
    "GradientDescent",
    "Neumann",
    "PenaltyGradient",
    "Reverse",
    "Solution",
    "Truncated",
    "get",
]
