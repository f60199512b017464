"""Hypergradient trust: the monitor against closed forms, and runs that never keep a NaN."""

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from test_lightning import trainer

from bilevel_dist import algorithms, hypergrad, tree
from bilevel_dist._checks import NonFiniteError
from bilevel_dist.algorithms.double_loop import AID
from bilevel_dist.hypergrad.base import Solution
from bilevel_dist.lightning import BilevelModule, HypergradientMonitor, TensorData
from bilevel_dist.problems import RidgeRegression
from bilevel_dist.recipes.data_denoising import Denoising, DigitsData

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))


def ridge_module(ridge, spec, log_lambda=-1.0):
    d = ridge.x_train.shape[1]
    return BilevelModule(
        spec,
        inner_loss=lambda w, x, batch: ridge.inner_loss(w, x),
        outer_loss=lambda w, x, batch: ridge.outer_loss(w, x),
        variables=lambda: ({"log_lambda": torch.full((d,), log_lambda)}, {"w": torch.zeros(d)}),
    )


def ridge_data(tmp_path, n=64, m=32):
    path = tmp_path / "ridge.pt"  # the losses hold their data: the batches only count samples
    torch.save({"train": {"i": torch.arange(float(n))}, "val": {"i": torch.arange(float(m))}}, path)
    return TensorData(str(path), inner_batch_size=n, outer_batch_size=m)


def lipschitz(ridge, outer):
    a = ridge.x_train.T @ ridge.x_train / ridge.x_train.shape[0] + torch.diag(outer["log_lambda"].exp())
    return float(torch.linalg.eigvalsh(a).max())


class Closed(L.Callback):
    """The closed-form hypergradient at the point each step starts from."""

    def __init__(self, ridge):
        self.ridge, self.values = ridge, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.values.append(self.ridge.hypergradient(tree.detach(module.outer))["log_lambda"])


def test_reference_equals_the_closed_form_and_aid_with_50_cg_iterations_agrees(tmp_path):
    ridge = RidgeRegression.make(n_train=64, n_val=32, features=5, spread=10.0, seed=1)
    lr = 1.0 / lipschitz(ridge, {"log_lambda": torch.full((5,), -1.0)})
    spec = {"name": "aid", "inner_steps": 2000, "inner_lr": lr, "linear_iters": 50, "outer_lr": 0.5}
    monitor = HypergradientMonitor(
        every_n_steps=1, estimator={"name": "cg", "iters": 200, "tol": 1e-14}, inner_steps=20000, inner_tol=1e-13
    )
    closed = Closed(ridge)
    module = ridge_module(ridge, spec)
    references = []
    original = monitor.reference

    def keep(module_, outer, inner):
        solution = original(module_, outer, inner)
        references.append(solution.grad["log_lambda"])
        return solution

    monitor.reference = keep
    trainer(max_steps=3, callbacks=[closed, monitor]).fit(module, ridge_data(tmp_path))
    assert len(monitor.history) == 3
    for reference, exact in zip(references, closed.values, strict=True):
        assert float((reference - exact).abs().max()) < 1e-8 * max(1.0, float(exact.abs().max()))
    assert all(h["cosine"] > 0.999 for h in monitor.history)
    assert all(h["relative_error"] < 1e-3 for h in monitor.history)
    assert all(h["reference_residual"] < 1e-10 for h in monitor.history)
    assert all(h["seconds"] > 0 for h in monitor.history)


def test_itd_with_one_step_on_a_poorly_conditioned_ridge_is_flagged(tmp_path):
    """log λ = −8: the Hessian's condition number is about 2,400, so one unrolled step's Jacobian
    (``−lr ∂²_xw g``) points far from the implicit one (``−H⁻¹ ∂²_xw g``)."""
    ridge = RidgeRegression.make(n_train=64, n_val=32, features=6, spread=1e4, seed=0)
    lr = 1.0 / lipschitz(ridge, {"log_lambda": torch.full((6,), -8.0)})
    spec = {"name": "itd", "inner_steps": 1, "inner_lr": lr, "outer_lr": 1e-3}
    monitor = HypergradientMonitor(every_n_steps=1, inner_steps=300000, inner_tol=1e-10, threshold=0.9, patience=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=3, callbacks=[monitor]).fit(ridge_module(ridge, spec, -8.0), ridge_data(tmp_path))
    cosines = [h["cosine"] for h in monitor.history]
    assert math.isnan(cosines[0])  # one step from w = 0: a zero direction has no cosine (and no verdict)
    assert max(cosines[1:]) < 0.5, cosines
    assert sum("HypergradientMonitor" in str(w.message) for w in caught) == 1  # once per streak


