"""Second-order products and linear solvers on trees.

Hessian-vector products are reverse-over-reverse: the inner gradient is linearised once and each
product is one backward through that graph, the cheapest form on CPU (forward-over-reverse
measured ten times slower, ``reference/baselines.md``). Where nothing carries a graph, outside
``torch.func`` transforms, the graph is plain autograd's (a third of ``torch.func.vjp``'s cost
on small models, ``benchmarks/overhead.py``); inside transforms it is ``torch.func``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from bilevel_dist import _autograd as autograd
from bilevel_dist import tree
from bilevel_dist.problem import Loss
from bilevel_dist.tree import Tree

MatVec = Callable[[Tree], Tree]


def loss_grad(loss: Loss, inner: Tree, outer: Tree, batch: Any) -> Tree:
    """``∇_w loss(w, x)`` at ``w = inner``, differentiable in whatever ``inner`` and ``outer``
    carry a graph of (unrolled solves). Outside ``torch.func`` transforms by ``autograd.grad``:
    ``torch.func.grad`` would wrap every op of the loss in one more transform level, about 1.6×
    the time of a small network's gradient."""
    if torch._C._functorch.peek_interpreter_stack() is not None:  # inside vmap/jvp/grad
        return grad(loss)(inner, outer, batch)
    tracked = any(v.requires_grad for v in inner.values()) or any(v.requires_grad for v in outer.values())
    leaves = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in inner.items()}
    if torch.is_grad_enabled():
        value = loss(leaves, outer, batch)
    else:
        with torch.enable_grad():
            value = loss(leaves, outer, batch)
    grads = autograd.grad((value,), leaves.values(), create_graph=tracked)
    return _filled(leaves, grads)


def loss_grads(loss: Loss, inner: Tree, outer: Tree, batch: Any) -> tuple[Tree, Tree]:
    """``(∇_w loss, ∇_x loss)`` in one backward pass (by ``autograd.grad`` where nothing carries
    a graph, as :func:`loss_grad`)."""
    if not _plain(inner, outer):
        return grad(loss, argnums=(0, 1))(inner, outer, batch)
    with torch.enable_grad():
        w, x = _leaves(inner), _leaves(outer)
        value = loss(w, x, batch)
        grads = autograd.grad((value,), [*w.values(), *x.values()])
    return _filled(w, grads[: len(w)]), _filled(x, grads[len(w) :])


def _plain(*trees: Tree) -> bool:
    """Whether plain autograd can differentiate here: outside ``torch.func`` transforms, and no
    leaf carries a graph that the result would have to extend."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return not any(v.requires_grad for t in trees for v in t.values())


def _leaves(t: Tree) -> Tree:
    """Detached copies of ``t``'s floating-point tensors that require grad (integers as they are)."""
    return {k: v.detach().requires_grad_() if v.is_floating_point() else v for k, v in t.items()}


def _filled(like: Tree, grads: Any) -> Tree:
    """``autograd.grad``'s results as a tree, zeros where a leaf was unused."""
    if all(g is not None for g in grads):
        return dict(zip(like, grads, strict=True))
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(like.items(), grads, strict=True)}


class Linearization:
    """The gradient ``∇_w ℓ(w, x)`` at one point, with its derivatives as linear maps.

    ``hvp(v) = ∇²_ww ℓ · v`` is one backward of a vjp over ``w`` alone, so a run of products (CG,
    Neumann) never back-propagates into ``x``. ``mixed(v) = ∇²_xw ℓ · v = ∂/∂x ⟨∇_w ℓ, v⟩`` is
    linearised over ``x`` when first asked for. With ``joint=True`` one vjp over ``(w, x)`` gives
    both products of the same ``v`` in one backward (:meth:`both`: single-loop methods).
    """

    def __init__(self, loss: Loss, inner: Tree, outer: Tree, batch: Any, joint: bool = False) -> None:
        self._loss, self._inner, self._outer, self._batch = loss, inner, outer, batch
        if joint:
            self.grad, self._joint = vjp(lambda w, x: grad(loss)(w, x, batch), inner, outer)
            self._over_w = None
        else:
            self.grad, self._over_w = vjp(lambda w: grad(loss)(w, outer, batch), inner)
            self._joint = None
        self._over_x: Callable[[Tree], tuple[Tree]] | None = None

    def hvp(self, v: Tree) -> Tree:
        """Hessian-vector product ``∇²_ww ℓ · v``."""
        if self._over_w is not None:
            return self._over_w(v)[0]
        return self._joint(v)[0]  # type: ignore[misc]

    def mixed(self, v: Tree) -> Tree:
        """Mixed second-derivative product ``∇²_xw ℓ · v``, shaped like the outer tree."""
        if self._joint is not None:
            return self._joint(v)[1]
        if self._over_x is None:
            loss, inner, batch = self._loss, self._inner, self._batch
            self._over_x = vjp(lambda x: grad(loss)(inner, x, batch), self._outer)[1]
        return self._over_x(v)[0]

    def both(self, v: Tree) -> tuple[Tree, Tree]:
        """``(hvp(v), mixed(v))``, in one backward when linearised jointly."""
        if self._joint is not None:
            return self._joint(v)
        return self.hvp(v), self.mixed(v)


