"""Second-order products and linear solvers on trees, against dense linear algebra."""

import torch
from torch.func import hessian

from bilevel_dist import tree
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
