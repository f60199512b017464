"""The console script lists estimators and exits with code 2 on a user mistake."""

import subprocess
import sys

from bilevel_dist import hypergrad


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bilevel_dist.cli", *args], capture_output=True, text=True)


def test_lists_every_estimator():
    result = run_cli("estimators")
    assert result.returncode == 0
    assert [line.split()[0] for line in result.stdout.splitlines()] == sorted(hypergrad.REGISTRY)


def test_unknown_command_exits_2_without_traceback():
    result = run_cli("fly")
    assert result.returncode == 2
    assert "invalid choice: 'fly'" in result.stderr and "Traceback" not in result.stderr
