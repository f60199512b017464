"""The oracles of a bilevel problem under its reduction policy, counted.

**Reduction policy.** A *shared* lower level (``BilevelProblem(batched=False)``: one model
trained on every rank's data) averages each inner oracle across ranks — ``∇_w g``, ``∇²_ww g·v``
and ``∇_w f`` — so every rank solves the same system and takes the same early exits (they are
decided from reduced values). *Independent* lower levels (``batched=True``: one row per task,
client or image, each rank holding its own rows) make no collective at all: inner gradients,
products, dot products and norms are per problem and local, and an early exit may differ across
ranks because nothing inside a loop communicates. Under both, outer-gradient pieces (``∇_x f``,
``∇²_xw g·v``, ``∇_x g``) stay local until :meth:`Oracles.outer_gradient` reduces them once.

**Loss conventions.** Shared: each rank's losses are means over its batch and the global
objectives are the means over ranks (equal batches per rank), so reductions are means and a leaf
sharded by rows (per-sample weights) is scaled by ``1/W`` (:meth:`Comm.mean`). Independent:
``inner_loss`` and ``outer_loss`` are each the *sum* over the rank's problems and the global
objectives are the sums over ranks, so ``∇_{w_i}`` is problem ``i``'s own gradient whatever the
number of problems or ranks (no scaling of sharded rows, no collective), and the outer gradient
is the sum over ranks (:meth:`Comm.sum`). A mean over all problems is a sum divided by their
global count, a constant the loss can hold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.func import vmap

from bilevel_dist import tree
from bilevel_dist.distributed import Comm
from bilevel_dist.linalg import Linearization, linearize, loss_grad, loss_grads
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.tree import Tree


class Chunks(list):
    """One batch in pieces: ``[(batch, weight), ...]`` whose weighted sum of oracle results is the
    whole batch's (weight: the chunk's share of the samples, for losses that are means). A full
    pass (SRBA's and VRBO's refresh) goes through the oracles as one call, reduced once: a
    gradient holds one chunk's graph at a time, a linearisation keeps each chunk's."""


class Oracles:
    """First- and second-order oracles of ``problem`` on one batch, reduced as its lower level's
    policy says (module docstring), with a count of each kind in :attr:`calls`.

    Kinds counted: ``inner_grad`` (``∇_w g``, or ``(∇_w g, ∇_x g)``), ``linearize`` (``∇_w g``
    with its graph kept for products), ``hvp``, ``mixed``, ``outer_grad`` (``(∇_w f, ∇_x f)``).
    """

    def __init__(self, problem: BilevelProblem, comm: Comm | None = None) -> None:
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"problem must be a BilevelProblem, got {type(problem).__name__}")
        self.problem = problem
        self.comm = comm or Comm()
        self.batched = problem.batched
        self.calls: Counter[str] = Counter()

    @classmethod
    def of(cls, problem: BilevelProblem | Oracles) -> Oracles:
        """``problem``'s oracles (itself when it already is one: its counts and ``Comm`` go on);
        a bare problem is evaluated on this process alone."""
        return problem if isinstance(problem, Oracles) else cls(problem, Comm(local=True))

    # -- reductions --------------------------------------------------------------------------
    def reduce_inner(self, t: Tree) -> Tree:
        """An inner-level quantity made global: averaged over ranks for a shared level, as is
        (per problem, local) for independent ones."""
        return t if self.batched or not self.comm.active else self.comm.mean(t)

    def outer_gradient(self, t: Tree) -> Tree:
        """The one reduction of an outer step: local outer-gradient pieces made global (the mean
        over ranks for a shared level, the sum for independent ones)."""
        return self.comm.sum(t) if self.batched else self.comm.mean(t)

    def dot(self, a: Tree, b: Tree) -> Tensor:
        """``⟨a, b⟩`` of two inner trees: global (one value) for a shared level, per problem and
        local (``(B,)``) for independent ones."""
        return tree.dot(a, b, batched=True) if self.batched else self.comm.dot(a, b)

    def norm(self, a: Tree) -> Tensor:
        """``‖a‖`` as :meth:`dot` measures it."""
        return self.dot(a, a).sqrt()

    def total_dot(self, a: Tree, b: Tree) -> Tensor:
        """``⟨a, b⟩`` of two inner trees over every problem on every rank: one value, the same on
        all ranks, for decisions such as a schedule's test. Independent levels hold their rows
        locally (sharded by ``per_sample`` or drawn per step), so the local sum is summed over
        ranks (one all-reduce)."""
        if not self.batched:
            return self.comm.dot(a, b)
        local = tree.dot(a, b)
        return self.comm.sum({"total": local.reshape(1)})["total"][0]

    # -- oracles -----------------------------------------------------------------------------
    def inner_grad(self, w: Tree, x: Tree, batch: Any) -> Tree:
        """``∇_w g``, reduced by the policy."""
        self.calls["inner_grad"] += 1
        if isinstance(batch, Chunks):
            return self.reduce_inner(_chunked(lambda b: loss_grad(self.problem.inner_loss, w, x, b), batch))
        return self.reduce_inner(loss_grad(self.problem.inner_loss, w, x, batch))

    def inner_grads(self, w: Tree, x: Tree, batch: Any) -> tuple[Tree, Tree]:
        """``(∇_w g, ∇_x g)``: the first reduced by the policy, the second local (an outer piece)."""
        self.calls["inner_grad"] += 1
        gw, gx = _chunked(lambda b: loss_grads(self.problem.inner_loss, w, x, b), batch)
        return self.reduce_inner(gw), gx

    def outer_grads(self, w: Tree, x: Tree, batch: Any) -> tuple[Tree, Tree]:
        """``(∇_w f, ∇_x f)``: the first reduced by the policy, the second local."""
        self.calls["outer_grad"] += 1
        fw, fx = _chunked(lambda b: loss_grads(self.problem.outer_loss, w, x, b), batch)
        return self.reduce_inner(fw), fx

    def linearize(self, w: Tree, x: Tree, batch: Any, joint: bool = False, mixed: bool = True) -> _Reduced:
        """``∇_w g`` at ``(w, x)`` with its products: gradient and Hessian-vector products reduced
        by the policy, mixed products local (outer pieces). ``joint``, ``mixed``: see
        :func:`~bilevel_dist.linalg.linearize`.
        On :class:`Chunks` every product is the weighted sum over the chunks' linearisations."""
        self.calls["linearize"] += 1
        loss = self.problem.inner_loss
        if isinstance(batch, Chunks):
            lin: Any = _Sum([(weight, linearize(loss, w, x, b, joint, mixed)) for b, weight in batch])
        else:
            lin = linearize(loss, w, x, batch, joint, mixed)
        return _Reduced(lin, self)

    def per_sample(self, fn: Callable[[Any], Tree], batch: dict[str, Tensor]) -> Tree:
        """``fn`` on every sample of a dict batch at once (vmapped), stacked on a leading axis."""
        return vmap(lambda one: fn({k: v.unsqueeze(0) for k, v in one.items()}))(batch)

    def __repr__(self) -> str:
        policy = "independent" if self.batched else "shared"
        return f"Oracles({policy}, {self.comm!r})"


