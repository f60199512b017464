"""Security audits from the command line: ``bilevel-dist test --config recipes/security/….yaml``.

- :class:`WitchesBrewAudit`: the thesis's poisoning protocol (ch. 6) per case — train a clean
  model, brew poisons at it (:func:`~.witches_brew.attack_case`), retrain victims from scratch on
  the poisoned and on the clean set — and the success rate over cases ± its standard error.
- :class:`BackdoorAudit`: the digits backdoor experiment (:mod:`.backdoor`): clean, heuristic and
  BLO victims per seed, their benign / attack / artefact RMSE.

Both are audits, not trainable models: every training (clean model, brew, victims) happens
inside ``test``, from the seeds, so ``test`` needs no checkpoint and ``fit`` has nothing to fit
(it exits 2 naming ``model.class_path`` and pointing to ``test``). The dataset is a setting of
the audit, so that a target index outside the test set is caught at construction; the CLI's
``data:`` section is :class:`SecurityData`, one placeholder batch that runs the audit once. The
test writes its CSV and PNG to the log directory and logs its summary metrics.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader

from bilevel_dist._checks import ConfigError, positive_float, positive_int, setting
from bilevel_dist.figures import log_image, pyplot
from bilevel_dist.recipes.security import backdoor
from bilevel_dist.recipes.security.data import BACKDOOR_DATASETS, DATASETS, backdoor_images, choose_case, load
from bilevel_dist.recipes.security.networks import NETWORKS, classifier
from bilevel_dist.recipes.security.witches_brew import (
    Augmentation,
    CaseResult,
    attack_case,
    success_rate,
    train_victims,
)

TRAINING_SETTINGS = {"epochs", "lr", "batch_size", "momentum", "weight_decay", "milestones"}
BLO_SETTINGS = set(backdoor.BLOConfig.__dataclass_fields__)


def augmentation_setting(key: str, value: dict[str, Any] | None, integer: bool) -> Augmentation | None:
    """``{shift, flip}`` as an :class:`~.witches_brew.Augmentation` (``None``: none); ``integer``
    shifts are whole pixels (the victims' crops), otherwise resampled bilinearly (the brew's)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(key, f"give {{shift: ..., flip: ...}}, got {value!r}")
    unknown = sorted(set(value) - {"shift", "flip"})
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", "augmentation takes shift and flip")
    shift, flip = value.get("shift", 4 if integer else 1.0), value.get("flip", False)
    if integer:
        setting(f"{key}.shift", lambda k, v: positive_int(k, v, allow_zero=True), shift)
    else:
        setting(f"{key}.shift", lambda k, v: positive_float(k, v, allow_zero=True), shift)
    if not isinstance(flip, bool):
        raise ConfigError(f"{key}.flip", f"flip is true or false, got {flip!r}")
    return Augmentation(float(shift), flip, integer=integer)


class SecurityData(L.LightningDataModule):
    """The placeholder data of an audit: one test batch, on which the audit runs once (the
    audit's own ``dataset`` setting holds the data it attacks)."""

    def test_dataloader(self) -> DataLoader:
        return DataLoader([torch.zeros(1)], batch_size=None)


