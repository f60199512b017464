"""The README's example runs as written and its hypergradient is right."""

import re
from pathlib import Path

import torch

import bilevel_dist as bd
from bilevel_dist import hypergrad, solvers

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_matches_exact_solve(capsys):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    solution = namespace["solution"]
    exact = bd.solve(
        namespace["problem"],
        {"log_lambda": torch.zeros(5)},
        {"w": torch.zeros(5)},
        solver=solvers.GD(lr=0.5, steps=2000, tol=1e-7),
        hypergrad=hypergrad.Exact(),
    )
    assert torch.allclose(solution.grad["log_lambda"], exact.grad["log_lambda"], rtol=1e-3, atol=1e-6)
    assert solution.info["inner_steps"] < 500  # stopped on its tolerance
    assert "tensor(" in capsys.readouterr().out


def test_readme_algorithm_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[1], "README.md", "exec"), namespace)
    quadratic, state = namespace["quadratic"], namespace["state"]
    start = quadratic.hypergradient(quadratic.outer_init())["x"].norm()
    assert quadratic.hypergradient(state["outer"])["x"].norm() < 0.1 * start
    loaded = torch.load(tmp_path / "soba.pt", weights_only=True)
    assert torch.equal(loaded["outer"]["x"], state["outer"]["x"])
