"""Backdoor attacks on image reconstruction (seed 000, Taneja et al.; ``shared/reference/
penalty-and-backdoor.md`` Part B): the heuristic BadNets-style attack and the bilevel (BLO) one.

Threat model (B.1). A reconstruction network ``f_θ`` maps measurements ``z = Aᵀy`` to images
``x``. The attacker poisons a fraction ``ratio`` of the training pairs into
``(z + δ, x + Δ)``: ``δ`` the trigger, supported on a ``trigger_size``² square at the bottom
right, ``Δ`` the target pattern, a plus at the top left. The victim trains on the poisoned set.

- **Heuristic** (B.2): ``δ`` a fixed white square (every trigger pixel at ``bound``).
- **BLO** (B.3–B.4, Eqs. 3–6): ``δ`` is the outer variable, ``‖δ‖∞ ≤ bound`` on its square; the
  lower level is the victim's training on the poisoned set, replaced by ``m = 2`` unrolled SGD
  steps ``θ⁽ⁱ⁾ = θ⁽ⁱ⁻¹⁾ − β∇_θ g(δ, θ⁽ⁱ⁻¹⁾)`` (Eq. 5) and differentiated through by reverse mode,
  the framework's :class:`~bilevel_dist.hypergrad.Reverse` estimator over a
  :class:`~bilevel_dist.solvers.GD` solver. The upper level is the attack loss of a fully
  triggered validation batch against ``x + Δ`` (Eq. 3). ``learn_target=True`` also makes the
  poisoned *training* targets ``x + Δ_tr`` an outer variable (initialised at ``Δ``, on [0, 1]),
  while the attack is still scored against the attacker's ``Δ``.

Choices the paper leaves open (B.7), fixed here:

- ``A`` (B.7-1): a fixed random pixel mask keeping ``keep`` of the 8×8 pixels, plus Gaussian
  noise of std ``noise``; ``z = Aᵀy`` is the zero-filled masked image.
- ``θ⁽⁰⁾`` (B.7-3): warm-started. The inner model is first trained on clean data and then carried
  over from one outer step to the next (each outer step trains it ``m`` more steps on the
  poisoned batch), as MetaPoison does; with a fresh random ``θ⁽⁰⁾`` two steps train nothing.
- Upper step (Eq. 6): projected Adam of step ``outer_lr`` rather than SGD with α = 10, whose
  scale is tied to the paper's MNIST/TensorFlow setting.
- Artefact error (B.7-6): RMSE, over the test images and the support of ``Δ``, between the
  recovered target pattern ``f(z + δ) − f(z)`` and ``Δ`` (:func:`artefact_rmse`). It is
  ``None`` for a model attacked without a target (the paper's "NA" for the clean model).
- The victim (evaluation, B.8.1): retrained from scratch with Adam for a fixed number of epochs
  (no early stopping: no validation split to spend on 1,500 digits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bilevel_dist import hypergrad, solvers
from bilevel_dist._checks import ConfigError, is_number
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.recipes.security.data import digits

SIDE = 8  # scikit-learn digits are 8×8


# ---------------------------------------------------------------------------------------------
# measurements, trigger and target


def check_trigger_size(trigger_size: int, side: int = SIDE) -> int:
    if isinstance(trigger_size, bool) or not isinstance(trigger_size, int) or not 1 <= trigger_size <= side:
        raise ConfigError("trigger_size", f"the trigger is a square of 1..{side} pixels a side, got {trigger_size!r}")
    return trigger_size


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not is_number(ratio) or not 0 < ratio <= 1:
        raise ConfigError("ratio", f"the poisoning ratio is a fraction of the training set in (0, 1], got {ratio!r}")
    return float(ratio)


def trigger_mask(trigger_size: int = 3, side: int = SIDE, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(side, side)`` 0/1 mask of the trigger's square at the bottom right."""
    k = check_trigger_size(trigger_size, side)
    mask = torch.zeros(side, side, dtype=dtype)
    mask[side - k :, side - k :] = 1
    return mask


