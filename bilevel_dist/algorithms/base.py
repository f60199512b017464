"""The algorithm interface: ``init(outer, inner) -> state``, ``step(state, inner_batch, outer_batch)``.

``state`` is a flat-ish dict of trees, tensors and numbers that ``torch.save`` /
``torch.load(weights_only=True)`` round-trips, so that a resumed run continues bit for bit.
Every oracle goes through the algorithm's :class:`~bilevel_dist.oracles.Oracles`: the problem's
reduction policy over the algorithm's ``Comm``, and a count per kind that each algorithm's
docstring states as its ``Cost`` per step (tested). Metrics are :class:`Metrics`: norms are
computed only when a logger reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from bilevel_dist import tree
from bilevel_dist._checks import ConfigError, positive_float, positive_int, setting, unit_interval
from bilevel_dist.distributed import Comm
from bilevel_dist.metrics import Metrics
from bilevel_dist.oracles import Oracles
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.tree import Tree

State = dict[str, Any]
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


class Algorithm:
    """A stateful bilevel outer loop. Subclasses declare ``hparams``: name -> (default, check)."""

    name: ClassVar[str] = ""
    hparams: ClassVar[dict[str, tuple[Any, Check]]] = {}
    #: what the algorithm takes from the data before its first step, by keyword, with the
    #: stand-in that checks the other settings before the data exists: ``n_inner``/``n_outer``
    #: (sample counts) and ``full_batches`` (one :class:`~bilevel_dist.oracles.Chunks` per level)
    data_needs: ClassVar[dict[str, Any]] = {}
    #: state entries that belong to one lower-level problem instance: reset, not kept, when a
    #: lower level starts afresh every step (:meth:`restart`)
    inner_keys: ClassVar[tuple[str, ...]] = ("inner",)
    #: whether the method's state survives a new lower level every step (no trajectory memory)
    episodic: ClassVar[bool] = True

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
        """One outer iteration; returns the new state and its metrics."""
        raise NotImplementedError

    def restart(self, state: State, inner: Tree) -> State:
        """``state`` with a new lower level ``inner`` (e.g. this step's tasks): the
        :attr:`inner_keys` start afresh, the outer variables and schedules go on."""
        if not self.episodic:
            raise ConfigError(
                "algorithm.name",
                f"{self.name} keeps a trajectory of one lower level: it needs persistent inner variables",
            )
        fresh = self.init({}, inner)  # no outer: its copies and buffers would be dropped
        return {**state, **{k: fresh[k] for k in self.inner_keys if k in fresh}}

    def cost(self, t: int) -> dict[str, int]:
        """Oracle calls of step ``t`` by kind (:class:`~bilevel_dist.oracles.Oracles`), tolerances off."""
        raise NotImplementedError

    def norm(self, t: Tree) -> Callable[[], float]:
        """The Euclidean norm of a (possibly sharded) tree, for metrics: computed when read
        (then a collective where leaves are sharded, on every rank at once)."""
        comm = self.comm
        return lambda: float(comm.norm(t))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.h.items())})"


def _copy(t: Tree) -> Tree:
    return {k: v.detach().clone() for k, v in t.items()}


def descend(x: Tree, direction: Tree, step: float) -> Tree:
    """``x − step · direction``."""
    return tree.axpy(-step, direction, x)


_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8


def adam(state: State, d: Tree, t: int, prefix: str = "outer") -> tuple[State, Tree]:
    """Adam's moments ``state[prefix_m]``, ``state[prefix_s]`` updated with ``d`` (step ``t``,
    from 0) and its bias-corrected direction ``m̂ / (√ŝ + ε)``; elementwise, so per-task and
    sharded variables need no reduction."""
    b1, b2 = _BETAS
    m = {k: b1 * v + (1 - b1) * d[k] for k, v in state[f"{prefix}_m"].items()}
    s = {k: b2 * v + (1 - b2) * d[k] * d[k] for k, v in state[f"{prefix}_s"].items()}
    c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
    direction = {k: (m[k] / c1) / ((s[k] / c2).sqrt() + _ADAM_EPS) for k in m}
    return {**state, f"{prefix}_m": m, f"{prefix}_s": s}, direction


def hypergradient(fx: Tree, jv: Tree) -> Tree:
    """``∇_x f − ∇²_xw g · v`` with ``v ≈ H⁻¹ ∇_w f`` (local pieces: reduce the result once)."""
    return tree.sub(fx, jv)


def zeros(t: Tree) -> Tree:
    """Zeros like ``t``."""
    return tree.zeros_like(t)


__all__ = ["Algorithm", "Metrics", "State"]
