"""Federated learning with the sampled clients as one batched lower level: FedSGD, FedAvg,
FedProx and server optimisers (:mod:`~bilevel_dist.algorithms.federated`), client partitions
(:mod:`.partition`) and round-by-round data (:mod:`.data`)."""

from bilevel_dist.recipes.federated.data import FederatedData
from bilevel_dist.recipes.federated.module import Federated
from bilevel_dist.recipes.federated.partition import partition

__all__ = ["Federated", "FederatedData", "partition"]
