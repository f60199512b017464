"""Bilevel algorithms by name: ``get(name, problem=..., **hparams)``.

Every algorithm has ``init(outer, inner) -> state`` and
``step(state, inner_batch, outer_batch) -> (state, metrics)``; ``state`` round-trips through
``torch.save`` / ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Any

from bilevel_dist._checks import ConfigError
from bilevel_dist.algorithms.base import Algorithm, Metrics, State
from bilevel_dist.algorithms.double_loop import AID, BSA, HOAG, ITD, AmIGO, StocBiO
from bilevel_dist.algorithms.federated import FedAvg, PerFedAvg, PFedMe
from bilevel_dist.algorithms.first_order import BOME, F2SA, Penalty
from bilevel_dist.algorithms.single_loop import FSLA, MRBO, SOBA, SUSTAIN, TTSA
from bilevel_dist.algorithms.variance_reduced import SABA, SRBA, VRBO
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.solvers import PerStep

REGISTRY: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (
        AID,
        ITD,
        StocBiO,
        AmIGO,
        BSA,
        HOAG,
        TTSA,
        SOBA,
        SABA,
        SRBA,
        FSLA,
        MRBO,
        VRBO,
        SUSTAIN,
        Penalty,
        BOME,
        F2SA,
    )
}


#: server-side algorithms whose lower levels are clients (their outer step is an aggregation of
#: the clients' updates, not a hypergradient step): usable by name, not among the bilevel methods
FEDERATED: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FedAvg, PFedMe, PerFedAvg)}


def find(name: str) -> type[Algorithm] | None:
    """The class registered as ``name`` in :data:`REGISTRY` or :data:`FEDERATED` (looked up at
    call time: a user may register an algorithm), or ``None``."""
    return REGISTRY.get(name) or FEDERATED.get(name) if isinstance(name, str) else None


def get(name: str, *, problem: BilevelProblem, **hparams: Any) -> Algorithm:
    """The algorithm registered as ``name`` for ``problem``; ``comm=`` and, for SRBA/VRBO,
    ``full_batches=`` may be passed beside the hyperparameters."""
    cls = find(name)
    if cls is None:
        known = sorted({**REGISTRY, **FEDERATED})
        raise ConfigError("name", f"unknown algorithm {name!r}; choose one of {', '.join(known)}")
    return cls(problem, **hparams)


__all__ = ["FEDERATED", "REGISTRY", "Algorithm", "Metrics", "PerStep", "State", "find", "get"]
