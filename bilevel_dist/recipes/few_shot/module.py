"""Few-shot meta-learning: ``bilevel-dist fit --config recipes/few_shot/sinusoid.yaml``.

The tasks of a meta-batch are one batched lower level (:mod:`.methods`): each rank adapts its
own tasks in one vectorised solve with no collective, and only the meta-gradient (one
all-reduce per meta-step) and the logged metrics cross ranks.

Before the method, ``fit`` trains the baselines (Prototypical Networks; "no meta-learning": the
network trained on every meta-training class, then a new head per task) with the same backbone,
initialisation, tasks and number of steps, validated at the steps the method will be. ``test``
adapts each of them on the support sets of the meta-test tasks, scores the query sets, and
reports mean and 95% confidence interval over the tasks, a table and a plot of validation
accuracy against meta-training step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.func import functional_call

from bilevel_dist import algorithms, tree
from bilevel_dist._checks import ConfigError
from bilevel_dist.algorithms.base import adam
from bilevel_dist.figures import log_image, pyplot
from bilevel_dist.lightning import BilevelModule
from bilevel_dist.recipes.few_shot import models
from bilevel_dist.recipes.few_shot.methods import KINDS, METHODS, Formulation
from bilevel_dist.solvers import GD, run
from bilevel_dist.tree import Tree

_ADAM = {"outer_optimizer": "adam", "outer_lr": 1e-3}
DEFAULT_ALGORITHMS: dict[str, dict[str, Any]] = {
    "maml": {"name": "itd", "inner_steps": 5, "inner_lr": 0.01, **_ADAM},
    "fomaml": {"name": "itd", "inner_steps": 5, "inner_lr": 0.01, "backprop_steps": 0, **_ADAM},
    "anil": {"name": "itd", "inner_steps": 5, "inner_lr": 0.1, **_ADAM},
    "imaml": {"name": "aid", "inner_steps": 10, "inner_lr": 0.01, "linear_iters": 5, **_ADAM},
    "penalty": {"name": "penalty", "inner_steps": 5, "inner_lr": 0.1, "outer_lr": 0.1},
    "heads": {"name": "aid", "inner_steps": 10, "inner_lr": 0.1, "linear_iters": 5, **_ADAM},
    "protonet": {"name": "itd", "inner_steps": 1, "inner_lr": 1.0, **_ADAM},
    "pretrain": {"name": "itd", "inner_steps": 1, "inner_lr": 1.0, **_ADAM},
}
BASELINES = ("protonet", "pretrain")


def algorithm_spec(method: str, given: dict[str, Any] | None) -> dict[str, Any]:
    """The method's algorithm settings: its defaults, overridden by ``given`` (a different
    registry ``name`` replaces them). ProtoNet's one exact step is fixed."""
    default = DEFAULT_ALGORITHMS[method]
    given = dict(given or {})
    spec = given if given.get("name", default["name"]) != default["name"] else {**default, **given}
    if method == "protonet":
        spec |= {"name": "itd", "inner_steps": 1, "inner_lr": 1.0, "backprop_steps": None}
    return spec


