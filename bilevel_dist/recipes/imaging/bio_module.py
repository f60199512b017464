"""``BIOReconstruction``: BIO (Liu et al.) from the command line,
``bilevel-dist fit|test --config recipes/imaging/bio_deblur.yaml``.

``fit`` trains the learned upper-level operator ``D`` (the dilated CNN of :mod:`.denoiser`) on
noisy copies of the training patches; validation and ``test`` run Stage 0 (FISTA-TV to the APG
tolerance, ``x̄``) and BIO's leader–follower ADMM (Algorithm 2 for deblurring and denoising,
Algorithm 3 for CS-MRI, :mod:`.bio`) on every held-out image at once. The test logs BIO's
per-iteration diagnostics (data residual, constraint residual, ``F(x^k)``, step, PSNR) to every
logger, with one logged step per iteration, and writes them to ``bio_diagnostics.csv`` and
``bio_diagnostics.png`` beside the per-image ``test_images.csv`` and ``reconstructions.png``.
``d: identity`` and ``d: deconv`` have nothing to train: ``bilevel-dist test`` runs them directly.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from bilevel_dist._checks import ConfigError, positive_float, positive_int, setting
from bilevel_dist.figures import log_image, pyplot
from bilevel_dist.recipes.imaging.bio import BIOResult, apg_tv, bio_csmri, bio_restoration, deconv, zero_filled
from bilevel_dist.recipes.imaging.data import imaging_data
from bilevel_dist.recipes.imaging.denoiser import DILATIONS, Denoiser
from bilevel_dist.recipes.imaging.metrics import scores
from bilevel_dist.recipes.imaging.report import write_scores

TARGETS = ("identity", "deconv", "cnn")
DENOISER_SETTINGS = {"channels", "dilations", "sigma", "batch_size", "lr", "seed"}
DIAGNOSTICS = ("residual", "constraint", "objective", "change", "psnr")


class BIOReconstruction(L.LightningModule):
    """BIO with a pluggable ``D`` on an :class:`~.data.ImagingData` task.

    Args:
        d: the upper level's target ``D(y)``: ``identity`` (``y``, or the zero-filled ``Aᴴy`` in
            k-space), ``deconv`` (the paper's ``(AᴴA + αI)⁻¹(Aᴴy + αy)``; Tikhonov in k-space)
            or ``cnn`` (the trained denoiser on the Deconv image; on the TV image ``x̄`` for
            CS-MRI, whose zero-filled image is no noisy photograph).
        gamma: the lower level's TV weight, ``min ½‖Ax − y‖² + γ‖∇x‖₁``.
        stage0_tol, stage0_iters, stage0_inner: FISTA-TV's relative-change tolerance (the paper's
            APG 1e-2 / 1e-4 / 1e-6), its cap, and the cap of its warm-started FGP prox.
        beta, tau, iters: the ADMM penalty, proximal weight and iteration cap.
        tol: BIO's own stopping rule, per image at a relative change ``‖x^{k+1} − x^k‖/‖x^{k+1}‖``
            below it (the paper's; 0 runs all ``iters``). ``D`` acts through this early-stopped
            iterate: a converged BIO returns ``x̄`` whatever ``D`` is when ``A`` is invertible.
        alpha: Deconv's trade-off (the paper's 1e-4 amplifies 1% noise; see the recipe README).
        eta, rho: CS-MRI's upper level ``η/2‖x − D(y)‖² + ρ‖DCT x‖₁``.
        denoiser: the CNN and its training (``channels``, ``dilations``, ``sigma`` of the
            training noise, ``batch_size`` patches a step, Adam's ``lr``, ``seed``).
        results_dir: where the test writes (default: the log directory).
    """

    validation_metrics = ("val_psnr", "val_ssim")

    def __init__(
        self,
        d: str = "cnn",
        gamma: float = 1e-3,
        stage0_tol: float = 1e-4,
        stage0_iters: int = 20000,
        stage0_inner: int = 200,
        beta: float = 10.0,
        tau: float = 0.1,
        iters: int = 300,
        tol: float = 0.0,
        alpha: float = 1e-2,
        eta: float = 1.0,
        rho: float = 0.0,
        denoiser: dict[str, Any] | None = None,
        results_dir: str | None = None,
    ) -> None:
        super().__init__()
        if d not in TARGETS:
            raise ConfigError("d", f"d must be one of {list(TARGETS)}, got {d!r}")
        unknown = sorted(set(denoiser or {}) - DENOISER_SETTINGS)
        if unknown:
            raise ConfigError(f"denoiser.{unknown[0]}", f"the denoiser takes {sorted(DENOISER_SETTINGS)}")
        self.save_hyperparameters()
        self.d = d
        self.gamma = setting("gamma", positive_float, gamma)
        self.stage0_tol = setting("stage0_tol", positive_float, stage0_tol)
        self.stage0_iters = setting("stage0_iters", positive_int, stage0_iters)
        self.stage0_inner = setting("stage0_inner", positive_int, stage0_inner)
        self.tol = setting("tol", lambda k, v: positive_float(k, v, allow_zero=True), tol)
        self.beta = setting("beta", positive_float, beta)
        self.tau = setting("tau", positive_float, tau)
        self.iters = setting("iters", positive_int, iters)
        self.alpha = setting("alpha", positive_float, alpha)
        self.eta = setting("eta", positive_float, eta)
        self.rho = setting("rho", lambda k, v: positive_float(k, v, allow_zero=True), rho)
        training = {"channels": 16, "dilations": DILATIONS, "sigma": 0.05, "batch_size": 8, "lr": 2e-3, "seed": 0}
        self.training_settings = {**training, **(denoiser or {})}
        setting("denoiser.sigma", positive_float, self.training_settings["sigma"])
        setting("denoiser.batch_size", positive_int, self.training_settings["batch_size"])
        self.net: Denoiser | None = None
        if d == "cnn":
            with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed only
                torch.manual_seed(self.training_settings["seed"])
                self.net = Denoiser(self.training_settings["channels"], self.training_settings["dilations"])
        self.results_dir = results_dir
        self.results: dict[str, Any] = {}

    # -- data --------------------------------------------------------------------------------
    @property
    def data(self) -> Any:
        return imaging_data(self)

    def setup(self, stage: str) -> None:
        self.data.setup(stage)
        if stage == "fit" and self.net is None:
            raise ConfigError("d", f"d: {self.d} has nothing to train; run `bilevel-dist test` (d: cnn trains D)")

    # -- fit: the CNN denoiser ---------------------------------------------------------------
    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        """Denoises ``batch_size`` of this rank's training patches under fresh noise; the draw
        depends on the seed, the step and the rank only, so a resumed run draws the same."""
        assert self.net is not None
        clean = batch["inner"]["truth"]
        generator = torch.Generator().manual_seed(
            self.training_settings["seed"] + 1_000_003 * (self.global_step + 1) + 7919 * self.global_rank
        )
        rows = torch.randint(clean.shape[0], (self.training_settings["batch_size"],), generator=generator)
        clean = clean[rows.to(clean.device)].to(torch.float32)
        noise = torch.randn(clean.shape, generator=generator).to(clean)
        loss = F.mse_loss(self.net(clean + self.training_settings["sigma"] * noise), clean)
        self.log("train_loss", loss, prog_bar=True, batch_size=clean.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        assert self.net is not None, "d: cnn trains; identity and deconv run by `bilevel-dist test`"
        return torch.optim.Adam(self.net.parameters(), lr=self.training_settings["lr"])

    # -- BIO ---------------------------------------------------------------------------------
    def target(self, y: Tensor, x_bar: Tensor, op: Any) -> Tensor:
        """``D(y)`` (class docstring)."""
        mri = y.is_complex()
        if self.d == "identity":
            return zero_filled(y, op) if mri else y
        if mri:
            return deconv(y, op, self.alpha, toward_observation=False) if self.d == "deconv" else self.denoise(x_bar)
        deconvolved = deconv(y, op, self.alpha)
        return deconvolved if self.d == "deconv" else self.denoise(deconvolved)

    def denoise(self, x: Tensor) -> Tensor:
        assert self.net is not None
        return self.net.denoise(x)

    def reconstruct(self, split: str) -> dict[str, Any]:
        """Stage 0 and BIO on every image of ``split``: ``{"y", "truth", "x_bar", "d", "bio"}``."""
        part = getattr(self.data, split)
        truth = part["truth"].to(self.device, torch.float64)
        y = part["y"].to(self.device)
        y = y.to(torch.complex128) if y.is_complex() else y.to(torch.float64)
        op = self.data.operator(truth.shape[-1])
        x_bar, stage0 = apg_tv(
            y, op, self.gamma, tol=self.stage0_tol, max_iter=self.stage0_iters, inner_iters=self.stage0_inner
        )
        d = self.target(y, x_bar, op)
        if y.is_complex():
            bio = bio_csmri(
                y, op, d, x_bar, self.beta, self.tau, self.iters, eta=self.eta, rho=self.rho, truth=truth, tol=self.tol
            )
        else:
            bio = bio_restoration(y, op, d, x_bar, self.beta, self.tau, self.iters, truth=truth, tol=self.tol)
        return {"y": y, "truth": truth, "op": op, "x_bar": x_bar, "stage0_iters": stage0, "d": d, "bio": bio}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out = self.reconstruct("val")
        scored = scores(out["bio"].x, out["truth"])
        for key in ("psnr", "ssim"):
            self.log(f"val_{key}", float(scored[key].mean()), batch_size=1, sync_dist=False)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        out = self.reconstruct("test")
        truth = out["truth"]
        measured = zero_filled(out["y"], out["op"]) if out["y"].is_complex() else out["y"]
        images = {"measured": measured, "D(y)": out["d"], "tv": out["x_bar"], "bio": out["bio"].x}
        methods = {name: {**scores(x, truth), "x": x} for name, x in images.items()}
        self.results = {**methods, "diagnostics": out["bio"], "stage0_iters": out["stage0_iters"]}
        for key in ("psnr", "ssim"):
            self.log(f"test_{key}", float(methods["bio"][key].mean()), batch_size=1, sync_dist=False)
            self.log(f"test_tv_{key}", float(methods["tv"][key].mean()), batch_size=1, sync_dist=False)
        if self.trainer.is_global_zero:
            self.write(methods, truth, out["bio"])

    def write(self, methods: dict[str, dict[str, Tensor]], truth: Tensor, bio: BIOResult) -> None:
        """The per-image CSV and figure, the diagnostics (CSV, figure, one logged step per
        iteration), and the table printed."""
        out = Path(self.results_dir or self.trainer.log_dir or self.trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        heading = f"BIO ({self.data.task}, D = {self.d}) on the test images"
        lines = write_scores(out, methods, truth, self.data.test_names, self.loggers, heading)
        series = {key: getattr(bio, key) for key in DIAGNOSTICS if getattr(bio, key) is not None}
        with open(out / "bio_diagnostics.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["iteration", "image", *series])
            for k in range(bio.residual.shape[0]):
                for i, name in enumerate(self.data.test_names):
                    writer.writerow([k + 1, name, *(f"{float(v[k, i]):.6g}" for v in series.values())])
        for logger in self.loggers:
            for k in range(bio.residual.shape[0]):
                logger.log_metrics({f"bio/{key}": float(v[k].mean()) for key, v in series.items()}, step=k + 1)
        figure = diagnostics_figure(series, self.data.test_names, out / "bio_diagnostics.png")
        log_image(self.loggers, "bio_diagnostics", figure)
        rank_zero_info("\n".join([*lines, f"  diagnostics: {out / 'bio_diagnostics.csv'}, {figure}"]))


def diagnostics_figure(series: dict[str, Tensor], names: list[str], path: Path) -> Path:
    """One panel per diagnostic against the iteration, one line per image."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(3.2 * len(series), 2.8), squeeze=False)
    for ax, (key, values) in zip(axes[0], series.items(), strict=True):
        for i, name in enumerate(names):
            ax.plot(range(1, values.shape[0] + 1), values[:, i].float().cpu().numpy(), label=name)
        if key != "psnr":
            ax.set_yscale("log")
        ax.set_title("PSNR (dB)" if key == "psnr" else key, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["BIOReconstruction", "diagnostics_figure"]
