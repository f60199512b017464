"""Data denoising by learned importance weights (Mehra & Hamm §3.2; Franceschi et al.'s
hyper-cleaning).

Outer: one logit ``a_i`` per training sample, weight ``σ(a_i) ∈ (0, 1)``; inner: a classifier
(:mod:`.models`) trained on the weighted noisy training loss; outer loss: cross-entropy on the
clean validation set. The per-sample logits are sharded across ranks.

At the end of ``fit`` the module trains the baselines with the same model and budget (the same
number of gradient steps, batch size and step size as the inner model received), then reports
test accuracy for the method and every baseline, the ROC-AUC of the learned weights between
clean and flipped samples, and a histogram of the weights (PNG, and wandb when it logs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.func import functional_call, grad
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.functional.classification import binary_auroc, multiclass_accuracy

from bilevel_dist._checks import ConfigError
from bilevel_dist.figures import log_image, pyplot
from bilevel_dist.lightning import BilevelModule
from bilevel_dist.recipes.data_denoising import models
from bilevel_dist.tree import Tree

BASELINES = ("oracle", "val_only", "train_val")


class Denoising(BilevelModule):
    """Importance weights for ``n_train`` samples and a classifier trained on them.

    Args:
        algorithm: ``{"name": ..., **hyperparameters}`` of :mod:`bilevel_dist.algorithms`
            (default: Penalty with T = 5 inner steps).
        model: a classifier of :mod:`bilevel_dist.recipes.data_denoising.models`.
        n_train: number of training samples; by default the data module's.
        input_shape: shape of one input; by default the data module's.
        classes: number of classes.
        reg: ``‖θ‖²`` regularisation of the inner problem (weights only, not biases).
        baselines: the baselines trained at the end of ``fit`` (``oracle``: clean training
            samples plus validation; ``val_only``; ``train_val``: all noisy training samples plus
            validation, unweighted).
        shard_weights: shard the per-sample weights across ranks (else every rank holds all).
        model_seed: seed of the classifier's initialisation (the baselines start from it too).
        nonfinite: ``"raise"`` or ``"skip"`` a step with non-finite values (:class:`BilevelModule`).
    """

    validation_metrics = (*BilevelModule.validation_metrics, "val_accuracy")

    def __init__(
        self,
        algorithm: dict[str, Any] | None = None,
        model: str = "linear",
        n_train: int | None = None,
        input_shape: tuple[int, ...] | None = None,
        classes: int = 10,
        reg: float = 1e-3,
        baselines: tuple[str, ...] = BASELINES,
        shard_weights: bool = True,
        model_seed: int = 0,
        nonfinite: str = "raise",
    ) -> None:
        spec = algorithm or {"name": "penalty", "inner_steps": 5, "inner_lr": 0.5, "outer_lr": 100.0}
        super().__init__(spec, per_sample=("logit",) if shard_weights else (), nonfinite=nonfinite)
        if model not in models.NAMES:
            raise ConfigError("model", f"unknown model {model!r}; choose one of {list(models.NAMES)}")
        unknown = sorted(set(baselines) - set(BASELINES))
        if unknown:
            raise ConfigError("baselines", f"unknown baseline {unknown[0]!r}; choose among {list(BASELINES)}")
        self.save_hyperparameters()
        self.model_name, self.n_train, self.input_shape, self.classes = model, n_train, input_shape, classes
        self.reg, self.baselines, self.model_seed = reg, tuple(baselines), model_seed
        self.val_accuracy = MulticlassAccuracy(classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(classes, average="micro")
        self.summary: dict[str, float] = {}

    # -- the bilevel problem -----------------------------------------------------------------
    def _from_data(self, name: str) -> Any:
        if getattr(self, name) is None:
            data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            if data is None or not hasattr(data, name):
                raise ConfigError(name, f"{name} is needed when the data module does not give it")
            setattr(self, name, getattr(data, name))
            self.hparams[name] = getattr(data, name)
        return getattr(self, name)

    @property
    def net(self) -> torch.nn.Module:
        """The classifier's architecture (its parameters are the inner variables)."""
        if not hasattr(self, "_net"):
            with torch.random.fork_rng():
                torch.manual_seed(self.model_seed)
                net = models.build(self.model_name, tuple(self._from_data("input_shape")), self.classes)
            object.__setattr__(self, "_net", net)  # not a submodule: the module's variables hold θ
        return self._net

    def initial_model(self) -> Tree:
        """The classifier's starting parameters."""
        return {k: v.detach().clone() for k, v in self.net.named_parameters()}

    def configure_variables(self) -> tuple[Tree, Tree]:
        return {"logit": torch.zeros(self._from_data("n_train"))}, self.initial_model()

    def logits(self, inner: Tree, x: Tensor, train: bool | None = None) -> Tensor:
        """Class scores of the classifier with parameters ``inner``; dropout is on in training
        mode (the module's, unless ``train`` says otherwise)."""
        mode = self.training if train is None else train
        if self.net.training != mode:  # train() walks every submodule: ~40 µs a call
            self.net.train(mode)
        return functional_call(self.net, inner, (x,))

    def penalty(self, inner: Tree) -> Tensor:
        """``reg ‖θ‖²`` over weight matrices and kernels."""
        return self.reg * sum((v**2).sum() for v in inner.values() if v.ndim > 1)

    def inner_loss(self, inner: Tree, outer: Tree, batch: dict[str, Tensor]) -> Tensor:
        """Weighted training cross-entropy plus the regulariser."""
        losses = F.cross_entropy(self.logits(inner, batch["x"]), batch["y"], reduction="none")
        weights = torch.sigmoid(outer["logit"][batch["index"]])
        return (weights * losses).mean() + self.penalty(inner)

    def outer_loss(self, inner: Tree, outer: Tree, batch: dict[str, Tensor]) -> Tensor:
        """Clean validation cross-entropy."""
        return F.cross_entropy(self.logits(inner, batch["x"]), batch["y"])

    # -- evaluation --------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.val_accuracy(self.logits(self.inner, batch["x"]), batch["y"])
        self.log("val_accuracy", self.val_accuracy, prog_bar=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self.test_accuracy(self.logits(self.inner, batch["x"]), batch["y"])
        self.log("test_accuracy", self.test_accuracy)

    def accuracy(self, inner: Tree, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
        """Accuracy of the classifier ``inner`` on ``(x, y)``."""
        with torch.no_grad():
            scores = torch.cat([self.logits(inner, part, train=False) for part in x.split(batch_size)])
        return float(multiclass_accuracy(scores, y, self.classes, average="micro"))

    def train_baseline(self, x: Tensor, y: Tensor, steps: int, lr: float, batch_size: int, seed: int) -> Tree:
        """The classifier trained by minibatch SGD on ``(x, y)`` with equal weights."""

        def loss(inner: Tree, xb: Tensor, yb: Tensor) -> Tensor:
            return F.cross_entropy(self.logits(inner, xb, train=True), yb) + self.penalty(inner)

        step = grad(loss)
        inner = {k: v.to(x) for k, v in self.initial_model().items()}
        gen = torch.Generator().manual_seed(seed)
        order, position = torch.randperm(len(y), generator=gen), 0
        for _ in range(steps):
            if position + batch_size > len(y):
                order, position = torch.randperm(len(y), generator=gen), 0
            ids = order[position : position + min(batch_size, len(y))].to(x.device)
            position += batch_size
            g = step(inner, x[ids], y[ids])
            inner = {k: v - lr * g[k] for k, v in inner.items()}
        return inner

    def on_train_end(self) -> None:
        data = self.trainer.datamodule
        if data is None or not hasattr(data, "flipped"):
            return
        device = self.device
        cast = lambda t: t.to(device=device, dtype=next(self.parameters()).dtype)  # noqa: E731
        x_train, x_val, x_test = cast(data.x_train), cast(data.x_val), cast(data.x_test)
        y_train, y_val, y_test = (t.to(device) for t in (data.y_train, data.y_val, data.y_test))
        clean = ~data.flipped.to(device)
        weights = torch.sigmoid(self.gathered("outer")["logit"]).detach()
        summary = {"method": self.accuracy(self.inner, x_test, y_test)}
        if bool(clean.any()) and bool((~clean).any()):
            summary["weight_auroc"] = float(binary_auroc(weights.float(), clean.long()))
        h = self.algorithm.h
        budget = self.global_step * int(h.get("inner_steps") or 1)
        lr, batch = float(h.get("inner_lr", 0.1)), int(data.inner_batch_size)
        sets = {
            "oracle": (torch.cat([x_train[clean], x_val]), torch.cat([y_train[clean], y_val])),
            "val_only": (x_val, y_val),
            "train_val": (torch.cat([x_train, x_val]), torch.cat([y_train, y_val])),
        }
        for name in self.baselines:
            x, y = sets[name]
            trained = self.train_baseline(x, y, budget, lr, batch, seed=self.model_seed)
            summary[name] = self.accuracy(trained, x_test, y_test)
        self.summary = summary
        for logger in self.loggers:
            logger.log_metrics({f"summary/{k}": v for k, v in summary.items()}, step=self.global_step)
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective under DDP: every rank
        if self.trainer.is_global_zero:
            self._report(summary, weights.cpu(), clean.cpu(), out)

    def _report(self, summary: dict[str, float], weights: Tensor, clean: Tensor, out: Path) -> None:
        lines = [
            f"data denoising with {self.algorithm_name} ({self.global_step} steps): test accuracy",
            *(f"  {name:10s} {value:.4f}" for name, value in summary.items() if name != "weight_auroc"),
        ]
        if "weight_auroc" in summary:
            lines.append(f"  weights separate clean from flipped samples: ROC-AUC {summary['weight_auroc']:.4f}")
        path = weight_histogram(weights, clean, out / "weights_histogram.png")
        lines.append(f"  histogram of the weights: {path}")
        log_image(self.loggers, "weights_histogram", path)
        rank_zero_info("\n".join(lines))


def weight_histogram(weights: Tensor, clean: Tensor, path: Path) -> Path:
    """Histograms of the learned weights of clean and flipped samples, as a PNG."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3))
    bins = torch.linspace(0, 1, 41).tolist()
    ax.hist(weights[clean].tolist(), bins=bins, alpha=0.6, label=f"clean ({int(clean.sum())})")
    ax.hist(weights[~clean].tolist(), bins=bins, alpha=0.6, label=f"flipped ({int((~clean).sum())})")
    ax.set_xlabel("learned weight σ(a)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fit_digits(
    noise: float,
    split_seed: int,
    steps: int = 500,
    algorithm: dict[str, Any] | None = None,
    baselines: tuple[str, ...] = BASELINES,
    root: str = "/tmp/bilevel_dist_denoising",
) -> dict[str, float]:
    """One run of the digits recipe at its default sizes (batches 128/50, no validation loop,
    no logger): the end-of-fit summary (test accuracies and weight ROC-AUC)."""
    import lightning as L

    from bilevel_dist.recipes.data_denoising.data import DigitsData

    L.seed_everything(0, verbose=False)
    data = DigitsData(noise=noise, split_seed=split_seed, inner_batch_size=128, outer_batch_size=50)
    model = Denoising(algorithm=algorithm, baselines=baselines)
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    trainer.fit(model, data)
    return model.summary
