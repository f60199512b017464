"""Witches' Brew (thesis ch. 6; ``shared/reference/geiping-thesis.md`` §4.5, tests 1–4 and 6):
the constraint set after every step, the exact double-backward gradient of the alignment loss,
restart selection, Remark 6.2's sanity case, and the CPU mechanism toy (Gaussian blobs, MLP
64-128-128-10, 1% poisons). Figures in comments were measured with torch 2.13 on CPU, one thread.
"""

import math
from functools import partial

import pytest
import torch
from torch import nn

from bilevel_dist._checks import ConfigError
from bilevel_dist.recipes.security import (
    Augmentation,
    alignment_loss,
    apply_poison,
    attack_case,
    augment,
    blobs,
    brew,
    choose_case,
    digits,
    networks,
    success_rate,
    target_gradient,
    train_victims,
)
from bilevel_dist.recipes.security.witches_brew import (
    Victims,
    _exact_batches,
    decay_milestones,
    ensemble_alignment_loss,
    ensemble_target_gradient,
    flips,
    parameters,
    project,
)

pytestmark = pytest.mark.usefixtures("one_thread")


mlp = partial(networks.mlp, dtype=torch.float32)  # the tests' victims are built in float32


# -- data and cases ------------------------------------------------------------------------------


def test_blobs_are_the_toy_and_deterministic():
    x, y, x_test, y_test = blobs(0)
    assert x.shape == (2000, 64) and x.dtype == torch.float32 and x_test.shape == (1000, 64)
    assert torch.equal(torch.bincount(y), torch.full((10,), 200))
    again = blobs(0, dtype=torch.float64)
    assert torch.equal(again[1], y) and torch.allclose(again[0].float(), x, atol=0, rtol=0)
    assert not torch.equal(blobs(1)[0], x)
    # noise N(0, I) around the class means: the within-class variance per coordinate is about 1
    centred = x - torch.stack([x[y == c].mean(0) for c in range(10)])[y]
    assert abs(float(centred.var()) - 1.0) < 0.02


def test_digits_images_and_flat():
    x, y, x_test, y_test = digits(0)
    assert x.shape == (1500, 1, 8, 8) and x_test.shape == (297, 1, 8, 8)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    flat = digits(0, images=False)
    assert flat[0].shape == (1500, 64) and torch.equal(flat[0], x.flatten(1)) and torch.equal(flat[1], y)


def test_choose_case():
    x, y, x_test, y_test = blobs(0)
    predicted = y_test.clone()
    predicted[::2] = (y_test[::2] + 1) % 10  # even test points "misclassified"
    case = choose_case(y, y_test, predicted, budget=0.01, seed=3)
    assert case.target % 2 == 1 and case.label == int(y_test[case.target]) and case.adversarial != case.label
    assert len(case.poisons) == 20 and bool((y[case.poisons] == case.adversarial).all())
    assert torch.equal(case.poisons, case.poisons.sort().values) and len(case.poisons.unique()) == 20
    again = choose_case(y, y_test, predicted, budget=0.01, seed=3)
    assert again.target == case.target and torch.equal(again.poisons, case.poisons)
    fixed = choose_case(y, y_test, budget=0.05, seed=0, target=7, adversarial=(int(y_test[7]) + 1) % 10)
    assert fixed.target == 7 and len(fixed.poisons) == 100


@pytest.mark.parametrize(
    ("call", "key"),
    [
        (lambda d: choose_case(d[1], d[3], budget=1.5), "budget"),
        (lambda d: choose_case(d[1], d[3], budget=0.0), "budget"),
        (lambda d: choose_case(d[1], d[3], budget=0.5), "budget"),  # 1000 poisons, class has 200
        (lambda d: choose_case(d[1], d[3], target=1000), "target"),
        (lambda d: choose_case(d[1], d[3], target=-1), "target"),
        (lambda d: choose_case(d[1], d[3], target=0, adversarial=int(d[3][0])), "adversarial"),
        (lambda d: attack_case(mlp((64, 10)), *d, eps=0.0), "eps"),
        (lambda d: attack_case(mlp((64, 10)), *d, eps=-1.0), "eps"),
        (lambda d: attack_case(mlp((64, 10)), *d, eps=1.0, budget=2.0), "budget"),
        (lambda d: attack_case(mlp((64, 10)), *d, eps=float("inf")), "eps"),
        (lambda d: attack_case(mlp((64, 10)), *d, eps=1.0, ensemble=0), "ensemble"),
        (lambda d: attack_case(mlp((64, 10)), *d, eps=1.0, poison_batch=0), "poison_batch"),
        # blobs are vectors: augmentation is for images, refused before any training
        (lambda d: attack_case(mlp((64, 10)), *d, eps=1.0, augmentation=Augmentation(1.0)), "augmentation"),
        (lambda d: attack_case(mlp((64, 10)), *d, eps=1.0, victim_augmentation=Augmentation()), "victim_augmentation"),
    ],
)
def test_bad_input_names_the_key(call, key):
    data = blobs(0, n_train=400, n_test=50)
    with pytest.raises(ConfigError) as error:
        call(data)
    assert error.value.key == key