def confidence(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the 95% normal confidence interval."""
    values = values.double()
    half = 1.96 * float(values.std()) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), half


class FewShot(BilevelModule):
    """A few-shot method (``method``) on a backbone, its tasks one batched lower level.

    Args:
        method: ``maml``, ``fomaml``, ``anil``, ``imaml``, ``penalty``, ``heads`` (the head
            problem with any registry ``algorithm``), ``protonet`` or ``pretrain``.
        algorithm: registry settings (``{"name": ..., ...}``) over the method's defaults.
        backbone: ``mlp``, ``conv4`` or ``resnet12``; default: ``mlp`` for regression, else
            ``conv4``.
        width: Conv-4's channels.
        prox: iMAML's proximal weight λ.
        head_reg: ridge weight of the task heads (``heads``, ``penalty``, ``pretrain``).
        head_steps, head_lr: gradient steps fitting a new head per task at evaluation.
        feature_scale: ``penalty`` and ``heads`` score their heads on features normalised to
            this length (cosine heads, as the Penalty authors' code; 0: raw features).
        head_warmup: gradient steps (at ``head_lr``, no graph) that start each task's head
            before the algorithm's step: single-loop registry methods (``soba``, ``ttsa``, ...)
            take one inner step per meta-step, and from a zero head the body gets no gradient.
        baselines: the baselines trained before the method in ``fit`` (default: ``protonet`` and
            ``pretrain`` for classification, ``pretrain`` for regression).
        baseline_lr: their Adam step size.
        model_seed: seed of the backbone's initialisation (every baseline starts from it).
        ways, meta_batch, input_shape, regression, train_classes: from the data module unless
            given.
        nonfinite: ``"raise"`` or ``"skip"`` a step with non-finite values (:class:`BilevelModule`).
    """

    validation_metrics = ("val_accuracy", "val_mse")

    def __init__(
        self,
        method: str = "maml",
        algorithm: dict[str, Any] | None = None,
        backbone: str | None = None,
        width: int = 64,
        prox: float = 1.0,
        head_reg: float = 1e-3,
        head_steps: int = 100,
        head_lr: float = 0.5,
        head_warmup: int = 0,
        feature_scale: float = 10.0,
        baselines: tuple[str, ...] | None = None,
        baseline_lr: float = 1e-3,
        model_seed: int = 0,
        ways: int | None = None,
        meta_batch: int | None = None,
        input_shape: tuple[int, ...] | None = None,
        regression: bool | None = None,
        train_classes: int | None = None,
        nonfinite: str = "raise",
    ) -> None:
        if method not in METHODS:
            raise ConfigError("method", f"unknown method {method!r}; choose one of {list(METHODS)}")
        if backbone is not None and backbone not in models.NAMES:
            raise ConfigError("backbone", f"unknown backbone {backbone!r}; choose one of {list(models.NAMES)}")
        unknown = sorted(set(baselines or ()) - set(BASELINES))
        if unknown:
            raise ConfigError("baselines", f"unknown baseline {unknown[0]!r}; choose among {list(BASELINES)}")
        self._formulations: dict[str, Formulation] = {}
        super().__init__(algorithm_spec(method, algorithm), lower_level="batched", nonfinite=nonfinite)
        self.save_hyperparameters()
        self.method, self.backbone_name, self.width, self.prox, self.head_reg = method, backbone, width, prox, head_reg
        self.head_steps, self.head_lr, self.baseline_lr, self.model_seed = head_steps, head_lr, baseline_lr, model_seed
        self.head_warmup, self.feature_scale = head_warmup, feature_scale
        self.ways, self.meta_batch, self.input_shape = ways, meta_batch, input_shape
        self.regression, self.train_classes = regression, train_classes
        self._baseline_names = baselines
        self.baseline_variables: dict[str, Tree] = {}
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.results: dict[str, tuple[float, float]] = {}
        self._scores: dict[str, list[tuple[Tensor, Tensor]]] = {}

    # -- what comes from the data ------------------------------------------------------------
    def _from_data(self, name: str, data_name: str | None = None) -> Any:
        if getattr(self, name) is None:
            data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            if data is None or not hasattr(data, data_name or name):
                raise ConfigError(name, f"{name} is needed when the data module does not give it")
            setattr(self, name, getattr(data, data_name or name))
            self.hparams[name] = getattr(self, name)
        return getattr(self, name)

    @property
    def metric(self) -> str:
        """``mse`` for regression, else ``accuracy``."""
        return "mse" if self._from_data("regression") else "accuracy"

    @property
    def baselines(self) -> tuple[str, ...]:
        names = self._baseline_names
        if names is None:
            names = ("pretrain",) if self._from_data("regression") else BASELINES
        return tuple(n for n in names if n != self.method)

    def network(self, method: str) -> models.Backbone:
        """The backbone of ``method`` (the pretraining baseline's head scores every
        meta-training class), initialised from ``model_seed``: the same body for every method."""
        regression = self._from_data("regression")
        outputs = 1 if regression else self._from_data("ways", "outputs")
        if method == "pretrain" and not regression:
            outputs = self._from_data("train_classes")
        name = self.backbone_name or ("mlp" if regression else "conv4")
        with torch.random.fork_rng():
            torch.manual_seed(self.model_seed)
            return models.build(name, tuple(self._from_data("input_shape")), outputs, self.width)

    def formulation(self, method: str | None = None) -> Formulation:
        """The bilevel problem of ``method`` (default: this module's)."""
        method = method or self.method
        if method not in self._formulations:
            regression = self._from_data("regression")
            kind = "init" if method == "pretrain" and regression else KINDS[method]
            self._formulations[method] = Formulation(
                kind,
                self.network(method),
                regression,
                self._from_data("meta_batch"),
                1 if regression else self._from_data("ways"),
                prox=self.prox if method == "imaml" else 0.0,
                reg=self.head_reg,
                feature_scale=self.feature_scale if method in ("penalty", "heads") else 0.0,
            )
        return self._formulations[method]

    def initial_outer(self, method: str) -> Tree:
        """``method``'s meta-parameters at initialisation (pretraining keeps its global head)."""
        form = self.formulation(method)
        if method == "pretrain":
            return {k: v.detach().clone() for k, v in form.net.named_parameters()}
        return form.outer_init()

    # -- the bilevel problem -----------------------------------------------------------------
    def configure_variables(self) -> tuple[Tree, Tree]:
        return self.initial_outer(self.method), {}

    def inner_init(self, outer: Tree, batch: dict[str, Tensor]) -> Tree:
        form = self.formulation()
        start = form.inner_init(outer, batch)
        if self.head_warmup and form.kind == "heads":
            with torch.enable_grad():
                start = run(GD(self.head_lr, self.head_warmup), form.problem, start, tree.detach(outer), batch).inner
        return start

    def inner_loss(self, inner: Tree, outer: Tree, batch: dict[str, Tensor]) -> Tensor:
        return self.formulation().inner_loss(inner, outer, batch)

    def outer_loss(self, inner: Tree, outer: Tree, batch: dict[str, Tensor]) -> Tensor:
        return self.formulation().outer_loss(inner, outer, batch)

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.method != "pretrain":
            super().training_step(batch, batch_idx)
        else:
            self._pretrain_training_step(batch)
        self._validate_last_step()

    def _pretrain_training_step(self, batch: dict[str, Any]) -> None:
        if self._state is None:
            self._sync_state()
        self._state, loss = self.pretrain_update(self._state, batch, self.algorithm.h["outer_lr"])
        self._mirror()
        self.optimizers().step()
        if self.global_step % self.trainer.log_every_n_steps == 0:
            for logger in self.loggers:
                logger.log_metrics({"outer_loss": loss}, step=self.global_step - 1)

    def pretrain_update(self, state: dict[str, Any], batch: dict[str, Any], lr: float) -> tuple[dict[str, Any], float]:
        """One Adam step of the "no meta-learning" baseline: the whole network on every
        support and query sample of the meta-batch, labelled by meta-training class (or, for
        regression, by its target); the gradient averaged over ranks."""
        support, query = batch["inner"], batch["outer"]
        x = torch.cat([support["x"].flatten(0, 1), query["x"].flatten(0, 1)])
        y = torch.cat([support["y"], query["y"]], 1)
        regression = self._from_data("regression")
        if not regression:
            y = support["classes"].gather(1, y)  # task labels to meta-training class ids
        y = y.flatten(0, 1)
        net = self.formulation("pretrain").net
        outer = {k: v.detach().requires_grad_() for k, v in state["outer"].items()}
        with torch.enable_grad():
            scores = functional_call(net, outer, (x,))
            loss = F.mse_loss(scores, y) if regression else F.cross_entropy(scores, y)
            grads = dict(zip(outer, torch.autograd.grad(loss, list(outer.values())), strict=True))
        grads = self.comm.mean(grads)
        state, direction = adam(state, grads, state["t"])
        moved = tree.axpy(-lr, direction, tree.detach(outer))
        return {**state, "outer": moved, "t": state["t"] + 1}, float(self.comm.mean_value(loss.detach()))

    # -- adaptation and scores ---------------------------------------------------------------
    def adaptation(self, method: str) -> tuple[int, float]:
        """Steps and step size that adapt ``method`` to a task at evaluation: the training
        inner loop for MAML-like methods, ``head_steps`` at ``head_lr`` for a new head, one
        exact step for prototypes."""
        kind = self.formulation(method).kind
        if kind == "prototypes":
            return 1, 1.0
        if kind == "heads":
            return self.head_steps, self.head_lr
        h = self.algorithm.h
        if "inner_steps" in h and KINDS[self.method] in ("init", "head_init"):
            return h["inner_steps"], h["inner_lr"]
        return DEFAULT_ALGORITHMS["maml"]["inner_steps"], DEFAULT_ALGORITHMS["maml"]["inner_lr"]

    def adapt(
        self,
        method: str,
        outer: Tree,
        support: dict[str, Tensor],
        steps: int | None = None,
        form: Formulation | None = None,
    ) -> Tree:
        """Each task's adapted inner variables after the evaluation inner loop on its support set."""
        form = form or self.formulation(method)
        default_steps, lr = self.adaptation(method)
        start = form.inner_init(outer, support)
        steps = default_steps if steps is None else steps
        return run(GD(lr, steps), form.problem, start, tree.detach(outer), support).inner

    def task_scores(self, method: str, outer: Tree, batch: dict[str, Any], steps: int | None = None) -> Tensor:
        """Each task's query score after adapting ``method``'s variables ``outer`` on its support."""
        form = self.formulation(method)
        with torch.inference_mode(False), torch.enable_grad():
            # evaluation loops run in inference mode: adaptation needs gradients
            support = {k: v.clone() for k, v in batch["support"].items()}
            query = {k: v.clone() for k, v in batch["query"].items()}
            outer = {k: v.clone() for k, v in outer.items()}
            if form.kind in ("heads", "prototypes"):  # a frozen body: its features once, not per head step
                with torch.no_grad():
                    support["x"], query["x"] = form.features(outer, support["x"]), form.features(outer, query["x"])
                form, outer = form.on_features(), {}
            inner = self.adapt(method, outer, support, steps, form)
            with torch.no_grad():
                return form.task_scores(inner, outer, query).detach()

    def _score(self, batch: dict[str, Any], variables: dict[str, tuple[str, Tree]]) -> None:
        for label, (method, outer) in variables.items():
            self._scores.setdefault(label, []).append((batch["task"], self.task_scores(method, outer, batch)))
        if self._from_data("regression"):  # the meta-initialisation itself, before any step
            label = f"{self.method} (no adaptation)"
            scores = self.task_scores(self.method, self.outer, batch, steps=0)
            self._scores.setdefault(label, []).append((batch["task"], scores))

    def _summarise(self) -> dict[str, tuple[float, float]]:
        """Mean and 95% CI per method over the evaluation tasks, each task once (every rank
        gets the same numbers)."""
        out = {}
        for label, parts in self._scores.items():
            ids, values = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            ids, values = self.all_gather(ids).reshape(-1), self.all_gather(values).reshape(-1)
            order = torch.argsort(ids, stable=True)
            ids, values = ids[order], values[order]
            first = torch.ones_like(ids, dtype=torch.bool)
            first[1:] = ids[1:] != ids[:-1]  # padding repeats a task: keep it once
            out[label] = confidence(values[first].cpu())
        self._scores = {}
        return out

    # -- validation and test -----------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._scores = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._score(batch, {self.method: (self.method, self.outer)})

    def on_validation_epoch_end(self) -> None:
        results = self._summarise()
        if self.method not in results:
            return
        mean, _ = results[self.method]
        self.log(f"val_{self.metric}", mean, prog_bar=True, batch_size=1)
        history = self.history.setdefault(self.method, [])
        if not self.trainer.sanity_checking and not (history and history[-1][0] == self.global_step):
            history.append((self.global_step, mean))

    def on_test_epoch_start(self) -> None:
        self._scores = {}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        variables = {self.method: (self.method, self.outer)}
        for name, outer in self.baseline_variables.items():
            variables[name] = (name, {k: v.to(self.device) for k, v in outer.items()})
        self._score(batch, variables)

    def on_test_epoch_end(self) -> None:
        self.results = self._summarise()
        metric = self.metric
        for label, (mean, half) in self.results.items():
            prefix = "" if label == self.method else f"{label.replace(' ', '_')}/"
            self.log(f"{prefix}test_{metric}", mean, batch_size=1)
            self.log(f"{prefix}test_{metric}_ci95", half, batch_size=1)
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.is_global_zero:
            self._report(out)

    def _report(self, out: Path) -> None:
        tasks = self.trainer.datamodule.test_tasks if self.trainer.datamodule is not None else "?"
        lines = [f"few-shot meta-test, {tasks} tasks: {self.metric} (mean ± 95% CI)"]
        lines += [f"  {label:28s} {mean:.4f} ± {half:.4f}" for label, (mean, half) in self.results.items()]
        path = curves_plot(self.history, self.metric, out / "few_shot_curves.png")
        if path is not None:
            lines.append(f"  validation {self.metric} against meta-training step: {path}")
            log_image(self.loggers, "few_shot_curves", path)
        rank_zero_info("\n".join(lines))

    # -- baselines ---------------------------------------------------------------------------
    def _device_batch(self, batch: Any) -> Any:
        strategy, precision = self.trainer.strategy, self.trainer.precision_plugin
        return precision.convert_input(strategy.batch_to_device(batch))

    def _validate_outer(self, method: str, outer: Tree) -> float:
        """``method``'s mean validation score with meta-parameters ``outer``."""
        data = self.trainer.datamodule
        self._scores = {}
        for batch in data.eval_tasks("val"):
            batch = self._device_batch(batch)
            self._scores.setdefault(method, []).append((batch["task"], self.task_scores(method, outer, batch)))
        return self._summarise()[method][0]

    def train_baseline(self, method: str, steps: int, checkpoints: set[int]) -> Tree:
        """``method`` trained on the method's tasks for ``steps`` steps, validated after the
        steps in ``checkpoints``; returns its meta-parameters."""
        data = self.trainer.datamodule
        like = next(self.parameters())
        outer = {k: v.to(like) for k, v in self.initial_outer(method).items()}
        train = data.train_dataloader().dataset
        if method == "pretrain":
            state = {"outer": outer, "outer_m": tree.zeros_like(outer), "outer_s": tree.zeros_like(outer), "t": 0}
        else:
            form = self.formulation(method)
            spec = {**algorithm_spec(method, None), "outer_lr": self.baseline_lr}
            algorithm = algorithms.get(spec.pop("name"), problem=form.problem, comm=self.comm, **spec)
            state = algorithm.init(outer, {})
        for t in range(steps):
            batch = self._device_batch(train[t])
            if method == "pretrain":
                state, _ = self.pretrain_update(state, batch, self.baseline_lr)
            else:
                state = algorithm.restart(state, form.inner_init(state["outer"], batch["inner"]))
                state, _ = algorithm.step(state, batch["inner"], batch["outer"])
            if t + 1 in checkpoints:
                self.history.setdefault(method, []).append((t + 1, self._validate_outer(method, state["outer"])))
        return tree.detach(state["outer"])

    def on_train_start(self) -> None:
        """Trains the baselines first, for the run's ``max_steps`` on the same tasks, validated
        where the method will be; they are in every checkpoint, so a resumed run keeps them."""
        trainer, data = self.trainer, self.trainer.datamodule
        if data is None or not hasattr(data, "eval_tasks") or trainer.max_steps < 1:
            return
        for name in self.baselines:
            if name not in self.baseline_variables:
                self.baseline_variables[name] = self.train_baseline(
                    name, trainer.max_steps, self._baseline_checkpoints()
                )

    def _validate_last_step(self) -> None:
        """Validates the method after the step that reaches ``max_steps`` (Lightning's loop stops
        without validating it), so that its curve ends where the baselines' do; before the
        step's checkpoint is written."""
        if self.global_step == self.trainer.max_steps and self.global_step in self._baseline_checkpoints():
            if (self.history.get(self.method) or [(0, 0.0)])[-1][0] < self.global_step:  # sanity checks leave []
                score = self._validate_outer(self.method, self.outer)
                self.history.setdefault(self.method, []).append((self.global_step, score))

    def _baseline_checkpoints(self) -> set[int]:
        trainer = self.trainer
        every = trainer.val_check_interval
        by_steps = isinstance(every, int) and trainer.check_val_every_n_epoch is None
        if not by_steps or trainer.limit_val_batches == 0 or trainer.max_steps < 1:
            return set()
        return set(range(every, trainer.max_steps + 1, every))

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["few_shot"] = {"history": self.history, "baselines": self.baseline_variables}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("few_shot", {})
        self.history = {k: [tuple(p) for p in v] for k, v in saved.get("history", {}).items()}
        self.baseline_variables = saved.get("baselines", {})


def curves_plot(history: dict[str, list[tuple[int, float]]], metric: str, path: Path) -> Path | None:
    """Validation score against meta-training step, one line per method (PNG; ``None``
    without history)."""
    if not any(history.values()):
        return None
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, points in history.items():
        if points:
            steps, values = zip(*sorted(points), strict=True)
            ax.plot(steps, values, marker="o", label=label)
    ax.set_xlabel("meta-training step")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
