"""The filter energy's analytic derivatives (gradient, Hessian-vector product, mixed products in
the filters and β) against autograd through the composite formula, float64, to 1e-10: on every
kernel layout (image-major, pixel-major with gather or scatter adjoint, several blocks), filter
sizes 2×2 / 3×3 / 5×5, a cotangent that itself depends on β, derivatives of a product, and the
``torch.func`` path."""

import math

import pytest
import torch
from torch.func import grad, jvp, vmap

from bilevel_dist.linalg import linearize
from bilevel_dist.recipes.imaging import energies
from bilevel_dist.recipes.imaging.energies import FilterEnergy, correlate, cr1n, dct_filters, tv_filters

TOL = 1e-10
LAYOUTS = {  # (PIXEL_MAJOR, GATHER_ADJOINT, BLOCK)
    "image_major": (10**9, 0, 10**9),
    "pixel_major_gather": (1, 10**9, 10**9),
    "pixel_major_scatter": (1, 0, 10**9),
    "blocks": (1, 0, 200),  # blocks of 2 to 4 images, the last one shorter
    "defaults": (energies.PIXEL_MAJOR, energies.GATHER_ADJOINT, energies.BLOCK),
}


def composite(energy: FilterEnergy, x, y, filters, beta):
    """``Φ`` as the module defined it before the analytic derivatives (plain autograd)."""
    weights = math.exp(energy.beta0) * torch.exp(beta)
    return energy.data_term(x, y) + (cr1n(correlate(x, filters), energy.eps).flatten(2).sum(2) * weights).sum(1)


def case(filters: str, batch: int = 5, shape: tuple[int, int] = (9, 7)):
    generator = torch.Generator().manual_seed(1)
    if filters == "tv":
        c = tv_filters()
    elif filters == "dct":
        c = dct_filters(3)
    else:
        c = 0.3 * torch.randn(6, 1, 5, 5, generator=generator)
    x = torch.rand(batch, 1, *shape, generator=generator)
    y = x + 0.1 * torch.randn(x.shape, generator=generator)
    beta = 0.5 * torch.randn(c.shape[0], generator=generator)
    return x, y, c, beta, generator


def derivatives(fn, x, y, filters, beta, cotangent, v):
    """Value, ∇_x, ∇²_xx v, ∂_(c,β) ⟨∇_x, v⟩ and the first derivatives in (c, β) of Σ g_b Φ_b."""
    x, filters, beta = (t.clone().requires_grad_() for t in (x, filters, beta))
    value = fn(x, y, filters, beta)
    total = (value * cotangent(beta)).sum()
    gx = torch.autograd.grad(total, x, create_graph=True)[0]
    hvp = torch.autograd.grad(gx, x, v, retain_graph=True)[0]
    mixed = torch.autograd.grad(gx, (filters, beta), v, retain_graph=True)
    first = torch.autograd.grad(total, (filters, beta))
    return [value, gx, hvp, *mixed, *first]


def assert_close(found, expected):
    for a, b in zip(found, expected, strict=True):
        a, b = a.detach(), b.detach()
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= TOL * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("filters", ["dct", "tv", "random5"])
def test_derivatives_match_autograd(layout, filters, monkeypatch):
    for name, value in zip(("PIXEL_MAJOR", "GATHER_ADJOINT", "BLOCK"), LAYOUTS[layout], strict=True):
        monkeypatch.setattr(energies, name, value)
    x, y, c, beta, generator = case(filters, batch=13 if layout == "blocks" else 5)
    energy = FilterEnergy(eps=0.05, beta0=-1.0)
    v = torch.randn(x.shape, generator=generator)
    weights = torch.rand(x.shape[0], generator=generator) + 0.5
    expected = derivatives(lambda *a: composite(energy, *a), x, y, c, beta, lambda b: weights, v)
    assert_close(derivatives(energy, x, y, c, beta, lambda b: weights, v), expected)


