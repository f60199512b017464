"""The Penalty method of Mehra & Hamm: reference tests T1–T6 (penalty-and-backdoor.md §A.12)."""

import math

import pytest
import torch

import bilevel_dist as bd
from bilevel_dist import algorithms, hypergrad, solvers
from bilevel_dist.algorithms import ITD


def lemma_problem(seed=0):
    """g = ½vᵀHv − vᵀBu, f = ½‖v − a‖² + ½uᵀCu + cᵀu with U=4, V=6 (§A.12 T1)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(6, 6, generator=gen)
    h = q @ q.T / 6 + torch.eye(6)
    b, a = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    r = torch.randn(4, 4, generator=gen)
    c_mat, c = r @ r.T / 4 + torch.eye(4), torch.randn(4, generator=gen)

    def inner_loss(inner, outer, batch):
        v, u = inner["v"], outer["u"]
        return 0.5 * v @ h @ v - v @ b @ u

    def outer_loss(inner, outer, batch):
        v, u = inner["v"], outer["u"]
        return 0.5 * ((v - a) ** 2).sum() + 0.5 * u @ c_mat @ u + c @ u

    return bd.BilevelProblem(inner_loss, outer_loss), (h, b, a, c_mat, c), {"u": torch.randn(4, generator=gen)}


def penalty_point(mats, u, gamma):
    h, b, a, _, _ = mats
    return torch.linalg.solve(torch.eye(6) + gamma * h @ h, a + gamma * h @ b @ u)


def implicit_formula(mats, u, v):
    """∇_u f − ∇²_uv g H⁻¹ ∇_v f at (u, v): here ∇²_uv g = −Bᵀ."""
    h, b, a, c_mat, c = mats
    return c_mat @ u + c + b.T @ torch.linalg.solve(h, v - a)


def true_hypergradient(mats, u):
    h, b, _, _, _ = mats
    return implicit_formula(mats, u, torch.linalg.solve(h, b @ u))


GAMMAS = [0.1, 1.0, 10.0, 100.0, 1e3, 1e4]


@pytest.mark.parametrize("gamma", GAMMAS)
def test_t1_lemma3_penalty_gradient_is_implicit_formula_at_penalty_point(gamma):
    problem, mats, outer = lemma_problem()
    solution = bd.solve(
        problem,
        outer,
        {"v": torch.zeros(6)},
        solver=solvers.GD(0.2, 300),
        hypergrad=hypergrad.PenaltyGradient(gamma=gamma),
    )
    expected = implicit_formula(mats, outer["u"], penalty_point(mats, outer["u"], gamma))
    assert float((solution.grad["u"] - expected).abs().max()) < 1e-9 * max(1.0, float(expected.abs().max()))


def test_t2_asymptotic_exactness_order_one_over_gamma():
    problem, mats, outer = lemma_problem()
    truth = true_hypergradient(mats, outer["u"])
    v_star = torch.linalg.solve(mats[0], mats[1] @ outer["u"])
    errors, distances = [], []
    for gamma in GAMMAS:
        grad = bd.solve(
            problem,
            outer,
            {"v": torch.zeros(6)},
            solver=solvers.GD(0.2, 300),
            hypergrad=hypergrad.PenaltyGradient(gamma=gamma),
        ).grad["u"]
        errors.append(float((grad - truth).abs().max()))
        distances.append(float((penalty_point(mats, outer["u"], gamma) - v_star).norm()))
    slope = (math.log(errors[-1]) - math.log(errors[3])) / (math.log(GAMMAS[-1]) - math.log(GAMMAS[3]))
    assert slope == pytest.approx(-1.0, abs=0.05), errors
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:], strict=False))
    assert distances[-1] < 1e-2 * distances[0]
    # Eq. (9) at v* is the closed form Cu + c + (H⁻¹B)ᵀ(v* − a).
    assert float((implicit_formula(mats, outer["u"], v_star) - truth).abs().max()) < 1e-14


def test_t3_autograd_path_equals_analytic_gradients():
    problem, mats, outer = lemma_problem()
    h, b, a, c_mat, c = mats
    algorithm = algorithms.get("penalty", problem=problem)
    state = algorithm.init(outer, {"v": torch.randn(6)})
    state["gamma"] = 7.0
    v, u = state["inner"]["v"], state["outer"]["u"]
    dv, du, _ = algorithm.gradients(state, state["inner"], state["outer"], None, None)
    grad_g = h @ v - b @ u
    assert torch.allclose(dv["v"], (v - a) + 7.0 * h @ grad_g, atol=1e-10, rtol=0)
    assert torch.allclose(du["u"], c_mat @ u + c + 7.0 * (-b.T) @ grad_g, atol=1e-10, rtol=0)


def synthetic(kind, seed):
    """The Figs. 1–2 problems (§A.10.1) and the distance of (u, v) to their solution sets."""
    gen = torch.Generator().manual_seed(seed)
    ones = torch.ones(10)
    if kind in ("1a", "1b"):
        s, proj = torch.eye(10), torch.eye(10)
    else:
        a = torch.randn(5, 10, generator=gen)
        s = a.T @ a
        proj = torch.linalg.pinv(a) @ a  # projection onto row(A)
    if kind in ("1a", "2a"):
        f = lambda w, x, b: (x["u"] ** 2).sum() + (w["v"] ** 2).sum()  # noqa: E731
        g = lambda w, x, b: (ones - x["u"] - w["v"]) @ s @ (ones - x["u"] - w["v"])  # noqa: E731

        def distance(u, v):
            return float(torch.cat([proj @ (u - 0.5 * ones), proj @ (v - 0.5 * ones)]).norm())
    else:
        f = lambda w, x, b: (w["v"] ** 2).sum() - (x["u"] - w["v"]) @ s @ (x["u"] - w["v"])  # noqa: E731
        g = lambda w, x, b: (x["u"] - w["v"]) @ s @ (x["u"] - w["v"])  # noqa: E731

        def distance(u, v):
            return float(torch.cat([proj @ u, v]).norm())

    s_max = float(torch.linalg.eigvalsh(s).max())
    start = (torch.rand(10, generator=gen) * 10 - 5, torch.rand(10, generator=gen) * 10 - 5)
    return bd.BilevelProblem(g, f), s_max, start, distance


def run_penalty(kind, seed, steps, inner_steps=1):
    problem, s_max, (u, v), distance = synthetic(kind, seed)
    base = 0.5 / (2 + 2 * s_max)
    algorithm = algorithms.get(
        "penalty",
        problem=problem,
        inner_lr=base,
        outer_lr=base,
        inner_steps=inner_steps,
        gamma_lr_coef=4 * s_max**2 / (2 + 2 * s_max),  # step = 0.5 / (2 + 2s + 4γs²)
    )
    state = algorithm.init({"u": u}, {"v": v})
    for _ in range(steps):
        state, _ = algorithm.step(state, None, None)
    return distance(state["outer"]["u"], state["inner"]["v"]), state


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["1a", "1b"])
def test_t4_figure1_converges_below_1e3_by_5k_iterations(kind):
    distances = [run_penalty(kind, seed, 5000)[0] for seed in range(3)]
    assert sorted(distances)[1] < 1e-3, distances


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "steps"), [("2a", 20000), ("2b", 50000)])
def test_t4_figure2_rank_deficient_converges_below_0p1(kind, steps):
    distances = [run_penalty(kind, seed, steps)[0] for seed in range(3)]
    assert sorted(distances)[1] < 0.1, distances


@pytest.mark.slow
def test_t5_baselines_gd_alternation_and_rmd():
    problem, _, (u0, v0), distance = synthetic("1a", 0)
    # Alternating GD that ignores the hypergradient settles at (0, 1): distance √5.
    u, v = u0.clone(), v0.clone()
    for _ in range(4000):
        v = v - 0.1 * 2 * (u + v - 1)
        u = u - 0.1 * 2 * u
    assert distance(u, v) == pytest.approx(math.sqrt(5), abs=1e-6)
    # RMD (ITD, warm-started GD) with a large T converges; with T = 1 it stalls far away.
    finals = {}
    for steps in (1, 100):
        itd = ITD(problem, inner_lr=0.1, inner_steps=steps, outer_lr=0.05)
        state = itd.init({"u": u0}, {"v": v0})
        for _ in range(500):
            state, _ = itd.step(state, None, None)
        finals[steps] = distance(state["outer"]["u"], state["inner"]["v"])
    assert finals[100] < 1e-3 and finals[1] > 0.5, finals


def test_t6_schedule_changes_only_when_tolerance_holds_and_survives_checkpoint(tmp_path):
    problem, mats, outer = lemma_problem()
    algorithm = algorithms.get(
        "penalty", problem=problem, inner_lr=0.05, outer_lr=0.05, epsilon=0.5, multiplier=True, lam=1.0
    )
    state = algorithm.init(outer, {"v": torch.zeros(6)})
    changes = 0
    for _ in range(300):
        before = dict(state)
        state, metrics = algorithm.step(state, None, None)
        held = metrics["penalty_residual"] <= before["epsilon"]
        if held:
            changes += 1
            assert state["gamma"] == pytest.approx(1.1 * before["gamma"], rel=1e-15)
            assert state["epsilon"] == pytest.approx(0.9 * before["epsilon"], rel=1e-15)
            assert state["lam"] == pytest.approx(0.9 * before["lam"], rel=1e-15)
            # ν is updated after γ changes, with the new γ and ∇_v g where the tolerance was checked.
            h, b = mats[0], mats[1]
            grad_g = h @ state["inner"]["v"] - b @ before["outer"]["u"]
            expected_nu = before["nu"]["v"] + state["gamma"] * grad_g
            assert torch.allclose(state["nu"]["v"], expected_nu, atol=1e-12)
        else:
            for key in ("gamma", "epsilon", "lam"):
                assert state[key] == before[key]
            assert torch.equal(state["nu"]["v"], before["nu"]["v"])
    assert 3 <= changes < 300
    path = tmp_path / "penalty.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["gamma"] == state["gamma"] and loaded["epsilon"] == state["epsilon"]
    continued, _ = algorithm.step(state, None, None)
    resumed, _ = algorithm.step(loaded, None, None)
    assert torch.equal(continued["outer"]["u"], resumed["outer"]["u"])
