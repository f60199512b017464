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
