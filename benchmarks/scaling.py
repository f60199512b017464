"""1 against 2 gloo processes, one torch thread each, with the same work per process: samples (or
tasks, or clients) per second, and the collectives per step.

    python benchmarks/scaling.py            # about 4 minutes; writes results/scaling.md

- **denoising**: the engine benchmark's MLP 64-256-10 trained by AID (10 inner steps, 10 CG
  iterations) on digits hyper-cleaning, 256 inner samples per process and step (``engine.py``),
  logging at Lightning's default cadence (every 50 steps);
- **few-shot**: the recipe's MAML step on sinusoid tasks, 32 tasks per process (``fewshot.py``);
- **federated**: FedAvg rounds on 10,000 digits clients, 100 sampled clients per process
  (``federated.py``).

Each setting runs ``--repeats`` times, 1 and 2 processes alternating; a cell is the best run (the
shared CPUs swing). ``BILEVEL_DIST_SHM=0`` in the environment sends every reduction through gloo
(the "before" column of the README's breakdown).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "BENCH_LOGS": "/tmp/bilevel_dist_scaling"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("RESULT ")][-1][7:])


def _together(commands: list[list[str]]) -> list[str]:
    """Runs the commands at once; their standard outputs."""
    pipe = subprocess.PIPE
    procs = [subprocess.Popen(c, env=_env(), stdout=pipe, stderr=pipe, text=True) for c in commands]
    outs = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(err[-3000:])
        outs.append(out)
    return outs


def denoising(devices: int, alone: int = 1) -> float:
    """Samples per second of ``devices`` ranks; ``alone = 2``: two 1-process runs at once (summed)."""
    command = [sys.executable, __file__, "--worker", "denoising", str(devices)]
    return sum(_result(out)["samples_per_s"] for out in _together([command] * alone))


def few_shot(devices: int, alone: int = 1, tasks: int = 32) -> float:
    import fewshot

    port, procs = _port(), []
    for rank in range(max(devices, alone)):
        world = 1 if alone > 1 else devices
        cfg = {"world": world, "rank": rank if world > 1 else 0, "port": port, "tasks": [tasks * world], "check": []}
        procs.append(fewshot._launch("dist", {**cfg, "blocks": 5}))
    outs = [fewshot._collect(p) for p in procs]
    if alone > 1:
        return sum(tasks / (out["ms"][str(tasks)] / 1e3) for out in outs)
    ms = max(out["ms"][str(tasks * devices)] for out in outs)
    return tasks * devices / (ms / 1e3)


def federated(devices: int, alone: int = 1, clients: int = 100, rounds: int = 43) -> float:
    command = [sys.executable, str(HERE / "federated.py"), "--worker", "processes", str(devices), str(rounds)]
    command.append(str(clients * devices))
    return sum(_result(out)["clients_per_second"] for out in _together([command] * alone))


def collectives_per_step() -> dict[str, str]:
    return {
        "denoising": "22 sums (10 inner gradients, 10 Hessian-vector products, ∇_w f, the hypergradient)",
        "few-shot": "1 sum (the meta-gradient)",
        "federated": "1 sum (the weighted client updates and weights)",
    }


def _worker(kind: str, devices: int) -> None:
    import engine
    import torch

    torch.set_num_threads(1)
    result = engine.lightning_run("mlp", devices, progress_bar=False, log_every=50)  # Lightning's default
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker[0], int(args.worker[1]))
        return
    settings = {
        "denoising": (denoising, "samples/s"),
        "few-shot": (few_shot, "tasks/s"),
        "federated": (federated, "clients/s"),
    }
    rows = []
    for name, (fn, unit) in settings.items():
        if args.only and name not in args.only:
            continue
        best = {"one": 0.0, "two": 0.0, "apart": 0.0}
        for _ in range(args.repeats):
            best["one"] = max(best["one"], fn(1))
            best["two"] = max(best["two"], fn(2))
            best["apart"] = max(best["apart"], fn(1, alone=2))
        rows.append((name, unit, best["one"], best["two"], best["apart"]))
        print(name, best, f"{best['two'] / best['one']:.2f}x", flush=True)
    shm = os.environ.get("BILEVEL_DIST_SHM", "1") != "0"
    lines = [
        f"Command: `{'' if shm else 'BILEVEL_DIST_SHM=0 '}python benchmarks/scaling.py` — {platform.machine()}, "
        f"{os.cpu_count()} CPUs, one torch thread per process; best of {args.repeats} runs each.",
        "",
        "| workload | unit | 1 process | 2 processes | 2 / 1 | two unconnected 1-process runs at once, summed "
        "(the ceiling) | ceiling / 1 | collectives per step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    per_step = collectives_per_step()
    for name, unit, one, two, apart in rows:
        lines.append(
            f"| {name} | {unit} | {one:.0f} | {two:.0f} | {two / one:.2f}x | {apart:.0f} | {apart / one:.2f}x | "
            f"{per_step[name]} |"
        )
    if not args.only:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / ("scaling.md" if shm else "scaling_gloo.md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
