"""``Metrics``: step diagnostics that are computed only when read.

A norm may need a collective (a sharded tree) and turning a tensor into a float waits for the
device, so an algorithm hands back zero-argument callables and tensors; the engine reads them on
logging steps only, on every rank at once, and everything else is dropped unevaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import Tensor


class Metrics(Mapping[str, Any]):
    """A read-only mapping whose values may be deferred: a callable is evaluated on first read
    (and kept), so ``float(metrics["hypergrad_norm"])`` works as on a dict."""

    def __init__(self, values: Mapping[str, Any] | None = None, *, direction: Any = None, **more: Any) -> None:
        self._values: dict[str, Any] = {**(values._values if isinstance(values, Metrics) else values or {}), **more}
        #: the outer direction the step used (its hypergradient estimate, reduced over ranks, shaped
        #: like the outer tree): not a logged value, what a monitor compares with a reference
        self.direction = direction if direction is not None or not isinstance(values, Metrics) else values.direction

    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        if callable(value):
            value = self._values[key] = value()
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __or__(self, other: Mapping[str, Any]) -> Metrics:
        more = other._values if isinstance(other, Metrics) else other
        direction = other.direction if isinstance(other, Metrics) and other.direction is not None else self.direction
        return Metrics({**self._values, **more}, direction=direction)

    def select(self, *keys: str) -> Metrics:
        """The entries named in ``keys`` that are present, still unevaluated."""
        return Metrics({k: self._values[k] for k in keys if k in self._values})

    def floats(self) -> dict[str, float]:
        """Every value as a Python float (evaluating the deferred ones; per-problem tensors are
        averaged)."""
        return {k: as_float(self[k]) for k in self._values}

    def __repr__(self) -> str:
        shown = {k: ("<deferred>" if callable(v) else v) for k, v in self._values.items()}
        return f"Metrics({shown})"


def deferred(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """``fn(*args)``, later."""
    return lambda: fn(*args)


def as_float(value: Any) -> float:
    """A logged value as a Python float (a per-problem tensor by its mean)."""
    if isinstance(value, Tensor):
        return float(value.detach().float().mean()) if value.numel() != 1 else float(value.detach())
    return float(value)
