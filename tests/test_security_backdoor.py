"""BLO backdoor on image reconstruction (seed 000; ``shared/reference/penalty-and-backdoor.md``
Part B): the artefact metric pinned on hand-made arrays (B-T5), the poisoning transform (B-T4),
the BLO trigger's constraint set, BLO against the heuristic over 3 seeds, and bad input.

Measured on the default :class:`Setting` (8×8 digits, half the pixels measured plus noise 0.02,
3×3 bottom-right trigger with ``‖δ‖∞ ≤ 1``, 5-pixel plus at the top left, ratio 0.3, MLP
64-256-256-64 victims trained 30 Adam epochs; BLO: 200 outer steps, m = 2 unrolled SGD steps of
β = 0.1 through ``hypergrad.Reverse``), RMSE on 297 test digits, mean over seeds 0, 1, 2
(torch CPU, float32, one thread):

============  =======  =======  ========
method        benign   attack   artefact
============  =======  =======  ========
clean         0.1167   0.4799   None
heuristic     0.1201   0.1245   0.0411
BLO           0.1186   0.1216   0.0466
============  =======  =======  ========

Per seed, BLO's attack RMSE is below the heuristic's by 0.0036, 0.0025, 0.0024 and its benign
RMSE by 0.0024, 0.0017, 0.0005; its artefact RMSE is higher. The paper's Table 1 (MNIST, CAE,
ratio 0.3): clean 0.021 / 0.045 / NA, heuristic 0.046 / 0.044 / 0.26, BLO 0.039 / 0.040 / 0.245.
"""

import pytest
import torch

from bilevel_dist import hypergrad, solvers
from bilevel_dist._checks import ConfigError
from bilevel_dist.recipes.security.backdoor import (
    BLOConfig,
    Reconstructor,
    Setting,
    artefact_rmse,
    average,
    blo_problem,
    blo_trigger,
    digits,
    plus_target,
    poison,
    poisoned_rows,
    rmse,
    run_seed,
    trigger_mask,
)

SEEDS = (0, 1, 2)
BENIGN_TOLERANCE = 0.005  # BLO's benign RMSE may exceed the heuristic's by at most this (~4%)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_artefact_pinned_on_a_hand_made_example():
    target = plus_target(3, 1.0)
    assert target.sum() == 5 and target[1, 1] == 1 and target[0, 0] == 0  # a 5-pixel plus, top left
    clean = torch.full((2, 1, 8, 8), 0.3)
    triggered = clean.clone()
    triggered[..., target != 0] += 0.5  # half the plus recovered on its support
    triggered[..., 7, 7] = 9.0  # off the support: not part of the artefact
    assert artefact_rmse(clean, triggered, target) == pytest.approx(0.5)
    # the recovered pattern is the difference f(z + δ) − f(z): a shared offset cancels
    assert artefact_rmse(clean, clean + target, target) == pytest.approx(0.0, abs=1e-7)
    assert artefact_rmse(clean, triggered, None) is None  # the paper's "NA"
    assert rmse(clean, clean) == 0.0
    assert rmse(torch.ones(4), torch.zeros(4)) == 1.0
    assert rmse(torch.tensor([3.0, 0.0]), torch.zeros(2)) == pytest.approx(4.5**0.5)


def test_poisoning_transform():
    x = torch.rand(40, 1, 8, 8, dtype=torch.float32)
    z = 0.5 * x
    rows = poisoned_rows(40, 0.3, torch.Generator().manual_seed(0))
    assert int(rows.sum()) == 12  # exactly round(ratio·n)
    mask, target = trigger_mask(3), plus_target()
    assert mask.sum() == 9 and mask[5:, 5:].all()  # 3×3 at the bottom right
    zp, xp = poison(z, x, rows, mask, target)
    assert torch.equal(zp[rows], z[rows] + mask) and torch.equal(xp[rows], x[rows] + target)
    assert torch.equal(zp[~rows], z[~rows]) and torch.equal(xp[~rows], x[~rows])