def test_brew_rejects_bad_settings_before_work():
    model = mlp((4, 3), dtype=torch.float64)()
    x, y = torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)
    for kwargs, key in [
        ({"eps": 0.0}, "eps"),
        ({"eps": 1.0, "restarts": 0}, "restarts"),
        ({"eps": 1.0, "lr": 0}, "lr"),
        ({"eps": 1.0, "poison_batch": 0}, "poison_batch"),
    ]:
        with pytest.raises(ConfigError) as error:
            brew(model, parameters(model), x[:1], y[:1], x, y, **kwargs)
        assert error.value.key == key


# -- the alignment loss ----------------------------------------------------------------------------


def test_alignment_double_backward_passes_gradcheck():
    """``∂B/∂Δ`` through ``∇_θ`` of the poisons (the double backward) against central finite
    differences: float64, a 2-layer MLP 5-7-3 (tanh, smooth), 3 poisons, with and without the
    bilinear augmentation (4×4 images, fractional shifts and a flip)."""
    torch.manual_seed(0)
    model = mlp((5, 7, 3), nn.Tanh, dtype=torch.float64)()
    theta = parameters(model)
    x, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    target = target_gradient(model, theta, torch.randn(1, 5), torch.tensor([1]))
    delta = (0.3 * torch.randn(3, 5)).requires_grad_()
    assert torch.autograd.gradcheck(lambda d: alignment_loss(model, theta, target, x, y, d), (delta,))

    image_model = mlp((16, 7, 3), nn.Tanh, dtype=torch.float64)()
    theta = parameters(image_model)
    images = torch.rand(3, 1, 4, 4)
    target = target_gradient(image_model, theta, torch.rand(1, 1, 4, 4), torch.tensor([2]))
    draws = torch.tensor([[0.3, -0.7, 1.0], [-1.2, 0.4, 0.0], [0.5, 0.5, 1.0]])
    delta = (0.1 * torch.randn(3, 1, 4, 4)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda d: alignment_loss(image_model, theta, target, images, y, d, draws=draws), (delta,)
    )


def test_remark_6_2_poison_equal_to_target_aligns_exactly():
    """With ε large and one poison of the adversarial label, ``x_p + Δ = x_t`` makes the poison's
    gradient the target's adversarial gradient: B = 0 (measured 0 to 1e-16), a minimum (its
    gradient vanishes), and B > 0 elsewhere (measured ≥ 1e-3 at 0.1 perturbations)."""
    torch.manual_seed(1)
    model = mlp((6, 8, 4), nn.Tanh, dtype=torch.float64)()
    theta = parameters(model)
    x_target, adversarial = torch.randn(1, 6), torch.tensor([2])
    x_poison = torch.randn(1, 6)
    target = target_gradient(model, theta, x_target, adversarial)
    at_target = project(x_target - x_poison, x_poison, 1e6).requires_grad_()
    b = alignment_loss(model, theta, target, x_poison, adversarial, at_target)
    (slope,) = torch.autograd.grad(b, at_target)
    assert abs(float(b.detach())) < 1e-12 and float(slope.abs().max()) < 1e-7
    elsewhere = at_target.detach() + 0.1 * torch.randn(16, 1, 6)
    others = torch.stack([alignment_loss(model, theta, target, x_poison, adversarial, d) for d in elsewhere])
    assert float(others.min()) > 1e-4
    assert float(alignment_loss(model, theta, target, x_poison, adversarial, torch.zeros(1, 6))) > 1e-3


