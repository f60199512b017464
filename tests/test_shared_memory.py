"""The shared-memory sum over CPU ranks on one host: equal to gloo's all-reduce bit for bit, no
file left behind, a clear error when a rank does not come, and off by ``BILEVEL_DIST_SHM=0``."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bilevel_dist import distributed
from bilevel_dist.distributed import Comm
from bilevel_dist.shared_memory import SLOT_BYTES, SharedMemorySum

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, scenario: str) -> None:
    if scenario == "disabled":
        os.environ["BILEVEL_DIST_SHM"] = "0"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    comm, result = Comm(), {}
    if scenario == "late":
        summer = SharedMemorySum.create()
        summer.timeout_s = 2.0
        if rank == 0:
            try:
                summer(torch.ones(3))
            except RuntimeError as error:
                result["error"] = str(error)
        dist.barrier()
    else:
        gen = torch.Generator().manual_seed(rank)
        for dtype in (torch.float64, torch.float32, torch.int64):
            for n in (1, 19210, SLOT_BYTES // 8 + 1):  # the last does not fit a slot: gloo
                x = (torch.randn(n, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
                ours = comm._sum_buffer(x)
                theirs = x.clone()
                dist.all_reduce(theirs)
                result[f"{dtype}_{n}"] = (ours, theirs)
        result["shared"] = distributed._shared_sum(None) is not None
    result["files"] = sorted(f for f in os.listdir("/dev/shm") if f.startswith("bilevel_dist_"))
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _run(tmp_path, scenario: str) -> list[dict]:
    mp.spawn(_worker, args=(_port(), str(tmp_path), scenario), nprocs=2)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_sums_equal_gloo_bit_for_bit_on_every_rank_and_leave_no_file(tmp_path):
    ranks = _run(tmp_path, "sums")
    for rank in ranks:
        assert rank["shared"] and rank["files"] == []
        sums = {key: value for key, value in rank.items() if isinstance(value, tuple)}
        assert len(sums) == 9
        for key, (ours, theirs) in sums.items():
            assert torch.equal(ours, theirs), key
            assert torch.equal(ours, ranks[0][key][0]), key  # the same on both ranks


def test_off_by_environment_variable_and_gloo_gives_the_same(tmp_path):
    ranks = _run(tmp_path, "disabled")
    assert not ranks[0]["shared"] and not ranks[1]["shared"]
    assert all(torch.equal(*v) for v in ranks[0].values() if isinstance(v, tuple))


def test_a_rank_that_never_comes_is_named_after_the_timeout(tmp_path):
    ranks = _run(tmp_path, "late")
    assert "ranks [1] did not reach shared-memory sum 2 in 2 s" in ranks[0]["error"]


def test_pin_cpus_gives_each_local_rank_its_own_slice():
    import json
    import subprocess
    import sys

    script = (
        "import json, os\nfrom bilevel_dist.distributed import pin_cpus\n"
        "now = lambda: sorted(os.sched_getaffinity(0))\n"
        "print(json.dumps([now(), pin_cpus(0, 1), pin_cpus(0, 10**6), pin_cpus(1, 2), now()]))"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, one_rank, too_many, pinned, after = json.loads(run.stdout)
    assert one_rank is None and too_many is None  # one rank, or more ranks than CPUs: left alone
    if len(before) < 2:
        assert pinned is None
        return
    half = len(before) // 2
    assert pinned == after == before[half : 2 * half]  # local rank 1 of 2: the second half
