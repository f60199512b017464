"""The algorithm interface: ``init(outer, inner) -> state``, ``step(state, inner_batch, outer_batch)``.

``state`` is a flat-ish dict of trees, tensors and numbers that ``torch.save`` /
``torch.load(weights_only=True)`` round-trips, so that a resumed run continues bit for bit.
Every oracle result computed from a rank's batch goes through the algorithm's ``Comm``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor
from torch.func import vmap

from bilevel_dist import tree
from bilevel_dist._checks import ConfigError, positive_float, positive_int, setting, unit_interval
from bilevel_dist.distributed import Comm
from bilevel_dist.linalg import Linearization, linearize, loss_grad, loss_grads
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.tree import Tree

State = dict[str, Any]
Metrics = dict[str, float]
Check = Callable[[str, Any], Any]


def lr(name: str, value: Any) -> float:
    """A step size: finite and ``> 0``."""
    return positive_float(name, value)


def count(name: str, value: Any) -> int:
    """A number of steps or iterations: an int ``> 0``."""
    return positive_int(name, value)


def fraction(name: str, value: Any) -> float:
    """A momentum, decay exponent or factor in ``[0, 1)``."""
    return unit_interval(name, value)


def nonnegative(name: str, value: Any) -> float:
    """A weight or growth that may be zero (off): finite and ``>= 0``."""
    return positive_float(name, value, allow_zero=True)


def factor(name: str, value: Any) -> float:
    """A multiplicative factor ``> 0``."""
    return positive_float(name, value)


def choice(*options: str) -> Check:
    """A string among ``options``."""

    def check(name: str, value: Any) -> str:
        if value not in options:
            raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
        return value

    return check


def decayed(base: float, t: int, exponent: float) -> float:
    """``base / (t + 1)^exponent``: the usual ``t^-a`` schedule, ``exponent = 0`` keeps it fixed."""
    return base / (t + 1) ** exponent


class Oracles:
    """First- and second-order oracles of a problem on one batch, each reduced across ranks."""

    def __init__(self, problem: BilevelProblem, comm: Comm) -> None:
        self.problem = problem
        self.comm = comm

    def inner_grad(self, w: Tree, x: Tree, batch: Any) -> Tree:
        """``∇_w g`` averaged over ranks."""
        return self.comm.mean(loss_grad(self.problem.inner_loss, w, x, batch))

    def inner_grads(self, w: Tree, x: Tree, batch: Any) -> tuple[Tree, Tree]:
        """``(∇_w g, ∇_x g)`` averaged over ranks."""
        gw, gx = loss_grads(self.problem.inner_loss, w, x, batch)
        return self.comm.mean(gw), self.comm.mean(gx)

    def outer_grads(self, w: Tree, x: Tree, batch: Any) -> tuple[Tree, Tree]:
        """``(∇_w f, ∇_x f)`` averaged over ranks."""
        gw, gx = loss_grads(self.problem.outer_loss, w, x, batch)
        return self.comm.mean(gw), self.comm.mean(gx)

    def linearize(self, w: Tree, x: Tree, batch: Any) -> Linearization:
        """The inner gradient and its second-order products, every output averaged over ranks."""
        lin = linearize(self.problem.inner_loss, w, x, batch)
        comm = self.comm

        def products(v: Tree) -> tuple[Tree, Tree]:
            hv, jv = lin.both(v)
            return comm.mean(hv), comm.mean(jv)

        return Linearization(comm.mean(lin.grad), products)

    def hypergrad_pieces(self, w: Tree, v: Tree, x: Tree, inner_batch: Any, outer_batch: Any) -> tuple[Tree, ...]:
        """At ``(w, v, x)``: ``∇_w g``, ``H v``, ``J v``, ``∇_w f``, ``∇_x f`` — one of each oracle."""
        lin = self.linearize(w, x, inner_batch)
        hv, jv = lin.both(v)
        fw, fx = self.outer_grads(w, x, outer_batch)
        return lin.grad, hv, jv, fw, fx

    def per_sample(self, fn: Callable[[Any], Tree], batch: dict[str, Tensor]) -> Tree:
        """``fn`` on every sample of a dict batch at once (vmapped), stacked on a leading axis."""
        return vmap(lambda one: fn({k: v.unsqueeze(0) for k, v in one.items()}))(batch)


class Algorithm:
    """A stateful bilevel outer loop. Subclasses declare ``hparams``: name -> (default, check)."""

    name: ClassVar[str] = ""
    hparams: ClassVar[dict[str, tuple[Any, Check]]] = {}

    def __init__(self, problem: BilevelProblem, comm: Comm | None = None, **hparams: Any) -> None:
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"problem must be a BilevelProblem, got {type(problem).__name__}")
        unknown = sorted(set(hparams) - set(self.hparams))
        if unknown:
            raise ConfigError(
                unknown[0],
                f"algorithm {self.name!r} has no hyperparameter {unknown[0]!r}; its hyperparameters are "
                f"{sorted(self.hparams)}",
            )
        self.problem = problem
        self.comm = comm or Comm()
        self.oracles = Oracles(problem, self.comm)
        values = {}
        for key, (default, check) in self.hparams.items():
            value = hparams.get(key, default)
            values[key] = value if value is None else setting(key, check, value)
        self.h = values

    def init(self, outer: Tree, inner: Tree) -> State:
        """The starting state: variables (copied), the step counter and algorithm buffers."""
        return {"outer": _copy(outer), "inner": _copy(inner), "t": 0}

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        """One outer iteration; returns the new state and metrics (floats)."""
        raise NotImplementedError

    def norm(self, t: Tree) -> float:
        """The Euclidean norm of a (possibly sharded) tree, as a float for metrics."""
        return float(self.comm.norm(t))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.h.items())})"


def _copy(t: Tree) -> Tree:
    return {k: v.detach().clone() for k, v in t.items()}


def descend(x: Tree, direction: Tree, step: float) -> Tree:
    """``x − step · direction``."""
    return tree.axpy(-step, direction, x)


def hypergradient(fx: Tree, jv: Tree) -> Tree:
    """``∇_x f − ∇²_xw g · v`` with ``v ≈ H⁻¹ ∇_w f``."""
    return tree.sub(fx, jv)


def zeros(t: Tree) -> Tree:
    """Zeros like ``t``."""
    return tree.zeros_like(t)


__all__ = ["Algorithm", "Metrics", "Oracles", "State"]
