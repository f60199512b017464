"""``Federated``: federated training as a :class:`~bilevel_dist.lightning.BilevelModule`.

The global model is the outer variable; the round's client models, stacked on a leading client
axis, are the lower level (``lower_level="batched"``, started afresh each round from the global
model: :meth:`inner_init`). One round is one training step, so Lightning's checkpointing, loggers,
progress bar and CLI work unchanged; the server state (global model, server optimiser moments,
round counter) is the algorithm state, and the round's clients follow from ``(seed, round)``.

Methods (``method``), each a preset of the ``fedavg`` algorithm that ``algorithm`` may override:

- ``fedsgd``: one full-batch local step per round (set ``data.local_batch: 0``, ``epochs: 1``);
- ``fedavg``: ``E`` local epochs of minibatches (McMahan et al. 2017);
- ``fedprox``: FedAvg with the proximal term ``μ/2 ‖θ − w‖²`` (``prox``, Li et al. 2020);
- ``fedavgm``, ``fedadam``, ``fedyogi``: FedAvg with a server optimiser (Reddi et al. 2021);
- ``pfedme``: personalised models as Moreau-envelope lower levels (Dinh et al. 2020);
- ``perfedavg``: MAML-style personalisation (Fallah et al. 2020).

``test`` reports the global model's accuracy on the global test set (``test_accuracy``) and on
every client's own held-out samples (``test_client_accuracy``), and the personalised models'
accuracy there (``test_personal_accuracy``: each client's model from the global one by the
method's personalisation; the global model itself for the FedAvg family).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from bilevel_dist._checks import ConfigError
from bilevel_dist.figures import log_image, pyplot
from bilevel_dist.lightning.module import BilevelModule
from bilevel_dist.tree import Tree

log = logging.getLogger(__name__)

METHODS = {
    "fedsgd": {"name": "fedavg"},
    "pfedme": {"name": "pfedme"},
    "perfedavg": {"name": "perfedavg"},
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedavg", "prox": 0.01},
    "fedavgm": {"name": "fedavg", "server_optimizer": "avgm", "server_lr": 1.0, "server_momentum": 0.9},
    "fedadam": {"name": "fedavg", "server_optimizer": "adam", "server_lr": 0.01},
    "fedyogi": {"name": "fedavg", "server_optimizer": "yogi", "server_lr": 0.01},
}
MODELS = ("linear", "mlp", "cnn")


def build_model(name: str, input_shape: tuple[int, ...], classes: int, hidden: int = 64) -> nn.Module:
    """``linear`` (softmax regression), ``mlp`` (one hidden ReLU layer, McMahan's 2NN with one
    layer) or ``cnn`` (McMahan's CNN: two 5×5 conv layers of 32 and 64 channels with 2×2
    pooling, 512 units, for image inputs)."""
    features = 1
    for size in input_shape:
        features *= size
    if name == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(features, classes))
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    if name == "cnn":
        if len(input_shape) != 3:
            raise ConfigError("model", f"model 'cnn' needs image inputs (channels, height, width), got {input_shape}")
        side = input_shape[1] // 4
        return nn.Sequential(
            nn.Conv2d(input_shape[0], 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * side * side, 512), nn.ReLU(), nn.Linear(512, classes),
        )  # fmt: skip
    raise ConfigError("model", f"unknown model {name!r}; choose one of {list(MODELS)}")


_ORDERS = (1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 48.0, 64.0, 128.0, 256.0)


def privacy_spent(rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε of ``rounds`` Gaussian-mechanism rounds with client sampling rate ``rate``, at ``δ``:
    ``dp-accounting``'s RDP accountant (Mironov et al.), not a hand-written one."""
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError as missing:
        raise ImportError("privacy accounting needs dp-accounting: pip install 'bilevel-dist[federated]'") from missing
    event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant = rdp.RdpAccountant(orders=list(_ORDERS))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