class _Audit(L.LightningModule):
    """What both audits share: one dummy test batch (the audit runs once, in ``test_step``),
    nothing to fit, the output directory, and independent units (cases, seeds) sharded across
    ranks and, with ``results_dir``, kept as they finish so that a killed audit resumes."""

    def __init__(self, results_dir: str | None = None) -> None:
        super().__init__()
        self.results_dir = results_dir
        self.results: dict[str, Any] = {}

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._nothing_to_fit()

    def _nothing_to_fit(self) -> None:
        name = type(self).__name__
        raise ConfigError("model.class_path", f"{name} trains its models inside the audit; run `bilevel-dist test`")

    # defined so that Lightning's loop check passes and `fit` reaches setup's one-line error
    def training_step(self, batch: Any, batch_idx: int) -> None:
        self._nothing_to_fit()

    def configure_optimizers(self) -> None:
        self._nothing_to_fit()

    def test_dataloader(self) -> DataLoader:
        return DataLoader([torch.zeros(1)], batch_size=None)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        # Lightning tests under inference mode; the audit trains, so gradients back on
        # every rank: the log directory is broadcast from rank 0 under DDP
        self._out = Path(self.results_dir or self.trainer.log_dir or self.trainer.default_root_dir)
        with torch.inference_mode(False), torch.enable_grad():
            self.audit()

    def audit(self) -> None:
        raise NotImplementedError

    def out_dir(self) -> Path:
        self._out.mkdir(parents=True, exist_ok=True)
        return self._out

    def run_units(self, count: int, run: Callable[[int], Any]) -> list[Any]:
        """``[run(0), …, run(count − 1)]`` on every rank: rank ``r`` of ``W`` runs units ``r, r + W,
        …`` (each unit is seeded on its own, so the split changes nothing), then one gather. With
        ``results_dir`` each finished unit is saved there (``units/``, written whole or not at all,
        keyed by the audit's settings) and a rerun with the same settings loads it instead."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        mine = {i: self._unit(i, run) for i in range(rank, count, world)}
        if world > 1:
            buffer = io.BytesIO()
            torch.save(mine, buffer)
            parts: list[Any] = [None] * world
            torch.distributed.all_gather_object(parts, buffer.getvalue())
            mine = {}
            for part in parts:
                mine.update(torch.load(io.BytesIO(part), map_location="cpu", weights_only=False))
        return [mine[i] for i in range(count)]

    def _unit(self, i: int, run: Callable[[int], Any]) -> Any:
        if self.results_dir is None:
            return run(i)
        settings = json.dumps(dict(self.hparams), sort_keys=True, default=str)
        key = hashlib.sha256(settings.encode()).hexdigest()[:16]
        path = Path(self.results_dir) / "units" / f"{type(self).__name__}-{key}-{i}.pt"
        if path.exists():
            rank_zero_info(f"unit {i}: reusing {path}")
            return torch.load(path, map_location="cpu", weights_only=False)  # the audit's own file
        result = run(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(result, partial)
        os.replace(partial, path)  # a kill leaves the old state or the new, never half a file
        return result


class WitchesBrewAudit(_Audit):
    """Witches' Brew (clean-label poisoning by gradient alignment) over ``cases`` poison-target
    cases on a classifier trained from scratch.

    Args:
        dataset: ``blobs`` (the thesis's CPU toy), ``digits``, or ``mnist``/``cifar10`` from ``root``.
        data_seed: the data draw (blobs) or split (digits).
        eps: the poisons' bound ``‖Δ‖∞ ≤ ε`` (input units; images also stay on [0, 1]).
        budget: the poisoned fraction of the training set, in (0, 1].
        target: the target test index (every case attacks it), or ``None``: each case draws one
            the clean model classifies correctly.
        adversarial: the adversarial class, or ``None``: drawn per case.
        cases: the number of cases; case ``i`` uses seed ``seed + i`` (clean model ``10000 + seed + i``).
        victims: victims per case, seeds ``0 … victims − 1``, trained poisoned and clean.
        victim_seeds: the victims' seeds, overriding ``victims``: ``[3]`` is victim 3 of a full
            audit alone (the sweep of ``recipes/security/witches_brew_sweep.yaml`` runs one
            (case, victim seed) pair a trial; the pair's flips equal the full audit's).
        restarts, steps, lr: the brew's restarts, signed-Adam steps and step (absolute, not divided
            by the ensemble size as the thesis's code does; the toy's 0.4ε).
        network: the clean model's and the victims' architecture, ``mlp``, ``convnet`` (the
            thesis's 6-layer ConvNet) or ``resnet18`` (CIFAR stem); the last two need images.
        widths: the MLP's hidden widths (input and class count come from the data).
        ensemble: brew on this many clean models (alignment averaged over them in one ``vmap``).
        poison_batch, exact_batches: the brew's poison mini-batches (:func:`~.witches_brew.brew`).
        augment: the brew's differentiable augmentation, ``{shift: pixels, flip: bool}`` (images).
        victim_augment: the clean model's and the victims' augmentation, ``{shift: whole pixels,
            flip: bool}`` (random crops with zero padding and flips; images).
        clean_control: also train every victim seed on the clean set (the control column).
        training: :func:`~.witches_brew.train_victims` settings shared by the clean model and the
            victims (``epochs``, ``lr``, ``batch_size``, ``momentum``, ``weight_decay``, ``milestones``).
        seed: the first case's seed.
        results_dir: where the test writes (default: the log directory); given, finished cases are
            kept there and a rerun with the same settings resumes from them. Ranks split the cases.
    """

    #: what ``test`` logs, for a ``bilevel-dist tune`` search with ``stage: test``
    test_metrics = ("test_success", "test_success_se", "test_clean_success", "test_clean_success_se", "test_accuracy")

    def __init__(
        self,
        dataset: str = "blobs",
        root: str | None = None,
        data_seed: int = 0,
        eps: float = 1.0,
        budget: float = 0.01,
        target: int | None = None,
        adversarial: int | None = None,
        cases: int = 2,
        victims: int = 8,
        victim_seeds: list[int] | None = None,
        restarts: int = 4,
        steps: int = 250,
        lr: float = 0.4,
        network: str = "mlp",
        widths: list[int] | None = None,
        ensemble: int = 1,
        poison_batch: int | None = None,
        exact_batches: bool = False,
        augment: dict[str, Any] | None = None,
        victim_augment: dict[str, Any] | None = None,
        clean_control: bool = True,
        training: dict[str, Any] | None = None,
        seed: int = 0,
        results_dir: str | None = None,
    ) -> None:
        super().__init__(results_dir)
        self.save_hyperparameters()
        # cheap checks first, so a bad value costs no data loading
        self.eps = setting("eps", positive_float, eps)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ConfigError("budget", f"the poison budget is a fraction of the training set in (0, 1], got {budget}")
        self.budget = float(budget)
        self.cases = setting("cases", positive_int, cases)
        self.victims = setting("victims", positive_int, victims)
        if victim_seeds is not None:
            if not isinstance(victim_seeds, (list, tuple)) or not victim_seeds:
                raise ConfigError("victim_seeds", f"give a non-empty list of seeds, got {victim_seeds!r}")
            for i, s in enumerate(victim_seeds):
                setting(f"victim_seeds.{i}", lambda k, v: positive_int(k, v, allow_zero=True), s)
            if len(set(victim_seeds)) < len(victim_seeds):
                raise ConfigError("victim_seeds", f"the seeds repeat: {list(victim_seeds)}")
            self.victims = len(victim_seeds)
        self.victim_seeds = list(range(self.victims)) if victim_seeds is None else [int(s) for s in victim_seeds]
        self.restarts = setting("restarts", positive_int, restarts)
        self.steps = setting("steps", positive_int, steps)
        self.lr = setting("lr", positive_float, lr)
        self.widths = [128, 128] if widths is None else list(widths)
        for i, w in enumerate(self.widths):
            setting(f"widths.{i}", positive_int, w)
        if network not in NETWORKS:
            raise ConfigError("network", f"unknown network {network!r}; choose one of {list(NETWORKS)}")
        self.network = network
        self.ensemble = setting("ensemble", positive_int, ensemble)
        self.poison_batch = None if poison_batch is None else setting("poison_batch", positive_int, poison_batch)
        for key, value in (("exact_batches", exact_batches), ("clean_control", clean_control)):
            if not isinstance(value, bool):
                raise ConfigError(key, f"{key} is true or false, got {value!r}")
        self.exact_batches, self.clean_control = exact_batches, clean_control
        self.augmentation = augmentation_setting("augment", augment, integer=False)
        self.victim_augmentation = augmentation_setting("victim_augment", victim_augment, integer=True)
        unknown = sorted(set(training or {}) - TRAINING_SETTINGS)
        if unknown:
            raise ConfigError(f"training.{unknown[0]}", f"training takes {sorted(TRAINING_SETTINGS)}")
        self.victim_training = dict(training or {})
        self.seed = seed
        if dataset not in DATASETS:
            raise ConfigError("dataset", f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
        (self.x, self.y, self.x_test, self.y_test), self.box = load(dataset, root, data_seed)
        self.classes = int(max(int(self.y.max()), int(self.y_test.max())) + 1)
        n_test = len(self.y_test)
        if target is not None and (isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < n_test):
            raise ConfigError("target", f"the target index must lie in [0, {n_test}) (the test set), got {target!r}")
        if adversarial is not None and not 0 <= adversarial < self.classes:
            raise ConfigError(
                "adversarial", f"the adversarial class must lie in [0, {self.classes}), got {adversarial}"
            )
        if target is not None and adversarial is not None and int(self.y_test[target]) == adversarial:
            raise ConfigError("adversarial", f"the adversarial class {adversarial} is target {target}'s own class")
        self.target, self.adversarial = target, adversarial
        for key in ("augment", "victim_augment"):
            if (augment, victim_augment)[key == "victim_augment"] is not None and self.x.dim() != 4:
                raise ConfigError(key, f"augmentation needs images, {dataset} holds vectors")
        self.factory = classifier(network, self.x.shape[1:], self.classes, self.widths)

    def run_case(self, i: int) -> CaseResult:
        """Case ``i``: :func:`attack_case` with seed ``seed + i`` (a given target or adversarial
        class fixes the case, its poisons still drawn from that seed)."""
        seed = self.seed + i
        x, y, x_test, y_test = (t.to(self.device) for t in (self.x, self.y, self.x_test, self.y_test))
        factory = self.factory
        case = None
        if self.target is not None or self.adversarial is not None:
            # the clean model attack_case will train (same seed): a drawn target must be one it gets right
            clean = train_victims(
                factory, x, y, [10_000 + seed], augmentation=self.victim_augmentation, **self.victim_training
            )
            predicted = clean.predict(x_test)[0]
            case = choose_case(y, y_test, predicted, self.budget, seed, self.target, self.adversarial, self.classes)
        return attack_case(
            factory, x, y, x_test, y_test, eps=self.eps, budget=self.budget, case=case, seed=seed,
            victim_seeds=self.victim_seeds, restarts=self.restarts, steps=self.steps, lr=self.lr, box=self.box,
            training=self.victim_training, ensemble=self.ensemble, poison_batch=self.poison_batch,
            exact_batches=self.exact_batches, augmentation=self.augmentation,
            victim_augmentation=self.victim_augmentation, clean_control=self.clean_control,
        )  # fmt: skip

    def audit(self) -> None:
        results = self.run_units(self.cases, self.run_case)
        poisoned = torch.stack([r.poisoned.cpu() for r in results])
        mean, se = success_rate(poisoned)
        accuracy = float(torch.stack([r.accuracy.cpu() for r in results]).mean())
        summary = {"test_success": mean, "test_success_se": se, "test_accuracy": accuracy}
        clean = None
        if self.clean_control:
            clean = success_rate(torch.stack([r.clean.cpu() for r in results]))
            summary.update(test_clean_success=clean[0], test_clean_success_se=clean[1])
        self.results = {"cases": results, "success": (mean, se), "clean": clean}
        for key, value in summary.items():
            self.log(key, value, batch_size=1, sync_dist=False)
        if self.trainer.is_global_zero:
            self.write(results, accuracy)

    def write(self, results: list[CaseResult], accuracy: float) -> None:
        """``success.csv`` (one row per case and victim seed), ``success.png``, the table printed."""
        out = self.out_dir()
        with open(out / "success.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case", "target", "label", "adversarial", "victim_seed", "poisoned_flip", "clean_flip",
                             "poisoned_accuracy", "best_alignment"])  # fmt: skip
            for i, r in enumerate(results):
                for v, victim in enumerate(self.victim_seeds):
                    writer.writerow([
                        i, r.case.target, r.case.label, r.case.adversarial, victim, int(r.poisoned[v]),
                        int(r.clean[v]) if self.clean_control else "",
                        f"{float(r.accuracy[v]):.4f}", f"{float(r.brew.final[r.brew.best]):.4f}",
                    ])  # fmt: skip
        figure = success_figure(results, out / "success.png")
        log_image(self.loggers, "success", figure)
        mean, se = self.results["success"]
        name = self.hparams["dataset"]
        lines = [
            f"Witches' Brew on {name}: ε {self.eps:g}, budget {self.budget:.1%}, {self.cases} case(s) × "
            f"{self.victims} victims",
            f"  {'case':>4} {'target':>6} {'class':>5} {'adv':>3} {'poisoned':>9} {'clean':>6} {'best B':>7}",
        ]
        for i, r in enumerate(results):
            lines.append(
                f"  {i:>4} {r.case.target:>6} {r.case.label:>5} {r.case.adversarial:>3} "
                f"{int(r.poisoned.sum()):>5}/{self.victims:<3} "
                + (f"{int(r.clean.sum()):>2}/{self.victims:<3} " if self.clean_control else f"{'–':>6} ")
                + f"{float(r.brew.final[r.brew.best]):>7.3f}"
            )
        control = (
            "no clean control"
            if self.results["clean"] is None
            else "{:.3f} ± {:.3f} (clean control)".format(*self.results["clean"])
        )
        lines += [
            f"  success {mean:.3f} ± {se:.3f} (poisoned), {control}; poisoned victims' test accuracy {accuracy:.3f}",
            f"  wrote {out / 'success.csv'}, {figure}",
        ]
        rank_zero_info("\n".join(lines))


def success_figure(results: list[CaseResult], path: Path) -> Path:
    """Left: per case, the fraction of victims whose target flipped, poisoned against clean.
    Right: every case's alignment loss ``B`` of the kept restart along the brew."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    cases = range(len(results))
    width = 0.38
    left.bar([c - width / 2 for c in cases], [float(r.poisoned.float().mean()) for r in results], width,
             label="poisoned")  # fmt: skip
    if all(len(r.clean) for r in results):
        left.bar([c + width / 2 for c in cases], [float(r.clean.float().mean()) for r in results], width,
                 label="clean")  # fmt: skip
    left.set_xticks(list(cases), [f"{r.case.target}: {r.case.label}→{r.case.adversarial}" for r in results],
                    fontsize=7)  # fmt: skip
    left.set_ylim(0, 1.05)
    left.set_ylabel("target flipped (fraction of victims)", fontsize=8)
    left.legend(fontsize=7)
    for i, r in enumerate(results):
        history = r.brew.history[:, r.brew.best].float().cpu().numpy()
        right.plot(range(1, len(history) + 1), history, label=f"case {i}")
    right.set_xlabel("brew step", fontsize=8)
    right.set_ylabel("alignment loss B", fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


CASE_KEY, VICTIMS_KEY = "model.seed", "model.victim_seeds"


def success_table(table: Any, sweep_dir: str) -> str:
    """The ``report:`` of ``recipes/security/witches_brew_sweep.yaml``: from a sweep whose trials
    are one case (``model.seed``) × victim seeds (``model.victim_seeds``) each, per case the
    poisoned and clean victims flipped, and the success over cases as the audit computes it (each
    case's rate over its victims, then mean ± standard error over cases, :func:`success_rate`).
    Printed, written to ``success.md`` in ``sweep_dir`` and returned."""
    from bilevel_dist.tune.sweep import store

    missing = [key for key in (CASE_KEY, VICTIMS_KEY, "test_success", "test_clean_success") if key not in table]
    if missing:
        raise ValueError(f"the sweep's table has no {missing[0]}: search {CASE_KEY} and {VICTIMS_KEY}, stage test")
    finished = table[table["status"] == "OK"]
    cases: dict[int, dict[str, Any]] = {}
    for _, row in finished.iterrows():
        seeds = list(row[VICTIMS_KEY])
        case = cases.setdefault(int(row[CASE_KEY]), {"seeds": [], "poisoned": 0, "clean": 0})
        case["seeds"] += seeds
        # a trial's success is the mean over its victims: times their number, its flips
        case["poisoned"] += round(float(row["test_success"]) * len(seeds))
        case["clean"] += round(float(row["test_clean_success"]) * len(seeds))
    lines = ["| case seed | victim seeds | poisoned flipped | clean flipped |", "|---|---|---|---|"]
    for seed, case in sorted(cases.items()):
        n, victims = len(case["seeds"]), ", ".join(map(str, sorted(case["seeds"])))
        lines.append(f"| {seed} | {victims} | {case['poisoned']}/{n} | {case['clean']}/{n} |")
    if cases:
        poisoned = torch.tensor([[c["poisoned"] / len(c["seeds"])] for c in cases.values()], dtype=torch.float64)
        clean = torch.tensor([[c["clean"] / len(c["seeds"])] for c in cases.values()], dtype=torch.float64)
        (mean, se), (clean_mean, clean_se) = success_rate(poisoned), success_rate(clean)
        lines.append(
            f"\nsuccess {mean:.3f} ± {se:.3f} (poisoned), {clean_mean:.3f} ± {clean_se:.3f} (clean control): "
            f"mean ± standard error over {len(cases)} case(s) of the per-case rate"
        )
    if failed := len(table) - len(finished):
        lines.append(f"{failed} trial(s) failed and are left out")
    text = "\n".join(lines)
    print("\nWitches' Brew: targets flipped to the adversarial class, per case\n" + text)
    store(f"{sweep_dir}/success.md", text + "\n")
    return text


# ---------------------------------------------------------------------------------------------
# backdoor


class BackdoorAudit(_Audit):
    """Backdoor attacks on image reconstruction (heuristic BadNets square against the BLO
    trigger), averaged over ``seeds``; settings as :class:`.backdoor.Setting`, ``blo`` the
    :class:`.backdoor.BLOConfig` fields to change (``blo.solver``: ``reverse``, ``penalty`` or
    ``aid``).

    Args:
        dataset: ``digits`` (scikit-learn's 8×8, split per seed) or ``mnist`` (28×28, the four
            IDX files in ``root``, read by the denoising recipe's reader, loaded once).
        network: the reconstructor, ``mlp`` or ``cae`` (:class:`.backdoor.ConvAutoencoder`;
            ``channels`` its four convolutions' widths, default by image size).
        lr: the victims' (and the BLO surrogate's pretraining) Adam step.
        results_dir: as :class:`WitchesBrewAudit`'s (finished seeds kept there; ranks split the seeds).
    """

    #: what ``test`` logs (mean over seeds), for a ``bilevel-dist tune`` search with ``stage: test``
    test_metrics = tuple(
        f"test_{method}_{metric}"
        for method in ("clean", "heuristic", "blo")
        for metric in ("benign", "attack", "artefact")
        if (method, metric) != ("clean", "artefact")
    )

    def __init__(
        self,
        seeds: list[int] | None = None,
        ratio: float = 0.3,
        trigger_size: int = 3,
        bound: float = 1.0,
        target_size: int = 3,
        target_value: float = 1.0,
        keep: float = 0.5,
        noise: float = 0.02,
        epochs: int = 30,
        blo: dict[str, Any] | None = None,
        examples: int = 4,
        results_dir: str | None = None,
        dataset: str = "digits",
        root: str | None = None,
        network: str = "mlp",
        channels: list[int] | None = None,
        lr: float = 3e-3,
    ) -> None:
        super().__init__(results_dir)
        self.save_hyperparameters()
        self.seeds = [0, 1, 2] if seeds is None else list(seeds)
        if not self.seeds:
            raise ConfigError("seeds", "give at least one seed")
        if dataset not in BACKDOOR_DATASETS:
            raise ConfigError("dataset", f"unknown dataset {dataset!r}; choose one of {list(BACKDOOR_DATASETS)}")
        unknown = sorted(set(blo or {}) - BLO_SETTINGS)
        if unknown:
            raise ConfigError(f"blo.{unknown[0]}", f"blo takes {sorted(BLO_SETTINGS)}")
        try:
            blo_config = backdoor.BLOConfig(**(blo or {}))
        except ConfigError as error:
            raise error.under("blo") from None
        self.examples = setting("examples", positive_int, examples)
        setting("epochs", positive_int, epochs)
        side = 28 if dataset == "mnist" else backdoor.SIDE
        # Setting checks ratio, trigger_size, bound, network, channels and lr and raises ConfigError naming them
        self.setting = backdoor.Setting(
            ratio=ratio, trigger_size=trigger_size, bound=bound, target_size=target_size, target_value=target_value,
            keep=keep, noise=noise, epochs=epochs, blo=blo_config, side=side, network=network,
            channels=None if channels is None else tuple(channels), lr=lr,
        )  # fmt: skip
        backdoor.plus_target(target_size, target_value, side)  # names target_size now rather than mid-run
        backdoor.pixel_mask(keep, side=side)
        self.dataset = dataset
        self.data = backdoor_images(dataset, root)  # None for digits: run_seed splits them per seed

    def audit(self) -> None:
        def run(j: int) -> tuple[dict, Any]:
            result, victims = backdoor.run_seed(
                self.setting, self.seeds[j], victims=True, data=self.data, device=self.device
            )
            return result, victims if j == 0 else None  # the figure shows the first seed

        units = self.run_units(len(self.seeds), run)
        runs, shown = [result for result, _ in units], units[0][1]
        mean = backdoor.average(runs)
        self.results = {"runs": runs, "mean": mean}
        for method, metrics in mean.items():
            for metric, value in metrics.items():
                if value is not None:
                    self.log(f"test_{method}_{metric}", value, batch_size=1, sync_dist=False)
        if self.trainer.is_global_zero:
            self.write(runs, mean, shown)

    def write(self, runs: list[dict], mean: dict, shown: dict[str, Any]) -> None:
        """``backdoor.csv`` (per seed and the mean), ``backdoor.png``, the table printed."""
        out = self.out_dir()
        metrics = ("benign", "attack", "artefact")
        with open(out / "backdoor.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["seed", "method", *metrics])
            for seed, run in [*zip(self.seeds, runs, strict=True), ("mean", mean)]:
                for method, values in run.items():
                    writer.writerow(
                        [seed, method, *("NA" if values[m] is None else f"{values[m]:.6f}" for m in metrics)]
                    )
        figure = examples_figure(shown, self.examples, out / "backdoor.png")
        log_image(self.loggers, "backdoor", figure)
        s = self.setting
        lines = [
            f"Backdoor on {self.dataset} ({s.network}, BLO solver {s.blo.solver}): ratio {s.ratio:g}, "
            f"{s.trigger_size}×{s.trigger_size} trigger, bound {s.bound:g}, mean over seeds {self.seeds} (RMSE)",
            f"  {'method':<10} {'benign':>8} {'attack':>8} {'artefact':>9}",
        ]
        for method, values in mean.items():
            cells = ["NA" if values[m] is None else f"{values[m]:.4f}" for m in metrics]
            lines.append(f"  {method:<10} {cells[0]:>8} {cells[1]:>8} {cells[2]:>9}")
        lines.append(f"  wrote {out / 'backdoor.csv'}, {figure}")
        rank_zero_info("\n".join(lines))


def examples_figure(shown: dict[str, Any], count: int, path: Path) -> Path:
    """Rows: test images; columns: the truth, the measurement, each victim's output on the clean
    and on the triggered measurement (its own trigger)."""
    plt = pyplot()
    z, x = shown["z"][:count], shown["x"][:count]
    columns: list[tuple[str, Tensor]] = [("truth", x), ("measured z", z)]
    with torch.no_grad():
        for name, model in shown["models"].items():
            trigger = shown["triggers"][name]
            columns += [(f"{name}: f(z)", model(z)), (f"{name}: f(z+δ)", model(z + trigger))]
    fig, axes = plt.subplots(len(x), len(columns), figsize=(1.2 * len(columns), 1.25 * len(x)), squeeze=False)
    for j, (title, images) in enumerate(columns):
        for i in range(len(x)):
            ax = axes[i][j]
            ax.imshow(images[i, 0].float().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "BackdoorAudit",
    "SecurityData",
    "WitchesBrewAudit",
    "examples_figure",
    "success_figure",
    "success_table",
]
