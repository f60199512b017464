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
- **Drop-in solvers** (seed 004's taxonomy; :class:`BLOConfig` ``solver``): the same problem and
  loop with the hypergradient from implicit differentiation (``aid``: CG or Neumann at the inner
  model the ``m`` steps reach) or from the penalty method (``penalty``: Mehra & Hamm's
  ``∇_δ f̃``, :class:`~bilevel_dist.hypergrad.PenaltyGradient`).

Networks and data: the MLP :class:`Reconstructor` (default) or the paper's conv autoencoder
:class:`ConvAutoencoder` (4 conv + 3 transposed conv; 222,145 parameters in the reference's
layout at 28×28, :data:`NARROW` on 8×8); scikit-learn's 8×8 digits (split per seed) or MNIST
from a local directory (``run_seed(data=...)``, 28×28: the trigger and the plus keep their
corners).

Choices the paper leaves open (B.7), fixed here:

- ``A`` (B.7-1): a fixed random pixel mask keeping ``keep`` of the image's pixels, plus Gaussian
  noise of std ``noise``; ``z = Aᵀy`` is the zero-filled masked image.
- ``θ⁽⁰⁾`` (B.7-3): warm-started. The inner model is first trained on clean data and then carried
  over from one outer step to the next (each outer step trains it ``m`` more steps on the
  poisoned batch), as MetaPoison does; with a fresh random ``θ⁽⁰⁾`` two steps train nothing.
- Upper step (Eq. 6): projected Adam of step ``outer_lr`` on digits rather than SGD with
  α = 10, whose scale is tied to the paper's MNIST/TensorFlow setting (``outer_optimizer="sgd"``
  gives the paper's step; ``recipes/security/backdoor_mnist.yaml`` uses it).
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
from bilevel_dist._checks import ConfigError, is_number, positive_float, positive_int
from bilevel_dist._checks import setting as checked
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
        v = self.noise * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) if self.noise else 0.0
        return self.mask.to(x.device) * (x + v)


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
    flag = poisoned.to(device=z.device, dtype=z.dtype).view(-1, *([1] * (z.ndim - 1)))
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


NETWORKS = ("mlp", "cae")
SOLVERS = ("reverse", "penalty", "aid")


