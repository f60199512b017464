"""Second-order products and linear solvers on trees, against dense linear algebra."""

import pytest
import torch
from torch.func import hessian

from bilevel_dist import linalg, tree
from bilevel_dist._autograd import grad as engine_grad
from bilevel_dist.linalg import cg, dense_hessian, fixed_point, linearize, neumann


def spd(n, count=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (count, n, n) if count else (n, n)
    q = torch.randn(shape, generator=gen)
    return q @ q.transpose(-1, -2) / n + 0.5 * torch.eye(n)


def test_hvp_and_mixed_products_match_dense_derivatives():
    a = spd(5)

    def loss(w, x, batch):
        return 0.5 * w["u"] @ a @ w["u"] + torch.sin(w["u"] * x["s"]).sum() + (w["v"] ** 2 * x["s"][:2]).sum()

    w = {"u": torch.randn(5), "v": torch.randn(2)}
    x = {"s": torch.randn(5)}
    lin = linearize(loss, w, x, None)
    direction = {"u": torch.randn(5), "v": torch.randn(2)}
    flat_loss = lambda fw, fx: loss(tree.unflatten(fw, w), {"s": fx}, None)  # noqa: E731
    full = hessian(flat_loss, argnums=(0, 1))(tree.flatten(w), x["s"])
    expected_hvp = full[0][0] @ tree.flatten(direction)
    expected_mixed = full[0][1].T @ tree.flatten(direction)
    assert torch.allclose(tree.flatten(lin.hvp(direction)), expected_hvp, atol=1e-12)
    assert torch.allclose(lin.mixed(direction)["s"], expected_mixed, atol=1e-12)
    assert torch.allclose(dense_hessian(lin.hvp, w, batched=False), full[0][0], atol=1e-12)
    hvp_only = linearize(loss, w, x, None, mixed=False)  # a graph over w alone: same products
    assert torch.equal(tree.flatten(hvp_only.hvp(direction)), tree.flatten(lin.hvp(direction)))
    with pytest.raises(RuntimeError, match="mixed=False"):
        hvp_only.mixed(direction)


def test_engine_grad_is_autograd_grad():
    """The oracles' direct engine call gives ``torch.autograd.grad``'s results and errors."""
    w, unused = torch.randn(4, requires_grad=True), torch.randn(2, requires_grad=True)

    def out():
        return torch.sin(w) * w

    for ours, theirs in (
        (engine_grad([out().sum()], [w, unused]), torch.autograd.grad(out().sum(), [w, unused], allow_unused=True)),
        (
            engine_grad([out()], [w], [torch.arange(4.0)]),
            torch.autograd.grad(out(), [w], torch.arange(4.0)),
        ),
    ):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
    (second,) = engine_grad([(torch.sin(w) * w).sum()], [w], create_graph=True)
    assert second.requires_grad  # differentiable again, as with create_graph
    with pytest.raises(RuntimeError, match="scalar outputs"):
        engine_grad([torch.sin(w)], [w])
    with pytest.raises(RuntimeError, match="shape"):
        engine_grad([torch.sin(w)], [w], [torch.ones(3)])


def test_batched_dense_hessian_is_per_block():
    a = spd(4, count=3)
    loss = lambda w, x, b: 0.5 * torch.einsum("bi,bij,bj->", w["w"], a, w["w"]) * x["c"]  # noqa: E731
    lin = linearize(loss, {"w": torch.randn(3, 4)}, {"c": torch.tensor(2.0)}, None)
    blocks = dense_hessian(lin.hvp, {"w": torch.zeros(3, 4)}, batched=True)
    assert blocks.shape == (3, 4, 4)
    assert torch.allclose(blocks, 2.0 * a, atol=1e-12)


def test_cg_solves_spd_system_per_problem():
    a = spd(12, count=5)
    a[0] = torch.eye(12)  # converges in one iteration, then stops while the others go on
    b = torch.randn(5, 12)
    matvec = lambda v: {"v": torch.einsum("bij,bj->bi", a, v["v"])}  # noqa: E731
    solved = cg(matvec, {"v": b}, iters=100, tol=1e-12, batched=True)
    assert torch.allclose(solved.solution["v"], torch.linalg.solve(a, b), atol=1e-10)
    assert bool((solved.residual <= 1e-12).all())
    assert solved.iterations <= 13


def test_cg_without_host_reads_equals_cg_with_them(monkeypatch):
    """On a GPU ``tol=0`` runs every iteration with guarded divisions instead of a host read per
    iteration; a solved system (here a zero right-hand side) stays solved, without NaN."""
    a = spd(6)
    b = {"v": torch.randn(6, dtype=torch.float64)}
    a = a.double()
    matvec = lambda d: {"v": a @ d["v"]}  # noqa: E731
    reading = cg(matvec, b, iters=20, tol=0.0)
    zero = cg(matvec, {"v": torch.zeros(6, dtype=torch.float64)}, iters=5, tol=0.0)
    monkeypatch.setattr(linalg, "host_reads_stall", lambda t: True)
    guarded = cg(matvec, b, iters=20, tol=0.0)
    assert torch.allclose(guarded.solution["v"], reading.solution["v"], rtol=0, atol=1e-12)
    assert torch.allclose(guarded.solution["v"], torch.linalg.solve(a, b["v"]), atol=1e-10)
    guarded_zero = cg(matvec, {"v": torch.zeros(6, dtype=torch.float64)}, iters=5, tol=0.0)
    assert zero.iterations == 0 and guarded_zero.iterations == 5
    assert torch.equal(guarded_zero.solution["v"], torch.zeros(6, dtype=torch.float64))


def test_neumann_error_decreases_monotonically():
    a = spd(10)
    lipschitz = float(torch.linalg.eigvalsh(a).max())
    b = {"v": torch.randn(10)}
    exact = torch.linalg.solve(a, b["v"])
    errors = [
        float((neumann(lambda v: {"v": a @ v["v"]}, b, iters=q, alpha=1 / lipschitz).solution["v"] - exact).norm())
        for q in (10, 100, 1000)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8 * float(exact.norm())


def test_fixed_point_converges_to_contraction_fixed_point():
    a = spd(6)
    alpha = 1 / float(torch.linalg.eigvalsh(a).max())
    b = {"v": torch.randn(6)}
    solved = fixed_point(lambda u: {"v": u["v"] - alpha * (a @ u["v"])}, b, iters=5000, tol=1e-13)
    assert torch.allclose(alpha * solved.solution["v"], torch.linalg.solve(a, b["v"]), atol=1e-10)
    assert solved.iterations < 5000  # stopped on its tolerance
