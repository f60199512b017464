"""What the gradient-inversion audit computes, apart from the optimisation itself.

- The client's local schedule (``E`` epochs of ``n/B`` minibatch steps) and its observed update,
  produced by the federated recipe's own client training (:class:`~bilevel_dist.algorithms.federated.FedAvg`:
  local steps, clipping and DP-FedAvg noise), so that what a user trains is what is audited;
- the attack's cost: one minus the cosine between a replayed update and the observed one over
  all parameter tensors at once, and the anisotropic mean total variation (thesis eq. 5.4 and
  its code's scale);
- the cheap first checks: the label of a single image from the last layer's bias update (iDLG),
  and the exact input of a biased linear first layer (thesis Prop. 5.1);
- PSNR and SSIM per image (torchmetrics) on de-normalised images clamped to [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from bilevel_dist import tree
from bilevel_dist._checks import ConfigError
from bilevel_dist.algorithms.federated import FedAvg
from bilevel_dist.distributed import Comm
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.tree import Tree


def local_schedule(n: int, batch_size: int, epochs: int, seed: int = 0) -> Tensor:
    """``(E·n/B, B)`` image slots of the client's local steps: each epoch a permutation of its
    ``n`` images (drawn from ``seed`` and the epoch) cut into minibatches of ``B``; ``B = 0``
    is the full set (FedSGD with ``E = 1``)."""
    if batch_size < 0:
        raise ConfigError("local_batch", f"the local batch size B must be ≥ 0 (0: the full set), got {batch_size}")
    batch_size = batch_size or n
    if batch_size > n:
        raise ConfigError("local_batch", f"the local batch size B={batch_size} is larger than the n={n} images")
    if n % batch_size:
        raise ConfigError("local_batch", f"B={batch_size} must divide n={n}: the thesis's E·n/B local steps")
    if epochs < 1:
        raise ConfigError("epochs", f"epochs must be at least 1, got {epochs}")
    steps = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        steps.append(order.view(-1, batch_size))
    return torch.cat(steps)


def client_loss(net: nn.Module) -> Callable[[Tree, Tree, dict[str, Tensor]], Tensor]:
    """The federated recipe's local loss, for ``net``: per client row, the weighted
    cross-entropy of its minibatch (``batch["weight"]``: the step's ``1/B`` on its samples)."""

    def loss(theta: Tree, w: Tree, batch: dict[str, Tensor]) -> Tensor:
        scores = vmap(lambda p, xs: functional_call(net, p, (xs,)))(theta, batch["x"])
        losses = F.cross_entropy(scores.transpose(1, 2), batch["y"], reduction="none")
        return (batch["weight"].to(losses) * losses).sum()

    return loss


def client_update(
    net: nn.Module,
    model: Tree,
    x: Tensor,
    y: Tensor,
    schedule: Tensor,
    local_lr: float,
    clip: float | None = None,
    noise_multiplier: float = 0.0,
    seed: int = 0,
) -> Tree:
    """The update ``θ_client − θ`` one client with images ``x`` and labels ``y`` sends after the
    local ``schedule`` from the global model ``model``, through the federated recipe's FedAvg
    (its local steps; with ``noise_multiplier > 0`` its DP-FedAvg clipping and noise for this
    one client, on this process alone)."""
    n = x.shape[0]
    steps, size = schedule.shape
    device = x.device
    weight = torch.zeros(steps, 1, n, dtype=x.dtype, device=device)
    rows = torch.arange(steps, device=device)[:, None]
    weight[rows, 0, schedule.to(device)] = 1.0 / size  # step s's minibatch mean
    batch = {
        "x": x[None],
        "y": y[None].to(device),
        "weight": weight,
        "size": torch.tensor([n], device=device),
        "dropped": torch.zeros(1, dtype=torch.bool, device=device),
        "index": torch.tensor([0], device=device),
        "sampled": torch.tensor([1], device=device),
    }
    problem = BilevelProblem(client_loss(net), lambda *_: torch.zeros(()), batched=True)
    settings = {"local_lr": local_lr, "clip": clip, "noise_multiplier": noise_multiplier, "seed": seed}
    server = FedAvg(problem, comm=Comm(local=True), **settings)
    with torch.enable_grad():
        direction, info = server.aggregate({k: v.detach() for k, v in model.items()}, batch, 0)
    if info["clients_used"] < 1:  # FedAvg leaves out a client whose training failed or diverged
        raise ConfigError("local_lr", "the client's local training failed or diverged: no update to audit")
    return {k: -d for k, d in direction.items()}  # the aggregate is w − θ_client


def cosine_cost(update: Tree, observed: Tree, rows: bool = False) -> Tensor:
    """``1 − ⟨u, U⟩ / (‖u‖ ‖U‖)`` over all parameter tensors at once (per row with ``rows``)."""
    u = tree.flatten(update, batched=rows)
    target = tree.flatten({k: observed[k] for k in update}).to(u)
    dot = (u * target).sum(-1)
    return 1 - dot / (u.norm(dim=-1) * target.norm()).clamp_min(1e-30)


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation as the thesis's code: the mean absolute difference along the
    height plus along the width, over the last four axes (images, channels, height, width)."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(-4).mean(-1)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(-4).mean(-1)
    return dx + dy


def idlg_label(last_bias_update: Tensor) -> int:
    """iDLG (Zhao et al. 2020): under softmax cross-entropy a single image's last-layer bias
    gradient is negative only at its label, so the update ``−τ ∇b`` is positive only there."""
    return int(torch.argmax(last_bias_update))


def recover_input(weight_grad: Tensor, bias_grad: Tensor) -> Tensor:
    """The input of a biased linear layer from its weight and bias gradients (thesis Prop. 5.1:
    ``∂L/∂A_i = ∂L/∂b_i · xᵀ``), from the row with the largest bias gradient."""
    i = int(bias_grad.abs().argmax())
    return weight_grad[i] / bias_grad[i]


def image_scores(reconstruction: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """Per image PSNR (dB) and SSIM of ``(n, C, H, W)`` images in [0, 1]."""
    rec, ref = reconstruction.clamp(0, 1).double(), truth.clamp(0, 1).double()
    psnr = peak_signal_noise_ratio(rec, ref, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(
        rec, ref, data_range=1.0, reduction="none"
    )  # torchmetrics' 11×11 Gaussian
    return psnr.float(), ssim.float()