def test_blo_trigger_stays_on_its_square_and_in_its_bound():
    x = digits(0)[0][:250]
    mask, target = trigger_mask(2), plus_target()
    trigger, train_target = blo_trigger(x * 0.9, x, target, mask, 0.3, 0.2, 0, BLOConfig(iters=10, pretrain=1))
    assert trigger.abs().max() <= 0.2 + 1e-7
    assert torch.all(trigger[mask == 0] == 0) and trigger[mask == 1].abs().min() > 0
    assert torch.equal(train_target, target)  # not learned unless asked


def test_unrolled_hypergradient_equals_finite_differences():
    """B-T1: ``hypergrad.Reverse`` through m = 2 SGD steps is the exact derivative of
    ``f(δ, θ⁽²⁾(δ))`` (float64, central differences), and exactly 0 off the trigger's square."""
    torch.manual_seed(0)
    model = Reconstructor(hidden=6).double()
    mask, target = trigger_mask(2, dtype=torch.float64), plus_target(dtype=torch.float64)
    problem = blo_problem(model, target, mask)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.rand(10, 1, 8, 8, dtype=torch.float64)
    inner_batch, outer_batch = (0.8 * x, x, torch.arange(10) < 3), (0.8 * x[:5], x[:5])
    solver = solvers.GD(lr=0.5, steps=2)
    delta = 0.3 * torch.randn(8, 8, dtype=torch.float64)
    grad = hypergrad.Reverse()(problem, {"trigger": delta}, theta, solver, inner_batch, outer_batch).grad["trigger"]

    def unrolled(d):
        w = {k: v.clone().requires_grad_() for k, v in theta.items()}
        for _ in range(2):
            g = torch.autograd.grad(problem.inner_loss(w, {"trigger": d}, inner_batch), list(w.values()))
            w = {k: (v - 0.5 * gk).detach().requires_grad_() for (k, v), gk in zip(w.items(), g, strict=True)}
        return float(problem.outer_loss(w, {"trigger": d}, outer_batch).detach())

    eps = 1e-6
    for i, j in [(6, 6), (7, 7), (6, 7)]:
        e = torch.zeros(8, 8, dtype=torch.float64)
        e[i, j] = eps
        assert float(grad[i, j]) == pytest.approx((unrolled(delta + e) - unrolled(delta - e)) / (2 * eps), rel=1e-5)
    assert torch.all(grad[mask == 0] == 0) and grad[mask == 1].abs().min() > 0


@pytest.fixture(scope="module")
def measured():
    return average([run_seed(Setting(), seed) for seed in SEEDS])


def test_blo_beats_the_heuristic_at_the_same_ratio(measured):
    clean, heuristic, blo = measured["clean"], measured["heuristic"], measured["blo"]
    assert blo["attack"] < heuristic["attack"]
    assert blo["benign"] <= heuristic["benign"] + BENIGN_TOLERANCE
    assert heuristic["attack"] < 0.5 * clean["attack"]  # the backdoor is learned at all
    assert clean["artefact"] is None and heuristic["artefact"] is not None and blo["artefact"] is not None


@pytest.mark.parametrize("size", [0, 9, 2.0, True])
def test_trigger_larger_than_the_image_names_its_key(size):
    with pytest.raises(ConfigError) as error:
        Setting(trigger_size=size)
    assert error.value.key == "trigger_size"
    with pytest.raises(ConfigError, match="trigger"):
        trigger_mask(size)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan"), "0.3"])
def test_ratio_outside_the_unit_interval_names_its_key(ratio):
    with pytest.raises(ConfigError) as error:
        Setting(ratio=ratio)
    assert error.value.key == "ratio"
    with pytest.raises(ConfigError) as error:
        poisoned_rows(10, ratio)
    assert error.value.key == "ratio"
