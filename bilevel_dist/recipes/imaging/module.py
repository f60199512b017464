"""``LearnedReconstruction``: bilevel learning of a reconstruction energy, one lower level per
training image, ``bilevel-dist fit --config recipes/imaging/denoise_filters.yaml``.

Every training patch ``j`` is its own lower level, ``x̂_j = argmin_x Φ(x; c, β, y_j)``
(:class:`~.energies.FilterEnergy`): the images are one batched problem, sharded across ranks by
rows (``per_sample``), warm-started across outer steps and kept in the checkpoint with CG's
``v``. The upper level is ``½ Σ_j ‖x̂_j − x_j‖²`` over the patches' count, differentiated
implicitly (:class:`~.algorithm.ReconstructionIFT`). Validation and test solve the held-out
images' lower levels to a tight tolerance and score them (PSNR, SSIM); the test writes a CSV
per image, a figure (truth / measured / TV / learned) and the learned filters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from bilevel_dist._checks import ConfigError, positive_float, positive_int, setting
from bilevel_dist.figures import log_image, pyplot
from bilevel_dist.lightning import BilevelModule
from bilevel_dist.recipes.imaging.algorithm import ReconstructionIFT
from bilevel_dist.recipes.imaging.data import imaging_data
from bilevel_dist.recipes.imaging.energies import FilterEnergy, dct_filters, tv_filters
from bilevel_dist.recipes.imaging.metrics import scores
from bilevel_dist.recipes.imaging.report import write_scores
from bilevel_dist.tree import Tree

REGULARISERS = ("filters", "tv")
LEARN = ("all", "beta")
STARTS = ("dct", "majorizer")
#: the double loop's settings a config may change in ``algorithm``
MAJORIZER_SETTINGS = {"iterations", "lr", "iterative_steps", "surrogate", "inner_iterations", "inner_tol"}
TUNABLE = {"inner_steps", "inner_tol", "linear_iters", "linear_tol", "outer_lr", "outer_decay", "outer_optimizer"}


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` on ``x``'s device in ``x``'s precision (complex stays complex)."""
    dtype = (torch.complex128 if x.dtype == torch.float64 else torch.complex64) if t.is_complex() else x.dtype
    return t.to(device=x.device, dtype=dtype)


