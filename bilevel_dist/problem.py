"""The bilevel problem: two losses over an outer and an inner tree of tensors."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel_dist.tree import Tree

Loss = Callable[[Tree, Tree, Any], Tensor]


@dataclass(frozen=True)
class BilevelProblem:
    """``min_x f(x, w*(x))`` subject to ``w*(x) = argmin_w g(x, w)``.

    Args:
        inner_loss: ``g(inner, outer, batch) -> scalar``, the lower-level objective.
        outer_loss: ``f(inner, outer, batch) -> scalar``, the upper-level objective.
        batched: every inner tensor carries a leading axis of independent lower-level problems
            (one per sample, task, client or image) and ``inner_loss`` is the sum of their losses.
            Solvers then stop per problem and linear solves run per problem, all vectorised.
    """

    inner_loss: Loss
    outer_loss: Loss
    batched: bool = False

    def __post_init__(self) -> None:
        for name in ("inner_loss", "outer_loss"):
            if not callable(getattr(self, name)):
                raise TypeError(f"BilevelProblem.{name} must be callable (inner, outer, batch) -> scalar tensor")


def check_tree(tree: Any, name: str) -> None:
    """Raises if ``tree`` is not a non-empty dict of finite floating-point tensors."""
    if not isinstance(tree, dict) or not tree:
        raise TypeError(f"{name} must be a non-empty dict[str, Tensor], got {type(tree).__name__}")
    for key, value in tree.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be strings, got {key!r}")
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name}[{key!r}] must be floating point, got {value.dtype}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}[{key!r}] contains non-finite values (nan or inf)")


def check_batched(inner: Tree) -> int:
    """Returns the number of independent problems, checking every inner tensor agrees on it."""
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in inner.items()}
    first_key, first = next(iter(sizes.items()))
    for key, size in sizes.items():
        if size is None:
            raise ValueError(f"batched problem: inner[{key!r}] is 0-d, it needs a leading problem axis")
        if size != first:
            raise ValueError(
                f"batched problem: mismatched shapes, inner[{key!r}] has leading size {size} "
                f"but inner[{first_key!r}] has {first}"
            )
    return int(first)  # type: ignore[arg-type]


def _evaluate(loss: Loss, name: str, inner: Tree, outer: Tree, batch: Any) -> Tensor:
    try:
        value = loss(inner, outer, batch)
    except (RuntimeError, IndexError) as error:
        raise ValueError(f"{name} failed on the given variables (mismatched shapes?): {error}") from error
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must return a tensor, got {type(value).__name__}")
    if value.numel() != 1 or value.ndim > 1:
        raise ValueError(f"{name} must return a scalar tensor, got shape {tuple(value.shape)}")
    if not math.isfinite(float(value.detach())):
        raise ValueError(f"{name} is not finite at the given variables: {float(value.detach())}")
    return value


def check_problem(problem: BilevelProblem, outer: Tree, inner: Tree, inner_batch: Any, outer_batch: Any) -> None:
    """Validates the variables and evaluates both losses once, before any long computation.

    Checks types, finiteness, batched leading axes, that each loss returns a finite scalar, and
    that both losses depend on the inner variables.
    """
    if not isinstance(problem, BilevelProblem):
        raise TypeError(f"problem must be a BilevelProblem, got {type(problem).__name__}")
    check_tree(outer, "outer")
    check_tree(inner, "inner")
    if problem.batched:
        check_batched(inner)
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_() for k, v in inner.items()}
        params = {k: v.detach() for k, v in outer.items()}
        for loss, name, batch in (
            (problem.inner_loss, "inner_loss", inner_batch),
            (problem.outer_loss, "outer_loss", outer_batch),
        ):
            value = _evaluate(loss, name, leaves, params, batch)
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True) if value.requires_grad else ()
            if all(g is None for g in grads):
                raise ValueError(f"{name} does not depend on the inner variables {sorted(inner)}")
