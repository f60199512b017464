"""The Lightning engine: :class:`BilevelModule`, :class:`BilevelDataModule` and the
:class:`HypergradientMonitor` callback."""

from bilevel_dist.lightning.callbacks import HypergradientMonitor
from bilevel_dist.lightning.data import BilevelDataModule, Samples, TensorData
from bilevel_dist.lightning.module import BilevelModule

__all__ = ["BilevelDataModule", "BilevelModule", "HypergradientMonitor", "Samples", "TensorData"]
