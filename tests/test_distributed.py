"""Comm across two gloo processes: algorithms on half-batches per rank equal one full-batch process."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bilevel_dist import algorithms
from bilevel_dist.distributed import Comm
from bilevel_dist.problems import FiniteSumQuadratic

NAMES = ["aid", "soba", "penalty", "itd"]


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
        torch.save(results, f"{path}.{rank}")
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