class AutogradLinearization:
    """:class:`Linearization`'s interface on one autograd graph of ``∇_w ℓ`` over ``(w, x)``
    (double backward), for points that carry no graph outside ``torch.func`` transforms: about
    a third of the ``torch.func`` form's cost for a small model. A product asks autograd for the
    inputs it needs only, so ``hvp`` never runs the branch into ``x``."""

    def __init__(self, loss: Loss, inner: Tree, outer: Tree, batch: Any, mixed: bool = True) -> None:
        with torch.enable_grad():
            # without mixed products the graph leaves x out: every product is then cheaper
            self._w, self._x = _leaves(inner), _leaves(outer) if mixed else outer
            value = loss(self._w, self._x, batch)
            grads = autograd.grad((value,), self._w.values(), create_graph=True)
        self.grad = {k: v.detach() for k, v in _filled(self._w, grads).items()}
        graph = [(k, g) for k, g in zip(self._w, grads, strict=True) if g is not None and g.requires_grad]
        self._keys, self._outputs = [k for k, _ in graph], [g for _, g in graph]
        self._inputs = {"w": list(self._w.values()), "x": list(self._x.values())}
        self._inputs["both"] = self._inputs["w"] + self._inputs["x"]
        self._wanted = {name: [i for i, t in enumerate(ts) if t.requires_grad] for name, ts in self._inputs.items()}
        self._mixed = mixed

    def _products(self, v: Tree, which: str) -> list[Tensor]:
        """``∂/∂input ⟨∇_w ℓ, v⟩`` for the inputs ``which`` names (zeros where one does not enter)."""
        if which != "w" and not self._mixed:
            raise RuntimeError("this linearisation was made with mixed=False: it has no mixed products")
        inputs, wanted = self._inputs[which], self._wanted[which]
        if not self._outputs or not wanted:
            return [torch.zeros_like(t) for t in inputs]
        found = autograd.grad(self._outputs, [inputs[i] for i in wanted], [v[k] for k in self._keys], retain_graph=True)
        if len(wanted) == len(inputs) and all(g is not None for g in found):
            return list(found)
        out: list[Tensor | None] = [None] * len(inputs)
        for i, g in zip(wanted, found, strict=True):
            out[i] = g
        return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, out, strict=True)]

    def hvp(self, v: Tree) -> Tree:
        """Hessian-vector product ``∇²_ww ℓ · v``."""
        return dict(zip(self._w, self._products(v, "w"), strict=True))

    def mixed(self, v: Tree) -> Tree:
        """Mixed second-derivative product ``∇²_xw ℓ · v``, shaped like the outer tree."""
        return dict(zip(self._x, self._products(v, "x"), strict=True))

    def both(self, v: Tree) -> tuple[Tree, Tree]:
        """``(hvp(v), mixed(v))`` in one backward."""
        products = self._products(v, "both")
        n = len(self._w)
        return dict(zip(self._w, products[:n], strict=True)), dict(zip(self._x, products[n:], strict=True))


def linearize(
    loss: Loss, inner: Tree, outer: Tree, batch: Any, joint: bool = False, mixed: bool = True
) -> Linearization | AutogradLinearization:
    """Linearises ``∇_w loss`` at ``(inner, outer)`` (see :class:`Linearization`): by plain
    autograd where nothing carries a graph outside ``torch.func`` transforms
    (:class:`AutogradLinearization`), else by ``torch.func``. ``mixed=False`` promises that
    no mixed product will be asked for (Hessian-vector products only)."""
    if _plain(inner, outer):
        return AutogradLinearization(loss, inner, outer, batch, mixed)
    return Linearization(loss, inner, outer, batch, joint)


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
    """Result of a linear solve: the solution, its residual norm (``None`` when it would cost a
    product of its own and was not asked for) and the iterations used."""

    solution: Tree
    residual: Tensor | None
    iterations: int


Dot = Callable[[Tree, Tree], Tensor]


def _dot(dot: Dot | None, batched: bool) -> Dot:
    return dot if dot is not None else partial(tree.dot, batched=batched)


def _residual(matvec: MatVec, b: Tree, v: Tree, dot: Dot) -> Tensor:
    """``‖b − A v‖``: one product more than the solve."""
    left = tree.sub(b, matvec(v))
    return dot(left, left).sqrt()


def cg(
    matvec: MatVec,
    b: Tree,
    *,
    iters: int,
    tol: float | Tensor = 0.0,
    batched: bool = False,
    dot: Dot | None = None,
    start: Tree | None = None,
) -> LinearSolve:
    """Conjugate gradient for ``A v = b`` with ``A`` symmetric positive definite, from ``start``
    (default 0).

    Each problem of a batch has its own step sizes and stops on its own once its residual norm
    falls to ``tol`` (a number, or one per problem); iteration ends when all have. ``dot``
    replaces the inner product: a reduction over ranks for a shared system (every rank then
    takes the same early exit), a per-problem local one for independent problems.
    """
    dot = _dot(dot, batched)
    if start is None:
        x, r = tree.zeros_like(b), dict(b)
    else:
        x, r = dict(start), tree.sub(b, matvec(start))
    p = dict(r)
    rr = dot(r, r)
    if rr.ndim == 0 and not (isinstance(tol, Tensor) and tol.ndim):
        return cg_one_system(matvec, x, r, p, rr, iters, float(tol), dot)
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