def test_augment_whole_pixel_shift_and_flip_are_exact():
    images = torch.rand(2, 1, 5, 6)
    draws = torch.tensor([[1.0, 0.0, 0.0], [0.0, -2.0, 1.0]])
    out = augment(images, draws)
    right = torch.zeros_like(images[0])
    right[..., 1:] = images[0, ..., :-1]  # content one pixel to the right, zeros come in
    up = torch.zeros_like(images[1])
    up[..., :-2, :] = images[1, ..., 2:, :]
    assert torch.allclose(out[0], right, atol=1e-12)
    assert torch.allclose(out[1], up.flip(-1), atol=1e-12)


# -- the brew ------------------------------------------------------------------------------------


def test_projection_invariants_after_every_step():
    """Digits images on [0, 1], ε = 0.1 (large enough that the box binds), differentiable
    augmentation: after the initial projection and every one of M = 12 steps, ‖Δ‖∞ ≤ ε, x + Δ in
    the box (up to one rounding; exactly after :func:`apply_poison`'s clamp), and every row
    but the poisons' is the clean row bit for bit. The loop over restarts gives the same Δ. Poison
    mini-batches keep the invariants; exact ones give the full-batch Δ."""
    x, y, x_test, y_test = digits(0, dtype=torch.float64)
    model = mlp((64, 16, 10), dtype=torch.float64)()
    theta = parameters(model)
    poisons = (y == 3).nonzero().flatten()[:5]
    eps, box, seen = 0.1, (0.0, 1.0), []
    others = torch.ones(len(x), dtype=torch.bool)
    others[poisons] = False

    def check(step: int, delta: torch.Tensor) -> None:
        seen.append(step)
        assert delta.shape == (3, 5, 1, 8, 8)
        assert float(delta.abs().max()) <= eps + 1e-12
        moved = x[poisons] + delta
        assert float(moved.min()) >= -1e-12 and float(moved.max()) <= 1 + 1e-12
        for d in delta:  # one per restart
            poisoned = apply_poison(x, poisons, d, box)
            assert float(poisoned.min()) >= 0.0 and float(poisoned.max()) <= 1.0
            assert torch.equal(poisoned[others], x[others])

    settings = dict(eps=eps, restarts=3, steps=12, lr=0.05, box=box, augmentation=Augmentation(shift=1.0), seed=4)
    result = brew(model, theta, x_test[:1], torch.tensor([3]), x[poisons], y[poisons], callback=check, **settings)
    assert seen == list(range(13))
    touching = (x[poisons] + result.deltas).isclose(torch.tensor(0.0), atol=1e-12) & (result.deltas < 0)
    assert bool(touching.any())  # the box was active, not only the ε-ball
    looped = brew(model, theta, x_test[:1], torch.tensor([3]), x[poisons], y[poisons], vectorise=False, **settings)
    assert torch.allclose(looped.deltas, result.deltas, atol=1e-10)
    # poison mini-batches of 2 (the last one 1) keep the invariants after every step too
    seen.clear()
    batched = brew(
        model, theta, x_test[:1], torch.tensor([3]), x[poisons], y[poisons], callback=check, poison_batch=2, **settings
    )
    assert seen == list(range(13)) and not torch.equal(batched.deltas, result.deltas)
    # exact mini-batches: the full B's gradient through the same augmentation draws
    exact = brew(
        model, theta, x_test[:1], torch.tensor([3]), x[poisons], y[poisons], poison_batch=2, exact_batches=True,
        **settings,
    )  # fmt: skip
    assert torch.allclose(exact.deltas, result.deltas, atol=1e-10) and torch.allclose(exact.history, result.history)


def _small(seed: int = 0, poisons: int = 6):
    """float64 blobs in 5-D (3 classes), an MLP 5-7-3 (tanh) and ``poisons`` poisons of class 1."""
    x, y, x_test, y_test = blobs(seed, n_train=60, n_test=5, dim=5, classes=3, dtype=torch.float64)
    rows = (y == 1).nonzero().flatten()[:poisons]
    return mlp((5, 7, 3), nn.Tanh, dtype=torch.float64), x, y, x_test[:1], torch.tensor([1]), x[rows], y[rows]