class ConvAutoencoder(nn.Module):
    """The paper's CAE shape (B.5: "4 convolution layers and 3 transposed convolution layers"):
    3×3 convolutions ``1 → c₀ → c₁ → c₂ → c₃`` of strides 1, 2, 2, 1 (ReLU after each), then
    transposed 3×3 convolutions ``c₃ → c₁ → c₀`` (stride 2, ReLU) and ``c₀ → 1`` (stride 1,
    linear), so ``side`` (divisible by 4) goes ``side → side/4 → side``. The default channels
    ``(32, 64, 64, 128)`` are the reference's example layout, 222,145 parameters (the paper
    reports 233k; its layout is not given); :data:`NARROW` is the 8×8 digits variant."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 64, 128), side: int = 28) -> None:
        super().__init__()
        channels = check_channels(channels)
        if isinstance(side, bool) or not isinstance(side, int) or side < 4 or side % 4:
            raise ConfigError("side", f"the CAE halves the image twice: its side is a multiple of 4, got {side!r}")
        c0, c1, c2, c3 = channels
        self.side = side

        def up(a: int, b: int) -> nn.ConvTranspose2d:
            return nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=1)

        self.net = nn.Sequential(
            nn.Conv2d(1, c0, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c0, c1, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
            up(c3, c1), nn.ReLU(),
            up(c1, c0), nn.ReLU(),
            nn.ConvTranspose2d(c0, 1, 3, padding=1),
        )  # fmt: skip

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


NARROW = (16, 32, 32, 64)  # the CAE on 8×8 digits: 55,777 parameters


def check_channels(channels: Any) -> tuple[int, int, int, int]:
    if (
        not isinstance(channels, (list, tuple))
        or len(channels) != 4
        or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels)
    ):
        raise ConfigError("channels", f"the CAE's four convolutions take 4 channel counts >= 1, got {channels!r}")
    return tuple(channels)  # type: ignore[return-value]


def check_network(network: str) -> str:
    if network not in NETWORKS:
        raise ConfigError("network", f"unknown network {network!r}; choose one of {list(NETWORKS)}")
    return network


def make_network(
    network: str = "mlp", side: int = SIDE, hidden: int = 256, channels: tuple[int, ...] | None = None
) -> nn.Module:
    """``mlp``: :class:`Reconstructor` (``hidden``); ``cae``: :class:`ConvAutoencoder`
    (``channels``, default the reference's layout at 28×28 and :data:`NARROW` below)."""
    if check_network(network) == "mlp":
        return Reconstructor(hidden, side)
    if channels is None:
        channels = (32, 64, 64, 128) if side >= 28 else NARROW
    return ConvAutoencoder(tuple(channels), side)


def predict(model: nn.Module, z: Tensor, chunk: int = 2000) -> Tensor:
    """``model(z)`` in chunks of ``chunk`` rows (a 10k MNIST test set through the CAE at once
    would hold gigabytes of activations)."""
    return torch.cat([model(part) for part in z.split(chunk)])


def train(
    z: Tensor,
    x: Tensor,
    seed: int,
    epochs: int = 30,
    lr: float = 3e-3,
    batch: int = 125,
    hidden: int = 256,
    network: str = "mlp",
    channels: tuple[int, ...] | None = None,
) -> nn.Module:
    """A reconstructor (:func:`make_network`) trained from scratch (init and batch order from
    ``seed``) by Adam on MSE, on ``z``'s device."""
    torch.manual_seed(seed)
    model = make_network(network, z.shape[-1], hidden, channels).to(device=z.device, dtype=z.dtype)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(z)
    for _ in range(epochs):
        for rows in torch.randperm(n, generator=g).split(batch):
            rows = rows.to(z.device)
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
    clean_out, triggered_out = predict(model, z), predict(model, z + trigger)
    return {
        "benign": rmse(clean_out, x),
        "attack": rmse(triggered_out, x + target),
        "artefact": artefact_rmse(clean_out, triggered_out, target if attacked else None),
    }


# ---------------------------------------------------------------------------------------------
# the BLO attack


@dataclass(frozen=True)
class BLOConfig:
    """Seed 000 §4.1's alternating scheme at digits scale: ``iters`` outer steps, ``m`` inner
    SGD steps of step ``beta`` on the poisoned batch, batches of ``batch``; ``outer_lr`` the
    projected step on ``δ`` (``outer_optimizer``: ``adam``, or ``sgd`` as the paper's α = 10);
    ``pretrain`` Adam epochs on clean data before the warm-started inner model.

    ``solver`` is the hypergradient through the ``m`` steps, one framework estimator each, over
    the same :func:`blo_problem` and the same loop (seed 004's taxonomy):

    - ``reverse``: RMD through the ``m`` unrolled steps (:class:`~bilevel_dist.hypergrad.Reverse`),
      the paper's method;
    - ``aid``: implicit differentiation at the inner model the ``m`` steps reach
      (:class:`~bilevel_dist.hypergrad.CG`, or ``Neumann`` with ``aid="neumann"``, ``solve_iters``
      iterations of step ``beta``), as if it solved the lower level;
    - ``penalty``: Mehra & Hamm's penalty hypergradient ``∇_δ f̃`` at the minimiser of
      ``f̃ = f + γ/2 ‖∇_θ g‖²`` (:class:`~bilevel_dist.hypergrad.PenaltyGradient`, ``gamma``,
      ``newton_steps`` Gauss–Newton steps of ``solve_iters`` CG iterations from that model).

    ``learn_target`` is experimental: in one trial (ratio 0.03, 2×2 trigger, bound 0.25, 3 seeds)
    the m = 2 hypergradient moved the training target away and the attack RMSE rose 0.13 → 0.41."""

    iters: int = 200
    m: int = 2
    beta: float = 0.1
    outer_lr: float = 0.05
    batch: int = 125
    pretrain: int = 20
    learn_target: bool = False
    solver: str = "reverse"
    aid: str = "cg"
    solve_iters: int = 20
    gamma: float = 100.0
    newton_steps: int = 1
    outer_optimizer: str = "adam"

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ConfigError("solver", f"unknown BLO solver {self.solver!r}; choose one of {list(SOLVERS)}")
        if self.aid not in ("cg", "neumann"):
            raise ConfigError("aid", f"the AID linear solve is 'cg' or 'neumann', got {self.aid!r}")
        if self.outer_optimizer not in ("adam", "sgd"):
            raise ConfigError("outer_optimizer", f"the upper step is 'adam' or 'sgd', got {self.outer_optimizer!r}")
        for key in ("iters", "m", "batch", "solve_iters"):
            checked(key, positive_int, getattr(self, key))
        for key in ("pretrain", "newton_steps"):
            checked(key, lambda name, value: positive_int(name, value, allow_zero=True), getattr(self, key))
        for key in ("beta", "outer_lr", "gamma"):
            checked(key, positive_float, getattr(self, key))

    def estimator(self) -> hypergrad.Estimator:
        """The framework estimator of :attr:`solver`."""
        if self.solver == "reverse":
            return hypergrad.Reverse()
        if self.solver == "aid":
            if self.aid == "cg":
                return hypergrad.CG(iters=self.solve_iters, tol=0.0)
            return hypergrad.Neumann(iters=self.solve_iters, alpha=self.beta)
        return hypergrad.PenaltyGradient(
            gamma=self.gamma, newton_steps=self.newton_steps, cg_iters=self.solve_iters, tol=0.0
        )


def blo_problem(model: nn.Module, target: Tensor, mask: Tensor, ridge: float = 0.0) -> BilevelProblem:
    """Eqs. 3–4 as a :class:`BilevelProblem` over ``model``'s architecture: inner variables its
    parameters, outer ``{"trigger"}`` (masked inside, so its gradient off the square is exactly 0)
    and optionally ``{"target"}``, the poisoned training target. Inner batch ``(z, x, poisoned)``:
    MSE on the poisoned batch (plus ``ridge·‖W‖²`` over the parameters named ``*weight``);
    outer batch ``(z, x)``: MSE of ``f(z + δ)`` against ``x + Δ``."""

    def net(theta: dict, inputs: Tensor) -> Tensor:
        return functional_call(model, theta, (inputs,))

    def inner_loss(theta: dict, u: dict, batch: tuple) -> Tensor:
        zb, xb, flags = batch
        zp, xp = poison(zb, xb, flags, u["trigger"] * mask, u.get("target", target))
        loss = nn.functional.mse_loss(net(theta, zp), xp)
        if ridge:
            loss = loss + ridge * sum((v**2).sum() for k, v in theta.items() if k.endswith("weight"))
        return loss

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
    network: str = "mlp",
    channels: tuple[int, ...] | None = None,
    lr: float = 3e-3,
) -> tuple[Tensor, Tensor]:
    """``(δ, Δ_tr)``: the BLO trigger (on ``mask``, ``‖δ‖∞ ≤ bound``) and the poisoned training
    target (``target`` unless ``config.learn_target``), by ``config.solver``'s hypergradient
    through ``m`` SGD steps of a :func:`make_network` ``network`` (pretrained with Adam of ``lr``).

    The training set ``(z, x)`` is split in half: the inner batches (``ratio`` of each poisoned)
    come from one half, the fully triggered validation batches of the upper level from the other.
    """
    ratio = check_ratio(ratio)
    g = torch.Generator().manual_seed(seed)
    half = len(z) // 2
    z_tr, x_tr, z_val, x_val = z[:half], x[:half], z[half:], x[half:]
    side = z.shape[-1]

    def fresh() -> nn.Module:
        return make_network(network, side, channels=channels).to(device=z.device, dtype=z.dtype)

    if config.pretrain:
        model = train(z_tr, x_tr, seed, epochs=config.pretrain, lr=lr, network=network, channels=channels)
    else:
        model = fresh()
    inner = {k: v.detach().clone() for k, v in model.named_parameters()}
    mask, target = mask.to(z.device), target.to(z.device)
    start = bound * (2 * torch.rand(mask.shape, generator=g, dtype=z.dtype) - 1)
    outer = {"trigger": start.to(z.device) * mask}
    if config.learn_target:
        outer["target"] = target.clone()
    problem = blo_problem(fresh(), target, mask)
    estimator, solver = config.estimator(), solvers.GD(lr=config.beta, steps=config.m)
    leaves = {k: v.clone().requires_grad_() for k, v in outer.items()}
    optimizer = torch.optim.Adam if config.outer_optimizer == "adam" else torch.optim.SGD
    opt = optimizer(leaves.values(), lr=config.outer_lr)
    count = max(1, round(ratio * config.batch))
    flags = (torch.arange(config.batch) < count).to(z.device)  # which rows of an inner batch are poisoned
    for _ in range(config.iters):
        rows = torch.randint(half, (config.batch,), generator=g).to(z.device)
        val = torch.randint(len(z_val), (config.batch,), generator=g).to(z.device)
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
    """The backdoor experiment (reference B.8.2): ``ratio`` of the training pairs poisoned, a
    ``trigger_size``² trigger bounded by ``bound``, a plus target of ``target_size`` pixels,
    measurements keeping ``keep`` of the pixels with noise ``noise``, on ``side``² images (8:
    digits, 28: MNIST); victims (``network``: ``mlp`` or ``cae`` of ``channels``,
    :func:`make_network`) trained ``epochs`` Adam epochs of step ``lr``."""

    ratio: float = 0.3
    trigger_size: int = 3
    bound: float = 1.0
    target_size: int = 3
    target_value: float = 1.0
    keep: float = 0.5
    noise: float = 0.02
    epochs: int = 30
    blo: BLOConfig = BLOConfig()
    side: int = SIDE
    network: str = "mlp"
    channels: tuple[int, ...] | None = None
    lr: float = 3e-3

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_trigger_size(self.trigger_size, self.side)
        if not is_number(self.bound) or not self.bound > 0:
            raise ConfigError("bound", f"the trigger bound is > 0, got {self.bound!r}")
        check_network(self.network)
        if self.channels is not None:
            check_channels(self.channels)
        if self.network == "cae" and self.side % 4:
            raise ConfigError("network", f"the CAE needs a side divisible by 4, got {self.side}")
        checked("lr", positive_float, self.lr)