def host_reads_stall(t: Tensor) -> bool:
    """Whether reading ``t`` on the host waits for a device queue (a GPU), rather than costing a
    few nanoseconds (a CPU)."""
    return t.device.type != "cpu"


def cg_one_system(
    matvec: MatVec, x: Tree, r: Tree, p: Tree, rr: Tensor, iters: int, tol: float | None, dot: Dot
) -> LinearSolve:
    """CG on one system from ``(x, r, p, ‖r‖²)``: the exit is decided on a number (one host read
    of ``‖r‖²`` per iteration, as the batched form's ``any()`` takes), so no masks are computed.
    ``r = 0`` exits before ``p = 0`` could divide by zero; an indefinite ``A`` may give NaN
    (``solve`` then names it). ``tol=None``: exactly ``iters`` iterations, no host read (the
    compiled path traces it). On a GPU ``tol=0`` is taken as ``None`` with guarded divisions
    (a solved system stays solved): a host read per iteration would stall the stream."""
    guarded = tol == 0 and host_reads_stall(rr)
    if guarded:
        tol = None
    it = 0
    for it in range(1, iters + 1):
        if tol is not None and float(rr) ** 0.5 <= tol:
            it -= 1
            break
        ap = matvec(p)
        pap = dot(p, ap)
        alpha = torch.where(pap == 0, 0.0, rr / pap) if guarded else rr / pap
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_new = dot(r, r)
        beta = torch.where(rr == 0, 0.0, rr_new / rr) if guarded else rr_new / rr
        p = {k: r[k] + beta * p[k] for k in r}
        rr = rr_new
    return LinearSolve(x, rr.sqrt(), it)


def neumann(
    matvec: MatVec,
    b: Tree,
    *,
    iters: int,
    alpha: float,
    batched: bool = False,
    weights: list[float] | None = None,
    dot: Dot | None = None,
    residual: bool = False,
) -> LinearSolve:
    """Truncated Neumann series ``A⁻¹ b ≈ α Σ_{j<iters} c_j (I − α A)^j b``; needs ``α ≤ 1/L``.

    ``weights`` are the ``c_j`` (default 1: the plain series; a random truncation such as BSA's
    weighs the terms it drew). ``iters − 1`` products; ``residual=True`` adds one for ``‖b − A v‖``.
    """
    weights = [1.0] * iters if weights is None else weights
    term = dict(b)
    total = tree.scale(b, weights[0])
    for j in range(1, len(weights)):
        term = tree.axpy(-alpha, matvec(term), term)
        if weights[j]:
            total = tree.axpy(weights[j], term, total)
    solution = tree.scale(total, alpha)
    norm = _residual(matvec, b, solution, _dot(dot, batched)) if residual else None
    return LinearSolve(solution, norm, len(weights))


def gradient_descent(
    matvec: MatVec,
    b: Tree,
    *,
    iters: int,
    lr: float,
    start: Tree | None = None,
    batched: bool = False,
    dot: Dot | None = None,
    residual: bool = False,
) -> LinearSolve:
    """``iters`` gradient steps ``v ← v − lr (A v − b)`` on ``½ vᵀAv − vᵀb`` from ``start``
    (a warm start, as AmIGO keeps ``v`` across outer steps); ``residual=True`` adds one product."""
    v = tree.zeros_like(b) if start is None else start
    for _ in range(iters):
        v = tree.axpy(-lr, tree.sub(matvec(v), b), v)
    norm = _residual(matvec, b, v, _dot(dot, batched)) if residual else None
    return LinearSolve(v, norm, iters)


def fixed_point(
    transpose_jacobian: MatVec,
    b: Tree,
    *,
    iters: int,
    tol: float | Tensor = 0.0,
    batched: bool = False,
    dot: Dot | None = None,
) -> LinearSolve:
    """Iterates ``v ← Jᵀ v + b`` to the fixed point ``v = (I − Jᵀ)⁻¹ b``; needs a contraction.

    Stops per problem once ``‖v_{k+1} − v_k‖ ≤ tol``; the returned residual is that step norm.
    """
    dot = _dot(dot, batched)
    v = tree.zeros_like(b)
    step = dot(b, b).sqrt()
    active = step > tol
    it = 0
    for it in range(1, iters + 1):
        if not bool(active.any()):
            it -= 1
            break
        new = tree.add(transpose_jacobian(v), b)
        change = tree.sub(new, v)
        step = torch.where(active, dot(change, change).sqrt(), step)
        v = tree.where(active, new, v, batched)
        active = active & (step > tol)
    return LinearSolve(v, step, it)
