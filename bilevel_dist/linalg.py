"""Second-order products and linear solvers on trees, built on ``torch.func``.

Hessian-vector products are reverse-over-reverse: the inner gradient is linearised once with
``torch.func.vjp`` and each product is one backward through that graph, the cheapest form on
CPU (forward-over-reverse measured ten times slower, ``reference/baselines.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from bilevel_dist import tree
from bilevel_dist.problem import Loss
from bilevel_dist.tree import Tree

MatVec = Callable[[Tree], Tree]


def loss_grad(loss: Loss, inner: Tree, outer: Tree, batch: Any) -> Tree:
    """``∇_w loss(w, x)`` at ``w = inner``."""
    return grad(loss)(inner, outer, batch)


def loss_grads(loss: Loss, inner: Tree, outer: Tree, batch: Any) -> tuple[Tree, Tree]:
    """``(∇_w loss, ∇_x loss)`` in one backward pass."""
    return grad(loss, argnums=(0, 1))(inner, outer, batch)


@dataclass
class Linearization:
    """The gradient ``∇_w ℓ(w, x)`` at one point, with its derivatives as linear maps.

    ``hvp(v) = ∇²_ww ℓ · v`` and ``mixed(v) = ∇²_xw ℓ · v = ∂/∂x ⟨∇_w ℓ, v⟩``; both come from
    one ``vjp`` of the gradient, so every product after the first costs one backward.
    """

    grad: Tree
    _vjp: Callable[[Tree], tuple[Tree, Tree]]

    def hvp(self, v: Tree) -> Tree:
        """Hessian-vector product ``∇²_ww ℓ · v``."""
        return self._vjp(v)[0]

    def mixed(self, v: Tree) -> Tree:
        """Mixed second-derivative product ``∇²_xw ℓ · v``, shaped like the outer tree."""
        return self._vjp(v)[1]

    def both(self, v: Tree) -> tuple[Tree, Tree]:
        """``(hvp(v), mixed(v))`` in one backward."""
        return self._vjp(v)


def linearize(loss: Loss, inner: Tree, outer: Tree, batch: Any) -> Linearization:
    """Linearises ``∇_w loss`` at ``(inner, outer)`` (see :class:`Linearization`)."""
    g, vjp_fn = vjp(lambda w, x: grad(loss)(w, x, batch), inner, outer)
    return Linearization(g, vjp_fn)


def dense_hessian(hvp: MatVec, like: Tree, batched: bool, chunk_size: int | None = None) -> Tensor:
    """The Hessian as a dense matrix, ``(n, n)`` or ``(B, n, n)`` per problem when batched.

    Built column by column with vmapped Hessian-vector products. In a batched problem the
    Hessian is block diagonal, so one product with ``e_j`` in every block gives column ``j`` of
    every block at once: ``n`` products, not ``B·n``.
    """
    n = tree.numel(like, batched)
    ref = next(iter(like.values()))
    eye = torch.eye(n, dtype=ref.dtype, device=ref.device)
    if batched:
        eye = eye[:, None, :].expand(n, ref.shape[0], n)
    directions = tree.unflatten(eye, like, batched)
    columns = vmap(hvp, chunk_size=chunk_size)(directions)  # (n, [B,] ...)
    flat = torch.cat([c.flatten(2 if batched else 1) for c in columns.values()], dim=-1)
    return flat.movedim(0, -1) if batched else flat.T


@dataclass
class LinearSolve:
    """Result of a linear solve: the solution, its residual norm and the iterations used."""

    solution: Tree
    residual: Tensor
    iterations: int


def cg(
    matvec: MatVec,
    b: Tree,
    *,
    iters: int,
    tol: float | Tensor = 0.0,
    batched: bool = False,
    dot: Callable[[Tree, Tree], Tensor] | None = None,
) -> LinearSolve:
    """Conjugate gradient for ``A v = b`` with ``A`` symmetric positive definite.

    Each problem of a batch has its own step sizes and stops on its own once its residual norm
    falls to ``tol`` (a number, or one per problem); iteration ends when all have. ``dot``
    replaces the inner product (``Comm.dot`` when leaves are sharded across ranks).
    """
    if dot is None:
        dot = partial(tree.dot, batched=batched)
    x = tree.zeros_like(b)
    r = dict(b)
    p = dict(b)
    rr = dot(r, r)
    active = rr.sqrt() > tol
    it = 0
    for it in range(1, iters + 1):
        if not bool(active.any()):
            it -= 1
            break
        ap = matvec(p)
        pap = dot(p, ap)
        alpha = torch.where(active, rr / torch.where(pap == 0, torch.ones_like(pap), pap), torch.zeros_like(rr))
        x = tree.axpy(alpha, p, x, batched)
        r = tree.axpy(-alpha, ap, r, batched)
        rr_new = dot(r, r)
        beta = torch.where(active, rr_new / torch.where(rr == 0, torch.ones_like(rr), rr), torch.zeros_like(rr))
        p = tree.axpy(beta, p, r, batched)
        rr = torch.where(active, rr_new, rr)
        active = active & (rr.sqrt() > tol)
    return LinearSolve(x, rr.sqrt(), it)


def neumann(matvec: MatVec, b: Tree, *, iters: int, alpha: float, batched: bool = False) -> LinearSolve:
    """Truncated Neumann series ``A⁻¹ b ≈ α Σ_{j<iters} (I − α A)^j b``; needs ``α ≤ 1/L``."""
    term = dict(b)
    total = dict(b)
    for _ in range(iters - 1):
        term = tree.axpy(-alpha, matvec(term), term)
        total = tree.add(total, term)
    solution = tree.scale(total, alpha)
    residual = tree.norm(tree.sub(b, matvec(solution)), batched)
    return LinearSolve(solution, residual, iters)


def fixed_point(
    transpose_jacobian: MatVec, b: Tree, *, iters: int, tol: float | Tensor = 0.0, batched: bool = False
) -> LinearSolve:
    """Iterates ``v ← Jᵀ v + b`` to the fixed point ``v = (I − Jᵀ)⁻¹ b``; needs a contraction.

    Stops per problem once ``‖v_{k+1} − v_k‖ ≤ tol``; the returned residual is that step norm.
    """
    v = tree.zeros_like(b)
    step = tree.norm(b, batched)
    active = step > tol
    it = 0
    for it in range(1, iters + 1):
        if not bool(active.any()):
            it -= 1
            break
        new = tree.add(transpose_jacobian(v), b)
        step = torch.where(active, tree.norm(tree.sub(new, v), batched), step)
        v = tree.where(active, new, v, batched)
        active = active & (step > tol)
    return LinearSolve(v, step, it)