def run_seed(
    setting: Setting = Setting(),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    victims: bool = False,
    data: tuple[Tensor, Tensor] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, dict] | tuple[dict[str, dict], dict[str, Any]]:
    """Clean, heuristic and BLO victims for one seed (measurement mask and noise, poisoned
    rows, initialisations; and the digits split): ``{method: {"benign", "attack", "artefact"}}``
    on the test set. ``data``: ``(x, x_test)`` images ``(n, 1, side, side)`` (e.g. MNIST), or
    ``None``: the digits split of ``seed``. The clean model's attack error uses the heuristic
    trigger; its artefact is ``None``. ``victims=True`` also returns what a figure shows: the
    test inputs ``z``, truths ``x``, the target, and per method the trained model and its trigger."""
    if data is None:
        x, _, x_test, _ = digits(seed, dtype=dtype)
    else:
        x, x_test = (t.to(dtype) for t in data)
    side = setting.side
    if x.shape[1:] != (1, side, side) or x_test.shape[1:] != (1, side, side):
        raise ConfigError("side", f"images must be (n, 1, {side}, {side}), got {tuple(x.shape)}")
    x, x_test = x.to(device), x_test.to(device)
    g = torch.Generator().manual_seed(seed)
    measure = Measurement(pixel_mask(setting.keep, seed, side, dtype=dtype), setting.noise)
    z, z_test = measure(x, g), measure(x_test, g)
    mask = trigger_mask(setting.trigger_size, side, dtype=dtype).to(x.device)
    target = plus_target(setting.target_size, setting.target_value, side, dtype=dtype).to(x.device)
    rows = poisoned_rows(len(z), setting.ratio, g).to(x.device)
    heuristic = setting.bound * mask
    net = {"network": setting.network, "channels": setting.channels}
    trigger, train_target = blo_trigger(
        z, x, target, mask, setting.ratio, setting.bound, seed, setting.blo, lr=setting.lr, **net
    )
    results, models, triggers = {}, {}, {}
    for name, (delta, delta_tr) in {
        "clean": (heuristic, None),
        "heuristic": (heuristic, target),
        "blo": (trigger, train_target),
    }.items():
        zp, xp = (z, x) if delta_tr is None else poison(z, x, rows, delta, delta_tr)
        # the victim: fresh init, same for all three
        model = train(zp, xp, seed + 1, epochs=setting.epochs, lr=setting.lr, **net)
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