class LearnedReconstruction(BilevelModule):
    """Learns the filters ``c_k`` and log-weights ``β_k`` of (Ex), or ``β`` alone.

    Args:
        regulariser: ``filters`` (``filter_size² − 1`` DCT atoms to start) or ``tv`` (the two
            finite differences: smoothed anisotropic TV, the baseline).
        filter_size: S of the S×S filters.
        learn: ``all`` (filters and β) or ``beta`` (β alone, filters fixed: the review's
            tuning-parameter comparison).
        eps: ε of the corner-rounded 1-norm (0.01 in the review).
        beta0: the fixed overall log-weight ``β₀`` (grid-searched in the review).
        init_steps, init_tol: the tight first solve of every training image at the starting
            parameters (the review's ``‖∇Φ‖/√N < 1e-7``), before the warm-started loop.
        eval_steps, eval_tol: the solve of validation and test images.
        start: ``dct`` (the atoms, β = 0) or ``majorizer``: the energy learned first by the
            thesis's single-level surrogate (:func:`~.majorizer.train_majorizer`: the dual
            Bregman surrogate and its iterative scheme, no derivative of the argmin), which the
            implicit double loop then refines (``trainer.max_steps``).
        majorizer: settings of :func:`~.majorizer.train_majorizer` (``iterations``, ``lr``,
            ``iterative_steps``, ``surrogate``, ``inner_iterations``, ``inner_tol``).
        tv_beta0: the TV column of the test figure and table: TV at this weight.
        results_dir: where the test writes its CSV and figures (default: the log directory).
        algorithm: the double loop's settings (:class:`~.algorithm.ReconstructionIFT`):
            ``inner_steps``, ``inner_tol``, ``linear_iters``, ``linear_tol``, ``outer_lr``, ...
    """

    validation_metrics = ("val_psnr", "val_ssim")

    def __init__(
        self,
        regulariser: str = "filters",
        filter_size: int = 7,
        learn: str = "all",
        eps: float = 0.01,
        beta0: float = -4.0,
        init_steps: int = 1000,
        init_tol: float = 1e-4,
        eval_steps: int = 1000,
        eval_tol: float = 1e-3,
        start: str = "dct",
        majorizer: dict[str, Any] | None = None,
        tv_beta0: float | None = None,
        results_dir: str | None = None,
        algorithm: dict[str, Any] | None = None,
        nonfinite: str = "raise",
    ) -> None:
        if regulariser not in REGULARISERS:
            raise ConfigError("regulariser", f"regulariser must be one of {list(REGULARISERS)}, got {regulariser!r}")
        if start not in STARTS:
            raise ConfigError("start", f"start must be one of {list(STARTS)}, got {start!r}")
        if start == "majorizer" and (regulariser, learn) != ("filters", "all"):
            raise ConfigError("start", "the majorizer start learns filters and β: regulariser filters, learn all")
        unknown = sorted(set(majorizer or {}) - MAJORIZER_SETTINGS)
        if unknown:
            raise ConfigError(f"majorizer.{unknown[0]}", f"the majorizer takes {sorted(MAJORIZER_SETTINGS)}")
        if learn not in LEARN:
            raise ConfigError("learn", f"learn must be one of {list(LEARN)}, got {learn!r}")
        fixed = sorted(set(algorithm or {}) - TUNABLE)
        if fixed:
            raise ConfigError(f"algorithm.{fixed[0]}", f"the reconstruction's double loop takes {sorted(TUNABLE)}")
        self.regulariser, self.learn = regulariser, learn
        self.filter_size = setting("filter_size", positive_int, filter_size)
        if regulariser == "filters" and self.filter_size < 2:
            raise ConfigError("filter_size", "filter_size must be at least 2: a 1×1 DCT basis has no non-constant atom")
        self.eps = setting("eps", positive_float, eps)
        self.beta0 = float(beta0)
        spec = {"name": ReconstructionIFT.name, **(algorithm or {})}
        super().__init__(spec, per_sample=("x",), lower_level="batched", nonfinite=nonfinite)
        self.save_hyperparameters()
        self.init_steps = setting("init_steps", lambda k, v: positive_int(k, v, allow_zero=True), init_steps)
        self.init_tol = setting("init_tol", positive_float, init_tol)
        self.eval_steps = setting("eval_steps", positive_int, eval_steps)
        self.eval_tol = setting("eval_tol", positive_float, eval_tol)
        self.tv_beta0 = tv_beta0
        self.start, self.majorizer = start, dict(majorizer or {})
        self.results_dir = results_dir
        self.results: dict[str, Any] = {}
        self._energies: dict[int, FilterEnergy] = {}
        self._majorizer_outer: Tree | None = None
        self._fixed: dict[tuple, Tensor] = {}

    def _make_algorithm(self, from_data: dict[str, Any]) -> ReconstructionIFT:
        try:
            return ReconstructionIFT(self.problem, comm=self.comm, step_bound=self.step_bound, **self._spec)
        except ConfigError as error:
            raise error.under("algorithm") from None

    # -- data and the energy -----------------------------------------------------------------
    @property
    def data(self) -> Any:
        return imaging_data(self)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = self.data
        data.setup(stage)
        smallest = min(data.patch_size, data.eval_crop or data.image_size)
        if self.regulariser == "filters" and self.filter_size > smallest:
            raise ConfigError(
                "filter_size", f"{self.filter_size}x{self.filter_size} filters exceed the {smallest}-pixel images"
            )

    def energy(self, side: int) -> FilterEnergy:
        """Φ for ``side × side`` images (the operator depends on the size: masks, kernels)."""
        if side not in self._energies:
            self._energies[side] = FilterEnergy(self.data.operator(side), self.eps, self.beta0)
        return self._energies[side]

    def start_filters(self, dtype: torch.dtype | None = None) -> Tensor:
        """The filters at the start: DCT atoms, or the two finite differences for TV."""
        dtype = dtype or torch.get_default_dtype()
        if self.regulariser == "tv":
            return tv_filters(dtype)
        return dct_filters(self.filter_size, dtype)

    def parameters_of(self, outer: Tree) -> tuple[Tensor, Tensor]:
        """``(filters, β)`` from the outer variables (fixed filters when only β is learned)."""
        beta = outer["beta"]
        if "filters" in outer:
            return outer["filters"], beta
        key = (beta.dtype, beta.device)
        if key not in self._fixed:  # built once in float64, then cast: the same filters in every precision
            self._fixed[key] = self.start_filters(torch.float64).to(beta)
        return self._fixed[key], beta

    def step_bound(self, outer: Tree) -> float:
        """``L`` of eq. (4.19) at the current parameters, for the training patches."""
        filters, beta = self.parameters_of(outer)
        side = self.data.patch_size
        return self.energy(side).lipschitz(filters, beta, (side, side))

    def configure_variables(self) -> tuple[Tree, Tree]:
        filters = self.start_filters()
        outer = {"beta": torch.zeros(filters.shape[0], dtype=filters.dtype)}
        if self.learn == "all":
            outer = {"filters": filters, **outer}
        train = self.data.train
        restoring = self._trainer is not None and self.trainer.ckpt_path is not None  # the checkpoint's values win
        if self.start == "majorizer" and not restoring:
            outer = self.majorizer_start(outer)
            self._majorizer_outer = {k: v.clone() for k, v in outer.items()}
        x = self.solve(outer, train["y"], self.init_steps, self.init_tol) if self.init_steps and not restoring else None
        if x is None:
            x = self.energy(train["truth"].shape[-1]).operator.adjoint(_like(train["y"], filters)).to(filters.dtype)
        return outer, {"x": x}

    def majorizer_start(self, outer: Tree) -> Tree:
        """``(filters, β)`` learned by the parametric majorizer on the training patches (every
        rank the same: the patches are all read, the computation is deterministic)."""
        from bilevel_dist.recipes.imaging.majorizer import train_majorizer

        train = self.data.train
        like = outer["beta"]
        energy = self.energy(train["truth"].shape[-1])
        learned = train_majorizer(
            train["truth"].to(like), train["y"].to(like), energy, outer["filters"], outer["beta"], **self.majorizer
        )
        self.results["majorizer_seconds"] = learned.history["time"][-1] if learned.history.get("time") else None
        return {"filters": learned.filters.to(like), "beta": learned.beta.to(like)}

    # -- the two levels ----------------------------------------------------------------------
    def inner_loss(self, inner: Tree, outer: Tree, batch: Any) -> Tensor:
        x = inner["x"][batch["index"]]
        filters, beta = self.parameters_of(outer)
        return self.energy(x.shape[-1])(x, _like(batch["y"], x), filters, beta).sum()

    def outer_loss(self, inner: Tree, outer: Tree, batch: Any) -> Tensor:
        x = inner["x"][batch["index"]]
        # a mean over every rank's patches: the sum here, over the global count
        return 0.5 * ((x - _like(batch["truth"], x)) ** 2).sum() / self.data.n_train

    # -- reconstruction of evaluation images -------------------------------------------------
    def solve(self, outer: Tree, y: Tensor, steps: int, tol: float, regulariser: str | None = None) -> Tensor:
        """The lower-level solution of every measurement in ``y`` at ``outer`` (OGM from ``Aᴴy``
        to ``‖∇Φ‖ ≤ tol`` per image, all images at once); ``regulariser="tv"`` solves TV at
        ``tv_beta0`` instead."""
        outer = {k: v.detach() for k, v in outer.items()}
        like = next(iter(outer.values()))
        energy = self.energy(y.shape[-1])
        if regulariser == "tv":
            energy = FilterEnergy(energy.operator, self.eps, float(self.tv_beta0))
            outer = {"beta": torch.zeros(2, dtype=like.dtype, device=like.device)}
            filters = tv_filters(like.dtype).to(like.device)
        else:
            filters, _ = self.parameters_of(outer)
        return energy.minimise(_like(y, like), filters, outer["beta"], steps, tol)

    def evaluate(self, split: str) -> dict[str, Tensor]:
        """PSNR and SSIM of the learned reconstruction of every ``split`` image (all ranks alike)."""
        part = getattr(self.data, split)
        x = self.solve(self.outer, part["y"], self.eval_steps, self.eval_tol)
        return {**scores(x, _like(part["truth"], x)), "x": x}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        scored = self.evaluate("val")
        for key in ("psnr", "ssim"):
            self.log(f"val_{key}", float(scored[key].mean()), batch_size=1, sync_dist=False)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.results = self.report()
        for key in ("psnr", "ssim"):
            self.log(f"test_{key}", float(self.results["learned"][key].mean()), batch_size=1, sync_dist=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._majorizer_outer is not None:  # the test table's majorizer column, after a resume too
            checkpoint["majorizer"] = {k: v.detach().cpu() for k, v in self._majorizer_outer.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "majorizer" in checkpoint:
            self._majorizer_outer = dict(checkpoint["majorizer"])

    def on_train_end(self) -> None:
        """Scores every method on the test images, writes the CSV and figures, prints the table."""
        self.results = {**self.results, **self.report()}

    def measured(self, y: Tensor, like: Tensor) -> Tensor:
        """The measurement shown as an image: ``y`` itself, or ``Aᴴy`` (zero-filled) in k-space."""
        return self.energy(y.shape[-1]).operator.adjoint(_like(y, like)) if y.is_complex() else _like(y, like)

    def report(self) -> dict[str, Any]:
        """Every method on the test images: the measurement (or zero-filled), TV at
        ``tv_beta0`` when set, and the learned energy; rank 0 writes the CSV and figures."""
        test = self.data.test
        learned = self.evaluate("test")
        like = learned["x"]
        truth = _like(test["truth"], like)
        measured = self.measured(test["y"], like)
        methods = {"measured": {**scores(measured, truth), "x": measured}}
        if self.tv_beta0 is not None:
            tv = self.solve(self.outer, test["y"], self.eval_steps, self.eval_tol, regulariser="tv")
            methods["tv"] = {**scores(tv, truth), "x": tv}
        if self._majorizer_outer is not None:  # the surrogate's energy, before the double loop
            start = self.solve(
                {k: v.to(like) for k, v in self._majorizer_outer.items()}, test["y"], self.eval_steps, self.eval_tol
            )
            methods["majorizer"] = {**scores(start, truth), "x": start}
        methods["learned"] = learned
        out = Path(self.results_dir or self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            self.write(out, methods, truth)
        return methods

    def write(self, out: Path, methods: dict[str, dict[str, Tensor]], truth: Tensor) -> None:
        """The per-image CSV, the test figure and the filters' image, and the table printed."""
        setting = f"{self.data.task}, {self.regulariser}, learn={self.learn}"
        heading = f"learned reconstruction ({setting}) on the test images"
        lines = write_scores(out, methods, truth, self.data.test_names, self.loggers, heading)
        filters, beta = self.parameters_of(self.outer)
        shown = filters_image(filters, beta, self.beta0, out / "filters.png")
        log_image(self.loggers, "filters", shown)
        rank_zero_info("\n".join([*lines, f"  filters: {shown}"]))


def filters_image(filters: Tensor, beta: Tensor, beta0: float, path: Path) -> Path:
    """A PNG of the filters (each scaled to its own range), titled with ``e^{β₀+β_k}‖c_k‖₂``,
    the review's approximate regularisation strength."""
    plt = pyplot()
    k = filters.shape[0]
    cols = min(k, 8)
    rows = math.ceil(k / cols)
    strength = (math.exp(beta0) * torch.exp(beta) * filters.flatten(1).norm(dim=1)).tolist()
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.25 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= k:
            ax.axis("off")
            continue
        ax.imshow(filters[i, 0].detach().float().cpu().numpy(), cmap="gray")
        ax.set_title(f"{strength[i]:.2g}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["LearnedReconstruction", "filters_image"]
