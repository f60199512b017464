"""Engine benchmark: the Lightning ``BilevelModule`` against a bare algorithm loop, 1 against 2
processes (Lightning DDP, gloo, CPU), and vmap-batched against looped per-task lower levels.

    python benchmarks/engine.py            # writes benchmarks/results/engine.md

Hyper-cleaning on digits (1,147 noisy training samples, one weight each). "MLP" is a 64-256-10
network trained by AID (10 inner steps, 10 CG iterations, 256 samples per process and step);
"linear" is the linear softmax model trained by SOBA (64 samples): the smallest step there is,
where Lightning's fixed per-step cost (about 0.6 ms here) weighs most.
Timings are medians of repeated runs in this process, after warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from bilevel_dist import algorithms
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.recipes.data_denoising import Denoising, DigitsData

RESULTS = Path(__file__).parent / "results"
WARMUP = 10
STEPS = {"mlp": 60, "linear": 300}
SETUPS = {
    "mlp": {"name": "aid", "inner_steps": 10, "linear_iters": 10, "inner_lr": 0.1, "outer_lr": 10.0},
    "linear": {"name": "soba", "inner_lr": 0.5, "outer_lr": 20.0},
}


class MLPDenoising(Denoising):
    """The recipe with a one-hidden-layer MLP as the inner model."""

    def __init__(self, hidden: int = 256, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hidden = hidden

    def configure_variables(self):
        outer, _ = super().configure_variables()
        gen = torch.Generator().manual_seed(0)
        features = 64
        inner = {
            "w1": torch.randn(features, self.hidden, generator=gen) / features**0.5,
            "b1": torch.zeros(self.hidden),
            "w2": torch.randn(self.hidden, self.classes, generator=gen) / self.hidden**0.5,
            "b2": torch.zeros(self.classes),
        }
        return outer, inner

    def logits(self, inner, x, train=None):
        return torch.tanh(x @ inner["w1"] + inner["b1"]) @ inner["w2"] + inner["b2"]

    def inner_loss(self, inner, outer, batch):
        losses = F.cross_entropy(self.logits(inner, batch["x"]), batch["y"], reduction="none")
        weights = torch.sigmoid(outer["logit"][batch["index"]])
        return (weights * losses).mean() + self.reg * sum((inner[k] ** 2).sum() for k in ("w1", "w2"))


BATCH = {"mlp": 256, "linear": 64}


def make(setup: str):
    data = DigitsData(inner_batch_size=BATCH[setup], outer_batch_size=50)
    cls = MLPDenoising if setup == "mlp" else Denoising
    return data, cls(n_train=data.n_train, input_shape=data.input_shape, algorithm=SETUPS[setup], baselines=())


class StepClock(L.Callback):
    """Wall time of the training steps after ``WARMUP`` (data loading and Lightning's loop included)."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == WARMUP:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module):
        self.seconds = time.perf_counter() - self.start


def lightning_run(setup: str, devices: int, progress_bar: bool = True, log_every: int = 1) -> dict:
    data, model = make(setup)
    clock = StepClock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=STEPS[setup],
        limit_val_batches=0,
        logger=L.pytorch.loggers.CSVLogger(os.environ.get("BENCH_LOGS", "/tmp/bilevel_bench_logs")),
        log_every_n_steps=log_every,
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(model, data)
    steps = STEPS[setup] - WARMUP
    per_step = clock.seconds / steps
    return {"step_ms": 1e3 * per_step, "samples_per_s": BATCH[setup] * devices / per_step}


def bare_run(setup: str) -> dict:
    """The same algorithm and batches in a plain Python loop (batches prepared in advance)."""
    data, model = make(setup)
    data.per_sample = True  # as the trainer sets it for this model: per-sample weights
    steps = data.paired_steps()
    batches = [steps[t] for t in range(STEPS[setup])]
    algorithm = algorithms.get(model.algorithm_name, problem=model.problem, **model._spec)
    state = algorithm.init(*model.configure_variables())
    for t in range(WARMUP):
        state, _ = algorithm.step(state, batches[t]["inner"], batches[t]["outer"])
    start = time.perf_counter()
    for t in range(WARMUP, STEPS[setup]):
        state, _ = algorithm.step(state, batches[t]["inner"], batches[t]["outer"])
    per_step = (time.perf_counter() - start) / (STEPS[setup] - WARMUP)
    return {"step_ms": 1e3 * per_step, "samples_per_s": BATCH[setup] / per_step}


def processes(setup: str, devices: int) -> dict:
    """A Lightning run with ``devices`` processes, in a fresh interpreter (DDP relaunches it)."""
    out = subprocess.run(
        [sys.executable, __file__, "--worker", setup, str(devices)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def task_problem(tasks: int, dim: int = 32, samples: int = 20):
    """Per-task ridge heads around a shared centre, independent lower levels (``batched=True``:
    the losses are sums over tasks); ``batch["index"]`` are the tasks solved."""
    gen, f64 = torch.Generator().manual_seed(0), torch.float64  # float64: agreement to rounding is visible
    a, c = (torch.randn(tasks, samples, dim, generator=gen, dtype=f64) for _ in range(2))
    b, e = (torch.randn(tasks, samples, generator=gen, dtype=f64) for _ in range(2))

    def inner(w, x, batch):
        t = batch["index"]
        fit = torch.einsum("tnd,td->tn", a[t], w["w"]) - b[t]
        return (fit.pow(2).sum(1) / (2 * samples) + 0.5 * (w["w"] - x["x"]).pow(2).sum(1)).sum()

    def outer(w, x, batch):
        t = batch["index"]
        fit = torch.einsum("tnd,td->tn", c[t], w["w"]) - e[t]
        return (fit.pow(2).sum(1) / (2 * samples)).sum()

    return BilevelProblem(inner, outer, batched=True), dim


def batched_vs_looped(tasks: int = 64, steps: int = 20) -> dict:
    """AID steps on all task heads at once (one ``(T, d)`` tensor) against one AID per task."""
    problem, dim = task_problem(tasks)
    hp = {"inner_steps": 10, "linear_iters": 10, "inner_lr": 0.1, "outer_lr": 0.01}
    aid = algorithms.get("aid", problem=problem, **hp)
    x0 = {"x": torch.zeros(dim, dtype=torch.float64)}

    def batched():
        state = aid.init(x0, {"w": torch.zeros(tasks, dim, dtype=torch.float64)})
        batch = {"index": torch.arange(tasks)}
        for _ in range(steps):
            state, _ = aid.step(state, batch, batch)
        return state["outer"]["x"]

    def looped():  # the same method, one task's lower level at a time, outer steps summed
        x = x0["x"].clone()
        heads = [torch.zeros(1, dim, dtype=torch.float64) for _ in range(tasks)]
        for _ in range(steps):
            step = torch.zeros(dim, dtype=torch.float64)
            for t in range(tasks):
                state = aid.init({"x": x}, {"w": heads[t]})
                state, _ = aid.step(state, {"index": torch.tensor([t])}, {"index": torch.tensor([t])})
                heads[t] = state["inner"]["w"]
                step += state["outer"]["x"] - x
            x = x + step
        return x

    timings, results = {}, {}
    for name, fn in (("batched", batched), ("looped", looped)):
        fn()
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            results[name] = fn()
            runs.append(time.perf_counter() - start)
        timings[name] = statistics.median(runs)
    # each task's CG has its own step sizes, so the two agree to rounding
    diff = float((results["batched"] - results["looped"]).abs().max())
    return {"tasks": tasks, **{f"{k}_s": v for k, v in timings.items()}, "max_abs_diff": diff}


def main() -> None:
    rows = []
    for setup in SETUPS:
        bare = statistics.median(bare_run(setup)["step_ms"] for _ in range(3))
        module = statistics.median(lightning_run(setup, 1)["step_ms"] for _ in range(3))
        quiet = statistics.median(lightning_run(setup, 1, progress_bar=False)["step_ms"] for _ in range(3))
        one, two = processes(setup, 1), processes(setup, 2)
        rows.append((setup, bare, module, quiet, one, two))
        print(setup, bare, module, quiet, one, two, flush=True)
    vmap = batched_vs_looped()
    print(vmap, flush=True)
    lines = [
        f"Measured on {os.cpu_count()} CPU cores, torch {torch.__version__}, lightning {L.__version__}; "
        f"digits hyper-cleaning, inner samples per process and step: {BATCH}; medians of 3 runs.",
        "",
        "| model / algorithm | bare loop ms/step | BilevelModule ms/step | overhead | fixed cost ms/step | "
        "overhead without progress bar | 1 process steps/s | 1 process samples/s | "
        "2 processes steps/s | 2 processes samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setup, bare, module, quiet, one, two in rows:
        lines.append(
            f"| {setup} / {SETUPS[setup]['name']} | {bare:.2f} | {module:.2f} | {100 * (module / bare - 1):+.1f}% | "
            f"{module - bare:.2f} | "
            f"{100 * (quiet / bare - 1):+.1f}% | {1e3 / one['step_ms']:.0f} | {one['samples_per_s']:.0f} | "
            f"{1e3 / two['step_ms']:.0f} | {two['samples_per_s']:.0f} |"
        )
    lines += [
        "",
        f"Per-task lower levels, AID (10 inner steps, 10 CG iterations), {vmap['tasks']} tasks, 20 outer steps: "
        f"batched {vmap['batched_s']:.3f} s, looped over tasks {vmap['looped_s']:.3f} s "
        f"({vmap['looped_s'] / vmap['batched_s']:.1f}x); outer variables differ by {vmap['max_abs_diff']:.1e}.",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=2)
    args = parser.parse_args()
    if args.worker:
        # one process per core: N processes with the default N threads each would oversubscribe
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(args.worker[1])))
        result = lightning_run(args.worker[0], int(args.worker[1]), progress_bar=False)
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            print(json.dumps(result))
    else:
        main()