def test_ensemble_alignment_is_the_members_mean():
    """Three members stacked (:class:`Victims`): the ensemble's ``B`` and ``∂B/∂Δ`` (one ``vmap``)
    equal the mean of the members' own to 1e-12 (float64); a brew on the ensemble keeps ‖Δ‖∞ ≤ ε,
    and a one-member ensemble brews as its plain parameters do (to rounding)."""
    factory, x, y, x_t, y_adv, x_p, y_p = _small()
    members = train_victims(factory, x, y, [1, 2, 3], epochs=1)
    delta = 0.3 * torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    targets = ensemble_target_gradient(members.net, members.params, x_t, y_adv, members.buffers)
    value = ensemble_alignment_loss(members.net, members.params, targets, x_p, y_p, delta, members.buffers)
    slope = torch.func.grad(
        lambda d: ensemble_alignment_loss(members.net, members.params, targets, x_p, y_p, d, members.buffers)
    )(delta)
    values, slopes = [], []
    for i in range(3):
        p, b = members.member(i)
        t = target_gradient(members.net, p, x_t, y_adv, b)
        values.append(alignment_loss(members.net, p, t, x_p, y_p, delta, b))
        slopes.append(torch.func.grad(lambda d: alignment_loss(members.net, p, t, x_p, y_p, d, b))(delta))
    assert abs(float(value - torch.stack(values).mean())) < 1e-12
    assert float((slope - torch.stack(slopes).mean(0)).abs().max()) < 1e-12
    assert float(torch.stack(values).std()) > 1e-3  # the members differ: the mean is not trivial
    settings = dict(eps=0.5, restarts=2, steps=6, lr=0.1, seed=3)
    together = brew(members.net, members, x_t, y_adv, x_p, y_p, **settings)
    assert float(together.deltas.abs().max()) <= 0.5 + 1e-12 and bool((together.final < together.initial).all())
    one = Victims(members.net, *members.member(1))
    one = Victims(one.net, {k: v[None] for k, v in one.params.items()}, {k: v[None] for k, v in one.buffers.items()})
    alone = brew(members.net, members.member(1)[0], x_t, y_adv, x_p, y_p, buffers=members.member(1)[1], **settings)
    assert torch.allclose(brew(members.net, one, x_t, y_adv, x_p, y_p, **settings).deltas, alone.deltas, atol=1e-10)


def test_attack_case_with_one_model_is_the_single_model_pipeline():
    """``ensemble=1`` is today's protocol bit for bit (clean model, case, brew at its plain
    parameters, victims); ``ensemble=2`` brews on two clean models, the first the same one."""
    x, y, x_test, y_test = blobs(0, n_train=400, n_test=50, dim=16)
    factory, training = mlp((16, 32, 10)), dict(epochs=3)
    settings = dict(eps=1.0, seed=1, restarts=2, steps=20, lr=0.4, victim_seeds=range(2), training=training)
    result = attack_case(factory, x, y, x_test, y_test, ensemble=1, clean_control=False, **settings)
    clean = train_victims(factory, x, y, [10_001], **training)
    case = choose_case(y, y_test, clean.predict(x_test)[0], budget=0.01, seed=1)
    params, buffers = clean.member(0)
    target, adversarial = x_test[case.target][None], torch.tensor([case.adversarial])
    by_hand = brew(
        clean.net, params, target, adversarial, x[case.poisons], y[case.poisons], eps=1.0, restarts=2, steps=20,
        lr=0.4, buffers=buffers, seed=1,
    )  # fmt: skip
    victims = train_victims(factory, apply_poison(x, case.poisons, by_hand.delta), y, range(2), **training)
    assert torch.equal(result.case.poisons, case.poisons) and result.case.target == case.target
    assert torch.equal(result.brew.deltas, by_hand.deltas) and torch.equal(result.brew.history, by_hand.history)
    assert torch.equal(result.poisoned, flips(victims, x_test[case.target], case.adversarial))
    pair = attack_case(factory, x, y, x_test, y_test, ensemble=2, clean_control=False, **settings)
    assert pair.case.target == case.target and not torch.equal(pair.brew.deltas, by_hand.deltas)


def test_attack_case_on_images_passes_augmentation_and_poison_batches_to_the_brew():
    """Digits images on [0, 1]: the brew's differentiable augmentation (fractional shifts of up to
    1 pixel and flips), the victims' whole-pixel shifts, exact mini-batches of 5 of the 15
    poisons. The constraint set holds; the augmentation changes the brew (it reaches it)."""
    x, y, x_test, y_test = digits(0, dtype=torch.float64)
    settings = dict(
        eps=0.1, seed=0, restarts=2, steps=4, lr=0.04, box=(0.0, 1.0), victim_seeds=range(2), clean_control=False,
        training=dict(epochs=1), poison_batch=5, exact_batches=True,
        victim_augmentation=Augmentation(1.0, flip=False, integer=True),
    )  # fmt: skip
    factory = mlp((64, 16, 10), dtype=torch.float64)
    shifted = attack_case(factory, x, y, x_test, y_test, augmentation=Augmentation(1.0), **settings)
    plain = attack_case(factory, x, y, x_test, y_test, **settings)
    delta = shifted.brew.delta
    assert delta.shape == (15, 1, 8, 8) and float(delta.abs().max()) <= 0.1 + 1e-12
    moved = x[shifted.case.poisons] + delta
    assert float(moved.min()) >= -1e-12 and float(moved.max()) <= 1 + 1e-12
    assert shifted.brew.history.shape == (4, 2) and not torch.equal(delta, plain.brew.delta)


