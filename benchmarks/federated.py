"""Federated rounds: the recipe's batched local training against a Python loop over clients, peak
memory against the clients sampled and the client chunk, and 1 against 2 processes.

    python benchmarks/federated.py           # about 5 minutes; writes results/federated.md and .png
    python benchmarks/federated.py --quick   # about 1 minute: m = 10 and 100, fewer repeats

Workload: scikit-learn's digits, an MLP 64-64-10, FedAvg with E = 5 local epochs of minibatches
of B = 10 at lr 0.1 (10 local steps), float32. K = 10,000 clients (IID) holding 20 samples each
(drawn with replacement: digits has 1,257 training samples), ``m`` of them sampled per round
(C = m / K).

- **Time per round**: the recipe's ``algorithm.step`` (every sampled client's local training as
  one vectorised computation, then the aggregation) against a hand-written loop: for each client,
  ``functional_call`` + ``torch.autograd.grad`` SGD steps on its own minibatches, then the same
  weighted average. Both see the same round (same clients and minibatches) and their new global
  models are checked to agree. A cell is the fastest of the repeats (the shared CPUs swing).
  One torch thread.
- **Peak memory**: in a fresh interpreter per cell, the rise of the peak RSS (``getrusage``) over
  one round, after the round's data is built and the same code warmed on 10 clients.
- **Processes**: ``Trainer.fit`` on 1 process and on 2 gloo processes (one thread each) with the
  same rounds; clients per second over the rounds after the first 3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
LOCAL_LR, EPOCHS, BATCH, HIDDEN = 0.1, 5, 10, 64
CLIENTS, SAMPLES = 10_000, 20


def _setup(sampled: int, chunk: int | None = None):
    import torch

    from bilevel_dist.recipes.federated import Federated, FederatedData

    torch.set_num_threads(1)
    data = FederatedData(
        clients=CLIENTS, partition="iid", fraction=sampled / CLIENTS, epochs=EPOCHS, local_batch=BATCH,
        samples_per_client=SAMPLES, seed=0,
    )  # fmt: skip
    model = Federated("fedavg", {"local_lr": LOCAL_LR, "client_chunk": chunk}, hidden=HIDDEN)
    model.input_shape, model.classes = data.input_shape, data.classes
    model._build()
    return data, model


def recipe_round(model, batch):
    state = model.algorithm.restart(model.state, model.inner_init(model.state["outer"], batch["inner"]))
    state, _ = model.algorithm.step(state, batch["inner"], batch["outer"])
    return state["outer"]


def loop_round(model, batch):
    """A hand-written round: a Python loop over clients, each a plain SGD loop on its minibatches."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    b = batch["inner"]
    w = model.state["outer"]
    total = {k: torch.zeros_like(v) for k, v in w.items()}
    weight_sum = 0.0
    for c in range(b["x"].shape[0]):
        n = int(b["size"][c])
        if n == 0:
            continue
        theta = {k: v.clone().requires_grad_() for k, v in w.items()}
        x, y, weights = b["x"][c, :n], b["y"][c, :n], b["weight"][:, c, :n]
        for s in range(weights.shape[0]):
            members = weights[s] > 0
            if not members.any():
                break
            loss = F.cross_entropy(functional_call(model.net, theta, (x[members],)), y[members])
            grads = torch.autograd.grad(loss, list(theta.values()))
            theta = {
                k: (v - LOCAL_LR * g).detach().requires_grad_() for (k, v), g in zip(theta.items(), grads, strict=True)
            }
        for k in total:
            total[k] += n * (w[k] - theta[k].detach())
        weight_sum += n
    return {k: w[k] - total[k] / weight_sum for k in w}


def time_rounds(sampled: int, repeats: int) -> dict:
    data, model = _setup(sampled)
    batches = [data.round(t) for t in range(3)]
    for batch in batches[:1]:  # warm both, check they agree
        a, b = recipe_round(model, batch), loop_round(model, batch)
        agree = max(float((a[k] - b[k]).abs().max()) for k in a)
    best = {"recipe": float("inf"), "loop": float("inf")}
    for _ in range(repeats):
        for name, fn in (("recipe", recipe_round), ("loop", loop_round)):
            start = time.perf_counter()
            for batch in batches:
                fn(model, batch)
            best[name] = min(best[name], (time.perf_counter() - start) / len(batches))
    return {"sampled": sampled, "clients": CLIENTS, **best, "agree": agree}


def memory(sampled: int, chunk: int | None) -> dict:
    data, model = _setup(sampled, chunk)
    small = data.round(1)
    small = {"inner": {k: v[:, :10] if k.startswith("weight") else v[:10] for k, v in small["inner"].items()}}
    small["outer"] = small["inner"]
    recipe_round(model, small)  # warm the code on 10 clients
    batch = data.round(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    recipe_round(model, batch)
    seconds = time.perf_counter() - start
    rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    return {"sampled": sampled, "chunk": chunk, "rise_mib": rise / 1024, "seconds": seconds}


def processes(devices: int, rounds: int, sampled: int) -> dict:
    import lightning as L
    import torch

    from bilevel_dist.recipes.federated import Federated, FederatedData

    torch.set_num_threads(1)

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    clock = Clock()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=rounds,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[clock], default_root_dir="/tmp/bilevel_dist_bench_federated",
    )  # fmt: skip
    data = FederatedData(
        clients=CLIENTS, partition="iid", fraction=sampled / CLIENTS, epochs=EPOCHS, local_batch=BATCH,
        samples_per_client=SAMPLES,
    )  # fmt: skip
    model = Federated("fedavg", {"local_lr": LOCAL_LR}, hidden=HIDDEN)
    trainer.fit(model, data)
    clients_per_second = sampled * (rounds - 3) / (clock.end - clock.start)
    outer = {k: v.tolist() for k, v in model.state["outer"].items()}
    return {"devices": devices, "clients_per_second": clients_per_second, "outer": outer}


