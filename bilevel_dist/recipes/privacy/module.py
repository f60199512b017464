"""``GradientInversion``: the privacy audit of a federated update, ``bilevel-dist fit --config
recipes/privacy/fedsgd_photo.yaml``.

The reconstruction is the outer variable: ``restarts`` candidate image sets, one row each,
sharded across ranks. The lower level is the client's local training from the global model,
replayed on each candidate (``E·n/B`` SGD steps at the client's ``local_lr``, in the client's
minibatch order), one batched problem with no collective, and differentiated by reverse mode
through its steps (:class:`~.algorithm.Inversion`, an ITD). The outer loss is one minus the
cosine between the replayed update and the observed one over all parameter tensors, plus
``tv`` times the total variation (Geiping et al. 2020, thesis ch. 5).

The observed update comes from the federated recipe's client training (``FedAvg``'s local
steps, and its DP-FedAvg clipping and noise with ``noise_multiplier > 0``) on the data module's
images, or from ``update_file``. ``unrolled=False`` is the FedSGD-style attack that ignores the
local steps (one gradient of the whole set). After training, the restart of least cost is
scored against the truth (PSNR and SSIM per image), drawn over the truth, logged and printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.func import functional_call, vmap

from bilevel_dist import tree
from bilevel_dist._checks import ConfigError, one_line, positive_float, positive_int, setting
from bilevel_dist.figures import log_image, pyplot
from bilevel_dist.lightning import BilevelModule
from bilevel_dist.recipes.privacy import attack, models
from bilevel_dist.recipes.privacy.algorithm import Inversion
from bilevel_dist.solvers import GD, PerStep, run
from bilevel_dist.tree import Tree

LABELS = ("known", "idlg")
#: the attack settings a config may change in ``algorithm`` (the rest follow from the client)
TUNABLE = {"outer_lr", "signed", "milestones", "gamma", "backprop_steps"}


class GradientInversion(BilevelModule):
    """Reconstructs a client's images from its update.

    Args:
        model: the attacked network (:mod:`.models`): ``convnet``, ``lenet``, ``resnet18``, or the
            federated recipe's ``linear``, ``mlp``, ``cnn``.
        width: the ConvNet's D (the ResNet's base width, the MLP's hidden units).
        model_seed: the seed of the global model (an untrained network, as in Table 5.2).
        local_lr: the client's local step size τ (the thesis's code: 1e-4).
        tv: the weight of the total variation.
        attack_lr: the attack's Adam step size (thesis: 0.1; 1 for FedAvg).
        signed: Adam on the hypergradient's sign (thesis) instead of the hypergradient.
        unrolled: replay the client's local steps (the bilevel attack); ``False`` attacks the
            update as one gradient of the whole set (FedSGD-style, ignoring the local steps).
        labels: ``known`` (the thesis's threat model) or ``idlg`` (recovered from the update; one
            image only).
        clip, noise_multiplier, dp_seed: the client's DP-FedAvg (federated recipe) settings.
        update_file: a ``torch.save``-d ``{"update": {name: tensor}}`` (optionally ``"model"``,
            the global parameters) to attack instead of the simulated one.
        global_model: a ``BilevelModule`` checkpoint whose outer variables are the attacked
            global model: e.g. the federated recipe's (``model: cnn``, ``mlp`` or ``linear`` are
            its networks; it trains on raw pixels: set ``data.normalisation: none``), so that what
            a user trained is what is audited. Default: the untrained ``model_seed`` network.
        save_update: where to write the simulated update (and the global model) as such a file.
        init_seed: the seed of the restarts' N(0, 1) starting images.
        algorithm: settings of the attack's algorithm (:class:`~.algorithm.Inversion`) over these:
            ``outer_lr``, ``signed``, ``milestones``, ``gamma``, ``backprop_steps``.
    """

    validation_metrics = ("val_psnr", "val_ssim", "val_cost")

    def __init__(
        self,
        model: str = "convnet",
        width: int = 16,
        model_seed: int = 0,
        local_lr: float = 1e-4,
        tv: float = 1e-4,
        attack_lr: float = 0.1,
        signed: bool = True,
        unrolled: bool = True,
        labels: str = "known",
        clip: float | None = None,
        noise_multiplier: float = 0.0,
        dp_seed: int = 0,
        update_file: str | None = None,
        global_model: str | None = None,
        save_update: str | None = None,
        init_seed: int = 0,
        algorithm: dict[str, Any] | None = None,
        nonfinite: str = "raise",
    ) -> None:
        if model not in models.NAMES:
            raise ConfigError("model", f"unknown model {model!r}; choose one of {list(models.NAMES)}")
        if labels not in LABELS:
            raise ConfigError("labels", f"labels must be one of {list(LABELS)}, got {labels!r}")
        if noise_multiplier and clip is None:
            raise ConfigError("clip", "DP-FedAvg (noise_multiplier > 0) needs a clip: the noise is scaled to it")
        for key, path in (("update_file", update_file), ("global_model", global_model)):
            if path is not None and not Path(path).expanduser().is_file():
                raise ConfigError(key, f"{key} {path!r} does not exist")
        if save_update is not None and not Path(save_update).expanduser().parent.is_dir():
            raise ConfigError("save_update", f"the directory of save_update {save_update!r} does not exist")
        fixed = sorted(set(algorithm or {}) - TUNABLE)
        if fixed:  # the replay must be the client's: its steps, step size and order come from the audit
            raise ConfigError(
                f"algorithm.{fixed[0]}",
                f"the attack's algorithm takes {sorted(TUNABLE)}; {fixed[0]!r} follows from the audited client",
            )
        spec = {"name": "inversion", "inner_lr": local_lr, "outer_lr": attack_lr, "signed": signed}
        if not unrolled:
            spec["inner_steps"] = 1
        spec |= algorithm or {}
        super().__init__(spec, per_sample=("images",), lower_level="batched", nonfinite=nonfinite)
        self.save_hyperparameters()
        self.model_name, self.model_seed = model, model_seed
        self.width = setting("width", positive_int, width)
        self.local_lr = setting("local_lr", positive_float, local_lr)
        self.tv = setting("tv", lambda k, v: positive_float(k, v, allow_zero=True), tv)
        self.unrolled, self.labels = unrolled, labels
        self.clip, self.noise_multiplier, self.dp_seed = clip, noise_multiplier, dp_seed
        self.update_file, self.global_model = update_file, global_model
        self.save_update, self.init_seed = save_update, init_seed
        self._net: nn.Module | None = None
        self._observed: tuple[torch.dtype, dict[str, Tree]] | None = None
        self._attacked: tuple[tuple[torch.dtype, torch.device], dict[str, Tree]] | None = None
        self.results: dict[str, Any] = {}

    # -- the audited client -------------------------------------------------------------------
    @property
    def data(self) -> Any:
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if data is None or not hasattr(data, "schedule"):
            raise ConfigError("data", "GradientInversion needs an AuditData data module")
        return data

    @property
    def net(self) -> nn.Module:
        if self._net is None:
            data = self.data
            net = models.build(self.model_name, data.input_shape, data.classes, self.width, self.model_seed)
            object.__setattr__(self, "_net", net)  # not a submodule: the attacked model is data, not a variable
        return self._net

    def _make_algorithm(self, from_data: dict[str, Any]) -> Inversion:
        try:
            return Inversion(self.problem, comm=self.comm, **{**from_data, **self._spec})
        except ConfigError as error:
            raise error.under("algorithm") from None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.data.setup(stage)
        if self.data.restarts < self.trainer.world_size:
            raise ConfigError(
                "data.restarts",
                f"{self.data.restarts} restarts for {self.trainer.world_size} processes: each needs one at least",
            )
        if self.update_file is not None:  # a mismatched file is a config error before any step
            self._read_update(torch.float32)
        elif self.global_model is not None:
            self._global_model()

    def _read_update(self, dtype: torch.dtype) -> dict[str, Tree]:
        saved = _load(self.update_file, "update_file")
        if not isinstance(saved, dict) or not isinstance(saved.get("update"), dict):
            raise ConfigError("update_file", f"{self.update_file} holds no {{'update': {{name: tensor}}}}")
        update = self._matching(saved["update"], "update_file", f"the update in {self.update_file}")
        if saved.get("model") is not None:
            model = self._matching(saved["model"], "update_file", f"the model in {self.update_file}")
        else:
            model = self._global_model()
        return {"model": _cast(model, dtype), "update": _cast(update, dtype)}

    def _global_model(self) -> Tree:
        """The attacked global parameters: a checkpoint's (``global_model``) or the network's own."""
        if self.global_model is None:
            return {k: v.detach() for k, v in self.net.named_parameters()}
        saved = _load(self.global_model, "global_model")
        if not isinstance(saved, dict) or "bilevel" not in saved or "state_dict" not in saved:
            raise ConfigError("global_model", f"{self.global_model} is not a bilevel-dist checkpoint")
        # a BilevelModule keeps replicated outer variables as parameters ("outer_vars.<name, | for .>")
        # and per-sample ones, gathered, under "bilevel"
        prefix = "outer_vars."
        outer = {k[len(prefix) :].replace("|", "."): v for k, v in saved["state_dict"].items() if k.startswith(prefix)}
        outer |= saved["bilevel"]["outer"]
        return self._matching(outer, "global_model", f"the global model in {self.global_model}")

    def _matching(self, given: Any, key: str, what: str) -> Tree:
        """``given`` checked against the network's parameter names and shapes."""
        params = dict(self.net.named_parameters())
        if not isinstance(given, dict) or set(given) != set(params):
            given = given if isinstance(given, dict) else {}
            lacking, extra = sorted(set(params) - set(given)), sorted(set(given) - set(params))
            problem = f"lacks the model's {lacking[0]!r}" if lacking else f"has {extra[0]!r}, which the model lacks"
            raise ConfigError(key, f"{what} {problem} ({self.model_name})")
        for k, v in given.items():
            if not isinstance(v, Tensor) or not v.is_floating_point():
                raise ConfigError(key, f"{what}: {k!r} is not a floating-point tensor")
            if tuple(v.shape) != tuple(params[k].shape):
                raise ConfigError(
                    key, f"{what}: {k!r} has shape {tuple(v.shape)}, the {self.model_name}'s {tuple(params[k].shape)}"
                )
        return {k: given[k] for k in params}  # the network's order

    def attacked(self, like: Tensor) -> dict[str, Tree]:
        """The global model and the observed update, in ``like``'s dtype and on its device (made
        once per dtype, copied once per device)."""
        key = (like.dtype, like.device)
        if self._attacked is None or self._attacked[0] != key:
            if self._observed is None or self._observed[0] != like.dtype:
                self._observed = (like.dtype, self._observe(like.dtype))
            self.net.to(device=like.device, dtype=like.dtype)
            found = {part: {k: v.to(like.device) for k, v in t.items()} for part, t in self._observed[1].items()}
            self._attacked = (key, found)
        return self._attacked[1]

    def _observe(self, dtype: torch.dtype) -> dict[str, Tree]:
        """The global model and the update under attack, on the CPU: read, or simulated from the
        client's true images and labels through the federated recipe's FedAvg."""
        self.net.to(device="cpu", dtype=dtype)
        if self.update_file is not None:
            found = self._read_update(dtype)
            where = ("update_file", f"the update in {self.update_file}")
        else:
            data = self.data
            model = _cast(self._global_model(), dtype)
            x = data.normalise(data.truth.to(dtype))
            update = attack.client_update(
                self.net, model, x, data.true_labels, data.schedule, self.local_lr,
                self.clip, self.noise_multiplier, self.dp_seed,
            )  # fmt: skip
            found = {"model": model, "update": update}
            where = ("local_lr", "the simulated client's update")
            if self.save_update and self.global_rank == 0:
                torch.save(found, Path(self.save_update).expanduser())
        flat = tree.flatten(found["update"])
        if not bool(flat.isfinite().all()) or not bool(flat.ne(0).any()):
            state = "is not finite" if not bool(flat.isfinite().all()) else "is zero"
            raise ConfigError(where[0], f"{where[1]} {state}: there is nothing to invert (a diverged client?)")
        return found

    def label_guess(self) -> int:
        """The single image's label read from the observed update's last linear bias (iDLG)."""
        linear = [name for name, m in self.net.named_modules() if isinstance(m, nn.Linear) and m.bias is not None]
        if not linear:
            raise ConfigError("labels", f"iDLG reads a linear last layer's bias; {self.model_name} has none")
        update = self.attacked(torch.zeros((), dtype=torch.get_default_dtype()))["update"]
        return attack.idlg_label(update[f"{linear[-1]}.bias"])

    # -- the bilevel problem -----------------------------------------------------------------
    def configure_variables(self) -> tuple[Tree, Tree]:
        data = self.data
        shape = (data.restarts, data.n, *data.input_shape)
        # drawn in float32 whatever the ambient dtype: the same start in every run and in score()
        start = torch.randn(shape, generator=torch.Generator().manual_seed(self.init_seed), dtype=torch.float32)
        return {"images": start}, {}

    def inner_init(self, outer: Tree, batch: dict[str, Tensor]) -> Tree:
        model = self.attacked(outer["images"])["model"]
        rows = batch["index"].shape[0]
        return {k: v.expand(rows, *v.shape).clone() for k, v in model.items()}

    def inner_loss(self, inner: Tree, outer: Tree, batch: dict[str, Tensor]) -> Tensor:
        """Each restart's local step: its candidates' minibatch cross-entropy, summed over restarts
        (the whole ``(S, B)`` schedule, as logged: the mean over its steps)."""
        slots = batch["slots"].flatten()
        x = outer["images"][batch["index"]][:, slots]
        scores = vmap(lambda p, xs: functional_call(self.net, p, (xs,)))(inner, x)
        y = batch["y"][slots].to(scores.device).expand(x.shape[0], -1)
        return F.cross_entropy(scores.flatten(0, 1), y.flatten(), reduction="sum") / slots.shape[0]

    def costs(self, inner: Tree, outer: Tree, batch: dict[str, Tensor]) -> Tensor:
        """Each restart's attack cost: ``1 − cos(θ_T − θ, U) + tv·TV(x)``."""
        found = self.attacked(outer["images"])
        model, update = found["model"], found["update"]
        replayed = {k: inner[k] - model[k] for k in model}
        images = outer["images"][batch["index"]]
        return attack.cosine_cost(replayed, update, rows=True) + self.tv * attack.total_variation(images)

    def outer_loss(self, inner: Tree, outer: Tree, batch: dict[str, Tensor]) -> Tensor:
        return self.costs(inner, outer, batch).sum()

    # -- training ----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.max_steps < 1:
            raise ConfigError("trainer.max_steps", "the attack's step decay is scheduled over max_steps: set it")
        self.algorithm.h["total_steps"] = self.trainer.max_steps  # the step decay's milestones
        if self.labels == "idlg":
            data = self.data
            if data.n != 1:
                raise ConfigError("labels", f"iDLG recovers the label of one image, the client has {data.n}")
            guess = self.label_guess()
            rank_zero_info(f"iDLG: label {guess} read from the update (truth {int(data.labels[0])})")
            data.labels = torch.tensor([guess])
        recovered = self.analytic_recovery()
        if recovered is not None:  # the cheap first check: no optimisation needed
            psnr, _ = attack.image_scores(recovered.double(), self.data.truth.double())
            self.results["analytic_psnr"] = float(psnr[0])
            rank_zero_info(f"analytic recovery of the linear first layer's input: PSNR {float(psnr[0]):.2f} dB")

    def analytic_recovery(self) -> Tensor | None:
        """The single image read off the update of a biased linear first layer (thesis Prop. 5.1),
        in pixels; ``None`` when the network does not start with one or the client has several
        images (the layer then holds their mixture)."""
        first = next((m for m in self.net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
        if not isinstance(first, nn.Linear) or first.bias is None or self.data.n != 1:
            return None
        update = self.attacked(torch.zeros((), dtype=torch.get_default_dtype()))["update"]
        names = {id(p): k for k, p in self.net.named_parameters()}
        weight, bias = update[names[id(first.weight)]], update[names[id(first.bias)]]
        x = attack.recover_input(weight, bias).view(1, *self.data.input_shape)
        return self.data.denormalise(x).clamp(0, 1).cpu()

    def attack_slots(self, slots: Tensor, n: int) -> Tensor:
        """The schedule the attack replays: the client's ``slots``, or with ``unrolled=False``
        one step over all ``n`` images (the FedSGD-style attack: one gradient of the whole set)."""
        return slots if self.unrolled else torch.arange(n, device=slots.device)[None]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        inner = batch["inner"]
        batch = {**batch, "inner": {**inner, "slots": self.attack_slots(inner["slots"], inner["y"].numel())}}
        super().training_step(batch, batch_idx)

    # -- scoring -----------------------------------------------------------------------------
    def restart_costs(self, images: Tensor) -> Tensor:
        """The cost of every restart's images ``(R, n, C, H, W)`` (replayed on this process)."""
        data = self.data
        slots = self.attack_slots(data.schedule.to(images.device), data.n)
        index = torch.arange(images.shape[0], device=images.device)
        batch = {"index": index, "y": data.labels.to(images.device)}
        steps = PerStep({**batch, "slots": s} for s in slots)
        with torch.inference_mode(False), torch.enable_grad():
            images = images.clone()  # evaluation runs in inference mode
            outer = {"images": images}
            start = self.inner_init(outer, batch)
            end = run(GD(self.algorithm.h["inner_lr"], len(steps)), self.problem, start, outer, steps).inner
            return self.costs(tree.detach(end), outer, batch).detach()

    def score(self) -> dict[str, Any]:
        """The least-cost restart against the truth (a collective: call it on every rank)."""
        data = self.data
        images = self.gathered("outer")["images"]
        costs = self.restart_costs(images)
        best = int(torch.argmin(costs))
        start = self.configure_variables()[0]["images"][best].to(images)
        truth = data.truth.to(images)
        psnr, ssim = attack.image_scores(data.denormalise(images[best]), truth)
        init_psnr, _ = attack.image_scores(data.denormalise(start), truth)
        return {
            "psnr": psnr, "ssim": ssim, "init_psnr": init_psnr, "cost": float(costs[best]),
            "restart": best, "images": data.denormalise(images[best]).clamp(0, 1).cpu(),
        }  # fmt: skip

    def _log_scores(self, prefix: str) -> dict[str, Any]:
        scored = self.score()
        values = {"psnr": scored["psnr"].mean(), "ssim": scored["ssim"].mean(), "cost": scored["cost"]}
        for k, v in values.items():
            self.log(f"{prefix}_{k}", float(v), batch_size=1, sync_dist=False)
        return scored

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._log_scores("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.results = self._log_scores("test")

    def on_train_end(self) -> None:
        """Scores the final reconstruction, draws it over the truth and prints the table."""
        scored = self.score()
        self.results = {**self.results, **scored}
        logged = {
            "psnr": float(scored["psnr"].mean()), "ssim": float(scored["ssim"].mean()),
            "init_psnr": float(scored["init_psnr"].mean()), "cost": scored["cost"],
        }  # fmt: skip
        if "analytic_psnr" in self.results:
            logged["analytic_psnr"] = self.results["analytic_psnr"]
        for logger in self.loggers:
            logger.log_metrics(logged, step=self.global_step)
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a broadcast: every rank
        if not self.trainer.is_global_zero:
            return
        out.mkdir(parents=True, exist_ok=True)
        saved = {"truth": self.data.truth, "reconstruction": scored["images"], "psnr": scored["psnr"]}
        torch.save({**saved, "ssim": scored["ssim"]}, out / "reconstruction.pt")
        path = grid(self.data.truth, scored["images"], scored["psnr"], out / "inversion.png")
        log_image(self.loggers, "inversion", path)
        lines = [f"gradient inversion ({self.model_name}, {self.data.n} images, {self.trainer.max_steps} steps)"]
        lines += ["  image  label  PSNR dB  SSIM"]
        for i in range(self.data.n):
            label = int(self.data.labels[i])
            lines.append(f"  {i:5d}  {label:5d}  {float(scored['psnr'][i]):7.2f}  {float(scored['ssim'][i]):.3f}")
        lines.append(
            f"  mean PSNR {logged['psnr']:.2f} dB (start {logged['init_psnr']:.2f} dB), SSIM {logged['ssim']:.3f}, "
            f"cost {logged['cost']:.4f} (restart {scored['restart']})"
        )
        lines.append(f"  truth over reconstruction: {path}")
        rank_zero_info("\n".join(lines))


def grid(truth: Tensor, reconstruction: Tensor, psnr: Tensor, path: Path) -> Path:
    """A PNG: the true images over their reconstructions, each titled with its PSNR."""
    plt = pyplot()
    n = truth.shape[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n + 0.4, 3.6), squeeze=False)
    for i in range(n):
        for row, image in enumerate((truth[i], reconstruction[i])):
            ax = axes[row][i]
            shown = image.detach().float().clamp(0, 1).permute(1, 2, 0).squeeze(-1).cpu().numpy()
            ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[1][i].set_title(f"{float(psnr[i]):.1f} dB", fontsize=8)
    axes[0][0].set_ylabel("truth")
    axes[1][0].set_ylabel("reconstruction")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _load(path: str, key: str) -> Any:
    """A ``torch.save``-d file, on the CPU; an unreadable one is a config error."""
    try:
        return torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read it is the file's fault
        raise ConfigError(key, f"cannot read {path}: {one_line(error)}") from None


def _cast(t: Tree, dtype: torch.dtype) -> Tree:
    return {k: v.detach().to(dtype) for k, v in t.items()}
