"""The README's example runs as written and its hypergradient is right."""

import re
from pathlib import Path

import lightning as L
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


def test_readme_lightning_example_tunes_feature_decays(capsys):
    torch.set_default_dtype(torch.float32)  # as in a fresh interpreter (the conftest sets float64)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    namespace: dict = {}
    exec(compile(blocks[2], "README.md", "exec"), namespace)
    model, trainer, data = namespace["model"], namespace["trainer"], namespace["data"]
    assert trainer.global_step == 50
    start = namespace["FeatureDecay"](algorithm={"name": "aid", "inner_steps": 20, "inner_lr": 0.5})
    before = L.Trainer(logger=False, enable_progress_bar=False).validate(start, data, verbose=False)[0]
    after = trainer.validate(model, data, verbose=False)[0]
    assert after["val_outer_loss"] < before["val_outer_loss"]
    assert not torch.equal(model.outer["log_decay"], torch.full((64,), -4.0, dtype=model.outer["log_decay"].dtype))