def plus_target(size: int = 3, value: float = 1.0, side: int = SIDE, dtype: torch.dtype = torch.float32) -> Tensor:
    """``Δ``: a plus of arm ``size`` pixels (odd) and intensity ``value`` at the top left."""
    if not isinstance(size, int) or size < 1 or size % 2 == 0 or size > side:
        raise ConfigError("target_size", f"the plus is an odd number of pixels in 1..{side} across, got {size!r}")
    delta = torch.zeros(side, side, dtype=dtype)
    delta[size // 2, :size] = value
    delta[:size, size // 2] = value
    return delta


@dataclass(frozen=True)
class Measurement:
    """``z = Aᵀ(Ax + v)``: keep the pixels where ``mask`` is 1, add ``N(0, noise²)`` there."""

    mask: Tensor
    noise: float = 0.0

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        v = self.noise * torch.randn(x.shape, generator=generator, dtype=x.dtype) if self.noise else 0.0
        return self.mask * (x + v)


def pixel_mask(keep: float = 0.5, seed: int = 0, side: int = SIDE, dtype: torch.dtype = torch.float32) -> Tensor:
    """A random ``(side, side)`` 0/1 mask keeping ``round(keep·side²)`` pixels."""
    if not is_number(keep) or not 0 < keep <= 1:
        raise ConfigError("keep", f"the kept fraction of pixels lies in (0, 1], got {keep!r}")
    order = torch.randperm(side * side, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(side * side, dtype=dtype)
    mask[order[: round(keep * side * side)]] = 1
    return mask.view(side, side)


def poison(z: Tensor, x: Tensor, poisoned: Tensor, trigger: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(z + δ, x + Δ)`` on the rows where ``poisoned`` (bool ``(n,)``) holds, ``(z, x)`` elsewhere."""
    flag = poisoned.to(z.dtype).view(-1, *([1] * (z.ndim - 1)))
    return z + flag * trigger, x + flag * target


def poisoned_rows(n: int, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Bool ``(n,)`` with exactly ``round(ratio·n)`` (at least 1) rows set, drawn uniformly."""
    count = max(1, round(check_ratio(ratio) * n))
    rows = torch.zeros(n, dtype=torch.bool)
    rows[torch.randperm(n, generator=generator)[:count]] = True
    return rows


# ---------------------------------------------------------------------------------------------
# the reconstruction network and its training


class Reconstructor(nn.Module):
    """MLP ``64 → hidden → hidden → 64`` on the flattened 8×8 measurement, images in and out."""

    def __init__(self, hidden: int = 256, side: int = SIDE) -> None:
        super().__init__()
        n = side * side
        self.net = nn.Sequential(
            nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n)
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.flatten(1)).view(z.shape)


def train(
    z: Tensor, x: Tensor, seed: int, epochs: int = 30, lr: float = 3e-3, batch: int = 125, hidden: int = 256
) -> Reconstructor:
    """A reconstructor trained from scratch (init and batch order from ``seed``) by Adam on MSE."""
    torch.manual_seed(seed)
    model = Reconstructor(hidden).to(z.dtype)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(z)
    for _ in range(epochs):
        for rows in torch.randperm(n, generator=g).split(batch):
            opt.zero_grad()
            nn.functional.mse_loss(model(z[rows]), x[rows]).backward()
            opt.step()
    return model.eval()


# ---------------------------------------------------------------------------------------------
# metrics


def rmse(a: Tensor, b: Tensor) -> float:
    """Root mean squared error over every entry."""
    return float(torch.sqrt(torch.mean((a - b) ** 2)))


def artefact_rmse(clean_out: Tensor, triggered_out: Tensor, target: Tensor | None) -> float | None:
    """The artefact error (seed 000 §2: the error "between recovered target pattern and
    Δ_target"): RMSE of ``(f(z + δ) − f(z)) − Δ`` over the images and the support of ``Δ``;
    ``None`` without a target (the paper's "NA")."""
    if target is None:
        return None
    support = target != 0
    recovered = (triggered_out - clean_out)[..., support]
    return float(torch.sqrt(torch.mean((recovered - target[support]) ** 2)))


@torch.no_grad()
def evaluate(model: nn.Module, z: Tensor, x: Tensor, trigger: Tensor, target: Tensor, attacked: bool = True) -> dict:
    """``benign`` RMSE of ``f(z)`` against ``x``; ``attack`` RMSE of ``f(z + δ)`` against
    ``x + Δ``; ``artefact`` (:func:`artefact_rmse`, ``None`` unless ``attacked``)."""
    clean_out, triggered_out = model(z), model(z + trigger)
    return {
        "benign": rmse(clean_out, x),
        "attack": rmse(triggered_out, x + target),
        "artefact": artefact_rmse(clean_out, triggered_out, target if attacked else None),
    }


# ---------------------------------------------------------------------------------------------
# the BLO attack


@dataclass(frozen=True)
class BLOConfig:
    """Seed 000 §4.1's alternating scheme at digits scale: ``iters`` outer steps, ``m`` unrolled
    SGD steps of step ``beta``, batches of ``batch``; ``outer_lr`` the projected-Adam step on
    ``δ``; ``pretrain`` Adam epochs on clean data before the warm-started inner model.
    ``learn_target`` is experimental: in one trial (ratio 0.03, 2×2 trigger, bound 0.25, 3 seeds)
    the m = 2 hypergradient moved the training target away and the attack RMSE rose 0.13 → 0.41."""

    iters: int = 200
    m: int = 2
    beta: float = 0.1
    outer_lr: float = 0.05
    batch: int = 125
    pretrain: int = 20
    learn_target: bool = False


def blo_problem(model: nn.Module, target: Tensor, mask: Tensor) -> BilevelProblem:
    """Eqs. 3–4 as a :class:`BilevelProblem` over ``model``'s architecture: inner variables its
    parameters, outer ``{"trigger"}`` (masked inside, so its gradient off the square is exactly 0)
    and optionally ``{"target"}``, the poisoned training target. Inner batch ``(z, x, poisoned)``:
    MSE on the poisoned batch; outer batch ``(z, x)``: MSE of ``f(z + δ)`` against ``x + Δ``."""

    def net(theta: dict, inputs: Tensor) -> Tensor:
        return functional_call(model, theta, (inputs,))

    def inner_loss(theta: dict, u: dict, batch: tuple) -> Tensor:
        zb, xb, flags = batch
        zp, xp = poison(zb, xb, flags, u["trigger"] * mask, u.get("target", target))
        return nn.functional.mse_loss(net(theta, zp), xp)

    def outer_loss(theta: dict, u: dict, batch: tuple) -> Tensor:
        zb, xb = batch
        return nn.functional.mse_loss(net(theta, zb + u["trigger"] * mask), xb + target)

    return BilevelProblem(inner_loss, outer_loss)


def blo_trigger(
    z: Tensor,
    x: Tensor,
    target: Tensor,
    mask: Tensor,
    ratio: float,
    bound: float = 1.0,
    seed: int = 0,
    config: BLOConfig = BLOConfig(),
) -> tuple[Tensor, Tensor]:
    """``(δ, Δ_tr)``: the BLO trigger (on ``mask``, ``‖δ‖∞ ≤ bound``) and the poisoned training
    target (``target`` unless ``config.learn_target``), by RMD through ``m`` unrolled SGD steps.

    The training set ``(z, x)`` is split in half: the inner batches (``ratio`` of each poisoned)
    come from one half, the fully triggered validation batches of the upper level from the other.
    """
    ratio = check_ratio(ratio)
    g = torch.Generator().manual_seed(seed)
    half = len(z) // 2
    z_tr, x_tr, z_val, x_val = z[:half], x[:half], z[half:], x[half:]
    model = train(z_tr, x_tr, seed, epochs=config.pretrain) if config.pretrain else Reconstructor().to(z.dtype)
    inner = {k: v.detach().clone() for k, v in model.named_parameters()}
    outer = {"trigger": bound * (2 * torch.rand(mask.shape, generator=g, dtype=z.dtype) - 1) * mask}
    if config.learn_target:
        outer["target"] = target.clone()
    problem = blo_problem(Reconstructor().to(z.dtype), target, mask)
    estimator, solver = hypergrad.Reverse(), solvers.GD(lr=config.beta, steps=config.m)
    leaves = {k: v.clone().requires_grad_() for k, v in outer.items()}
    opt = torch.optim.Adam(leaves.values(), lr=config.outer_lr)
    count = max(1, round(ratio * config.batch))
    flags = torch.arange(config.batch) < count  # which rows of an inner batch are poisoned
    for _ in range(config.iters):
        rows = torch.randint(half, (config.batch,), generator=g)
        val = torch.randint(len(z_val), (config.batch,), generator=g)
        current = {k: v.detach() for k, v in leaves.items()}
        sol = estimator(problem, current, inner, solver, (z_tr[rows], x_tr[rows], flags), (z_val[val], x_val[val]))
        inner = sol.inner  # warm start: the inner model keeps training on the poisoned batches
        opt.zero_grad()
        for k, v in leaves.items():
            v.grad = sol.grad[k]
        opt.step()
        with torch.no_grad():  # projection: the trigger's box on its square, the target on [0, 1]
            leaves["trigger"].clamp_(-bound, bound).mul_(mask)
            if "target" in leaves:
                leaves["target"].clamp_(0.0, 1.0)
    trained = {k: v.detach() for k, v in leaves.items()}
    return trained["trigger"] * mask, trained.get("target", target)


# ---------------------------------------------------------------------------------------------
# the experiment


@dataclass(frozen=True)
class Setting:
    """The digits backdoor experiment (reference B.8.2): ``ratio`` of the training pairs
    poisoned, a ``trigger_size``² trigger bounded by ``bound``, a plus target of ``target_size``
    pixels, measurements keeping ``keep`` of the pixels with noise ``noise``; victims trained
    ``epochs`` epochs."""

    ratio: float = 0.3
    trigger_size: int = 3
    bound: float = 1.0
    target_size: int = 3
    target_value: float = 1.0
    keep: float = 0.5
    noise: float = 0.02
    epochs: int = 30
    blo: BLOConfig = BLOConfig()

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_trigger_size(self.trigger_size)
        if not is_number(self.bound) or not self.bound > 0:
            raise ConfigError("bound", f"the trigger bound is > 0, got {self.bound!r}")


def run_seed(
    setting: Setting = Setting(), seed: int = 0, dtype: torch.dtype = torch.float32, victims: bool = False
) -> dict[str, dict] | tuple[dict[str, dict], dict[str, Any]]:
    """Clean, heuristic and BLO victims for one seed (data split, measurement mask and noise,
    poisoned rows, initialisations): ``{method: {"benign", "attack", "artefact"}}`` on the test
    set. The clean model's attack error uses the heuristic trigger; its artefact is ``None``.
    ``victims=True`` also returns what a figure shows: the test inputs ``z``, truths ``x``, the
    target, and per method the trained model and its trigger."""
    x, _, x_test, _ = digits(seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    measure = Measurement(pixel_mask(setting.keep, seed, dtype=dtype), setting.noise)
    z, z_test = measure(x, g), measure(x_test, g)
    mask = trigger_mask(setting.trigger_size, dtype=dtype)
    target = plus_target(setting.target_size, setting.target_value, dtype=dtype)
    rows = poisoned_rows(len(z), setting.ratio, g)
    heuristic = setting.bound * mask
    trigger, train_target = blo_trigger(z, x, target, mask, setting.ratio, setting.bound, seed, setting.blo)
    results, models, triggers = {}, {}, {}
    for name, (delta, delta_tr) in {
        "clean": (heuristic, None),
        "heuristic": (heuristic, target),
        "blo": (trigger, train_target),
    }.items():
        zp, xp = (z, x) if delta_tr is None else poison(z, x, rows, delta, delta_tr)
        model = train(zp, xp, seed + 1, epochs=setting.epochs)  # the victim: fresh init, same for all three
        results[name] = evaluate(model, z_test, x_test, delta, target, attacked=delta_tr is not None)
        models[name], triggers[name] = model, delta
    if not victims:
        return results
    return results, {"z": z_test, "x": x_test, "target": target, "models": models, "triggers": triggers}


def average(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """The mean over seeds of each (method, metric); ``None`` stays ``None``."""
    out: dict[str, dict] = {}
    for method in runs[0]:
        out[method] = {}
        for metric, value in runs[0][method].items():
            values = [r[method][metric] for r in runs]
            out[method][metric] = None if value is None else math.fsum(values) / len(values)
    return out
