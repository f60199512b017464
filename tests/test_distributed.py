"""Comm across two gloo processes: algorithms on half-batches per rank equal one full-batch process."""

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bilevel_dist import algorithms
from bilevel_dist.distributed import Comm, shard_rows
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.problems import FiniteSumQuadratic, TaskHeads

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from collectives import CountCollectives  # noqa: E402

NAMES = ["aid", "soba", "penalty", "itd"]
TASK_NAMES = ["aid", "soba", "itd", "bome"]
# independent lower levels (batched=True): every algorithm family, each rank its own 32 of 64 heads
BATCHED = {
    "aid": {"inner_steps": 6, "linear_iters": 4},
    "itd": {"inner_steps": 6},
    "hoag": {"inner_steps": 30, "tol": 1e-6, "linear_iters": 4},
    "soba": {},
    "penalty": {"inner_steps": 2},
    "bome": {"inner_steps": 3},
}


def task_problem(tasks: int = 8, dim: int = 5, samples: int = 6) -> tuple[BilevelProblem, dict]:
    """Per-task heads ``w_t`` pulled toward a shared outer centre ``x`` (iMAML-like): inner
    ``mean_t ‖A_t w_t − b_t‖²/2n + λ/2 ‖w_t − x‖²``, outer ``mean_t ‖C_t w_t − e_t‖²/2n``, both
    vectorised over the tasks of a batch; ``batch["index"]`` holds global task ids and
    ``batch["rows"]`` where those tasks sit in this rank's ``w``."""
    gen = torch.Generator().manual_seed(3)
    data = {k: torch.randn(tasks, samples, dim, generator=gen) for k in ("a", "c")}
    data |= {k: torch.randn(tasks, samples, generator=gen) for k in ("b", "e")}

    def inner(w, x, batch):
        t, heads = batch["index"], w["w"][batch["rows"]]
        fit = torch.einsum("tnd,td->tn", data["a"][t], heads) - data["b"][t]
        return (fit.pow(2).sum(1) / (2 * samples) + 0.5 * (heads - x["x"]).pow(2).sum(1)).mean()

    def outer(w, x, batch):
        t, heads = batch["index"], w["w"][batch["rows"]]
        fit = torch.einsum("tnd,td->tn", data["c"][t], heads) - data["e"][t]
        return (fit.pow(2).sum(1) / (2 * samples)).mean()

    start = {"x": torch.zeros(dim), "w": torch.zeros(tasks, dim)}
    return BilevelProblem(inner, outer), start


def run_tasks(name: str, comm: Comm, rank: int, world: int) -> torch.Tensor:
    problem, start = task_problem()
    ids = shard_rows(start["w"].shape[0], rank, world)
    batch = {"index": ids, "rows": torch.arange(len(ids))}
    hparams = {"inner_lr": 0.5, "outer_lr": 0.5} | ({"inner_steps": 5} if name != "soba" else {})
    algorithm = algorithms.get(name, problem=problem, comm=comm, **hparams)
    state = algorithm.init({"x": start["x"]}, {"w": start["w"][ids]})
    for _ in range(3):
        state, metrics = algorithm.step(state, batch, batch)
    full = comm.gather_rows(state["inner"]["w"], start["w"].shape[0])
    return torch.cat([state["outer"]["x"], full.flatten(), torch.tensor([metrics["hypergrad_norm"]])])