class Federated(BilevelModule):
    """Federated training of ``model`` on the clients of a :class:`FederatedData`.

    Args:
        method: a preset (module docstring).
        algorithm: settings of the ``fedavg`` algorithm over the preset's (``local_lr``, ``prox``,
            ``server_optimizer``, ``server_lr``, ``aggregator``, ``trim``, ``clip``,
            ``noise_multiplier``, ``client_chunk``, ...).
        model: ``linear``, ``mlp`` or ``cnn``.
        hidden: the MLP's hidden width.
        model_seed: the seed of the global model's initialisation.
        dp_delta: the δ of the (ε, δ) privacy spent by DP-FedAvg (``noise_multiplier > 0``),
            logged as ``dp_epsilon`` by the RDP accountant of ``dp-accounting`` (the
            ``[federated]`` extra) for Poisson sampling at rate ``C``.
        input_shape, classes: taken from the data module when the CLI links them.
        nonfinite: ``"raise"`` or ``"skip"`` a step with non-finite values (:class:`BilevelModule`).
    """

    validation_metrics = ("val_accuracy", "val_loss")

    def __init__(
        self,
        method: str = "fedavg",
        algorithm: dict[str, Any] | None = None,
        model: str = "mlp",
        hidden: int = 64,
        model_seed: int = 0,
        dp_delta: float = 1e-5,
        input_shape: tuple[int, ...] | None = None,
        classes: int | None = None,
        nonfinite: str = "raise",
    ) -> None:
        if method not in METHODS:
            raise ConfigError("method", f"unknown method {method!r}; choose one of {list(METHODS)}")
        if model not in MODELS:
            raise ConfigError("model", f"unknown model {model!r}; choose one of {list(MODELS)}")
        spec = {**METHODS[method], **(algorithm or {})}
        super().__init__(spec, lower_level="batched", nonfinite=nonfinite)
        self.save_hyperparameters()
        self.method, self.model_name, self.hidden, self.model_seed = method, model, hidden, model_seed
        self.input_shape, self.classes, self.dp_delta = input_shape, classes, dp_delta
        if not 0 < dp_delta < 1:
            raise ConfigError("dp_delta", f"dp_delta must be in (0, 1), got {dp_delta!r}")
        self._net: nn.Module | None = None
        self.val_accuracy = MulticlassAccuracy(classes or 2, average="micro")
        self.test_accuracy = MulticlassAccuracy(classes or 2, average="micro")
        # float64 sums whatever the precision: the mean over unequal rank shares is then exact
        self.val_loss, self.test_loss = MeanMetric().set_dtype(torch.float64), MeanMetric().set_dtype(torch.float64)

    # -- the network -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = getattr(self.trainer, "datamodule", None)
        if data is not None and self.input_shape is None:
            self.input_shape, self.classes = tuple(data.input_shape), data.classes
            self.hparams.update(input_shape=self.input_shape, classes=self.classes)  # a checkpoint rebuilds it alone
            self.val_accuracy = MulticlassAccuracy(self.classes, average="micro")
            self.test_accuracy = MulticlassAccuracy(self.classes, average="micro")

    @property
    def net(self) -> nn.Module:
        if self._net is None:
            if self.input_shape is None or self.classes is None:
                raise ConfigError(
                    "model", "the input shape and classes come from the data module: pass a FederatedData"
                )
            with torch.random.fork_rng():
                torch.manual_seed(self.model_seed)
                self._net = build_model(self.model_name, tuple(self.input_shape), self.classes, self.hidden)
        return self._net

    def configure_variables(self) -> tuple[Tree, Tree]:
        return {k: v.detach().clone() for k, v in self.net.named_parameters()}, {}

    def inner_init(self, outer: Tree, batch: dict[str, Tensor]) -> Tree:
        """Nothing per client outlives a round: the algorithm starts each chunk of client models
        from the global one and folds it into the aggregate (so memory follows the chunk)."""
        return {}

    def client_losses(self, inner: Tree, outer: Tree, x: Tensor, y: Tensor) -> Tensor:
        """``(C, n)`` per-sample losses of each client's model (``inner``; none: the global
        model ``outer``) on its own samples."""
        params = inner or outer
        x = x.to(next(iter(params.values())))
        if inner:
            scores = vmap(lambda p, xs: functional_call(self.net, p, (xs,)))(inner, x)
        else:
            scores = vmap(lambda xs: functional_call(self.net, outer, (xs,)))(x)
        return F.cross_entropy(scores.transpose(1, 2), y, reduction="none")

    # -- the two levels ----------------------------------------------------------------------
    def inner_loss(self, inner: Tree, outer: Tree, batch: dict[str, Tensor]) -> Tensor:
        """Sum over clients of this local step's minibatch loss (a full round's batch: each
        client's mean loss over its samples)."""
        losses = self.client_losses(inner, outer, batch["x"], batch["y"])
        weight = batch["weight"]
        if weight.dim() == 3:  # the whole round (logging): each client's mean over its data
            weight = (weight.sum(0) > 0).to(losses) / batch["size"].clamp_min(1)[:, None].to(losses)
        return (weight.to(losses) * losses).sum()

    def outer_loss(self, inner: Tree, outer: Tree, batch: dict[str, Tensor]) -> Tensor:
        """The round's training loss: clients' mean losses weighted by their data share (after
        a round: the new global model's, as no client model is kept)."""
        losses = self.client_losses(inner, outer, batch["x"], batch["y"])
        real = (torch.arange(losses.shape[1], device=losses.device)[None] < batch["size"][:, None]).to(losses)
        per_client = (losses * real).sum(1) / batch["size"].clamp_min(1).to(losses)
        return (per_client * batch["share"].to(losses)).sum()

    # -- training ----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        data = getattr(self.trainer, "datamodule", None)
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # on every rank: a broadcast under DDP
        if data is not None and hasattr(data, "client_data") and self.trainer.is_global_zero:
            path = client_plot(data.client_data, out / "federated_clients.png")
            log_image(self.loggers, "federated_clients", path)
            rank_zero_info(f"clients' data sizes and labels: {path}")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # by id, from the rank that held them: a non-finite update is a warning, a dropout news
        non_finite = getattr(self.algorithm, "non_finite", [])
        failed = getattr(self.algorithm, "failed", [])  # warned by the algorithm
        dropped = sorted(set(getattr(self.algorithm, "excluded", [])) - set(non_finite) - set(failed))
        if non_finite:
            log.warning("round %d: clients %s sent a non-finite update: left out", self.global_step - 1, non_finite)
        if dropped:
            log.info("round %d: clients %s dropped out", self.global_step - 1, dropped)

    # -- evaluation --------------------------------------------------------------------------
    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        outer = self.outer
        scores = functional_call(self.net, outer, (x.to(next(iter(outer.values()))),))
        metric = self.val_accuracy if stage == "val" else self.test_accuracy
        mean_loss = self.val_loss if stage == "val" else self.test_loss
        metric.update(scores, y)
        mean_loss.update(F.cross_entropy(scores, y), weight=len(y))  # ranks may hold unequal shares
        self.log(f"{stage}_loss", mean_loss, batch_size=len(y))
        self.log(f"{stage}_accuracy", metric, batch_size=len(y))

    def on_validation_epoch_end(self) -> None:
        sigma = self.algorithm.h["noise_multiplier"]
        data = getattr(self.trainer, "datamodule", None)
        if sigma > 0 and data is not None and self.global_step > 0:
            rate = data.sampled / data.clients
            self.log("dp_epsilon", privacy_spent(rate, sigma, self.global_step, self.dp_delta))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            self._evaluate(batch, "test")
        else:
            self._evaluate_clients(batch)

    def _evaluate_clients(self, batch: dict[str, Tensor]) -> None:
        """The global and the personalised models on each client's own held-out samples."""
        outer = self.outer
        like = next(iter(outer.values()))
        n = batch["x"].shape[1]
        real = torch.arange(n, device=like.device)[None] < batch["size"][:, None]
        train = {"x": batch["x"].to(like), "y": batch["y"], "size": batch["size"]}
        train["weight"] = real.to(like) / batch["size"].clamp_min(1)[:, None].to(like)  # each client's mean
        with torch.inference_mode(False), torch.enable_grad():  # personalising takes gradients
            train = {k: v.clone() for k, v in train.items()}
            personal = self.algorithm.personalize({k: v.clone() for k, v in outer.items()}, train)
        test_real = torch.arange(batch["test_x"].shape[1], device=like.device)[None] < batch["test_size"][:, None]
        x, y = batch["test_x"].to(like), batch["test_y"]
        clients = x.shape[0]
        glob = {k: v.unsqueeze(0).expand(clients, *v.shape) for k, v in outer.items()}
        for name, params in (("client", glob), ("personal", personal)):
            scores = vmap(lambda p, xs: functional_call(self.net, p, (xs,)))(params, x)
            correct = ((scores.argmax(-1) == y) & test_real).sum()
            self._client_counts[name] += torch.stack([correct, test_real.sum()]).to(torch.float64)

    def on_test_epoch_start(self) -> None:
        like = next(iter(self.outer.values()))
        self._client_counts = {
            k: torch.zeros(2, dtype=torch.float64, device=like.device) for k in ("client", "personal")
        }

    def on_test_epoch_end(self) -> None:
        self.results = {"test_accuracy": float(self.test_accuracy.compute())}
        for name, counts in self._client_counts.items():
            total = self.comm.sum({"counts": counts.clone()})["counts"]
            self.results[f"test_{name}_accuracy"] = float(total[0] / total[1].clamp_min(1))
            self.log(f"test_{name}_accuracy", self.results[f"test_{name}_accuracy"], sync_dist=False)
        lines = ["federated test (global model; on the clients' own held-out samples: global, personalised):"]
        rank_zero_info("\n".join(lines + [f"  {k} {v:.4f}" for k, v in self.results.items()]))


def client_plot(clients: Any, path: Path, shown: int = 40) -> Path:
    """The partition at a glance: the histogram of the clients' training-set sizes, and the
    label mix of the first ``shown`` clients (stacked bars)."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = clients.sizes
    classes = int(clients.y.max()) + 1
    ids = torch.arange(min(shown, len(clients)))
    rows = clients.table[ids].clamp_min(0)
    real = clients.table[ids] >= 0
    counts = torch.zeros(len(ids), classes, dtype=torch.float64)
    counts.scatter_add_(1, clients.y[rows] * real, real.to(torch.float64))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.hist(sizes.numpy(), bins=min(40, max(5, len(sizes) // 5)), color="tab:blue")
    left.set(xlabel="training samples per client", ylabel="clients", title=f"{len(sizes)} clients")
    bottom = torch.zeros(len(ids))
    cmap = plt.get_cmap("tab10" if classes <= 10 else "tab20")
    for c in range(classes):
        right.bar(ids.numpy(), counts[:, c].numpy(), bottom=bottom.numpy(), color=cmap(c % cmap.N), width=0.9)
        bottom += counts[:, c]
    right.set(xlabel="client", ylabel="samples", title=f"label mix of the first {len(ids)} clients")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