class FlippedCG(hypergrad.CG):
    """CG whose mixed term has the wrong sign. On ridge the outer loss does not see ``x``, so the
    hypergradient is the mixed term alone and the flip negates it."""

    def __call__(self, *args, **kwargs):
        solution = super().__call__(*args, **kwargs)
        return Solution(solution.inner, tree.scale(solution.grad, -1.0), solution.info, solution.v)


class FlippedAID(AID):
    name = "flipped_aid"

    def estimator(self, state):
        return FlippedCG(iters=self.h["linear_iters"], tol=0.0)


def test_a_sign_flipped_estimator_is_caught_within_two_checks_and_strict_stops(tmp_path, monkeypatch):
    monkeypatch.setitem(algorithms.REGISTRY, "flipped_aid", FlippedAID)
    ridge = RidgeRegression.make(n_train=64, n_val=32, features=5, seed=2)
    lr = 1.0 / lipschitz(ridge, {"log_lambda": torch.full((5,), -1.0)})
    spec = {"name": "flipped_aid", "inner_steps": 500, "inner_lr": lr, "linear_iters": 20, "outer_lr": 0.1}
    monitor = HypergradientMonitor(every_n_steps=1, patience=2, strict=True)
    with pytest.warns(RuntimeWarning, match="stayed below 0.9 for 2 checks"):
        fit = trainer(max_steps=10, callbacks=[monitor])
        fit.fit(ridge_module(ridge, spec), ridge_data(tmp_path))
    assert len(monitor.history) == 2 and fit.global_step == 2  # caught at the second check, stopped
    assert all(h["cosine"] < -0.999 for h in monitor.history)


def test_monitor_settings_are_checked():
    with pytest.raises(ValueError, match="every_n_steps"):
        HypergradientMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="threshold"):
        HypergradientMonitor(threshold=2.0)
    with pytest.raises(ValueError, match="estimator 'nope'"):
        HypergradientMonitor(estimator={"name": "nope"})


# An outer lr of 1e12 on the denoising recipe: BOME's step divides by the value-function gradient's
# norm, which vanishes once the sigmoid weights saturate, so its hypergradient turns non-finite at
# step 3. Most algorithms stay finite at 1e12 (the weights saturate at 0 or 1; measured: 60 steps of
# each of the other algorithms). A diverging inner step (inner lr 1e100: the weights grow 2e97-fold
# a step until they overflow) makes the inner variable non-finite instead.
DIVERGING = {
    "bome, outer lr 1e12": ({"name": "bome", "outer_lr": 1e12}, "the hypergradient 'logit'"),
    "soba, inner lr 1e100": ({"name": "soba", "inner_lr": 1e100, "outer_lr": 1.0}, r"the inner variable '[\w.|]+'"),
}


@pytest.mark.parametrize("case", DIVERGING)
def test_nonfinite_steps_raise_or_are_skipped_and_checkpoints_stay_finite(tmp_path, case):
    spec, quantity = DIVERGING[case]
    data = DigitsData(inner_batch_size=32, outer_batch_size=25)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "raise", every_n_train_steps=1, save_top_k=-1)
    module = Denoising(algorithm=spec)
    match = rf"step \d+: {quantity} is not finite after the {spec['name']} step; the state was not updated"
    with pytest.raises(NonFiniteError, match=match):
        trainer(max_steps=20, callbacks=[checkpoints], enable_checkpointing=True).fit(module, data)
    saved = sorted((tmp_path / "raise").glob("*.ckpt"))
    assert saved, "a checkpoint of the steps before the failure"
    for path in saved:
        checkpoint = torch.load(path, weights_only=True)
        for level in ("outer", "inner"):
            for value in checkpoint["bilevel"][level].values():
                assert bool(torch.isfinite(value).all())
        for value in checkpoint["state_dict"].values():
            assert bool(torch.isfinite(value).all())
    assert all(bool(torch.isfinite(v).all()) for v in module.outer.values())  # the state was not updated

    skipping = Denoising(algorithm=spec, nonfinite="skip")
    logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs")
    trainer(max_steps=20, logger=logger, log_every_n_steps=1).fit(skipping, DigitsData(inner_batch_size=32))
    assert skipping.global_step == 20 and skipping.skipped_steps > 0
    assert all(bool(torch.isfinite(v).all()) for level in ("outer", "inner") for v in skipping.state[level].values())
    logged = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "skipped_steps" in logged