def test_poison_batch_of_all_poisons_is_the_full_batch_and_smaller_ones_step_on_their_own_b():
    """``poison_batch`` ≥ P is the full batch bit for bit. Smaller batches (2 of 6 poisons) step
    as the thesis code: one signed-Adam step moves each batch along the sign of the gradient of
    its *own* ``B`` (the cosine with the batch's gradient sum; Adam's first step is ``lr·sign`` up
    to its 1e-8), which is not the full ``B``'s gradient (measured: 9 of 60 signs differ).
    ``exact_batches`` gives the full ``B``'s gradient from batches of 4 and 2 (measured equal to
    rounding; the brew's Δ identical)."""
    factory, x, y, x_t, y_adv, x_p, y_p = _small()
    torch.manual_seed(0)
    model = factory()
    theta = parameters(model)
    settings = dict(eps=5.0, restarts=2, steps=8, lr=0.01, seed=2)
    full = brew(model, theta, x_t, y_adv, x_p, y_p, **settings)
    for size in (6, 10):
        same = brew(model, theta, x_t, y_adv, x_p, y_p, poison_batch=size, **settings)
        assert torch.equal(same.deltas, full.deltas) and torch.equal(same.history, full.history)
    start = []
    batched = brew(
        model, theta, x_t, y_adv, x_p, y_p, poison_batch=2, callback=lambda j, d: start.append(d.clone()), **settings
    )
    looped = brew(model, theta, x_t, y_adv, x_p, y_p, poison_batch=2, vectorise=False, **settings)
    assert torch.allclose(looped.deltas, batched.deltas, atol=1e-10, rtol=0)
    target = target_gradient(model, theta, x_t, y_adv)
    own, whole = torch.zeros_like(start[0]), torch.zeros_like(start[0])
    for r, d in enumerate(start[0]):
        whole[r] = torch.func.grad(lambda e: alignment_loss(model, theta, target, x_p, y_p, e))(d)
        for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
            own[r, rows] = torch.func.grad(
                lambda e: alignment_loss(model, theta, target, x_p[rows], y_p[rows], e)  # noqa: B023
            )(d[rows])
    stepped = project(start[0] - 0.01 * own.sign(), x_p, 5.0)  # the first step, before any decay
    assert torch.allclose(start[1], stepped, atol=1e-9, rtol=0)
    assert int((own.sign() != whole.sign()).sum()) > 0
    # exact_batches: two passes give the full B's gradient (to 1e-12), hence the full brew
    step, _ = _exact_batches(model, theta, {}, target, x_p, y_p, [slice(0, 4), slice(4, 6)], False, True)
    gradient, value = step(start[0], None)
    assert float((gradient - whole).abs().max()) < 1e-12
    assert torch.allclose(value, full.initial, atol=1e-12, rtol=0)
    exact = brew(model, theta, x_t, y_adv, x_p, y_p, poison_batch=4, exact_batches=True, **settings)
    assert torch.allclose(exact.deltas, full.deltas, atol=1e-10, rtol=0)
    assert torch.allclose(exact.history, full.history, atol=1e-12, rtol=0)


def test_step_decay_milestones():
    assert decay_milestones(250) == [93, 156, 218]  # 3/8, 5/8, 7/8 as the code's M // 2.667 ...
    assert decay_milestones(8) == [2, 4, 7]  # the code's float floor: 8 // 1.6 is 4.0


# -- victims and success -------------------------------------------------------------------------


