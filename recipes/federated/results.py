"""The README's federated results on digits (built in): 100 clients, C = 0.1, E = 5, B = 10,
200 rounds, an MLP 64-64-10; global accuracy on the held-out test set, the global model's and the
personalised models' accuracy on each client's own held-out samples, rounds to 90% validation
accuracy (checked every 10 rounds).

    python recipes/federated/results.py            # writes recipes/federated/results.md (+ .json)
    python recipes/federated/results.py --only iid

Each row is one ``bilevel-dist fit`` then ``bilevel-dist test --ckpt_path ...`` from the
repository root with the command shown beside it; two rows at a time, one torch thread each.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).parent
WORK = Path("/tmp/bilevel_dist_federated_results")
CONFIG = "digits_fedavg.yaml"
ALGORITHMS = {
    "fedavg": {"name": "fedavg", "local_lr": 0.1},
    "fedprox": {"name": "fedavg", "local_lr": 0.1, "prox": 0.01},
    "fedadam": {"name": "fedavg", "local_lr": 0.1, "server_optimizer": "adam", "server_lr": 0.01},
    "pfedme": {"name": "pfedme", "local_lr": 0.05, "personal_lr": 0.05, "personal_steps": 5, "lam": 15.0},
    "perfedavg": {"name": "perfedavg", "local_lr": 0.05, "alpha": 0.05},
}
PARTITIONS = {
    "iid": ["--data.init_args.partition", "iid"],
    "dirichlet_0.3": ["--data.init_args.partition", "dirichlet", "--data.init_args.alpha", "0.3"],
    "shards": ["--data.init_args.partition", "shards", "--data.init_args.shards_per_client", "2"],
}
ROWS = {
    "iid": list(ALGORITHMS),
    "dirichlet_0.3": list(ALGORITHMS),
    "shards": ["fedavg", "pfedme", "perfedavg"],
}


def args_for(partition: str, method: str) -> list[str]:
    algorithm = json.dumps(ALGORITHMS[method], separators=(",", ":"))
    return ["--model.init_args.method", method, "--model.init_args.algorithm", algorithm, *PARTITIONS[partition]]


def run(partition: str, method: str) -> dict:
    cwd = WORK / partition / method
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "bilevel_dist.cli"]
    common = ["--config", str(HERE.resolve() / CONFIG), *args_for(partition, method)]
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "10"]
    start = time.perf_counter()
    fit = subprocess.run([*base, "fit", *common, *quiet], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if fit.returncode:
        raise RuntimeError(f"{partition}/{method}: {fit.stderr[-2000:]}")
    ckpt = next(cwd.glob("checkpoints/**/last.ckpt"))
    test = subprocess.run(
        [*base, "test", *common, "--trainer.enable_progress_bar", "false", "--ckpt_path", str(ckpt)],
        cwd=cwd, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if test.returncode:
        raise RuntimeError(f"{partition}/{method} test: {test.stderr[-2000:]}")
    metrics = {}
    for line in (test.stdout + test.stderr).splitlines():  # the module's report: "  test_<name> <value>"
        parts = line.split()
        if len(parts) == 2 and line.startswith("  test_"):
            metrics[parts[0]] = float(parts[1])
    history = next(cwd.glob("logs/**/metrics.csv"))
    val = [
        (int(r["step"]) + 1, float(r["val_accuracy"])) for r in csv.DictReader(history.open()) if r.get("val_accuracy")
    ]
    to_90 = next((step for step, acc in val if acc >= 0.9), None)
    command = " ".join(["bilevel-dist fit --config recipes/federated/" + CONFIG, *_quote(args_for(partition, method))])
    return {"partition": partition, "method": method, **metrics, "rounds_to_90": to_90, "seconds": seconds,
            "command": command}  # fmt: skip


def _quote(args: list[str]) -> list[str]:
    return [f"'{a}'" if a.startswith("{") else a for a in args]


def plot() -> Path:
    """Validation accuracy against round, every method, one panel per partition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ROWS), figsize=(5 * len(ROWS), 3.8), sharey=True)
    for ax, (partition, methods) in zip(axes, ROWS.items(), strict=True):
        for method in methods:
            found = list((WORK / partition / method).glob("logs/**/metrics.csv"))
            if not found:
                continue
            rows = [r for r in csv.DictReader(found[0].open()) if r.get("val_accuracy")]
            ax.plot([int(r["step"]) + 1 for r in rows], [100 * float(r["val_accuracy"]) for r in rows], label=method)
        ax.axhline(90, color="grey", lw=0.8, ls=":")
        ax.set(title=f"digits, 100 clients, {partition}", xlabel="round", ylim=(40, 100))
        ax.legend(loc="lower right")
    axes[0].set_ylabel("global model, validation accuracy %")
    fig.tight_layout()
    path = HERE / "federated_curves.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=list(ROWS))
    parser.add_argument("--plot-only", action="store_true", help="redraw the curves from the last runs")
    options = parser.parse_args()
    if options.plot_only:
        print(plot())
        return
    jobs = [(p, m) for p in options.only for m in ROWS[p]]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda job: run(*job), jobs))
    saved = HERE / "results.json"
    old = json.loads(saved.read_text()) if saved.exists() else []
    keep = [r for r in old if (r["partition"], r["method"]) not in set(jobs)]
    results = keep + results
    order = {(p, m): i for i, (p, m) in enumerate((p, m) for p in ROWS for m in ROWS[p])}
    results.sort(key=lambda r: order[(r["partition"], r["method"])])
    saved.write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        "| partition | method | global test acc. | global on clients' own data | personalised on own data "
        "| rounds to 90% val. | fit s | command |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        rounds = r["rounds_to_90"] if r["rounds_to_90"] is not None else "> 200"
        lines.append(
            f"| {r['partition']} | {r['method']} | {100 * r['test_accuracy']:.1f} | "
            f"{100 * r['test_client_accuracy']:.1f} | {100 * r['test_personal_accuracy']:.1f} | {rounds} | "
            f"{r['seconds']:.0f} | `{r['command']}` |"
        )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(plot())


if __name__ == "__main__":
    main()
