"""Counting ``torch.distributed`` collectives, and the shared-memory sums that stand in for
all-reduces on one host, for tests that state how many a step makes."""

import lightning as L
import torch.distributed as dist

from bilevel_dist.shared_memory import SharedMemorySum

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce_scatter",
    "all_to_all",
    "barrier",
    "reduce",
)


class CountCollectives:
    """Counts every ``torch.distributed`` collective issued while active."""

    def __enter__(self):
        self.count, self.saved = 0, {name: getattr(dist, name) for name in COLLECTIVES}

        def counted(fn):
            def call(*args, **kwargs):
                self.count += 1
                return fn(*args, **kwargs)

            return call

        for name, fn in self.saved.items():
            setattr(dist, name, counted(fn))
        self.shared_call = SharedMemorySum.__call__
        SharedMemorySum.__call__ = counted(self.shared_call)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)
        SharedMemorySum.__call__ = self.shared_call


class StepCollectives(L.Callback):
    """Counts the collectives inside every algorithm step of a fit (:attr:`collectives`, one
    count per step)."""

    def __init__(self) -> None:
        self.collectives = []

    def on_train_start(self, trainer, module):
        step = module.algorithm.step

        def counted(*args, **kwargs):
            with CountCollectives() as counter:
                result = step(*args, **kwargs)
            self.collectives.append(counter.count)
            return result

        module.algorithm.step = counted