def run_batched(name: str, comm: Comm, rank: int, world: int) -> tuple[torch.Tensor, list[int]]:
    """3 steps of ``name`` on this rank's heads of 64 independent problems; returns the outer
    variables, the gathered heads and the collectives issued inside each step."""
    heads = TaskHeads.make(tasks=64)
    ids = shard_rows(heads.tasks, rank, world)
    batch = {"index": ids}
    hparams = {"inner_lr": 0.2, "outer_lr": 0.01, **BATCHED[name]}
    algorithm = algorithms.get(name, problem=heads.problem, comm=comm, **hparams)
    state = algorithm.init(heads.outer_init(), {"w": heads.inner_init()["w"][ids]})
    counts = []
    for _ in range(3):
        with CountCollectives() as counter:
            state, _ = algorithm.step(state, batch, batch)
        counts.append(counter.count)
    full = comm.gather_rows(state["inner"]["w"], heads.tasks)
    return torch.cat([state["outer"]["x"], full.flatten()]), counts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        comm = Comm()
        assert comm.world_size == world and comm.rank == rank
        mean = comm.mean({"a": torch.tensor([float(rank)])})["a"]
        quadratic = FiniteSumQuadratic.make()
        half = {"index": torch.arange(32 * rank, 32 * rank + 32)}
        results = {"mean": mean}
        for name in NAMES:
            algorithm = algorithms.get(name, problem=quadratic.problem, comm=comm, inner_lr=0.5, outer_lr=0.05)
            state = algorithm.init(quadratic.outer_init(), quadratic.inner_init())
            for _ in range(3):
                state, _ = algorithm.step(state, half, half)
            results[name] = torch.cat([state["outer"]["x"], state["inner"]["z"]])
        for name in TASK_NAMES:  # each rank solves only its own tasks' heads, all at once
            results[f"tasks_{name}"] = run_tasks(name, Comm(sharded=("w",)), rank, world)
        for name in BATCHED:
            values, counts = run_batched(name, Comm(sharded=("w",)), rank, world)
            results[f"batched_{name}"], results[f"collectives_{name}"] = values, torch.tensor(counts)
        torch.save(results, f"{path}.{rank}")
        dist.barrier()  # neither rank tears gloo down while the other may still be reading
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of two gloo ranks computed (one spawn for every test here)."""
    path = str(tmp_path_factory.mktemp("ranks") / "result")
    mp.spawn(worker, args=(2, free_port(), path), nprocs=2, join=True)
    return [torch.load(f"{path}.{rank}", weights_only=True) for rank in range(2)]


@pytest.mark.slow
def test_two_ranks_match_one_full_batch_process(ranks):
    assert float(ranks[0]["mean"]) == 0.5 and float(ranks[1]["mean"]) == 0.5
    quadratic = FiniteSumQuadratic.make()
    full = {"index": torch.arange(64)}
    for name in NAMES:
        algorithm = algorithms.get(name, problem=quadratic.problem, inner_lr=0.5, outer_lr=0.05)
        state = algorithm.init(quadratic.outer_init(), quadratic.inner_init())
        for _ in range(3):
            state, _ = algorithm.step(state, full, full)
        single = torch.cat([state["outer"]["x"], state["inner"]["z"]])
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every rank holds the same variables
        assert torch.allclose(ranks[0][name], single, atol=1e-12, rtol=0), name
    for name in TASK_NAMES:
        single = run_tasks(name, Comm(), 0, 1)
        key = f"tasks_{name}"
        assert torch.equal(ranks[0][key], ranks[1][key]), name
        assert torch.allclose(ranks[0][key], single, atol=1e-12, rtol=0), (name, (ranks[0][key] - single).abs().max())


# Collectives per step on independent lower levels: one reduction of the outer gradient; the
# first-order methods' steps also need global scalars (BOME's λ: two, Penalty's schedule test: one).
STEP_COLLECTIVES = {"aid": 1, "itd": 1, "hoag": 1, "soba": 1, "penalty": 2, "bome": 4}


@pytest.mark.slow
def test_batched_lower_levels_on_two_ranks_equal_one_rank_with_no_collective_inside(ranks):
    for name in BATCHED:
        single, _ = run_batched(name, Comm(), 0, 1)
        key = f"batched_{name}"
        assert torch.equal(ranks[0][key][:5], ranks[1][key][:5]), name  # the same outer variables
        diff = float((ranks[0][key] - single).abs().max())
        assert diff < 1e-10, (name, diff)
        for rank in ranks:
            assert rank[f"collectives_{name}"].tolist() == [STEP_COLLECTIVES[name]] * 3, name