def _worker(args: list[str]) -> None:
    kind = args[0]
    if kind == "time":
        out = time_rounds(int(args[1]), int(args[2]))
    elif kind == "memory":
        out = memory(int(args[1]), None if args[2] == "none" else int(args[2]))
    else:
        out = processes(int(args[1]), int(args[2]), int(args[3]))
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def _run(*args: str, threads: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(lines[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = [10, 100] if args.quick else [10, 100, 1000]
    repeats = 2 if args.quick else 5
    rounds = [_run("time", str(m), str(repeats if m < 1000 else 2)) for m in sizes]
    chunks = [None, 100, 10]
    mem = [_run("memory", str(m), "none" if c is None else str(c)) for m in sizes for c in chunks]
    procs_rounds, procs_sampled = (8, 100) if args.quick else (13, 200)
    one = _run("procs", "1", str(procs_rounds), str(procs_sampled))
    two = _run("procs", "2", str(procs_rounds), str(procs_sampled))
    drift = max(
        abs(a - b) for k in one["outer"] for a, b in zip(_flat(one["outer"][k]), _flat(two["outer"][k]), strict=True)
    )

    lines = [
        "# Federated rounds: batched clients against a loop, memory, processes",
        "",
        f"`python benchmarks/federated.py{' --quick' if args.quick else ''}` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {__import__('torch').__version__}, one torch thread per process.",
        "",
        "## Time per round (FedAvg, E = 5, B = 10, MLP 64-64-10, digits, 10,000 clients of 20 samples)",
        "",
        "| sampled clients m | clients K | recipe (batched) ms | Python loop over clients ms | speed-up "
        "| max abs diff of the new global model |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rounds:
        lines.append(
            f"| {r['sampled']} | {r['clients']} | {1e3 * r['recipe']:.1f} | {1e3 * r['loop']:.1f} | "
            f"{r['loop'] / r['recipe']:.1f}× | {r['agree']:.1e} |"
        )
    lines += [
        "",
        "## Peak memory of one round (rise of peak RSS, MiB)",
        "",
        "| sampled m | chunk: all | chunk 100 | chunk 10 |",
        "|---:|---:|---:|---:|",
    ]
    for m in sizes:
        row = [f"{x['rise_mib']:.1f}" for x in mem if x["sampled"] == m]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    biggest, unchunked = (next(x for x in mem if x["sampled"] == sizes[-1] and x["chunk"] == c) for c in (10, None))
    lines += [
        "",
        f"At m = {sizes[-1]}, a chunk of 10 clients peaks {biggest['rise_mib']:.1f} MiB above the round's start, "
        f"against {unchunked['rise_mib']:.1f} MiB for all clients at once "
        f"({unchunked['rise_mib'] / max(biggest['rise_mib'], 0.1):.0f}× less); with chunk 10 the rise stays flat as "
        f"m grows (the table's last column). One round of m = {sizes[-1]} with a chunk of 10 takes "
        f"{biggest['seconds']:.2f} s.",
        "",
        f"## Processes ({procs_sampled} clients a round of {CLIENTS}, {procs_rounds} rounds, the first 3 not timed)",
        "",
        "| processes | clients per second | ratio |",
        "|---:|---:|---:|",
        f"| 1 | {one['clients_per_second']:.0f} | 1.00× |",
        f"| 2 | {two['clients_per_second']:.0f} | {two['clients_per_second'] / one['clients_per_second']:.2f}× |",
        "",
        f"The global models of the 1- and 2-process runs differ by at most {drift:.1e} (float32).",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "federated.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rounds, mem, sizes)


def _flat(x):
    if isinstance(x, list):
        for v in x:
            yield from _flat(v)
    else:
        yield x


def _plot(rounds: list[dict], mem: list[dict], sizes: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    m = [r["sampled"] for r in rounds]
    left.loglog(m, [1e3 * r["recipe"] for r in rounds], "o-", label="recipe: clients as one batched solve")
    left.loglog(m, [1e3 * r["loop"] for r in rounds], "s--", label="Python loop over clients")
    left.set(xlabel="clients sampled per round", ylabel="ms per round", title="FedAvg round time (digits, 1 thread)")
    left.legend()
    for chunk, marker in ((None, "o-"), (100, "s-"), (10, "^-")):
        ys = [x["rise_mib"] for x in mem if x["chunk"] == chunk]
        right.plot(sizes, ys, marker, label=f"chunk {'all' if chunk is None else chunk}")
    right.set(xscale="log", xlabel="clients sampled per round", ylabel="peak RSS rise in a round (MiB)", title="Memory")
    right.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "federated.png", dpi=120)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
    else:
        main()