def test_vectorised_victims_equal_the_sgd_loop():
    """``vmap`` over ``stack_module_state`` with the hand-written Nesterov update gives the
    victims that ``torch.optim.SGD(nesterov=True)`` trains one by one (float64, 2 epochs of 7
    minibatches, a step decay after epoch 1): agreement to 1e-12, and distinct seeds give distinct
    victims."""
    x, y, _, _ = blobs(0, n_train=200, n_test=10, dim=8, dtype=torch.float64)
    kwargs = dict(epochs=2, batch_size=32, lr=0.1, milestones=(1,))
    together = train_victims(mlp((8, 16, 10), dtype=torch.float64), x, y, [3, 5], **kwargs)
    looped = train_victims(mlp((8, 16, 10), dtype=torch.float64), x, y, [3, 5], vectorise=False, **kwargs)
    for k in together.params:
        assert torch.allclose(together.params[k], looped.params[k], atol=1e-12, rtol=0)
    first = together.params["1.weight"]
    assert not torch.allclose(first[0], first[1])
    fresh = mlp((8, 16, 10), dtype=torch.float64)
    untrained = train_victims(fresh, x, y, [3], epochs=1, lr=1e-300)  # no move: the seed's init
    torch.manual_seed(3)
    assert torch.equal(untrained.params["1.weight"][0], fresh()[1].weight.detach())


def test_success_rate_mean_and_standard_error_over_cases():
    hits = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    mean, se = success_rate(hits)
    assert mean == pytest.approx(0.5) and se == pytest.approx(0.5 / math.sqrt(3))
    assert success_rate(torch.tensor([1, 1, 0, 1], dtype=torch.bool)) == (0.75, 0.0)


def test_toy_poisons_flip_the_target():
    """The thesis's CPU mechanism test: blobs in 64-D (seed 0), MLP 64-128-128-10 trained 15
    epochs (SGD Nesterov, lr 0.05, batch 64, wd 5e-4, float32), 20 poisons (1%), ε = 1.0 (about
    one noise std: a mechanism test, not an imperceptible one), R = 4, M = 250, signed Adam
    lr 0.4ε; the clean model from seed 10 000, the victims from seeds 0–7. Measured: target 877
    (class 0 → 1); B from 0.70–0.79 at Δ_0 to 0.062–0.074, best 0.062; the target flips on 8/8
    poisoned victims and on 0/8 clean ones, the poisoned victims' test accuracy 0.685 (the
    reference: 8/8 vs 0/8, best B 0.07–0.12). Data seeds 1–4 gave 8/8 poisoned too (best B
    0.062–0.102), and 0/8 clean except seed 3's borderline target (3/8); ε = 0.5 gave 4, 0, 0 of 8
    on seeds 0–2 and ε = 0.25 gave 0/8 (``python recipes/security/results.py toy`` and the
    README's CLI commands). About 8 s on one thread."""
    x, y, x_test, y_test = blobs(0)
    result = attack_case(
        mlp((64, 128, 128, 10)), x, y, x_test, y_test, eps=1.0, budget=0.01, seed=0, restarts=4, steps=250, lr=0.4
    )
    brewed = result.brew
    assert len(result.case.poisons) == 20 and float(brewed.delta.abs().max()) <= 1.0 + 1e-6
    assert bool((brewed.final < brewed.initial).all())  # every restart descends
    assert brewed.best == int(brewed.final.argmin()) and torch.equal(brewed.delta, brewed.deltas[brewed.best])
    assert float(brewed.final.min()) < 0.2
    assert int(result.poisoned.sum()) >= 6 and int(result.clean.sum()) <= 1
    assert float(result.accuracy.mean()) > 0.6  # the victims still learn the task (clean: 0.68)


def test_toy_ensemble_of_four_flips_where_one_model_half_fails():
    """The toy above at ε = 0.5 (lr 0.2 = 0.4ε), case seed 0 (target 877, class 0 → 1): one clean
    model flips 4/8 victims, an ensemble of 4 clean models (seeds 10 000 + 1 000 003·k, ``B``
    averaged) 8/8 (6/8 with the code's lr/ensemble = 0.05). Measured elsewhere (ensemble 4 vs one
    model, poisoned victims of 8; clean victims 0/8 throughout): data seed 0 cases 1, 2: 8 vs 8,
    0 vs 0; data seeds 1, 2 case 0: 0 vs 0 both. The ensemble never did worse; it helped once of
    five. About 7 s on one thread."""
    x, y, x_test, y_test = blobs(0)
    result = attack_case(
        mlp((64, 128, 128, 10)), x, y, x_test, y_test, eps=0.5, seed=0, restarts=4, steps=250, lr=0.2, ensemble=4,
        clean_control=False,
    )  # fmt: skip
    assert result.case.target == 877 and float(result.brew.delta.abs().max()) <= 0.5 + 1e-6
    assert int(result.poisoned.sum()) >= 6