class _Reduced:
    """A :class:`Linearization` whose gradient and products go through the oracles' policy."""

    def __init__(self, lin: Any, oracles: Oracles) -> None:
        self._lin, self._oracles = lin, oracles
        self.grad = oracles.reduce_inner(lin.grad)

    def hvp(self, v: Tree) -> Tree:
        self._oracles.calls["hvp"] += 1
        return self._oracles.reduce_inner(self._lin.hvp(v))

    def mixed(self, v: Tree) -> Tree:
        self._oracles.calls["mixed"] += 1
        return self._lin.mixed(v)

    def both(self, v: Tree) -> tuple[Tree, Tree]:
        self._oracles.calls["hvp"] += 1
        self._oracles.calls["mixed"] += 1
        hv, jv = self._lin.both(v)
        return self._oracles.reduce_inner(hv), jv


def _weighted_sum(parts: list[tuple[float, Any]]) -> Any:
    """``Σ weight · part`` over trees or tuples of trees."""
    first = parts[0][1]
    if isinstance(first, tuple):
        return tuple(_weighted_sum([(w, p[i]) for w, p in parts]) for i in range(len(first)))
    total = tree.scale(first, parts[0][0])
    for weight, part in parts[1:]:
        total = tree.axpy(weight, part, total)
    return total


def _chunked(fn: Callable[[Any], Any], batch: Any) -> Any:
    """``fn(batch)``, or its weighted sum over :class:`Chunks`, one chunk at a time."""
    if isinstance(batch, Chunks):
        return _weighted_sum([(weight, fn(b)) for b, weight in batch])
    return fn(batch)


class _Sum:
    """The weighted sum of the linearisations of a batch's chunks."""

    def __init__(self, parts: list[tuple[float, Linearization]]) -> None:
        self.parts = parts
        self.grad = _weighted_sum([(w, lin.grad) for w, lin in parts])

    def hvp(self, v: Tree) -> Tree:
        return _weighted_sum([(w, lin.hvp(v)) for w, lin in self.parts])

    def mixed(self, v: Tree) -> Tree:
        return _weighted_sum([(w, lin.mixed(v)) for w, lin in self.parts])

    def both(self, v: Tree) -> tuple[Tree, Tree]:
        return _weighted_sum([(w, lin.both(v)) for w, lin in self.parts])
