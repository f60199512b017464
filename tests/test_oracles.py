"""Oracles: every algorithm's stated cost per step, and independent lower levels solved as one
batched problem equal to one solve per problem."""

import pytest
import torch

import bilevel_dist as bd
from bilevel_dist import algorithms, hypergrad, solvers
from bilevel_dist.problems import FiniteSumQuadratic, TaskHeads

EXTRA = {
    "saba": {"n_inner": 64, "n_outer": 64},
    "hoag": {"tol": 1e-300, "linear_iters": 5},  # no early exit: the stated cost is the budget
    "bsa": {"neumann_terms": 6, "truncation_samples": 3},
}


@pytest.mark.parametrize("name", sorted(algorithms.REGISTRY))
def test_oracle_calls_per_step_match_the_stated_cost(name):
    quadratic = FiniteSumQuadratic.make()
    extra = {"full_batches": quadratic.full_batches()} if name in ("srba", "vrbo") else {}
    algorithm = algorithms.get(name, problem=quadratic.problem, **EXTRA.get(name, {}), **extra)
    state = algorithm.init(quadratic.outer_init(), quadratic.inner_init())
    batch = {"index": torch.arange(16)}
    for t in range(3):
        before = dict(algorithm.oracles.calls)
        state, _ = algorithm.step(state, batch, batch)
        used = {k: n - before.get(k, 0) for k, n in algorithm.oracles.calls.items() if n - before.get(k, 0)}
        stated = {k: n for k, n in algorithm.cost(t).items() if n != 0}
        if name == "bsa":  # a random truncation: at most Q − 1 products
            assert stated.pop("hvp") is None and used.pop("hvp", 0) <= algorithm.h["neumann_terms"] - 1
        assert used == stated, (name, t, used, stated)


def test_aid_makes_no_extra_inner_gradient():
    quadratic = FiniteSumQuadratic.make()
    aid = algorithms.get("aid", problem=quadratic.problem, inner_steps=7, linear_iters=4)
    state = aid.init(quadratic.outer_init(), quadratic.inner_init())
    aid.step(state, *quadratic.full_batches())
    assert dict(aid.oracles.calls) == {"inner_grad": 7, "linearize": 1, "hvp": 4, "mixed": 1, "outer_grad": 1}


def looped(name, heads, hparams, steps):
    """``steps`` outer steps of ``name`` with one single-task run per task, the outer steps summed."""
    algorithm = algorithms.get(name, problem=heads.problem, **hparams)
    x = heads.outer_init()["x"]
    rows = list(heads.inner_init()["w"].split(1))
    for _ in range(steps):
        change = torch.zeros_like(x)
        for t in range(heads.tasks):
            state = algorithm.init({"x": x}, {"w": rows[t]})
            batch = {"index": torch.tensor([t])}
            state, _ = algorithm.step(state, batch, batch)
            rows[t] = state["inner"]["w"]
            change += state["outer"]["x"] - x
        x = x + change
    return x, torch.cat(rows)


@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("aid", {"inner_steps": 6, "linear_iters": 4, "inner_lr": 0.2, "outer_lr": 0.01}),  # CG: per-problem steps
        ("itd", {"inner_steps": 6, "inner_lr": 0.2, "outer_lr": 0.01}),
    ],
)
def test_64_batched_lower_levels_equal_64_separate_solves(name, hparams):
    heads = TaskHeads.make(tasks=64)
    algorithm = algorithms.get(name, problem=heads.problem, **hparams)
    state = algorithm.init(heads.outer_init(), heads.inner_init())
    batch = {"index": torch.arange(heads.tasks)}
    for _ in range(3):
        state, _ = algorithm.step(state, batch, batch)
    x, w = looped(name, heads, hparams, 3)
    assert float((state["outer"]["x"] - x).abs().max()) < 1e-10
    assert float((state["inner"]["w"] - w).abs().max()) < 1e-10
    assert float((x - heads.outer_init()["x"]).abs().max()) > 1e-3  # the steps moved x


def test_batched_cg_hypergradient_matches_the_closed_form():
    heads = TaskHeads.make(tasks=16)
    outer = {"x": torch.linspace(-1, 1, 5, dtype=torch.float64)}
    solution = bd.solve(
        heads.problem,
        outer,
        heads.inner_init(),
        solver=solvers.GD(lr=0.25, steps=5000, tol=1e-13),
        hypergrad=hypergrad.CG(iters=20, tol=1e-14),
    )
    truth = heads.hypergradient(outer)["x"]
    assert float((solution.grad["x"] - truth).norm() / truth.norm()) < 1e-10
    assert torch.allclose(solution.inner["w"], heads.solution(outer)["w"], atol=1e-12, rtol=0)


def test_a_full_pass_in_chunks_equals_one_batch():
    """SRBA's and VRBO's refresh on Chunks (weighted pieces) equals it on the whole batch."""
    from bilevel_dist.oracles import Chunks

    quadratic = FiniteSumQuadratic.make()
    inner, outer = quadratic.full_batches()

    def chunks(batch, pieces):
        ids = batch["index"]
        return Chunks(({"index": part}, len(part) / len(ids)) for part in ids.tensor_split(pieces))

    for name in ("srba", "vrbo"):
        finals = []
        for full in ((inner, outer), (chunks(inner, 5), chunks(outer, 3))):
            algorithm = algorithms.get(name, problem=quadratic.problem, full_batches=full, period=2)
            state = algorithm.init(quadratic.outer_init(), quadratic.inner_init())
            gen = torch.Generator().manual_seed(0)
            for _ in range(5):
                state, _ = algorithm.step(
                    state, {"index": torch.randint(64, (8,), generator=gen)}, {"index": torch.arange(8)}
                )
            finals.append(torch.cat([state["outer"]["x"], state["inner"]["z"]]))
        assert float((finals[0] - finals[1]).abs().max()) < 1e-12, name
        assert (
            float((finals[0] - torch.cat([quadratic.outer_init()["x"], quadratic.inner_init()["z"]])).abs().max())
            > 1e-3
        )
