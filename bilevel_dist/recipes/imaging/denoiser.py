"""BIO's learned upper-level operator ``D`` (§6.1): a small dilated denoising CNN, trained offline on
noisy/clean pairs with Lightning. It enters BIO only through ``f(x) = ½‖x − D(y)‖²`` (a fixed
target), so the bilevel problem stays convex whatever the network outputs.

The paper's network: seven 3×3 dilated convolutions, six ReLUs between them and five batch norms
(between convolution and ReLU, not after the first convolution), trained on 800 ImageNet images
with 5% Gaussian noise; the width, dilations and residual output are IRCNN's (dilations
1-2-3-4-3-2-1, ``x − noise``), the width here is small enough for CPU tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from bilevel_dist._checks import ConfigError

DILATIONS = (1, 2, 3, 4, 3, 2, 1)


class Denoiser(nn.Module):
    """``x ↦ x − N(x)``: ``N`` is ``len(dilations)`` 3×3 convolutions of ``channels`` features with
    the given dilations (reflect padding keeps the size), ReLU between them and batch norm before
    every ReLU but the first (the paper's 7 convolutions, 6 ReLUs, 5 batch norms). The last
    convolution starts at zero, so an untrained network is the identity."""

    def __init__(
        self,
        channels: int = 16,
        dilations: Sequence[int] = DILATIONS,
        batch_norm: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if len(dilations) < 2:
            raise ConfigError("dilations", f"the denoiser needs at least 2 convolutions, got {list(dilations)}")
        layers: list[nn.Module] = []
        last = len(dilations) - 1
        for i, dilation in enumerate(dilations):
            cin, cout = (1 if i == 0 else channels), (1 if i == last else channels)
            norm = batch_norm and 0 < i < last
            # built in ``dtype`` (not cast afterwards): the initial weights do not depend on the
            # caller's default dtype
            conv = nn.Conv2d(
                cin, cout, 3, padding=dilation, dilation=dilation, bias=not norm, padding_mode="reflect", dtype=dtype
            )
            layers.append(conv)
            if i < last:
                layers += [nn.BatchNorm2d(channels, dtype=dtype), nn.ReLU()] if norm else [nn.ReLU()]
        nn.init.zeros_(layers[-1].weight)  # start as the identity: the residual is learnt from 0
        nn.init.zeros_(layers[-1].bias)
        self.noise = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x - self.noise(x)

    @torch.no_grad()
    def denoise(self, x: Tensor) -> Tensor:
        """``D(x)`` in evaluation mode, computed in the network's dtype and returned in ``x``'s."""
        was_training = self.training
        self.eval()
        weight = next(self.parameters())
        out = self(x.to(weight)).to(x.dtype)
        self.train(was_training)
        return out


class DenoiserTraining(L.LightningModule):
    """Trains a :class:`Denoiser` on ``sigma``-Gaussian-noisy random ``patch × patch`` crops of the
    clean ``images`` (``(N, 1, H, W)`` on ``[0, 1]``), ``batch_size`` crops a step, mean squared
    error to the clean crop, Adam. The initial weights, and the crops and noise drawn fresh every
    step from a generator, all come from ``seed`` (a run is reproducible). ``steps`` sizes the loader
    (``Trainer(max_steps=steps)``); the loss of each step is kept in ``losses``.

    ``sigma`` is the paper's fixed level (5%) or a range ``(low, high)``: each crop then gets its
    own level, uniform in the range (a blind denoiser, as DnCNN-B), for a ``D`` applied to
    reconstructions whose error is not one known level."""

    def __init__(
        self,
        images: Tensor,
        sigma: float | tuple[float, float] = 0.05,
        patch: int = 32,
        batch_size: int = 8,
        steps: int = 300,
        lr: float = 2e-3,
        seed: int = 0,
        channels: int = 16,
        dilations: Sequence[int] = DILATIONS,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if images.ndim != 4 or images.shape[1] != 1:
            raise ConfigError("images", f"clean images are (N, 1, H, W), got shape {tuple(images.shape)}")
        if patch > min(images.shape[-2:]):
            raise ConfigError("patch", f"patch {patch} is larger than the {tuple(images.shape[-2:])} images")
        levels = tuple(sigma) if isinstance(sigma, Sequence) else (sigma,)
        if len(levels) not in (1, 2) or not all(level >= 0 for level in levels) or not max(levels) > 0:
            raise ConfigError("sigma", f"sigma is a level > 0 or a range (low, high) with high > 0, got {sigma!r}")
        if len(levels) == 2 and levels[0] > levels[1]:
            raise ConfigError("sigma", f"the range sigma = {sigma!r} has low > high")
        self.save_hyperparameters(ignore=["images"])
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on seed only
            torch.manual_seed(seed)
            self.model = Denoiser(channels, dilations, batch_norm)
        self.images = images.detach().to(torch.float32).cpu()
        self.generator = torch.Generator().manual_seed(seed)
        self.losses: list[float] = []

    def sample(self) -> tuple[Tensor, Tensor]:
        """A batch of (noisy, clean) crops."""
        n, _, h, w = self.images.shape
        p, b = self.hparams.patch, self.hparams.batch_size
        which = torch.randint(n, (b,), generator=self.generator)
        top = torch.randint(h - p + 1, (b,), generator=self.generator)
        left = torch.randint(w - p + 1, (b,), generator=self.generator)
        clean = torch.stack([self.images[i, :, t : t + p, s : s + p] for i, t, s in zip(which, top, left, strict=True)])
        sigma = self.hparams.sigma
        if isinstance(sigma, Sequence):  # one level per crop
            low, high = sigma
            sigma = low + (high - low) * torch.rand(b, 1, 1, 1, generator=self.generator, dtype=clean.dtype)
        noisy = clean + sigma * torch.randn(clean.shape, generator=self.generator, dtype=clean.dtype)
        return noisy.to(self.device), clean.to(self.device)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        noisy, clean = self.sample()
        loss = F.mse_loss(self.model(noisy), clean)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        # the batches are drawn in training_step; the loader only counts steps
        return DataLoader(range(self.hparams.steps), batch_size=None)


def train_denoiser(images: Tensor, root_dir: str | Path, steps: int = 300, **kwargs) -> DenoiserTraining:
    """:class:`DenoiserTraining` on ``images`` (``kwargs`` as there) fitted for ``steps`` steps by a
    ``lightning.Trainer`` (CPU, no checkpoints, logger or progress bar; ``root_dir`` is its
    ``default_root_dir``); its ``model`` is left in evaluation mode."""
    module = DenoiserTraining(images, steps=steps, **kwargs)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        default_root_dir=str(root_dir),
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    module.model.eval()
    return module


__all__ = ["DILATIONS", "Denoiser", "DenoiserTraining", "train_denoiser"]
