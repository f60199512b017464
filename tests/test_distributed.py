"""Comm across two gloo processes: algorithms on half-batches per rank equal one full-batch process."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bilevel_dist import algorithms
from bilevel_dist.distributed import Comm, shard_rows
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.problems import FiniteSumQuadratic

NAMES = ["aid", "soba", "penalty", "itd"]
TASK_NAMES = ["aid", "soba", "itd", "bome"]


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
        torch.save(results, f"{path}.{rank}")
        dist.barrier()  # neither rank tears gloo down while the other may still be reading
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one_full_batch_process(tmp_path):
    path = str(tmp_path / "result")
    mp.spawn(worker, args=(2, free_port(), path), nprocs=2, join=True)
    ranks = [torch.load(f"{path}.{rank}", weights_only=True) for rank in range(2)]
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
