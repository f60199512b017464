"""Data denoising by learned importance weights (hyper-cleaning; Franceschi et al. 2017).

Outer: one logit ``a_i`` per training sample, weight ``σ(a_i) ∈ (0, 1)``; inner: a linear softmax
classifier trained on the weighted noisy training loss; outer loss: cross-entropy on a small clean
validation set. The per-sample logits are sharded across ranks (each rank keeps its samples' rows).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from bilevel_dist._checks import ConfigError
from bilevel_dist.lightning import BilevelDataModule, BilevelModule, Samples
from bilevel_dist.tree import Tree


class DigitsData(BilevelDataModule):
    """scikit-learn's bundled 8×8 digits: a noisy training set (labels flipped to a different
    class with probability ``noise``), a clean validation set and a clean test set (the split of
    :class:`bilevel_dist.problems.HyperCleaning`). Extra arguments go to :class:`BilevelDataModule`."""

    def __init__(
        self, noise: float = 0.5, n_val: int = 150, n_test: int = 500, split_seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(noise, (int, float)) or not 0 <= noise < 1:
            raise ConfigError("noise", f"noise must be a flip rate in [0, 1), got {noise!r}")
        for key, value in (("n_val", n_val), ("n_test", n_test)):
            if not isinstance(value, int) or value <= 0 or n_val + n_test >= 1797:
                raise ConfigError(key, f"{key} must be > 0 and leave training samples of the 1797 digits, got {value}")
        from bilevel_dist.problems import HyperCleaning

        self.save_hyperparameters()
        self.problem = HyperCleaning.make(noise=noise, n_val=n_val, n_test=n_test, seed=split_seed, dtype=torch.float32)

    @property
    def n_train(self) -> int:
        """Number of training samples (one importance weight each)."""
        return self.problem.n_inner

    def datasets(self) -> tuple[Samples, Samples, Samples]:
        p = self.problem
        train = Samples(x=p.x_train, y=p.y_train, flipped=p.flipped)
        return train, Samples(x=p.x_val, y=p.y_val), Samples(x=p.x_test, y=p.y_test)


class Denoising(BilevelModule):
    """Importance weights for ``n_train`` samples and a linear classifier on ``features`` inputs.

    Args:
        n_train: number of training samples; by default the data module's ``n_train``.
        algorithm: ``{"name": ..., **hyperparameters}`` of :mod:`bilevel_dist.algorithms`.
        reg: ``‖W‖²`` regularisation of the inner problem.
        shard_weights: shard the per-sample weights across ranks (else every rank holds all).
    """

    def __init__(
        self,
        n_train: int | None = None,
        algorithm: dict[str, Any] | None = None,
        features: int = 64,
        classes: int = 10,
        reg: float = 1e-3,
        shard_weights: bool = True,
    ) -> None:
        super().__init__(algorithm, per_sample=("logit",) if shard_weights else ())
        self.save_hyperparameters()
        self.n_train, self.features, self.classes, self.reg = n_train, features, classes, reg
        self.val_accuracy = MulticlassAccuracy(classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(classes, average="micro")

    def configure_variables(self) -> tuple[Tree, Tree]:
        if self.n_train is None:
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is None or not hasattr(datamodule, "n_train"):
                raise ConfigError("n_train", "n_train is needed when the data module does not give it")
            self.n_train = self.hparams["n_train"] = datamodule.n_train
        outer = {"logit": torch.zeros(self.n_train)}
        inner = {"weight": torch.zeros(self.features, self.classes), "bias": torch.zeros(self.classes)}
        return outer, inner

    @staticmethod
    def logits(inner: Tree, x: Tensor) -> Tensor:
        """Class scores of the linear model."""
        return x @ inner["weight"] + inner["bias"]

    def inner_loss(self, inner: Tree, outer: Tree, batch: dict[str, Tensor]) -> Tensor:
        """Weighted training cross-entropy plus ``reg ‖W‖²``."""
        losses = F.cross_entropy(self.logits(inner, batch["x"]), batch["y"], reduction="none")
        weights = torch.sigmoid(outer["logit"][batch["index"]])
        return (weights * losses).mean() + self.reg * (inner["weight"] ** 2).sum()

    def outer_loss(self, inner: Tree, outer: Tree, batch: dict[str, Tensor]) -> Tensor:
        """Clean validation cross-entropy."""
        return F.cross_entropy(self.logits(inner, batch["x"]), batch["y"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.val_accuracy(self.logits(self.inner, batch["x"]), batch["y"])
        self.log("val_accuracy", self.val_accuracy, prog_bar=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self.test_accuracy(self.logits(self.inner, batch["x"]), batch["y"])
        self.log("test_accuracy", self.test_accuracy)
