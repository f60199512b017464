"""The attack's outer loop: ITD through the client's replayed local steps, then the thesis's
outer step (§5.4, App. 5.C): Adam on the *signed* hypergradient, a step decay by ``gamma`` at
fixed fractions of the run, and a projection onto the image box in normalised space.
"""

from __future__ import annotations

from typing import Any

import torch

from bilevel_dist._checks import ConfigError
from bilevel_dist.algorithms.base import State, adam, descend, lr
from bilevel_dist.algorithms.double_loop import ITD
from bilevel_dist.hypergrad.base import Solution
from bilevel_dist.metrics import Metrics
from bilevel_dist.solvers import PerStep


def _fractions(name: str, value: Any) -> tuple[float, ...]:
    values = tuple(float(v) for v in value)
    if any(not 0 < v < 1 for v in values) or list(values) != sorted(values):
        raise ConfigError(name, f"{name} must be increasing fractions of the run in (0, 1), got {list(values)}")
    return values


def _decay(name: str, value: Any) -> float:
    if not 0 < float(value) <= 1:
        raise ConfigError(name, f"{name} is a decay factor in (0, 1], got {value!r}")
    return float(value)


def _box(name: str, value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in value)


class Inversion(ITD):
    """ITD whose inner batch carries the client's local schedule (``"slots"``: ``(S, B)`` image
    slots, one row per local step, replayed in order) and whose outer step is signed Adam
    (``signed``), decayed by ``gamma`` at ``milestones`` (fractions of ``total_steps``) and
    projected onto ``[low, high]`` per channel (``box_low``, ``box_high``).

    Cost per step: ``S`` inner gradients with their graph and one outer gradient.
    """

    name = "inversion"
    hparams = {
        **ITD.hparams,
        "outer_lr": (0.1, lr),
        "outer_optimizer": ("adam", lambda name, v: v),
        "signed": (True, lambda name, v: bool(v)),
        "milestones": ((3 / 8, 5 / 8, 7 / 8), _fractions),
        "gamma": (0.1, _decay),
        "total_steps": (None, lambda name, v: int(v)),
        "box_low": ((), _box),
        "box_high": ((), _box),
    }
    data_needs = {"inner_steps": 1, "box_low": (), "box_high": ()}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.h["outer_optimizer"] != "adam":
            raise ConfigError("outer_optimizer", "the inversion attack's outer step is Adam")

    def solve(self, state: State, inner_batch: Any, outer_batch: Any, tol: float | None = None, **kw: Any) -> Solution:
        slots = inner_batch["slots"]
        steps = PerStep({**inner_batch, "slots": slots[s]} for s in range(slots.shape[0]))
        return super().solve(state, steps, outer_batch, tol, **kw)

    def step_size(self, t: int) -> float:
        """``outer_lr``, times ``gamma`` for each milestone passed by step ``t``."""
        total = self.h["total_steps"]
        passed = 0 if total is None else sum(t >= int(f * total) for f in self.h["milestones"])
        return self.h["outer_lr"] * self.h["gamma"] ** passed

    def outer_update(self, state: State, solution: Solution, metrics: Metrics) -> tuple[State, Metrics]:
        t, d = state["t"], solution.grad
        state, moved = adam(state, {k: torch.sign(v) for k, v in d.items()} if self.h["signed"] else d, t)
        step = self.step_size(t)
        outer = {k: self.project(v) for k, v in descend(state["outer"], moved, step).items()}
        state = {**state, "outer": outer, "inner": solution.inner, "t": t + 1}
        shown = solution.info.select("inner_grad_norm")
        return state, Metrics(hypergrad_norm=self.norm(d), direction=d, outer_lr=step) | shown | metrics

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(..., C, H, W)`` clamped to the box of each channel."""
        low, high = self.h["box_low"], self.h["box_high"]
        if not low:
            return images
        shape = (-1, 1, 1)
        low_t = torch.tensor(low, dtype=images.dtype, device=images.device).view(shape)
        high_t = torch.tensor(high, dtype=images.dtype, device=images.device).view(shape)
        return torch.maximum(torch.minimum(images, high_t), low_t)