def test_cotangent_depending_on_beta():
    """``Σ_b a_b(β) Φ_b``: the derivative through the per-image cotangent (mixed in ``g``)."""
    x, y, c, beta, generator = case("dct")
    energy = FilterEnergy(eps=0.02, beta0=-2.0)
    v = torch.randn(x.shape, generator=generator)
    scale = torch.linspace(0.5, 1.5, x.shape[0])

    def cotangent(b):
        return scale * torch.sigmoid(b.sum())

    expected = derivatives(lambda *a: composite(energy, *a), x, y, c, beta, cotangent, v)
    assert_close(derivatives(energy, x, y, c, beta, cotangent, v), expected)


def test_products_differentiate_further():
    """``create_graph`` through a Hessian-vector product and a mixed product (third order)."""
    x, y, c, beta, generator = case("dct")
    energy = FilterEnergy(eps=0.05, beta0=-1.0)
    v = torch.randn(x.shape, generator=generator)

    def third(fn):
        xx, cc, bb = (t.clone().requires_grad_() for t in (x, c, beta))
        gx = torch.autograd.grad(fn(xx, y, cc, bb).sum(), xx, create_graph=True)[0]
        hvp = torch.autograd.grad(gx, xx, v, create_graph=True)[0]
        mixed = torch.autograd.grad(gx, bb, v, create_graph=True)[0]
        return [*torch.autograd.grad((hvp * hvp).sum() + (mixed**2).sum(), (xx, cc, bb))]

    assert_close(third(energy), third(lambda *a: composite(energy, *a)))


def test_parameter_gradient_with_graph():
    """First derivatives in ``(c, β)`` with ``create_graph`` (differentiated again in ``x``)."""
    x, y, c, beta, _ = case("tv")
    energy = FilterEnergy(eps=0.05, beta0=0.0)

    def mixed(fn):
        xx, cc, bb = (t.clone().requires_grad_() for t in (x, c, beta))
        gc, gb = torch.autograd.grad(fn(xx, y, cc, bb).sum(), (cc, bb), create_graph=True)
        return [*torch.autograd.grad((gc**2).sum() + (gb**2).sum(), (xx, cc, bb))]

    assert_close(mixed(energy), mixed(lambda *a: composite(energy, *a)))


def test_linearisation_products_match():
    """The products the implicit hypergradient takes (:func:`bilevel_dist.linalg.linearize`)."""
    x, y, c, beta, generator = case("dct", batch=10, shape=(8, 8))
    energy = FilterEnergy(eps=0.01, beta0=-3.0)
    v = {"x": torch.randn(x.shape, generator=generator)}

    def products(fn):
        def loss(inner, outer, batch):
            return fn(inner["x"], batch, outer["filters"], outer["beta"]).sum()

        lin = linearize(loss, {"x": x}, {"filters": c, "beta": beta}, y)
        mixed = lin.mixed(v)
        return [lin.grad["x"], lin.hvp(v)["x"], mixed["filters"], mixed["beta"]]

    assert_close(products(energy), products(lambda *a: composite(energy, *a)))


def test_torch_func_transforms():
    """Inside ``torch.func`` transforms (vmapped per-image gradients, jvp) the composite formula
    serves: the same values."""
    x, y, c, beta, generator = case("dct")
    energy = FilterEnergy(eps=0.05, beta0=-1.0)

    def per_image(fn):
        return vmap(grad(lambda xi, yi: fn(xi[None], yi[None], c, beta).sum()))(x, y)

    assert_close([per_image(energy)], [per_image(lambda *a: composite(energy, *a))])
    tangent = torch.randn(x.shape, generator=generator)
    found = jvp(lambda xx: energy(xx, y, c, beta), (x,), (tangent,))
    expected = jvp(lambda xx: composite(energy, xx, y, c, beta), (x,), (tangent,))
    assert_close(list(found), list(expected))


def test_no_grad_value():
    x, y, c, beta, _ = case("random5")
    energy = FilterEnergy(eps=0.05, beta0=-1.0)
    with torch.no_grad():
        assert_close([energy(x, y, c, beta)], [composite(energy, x, y, c, beta)])
