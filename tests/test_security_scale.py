"""The audits at scale: two DDP processes split the cases (seeds) and hold exactly what one process
holds, and an audit killed with ``kill -9`` after a finished case resumes from it to the same
``success.csv``, byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "scripts"
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "security"

pytestmark = pytest.mark.usefixtures("one_thread")


def script(out: Path, devices: int, audit: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(SCRIPTS / "security_test.py"), str(out), str(devices), audit]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"{audit}_rank{r}.pt", weights_only=False) for r in range(devices)]


@pytest.mark.slow
def test_two_processes_equal_one_for_both_audits(tmp_path):
    """Rank 0 runs cases 0 and 2, rank 1 case 1; after the gather both ranks hold every case's
    poisons, flips and accuracies bitwise equal to one process's, and log the same success. The
    backdoor's seeds likewise, to the last digit of every RMSE."""
    (one,) = script(tmp_path, 1, "brew")  # a fresh process each: the suite's default dtype is float64
    two = script(tmp_path, 2, "brew")
    for rank in two:
        assert rank["metrics"] == one["metrics"]
        for a, b in zip(rank["cases"], one["cases"], strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert one["metrics"]["test_success"] > one["metrics"]["test_clean_success"]
    (one,) = script(tmp_path, 1, "backdoor")
    for rank in script(tmp_path, 2, "backdoor"):
        assert rank["runs"] == one["runs"] and rank["mean"] == one["mean"]
        assert rank["metrics"] == one["metrics"]


def cli(results: Path, logs: Path) -> list[str]:
    training = "{epochs: 3}"
    return [
        sys.executable, "-m", "bilevel_dist.cli", "test", "--config", str(RECIPES / "witches_brew_blobs.yaml"),
        "--model.cases", "3", "--model.victims", "2", "--model.restarts", "2", "--model.steps", "20",
        "--model.training", training, "--model.results_dir", str(results),
        "--trainer.logger.init_args.save_dir", str(logs),
    ]  # fmt: skip


@pytest.mark.slow
def test_killed_audit_resumes_from_its_finished_cases_to_the_same_table(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = subprocess.run(cli(whole, tmp_path / "logs"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    process = subprocess.Popen(cli(broken, tmp_path / "logs"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list((broken / "units").glob("*-0.pt")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the audit ended before the kill"
    kept = sorted(p.name for p in (broken / "units").iterdir())
    assert len(kept) == 1 and kept[0].endswith("-0.pt"), kept  # no half-written file either
    assert not (broken / "success.csv").exists()

    resumed = subprocess.run(cli(broken, tmp_path / "logs"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "unit 0: reusing" in resumed.stdout + resumed.stderr
    assert (broken / "success.csv").read_bytes() == (whole / "success.csv").read_bytes()
