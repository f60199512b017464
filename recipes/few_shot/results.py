"""The README's few-shot results at CPU scale: sinusoid (5-shot) and rotated digits (5-way 1-shot
and 5-shot), every method, plus the baselines, 600 meta-test tasks each, mean ± 95% CI.

    python recipes/few_shot/results.py            # writes recipes/few_shot/results.md
    python recipes/few_shot/results.py --only rotated_digits_1shot

Each row is one ``bilevel-dist fit`` then ``bilevel-dist test --ckpt_path ...`` with the command
shown beside it (run from the repository root); the baselines (ProtoNet, "no meta-learning")
are trained inside the MAML run with its budget and reported by its ``test``. Two runs at a
time, one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).parent
WORK = Path("/tmp/bilevel_dist_few_shot_results")
IMAML_SINE = {"name": "aid", "inner_steps": 5, "inner_lr": 0.01, "linear_iters": 5, "outer_optimizer": "adam"}
PROX = ["--model.init_args.prox", "0.1"]
PENALTY_SINE = {"name": "penalty", "inner_steps": 3, "inner_lr": 0.005, "outer_lr": 0.01}


def _args(method: str, algorithm: dict | None = None, baselines: bool = False) -> list[str]:
    args = ["--model.init_args.method", method]
    if algorithm is not None:
        args += ["--model.init_args.algorithm", json.dumps(algorithm, separators=(",", ":"))]
    return args if baselines else [*args, "--model.init_args.baselines", "[]"]


def settings() -> dict[str, list[tuple[str, str, list[str]]]]:
    """Setting -> rows of (name, config, extra arguments)."""
    sine = [
        ("maml", "sinusoid.yaml", _args("maml", baselines=True)),
        ("fomaml", "sinusoid.yaml", _args("fomaml")),
        ("anil", "sinusoid.yaml", _args("anil")),
        ("imaml", "sinusoid.yaml", _args("imaml", {**IMAML_SINE, "outer_lr": 0.001}) + PROX),
        ("penalty", "sinusoid.yaml", _args("penalty", PENALTY_SINE) + ["--model.init_args.head_lr", "0.005"]),
    ]
    out = {"sinusoid_5shot": sine}
    for shots in (1, 5):
        shot = ["--data.init_args.shots", str(shots)]
        out[f"rotated_digits_{shots}shot"] = [
            ("maml", "rotated_digits.yaml", _args("maml", baselines=True) + shot),
            ("fomaml", "rotated_digits.yaml", _args("fomaml") + shot),
            ("anil", "rotated_digits.yaml", _args("anil") + shot),
            ("imaml", "rotated_digits.yaml", _args("imaml") + PROX + shot),
            ("penalty", "rotated_digits_penalty.yaml", ["--model.init_args.baselines", "[]"] + shot),
        ]
    return out


ROW = re.compile(r"^\s{2}(\S.*?)\s+(-?[\d.]+|nan) ± ([\d.]+|nan)\s*$")


def run(setting: str, name: str, config: str, extra: list[str]) -> dict:
    """Fit then test in a fresh folder; the test's table rows and the times."""
    cwd = WORK / setting / name
    shutil.rmtree(cwd, ignore_errors=True)  # a fresh run: no checkpoint of an earlier one is picked up
    cwd.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "bilevel_dist.cli"]
    common = ["--config", str(HERE.resolve() / config), *extra, "--trainer.enable_progress_bar", "false"]
    start = time.perf_counter()
    fit = subprocess.run([*base, "fit", *common], cwd=cwd, env=env, capture_output=True, text=True)
    fitted = time.perf_counter()
    if fit.returncode != 0:
        raise RuntimeError(f"{setting}/{name}: {fit.stderr[-2000:]}")
    ckpt = next(cwd.glob("checkpoints/**/last.ckpt"))
    tested = subprocess.run(
        [*base, "test", *common, "--ckpt_path", str(ckpt)], cwd=cwd, env=env, capture_output=True, text=True
    )
    if tested.returncode != 0:
        raise RuntimeError(f"{setting}/{name} test: {tested.stderr[-2000:]}")
    rows = {}
    for line in (tested.stdout + tested.stderr).splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = (float(match.group(2)), float(match.group(3)))
    command = f"bilevel-dist fit --config recipes/few_shot/{config} {' '.join(_quote(a) for a in extra)}"
    return {"rows": rows, "command": command, "fit_s": fitted - start, "test_s": time.perf_counter() - fitted}


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in '{}[]" ') else arg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", help="settings to run (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--methods", nargs="*", help="rows to run (default: all)")
    args = parser.parse_args()
    chosen = {k: v for k, v in settings().items() if not args.only or k in args.only}
    jobs = [(s, *row) for s, rows in chosen.items() for row in rows if not args.methods or row[0] in args.methods]

    def attempt(job: tuple) -> tuple[str, str, dict]:
        try:
            return job[0], job[1], run(*job)
        except Exception as error:  # one failed row must not lose the others
            print(error, file=sys.stderr)
            return job[0], job[1], {"error": str(error)[-500:]}

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(attempt, jobs))
    saved = HERE / "results.json"
    everything = json.loads(saved.read_text()) if saved.exists() else {}
    for setting, name, result in results:
        everything.setdefault(setting, {})[name] = result
    saved.write_text(json.dumps(everything, indent=1))
    write_markdown(everything)


def write_markdown(everything: dict) -> None:
    lines = ["# Few-shot results at CPU scale", "", "Produced by `python recipes/few_shot/results.py`; 600 meta-test"]
    lines += ["tasks per row, mean ± 95% CI; each run's `test` is `bilevel-dist test` with the same arguments"]
    lines += ["and `--ckpt_path` its last checkpoint. Baselines are trained inside the MAML run, same budget.", ""]
    for setting, runs in everything.items():
        metric = "MSE (lower is better)" if setting.startswith("sinusoid") else "accuracy"
        lines += [f"## {setting}: {metric}", "", "| method | meta-test | fit / test s | command |", "|---|---|---|---|"]
        for name, result in runs.items():
            if "error" in result:
                lines.append(f"| {name} | failed: {result['error'][-200:]} | | |")
                continue
            for label, (mean, half) in result["rows"].items():
                if label != name and name != "maml":
                    continue
                time_cell = f"{result['fit_s']:.0f} / {result['test_s']:.0f}" if label == name else "(in the MAML run)"
                lines.append(f"| {label} | {mean:.4f} ± {half:.4f} | {time_cell} | `{result['command']}` |")
        lines.append("")
    (HERE / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