def test_cli_exits_1_with_one_line_when_a_step_diverges(tmp_path):
    config = Path(__file__).parents[1] / "recipes" / "data_denoising" / "digits.yaml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bilevel_dist.cli",
            "fit",
            "--config",
            str(config),
            "--model.algorithm",
            '{"name": "bome", "outer_lr": 1e12}',
            "--trainer.max_steps",
            "30",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # the recipe's checkpoints directory is relative
    )
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bilevel-dist: error: step ") and "is not finite after the bome step" in last
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_monitor_on_two_ddp_processes_gives_every_rank_the_same_numbers(tmp_path):
    """SOBA on the denoising recipe, sharded per-sample weights: both ranks compute the same
    reference and comparison (the 2-process run's checks, bitwise), and one process on the
    same global batches agrees to 1e-6."""
    import monitor_fit

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "monitor_fit.py"), str(tmp_path), "2"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"monitor_rank{r}.pt", weights_only=True) for r in range(2)]
    assert len(ranks[0]) == 3
    keys = ("cosine", "relative_error", "norm_ratio", "reference_residual")

    def same(a, b, tol=0.0):  # NaN: SOBA's first direction is zero (v = 0), it has no cosine
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol

    for a, b in zip(*ranks, strict=True):
        assert all(same(a[k], b[k]) for k in keys), (a, b)
    one = monitor_fit.fit(1)
    for a, b in zip(ranks[0], one, strict=True):
        # the reference's GD stops at a tolerance: one process may stop an iteration apart
        assert same(a["cosine"], b["cosine"], 1e-6) and same(a["relative_error"], b["relative_error"], 1e-6)
    assert math.isnan(one[0]["cosine"])
    assert all(-1.0 <= h["cosine"] <= 1.0 and h["relative_error"] >= 0 for h in one[1:])


def test_the_recipe_config_adds_the_monitor_and_plot_draws_the_health_panels(tmp_path):
    """A 20-step CLI run of ``digits_monitor.yaml`` (monitor every 5 steps), then
    ``bilevel-dist plot`` on its logs."""
    import yaml

    from bilevel_dist.cli import main
    from bilevel_dist.health import read

    recipe = Path(__file__).parents[1] / "recipes" / "data_denoising" / "digits_monitor.yaml"
    settings = yaml.safe_load(recipe.read_text())
    monitor, checkpoints = settings["trainer"]["callbacks"]
    assert monitor["class_path"] == "bilevel_dist.lightning.HypergradientMonitor"
    monitor["init_args"]["every_n_steps"] = 5
    checkpoints["init_args"]["dirpath"] = str(tmp_path / "checkpoints")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    args = ["fit", "--config", str(config), "--trainer.max_steps", "20", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.val_check_interval", "10", "--model.baselines", "[]", "--trainer.precision", "64-true"]
    args += ["--trainer.default_root_dir", str(tmp_path)]
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the CLI's default logger writes to ./logs
    try:
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    series = read(tmp_path / "logs")
    assert [step for step, _ in series["monitor/cosine"]] == [0, 5, 10, 15]
    cosines = [value for _, value in series["monitor/cosine"]]
    assert math.isnan(cosines[0]) and all(-1.0 <= value <= 1.0 for value in cosines[1:])  # SOBA starts at v = 0
    assert all(value >= 0.0 for _, value in series["monitor/relative_error"])
    assert main(["plot", str(tmp_path / "logs"), "--out", str(tmp_path / "health.png")]) == 0
    png = (tmp_path / "health.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert main(["plot", str(tmp_path / "nothing")]) == 2
