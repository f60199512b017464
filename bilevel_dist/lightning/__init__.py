"""The Lightning engine: :class:`BilevelModule` and :class:`BilevelDataModule`."""

from bilevel_dist.lightning.data import BilevelDataModule, Samples, TensorData
from bilevel_dist.lightning.module import BilevelModule

__all__ = ["BilevelDataModule", "BilevelModule", "Samples", "TensorData"]
