"""The ``bilevel-dist`` command: LightningCLI configs, overrides, and one-line errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bilevel_dist import hypergrad
from bilevel_dist.cli import main

DIGITS = Path(__file__).parents[1] / "recipes" / "data_denoising" / "digits.yaml"
QUICK = ["--trainer.max_steps", "3", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bilevel_dist.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_lists_every_estimator():
    result = run_cli("estimators")
    assert result.returncode == 0
    assert [line.split()[0] for line in result.stdout.splitlines()] == sorted(hypergrad.REGISTRY)


def test_unknown_command_exits_2_without_traceback():
    result = run_cli("fly")
    assert result.returncode == 2
    choices = "fit, validate, test, tune, plot, estimators"
    assert result.stderr == f"bilevel-dist: error: unknown command 'fly'; choose one of {choices}\n"


def test_print_config_applies_command_line_overrides(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(DIGITS), "--model.algorithm.name", "aid", "--print_config"])
    assert exit_.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "bilevel_dist.recipes.data_denoising.Denoising"
    assert config["model"]["init_args"]["algorithm"] == {
        "name": "aid",
        "inner_steps": 5,
        "inner_lr": 0.5,
        "outer_lr": 100.0,
    }
    assert config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.CSVLogger"


MALFORMED = [
    (["--model.algorithm.name", "nope"], "model.init_args.algorithm.name: unknown algorithm 'nope'"),
    (
        ["--model.algorithm.name", "aid", "--model.algorithm.inner_steps", "-3"],
        "model.init_args.algorithm.inner_steps: inner_steps must be > 0",
    ),
    (["--model.algorithm.outer_lr", "fast"], "model.init_args.algorithm.outer_lr: outer_lr must be a number"),
    (["--model.algorithm.momentum", "0.9"], "model.init_args.algorithm.momentum: algorithm 'penalty' has no"),
    (["--model.init_args.reg", "abc"], "model.init_args.reg: Expected a <class 'float'>"),
    (["--model.init_args.bogus", "1"], "model: Option 'bogus' is not accepted"),
    (
        ["--model.class_path", "bilevel_dist.nope.Model"],
        "model: Problem with given class_path 'bilevel_dist.nope.Model'",
    ),
    (["--data.init_args.noise", "1.5"], "data.init_args.noise: noise must be a rate in [0, 1), got 1.5"),
    (["--data.init_args.inner_batch_size", "2.5"], "data.init_args.inner_batch_size: Expected a <class 'int'>"),
    (
        ["--data.init_args.inner_batch_size", "5000"],
        "data.init_args.inner_batch_size: inner_batch_size × processes exceeds",
    ),
    (
        ["--data.class_path", "bilevel_dist.lightning.TensorData", "--data.init_args.path", "/no/such/data.pt"],
        "data.init_args.path: no such file: '/no/such/data.pt'",
    ),
    (["--trainer.devices", "abc"], "trainer: `devices` selected with `CPUAccelerator` should be an int > 0."),
    (["--trainer.bogus", "1"], "unrecognized arguments: --trainer.bogus 1"),
]


DRIVER = """
import contextlib, io, json, sys
from bilevel_dist.cli import main
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_malformed_configs_exit_2_with_one_line_naming_the_key(tmp_path):
    cases = [["fit", "--config", str(DIGITS), *args, *QUICK] for args, _ in MALFORMED]
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cases)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for (code, err), (args, message) in zip(json.loads(result.stdout), MALFORMED, strict=True):
        lines = [line for line in err.splitlines() if line.startswith("bilevel-dist")]
        assert code == 2, (args, err)
        assert len(lines) == 1 and "Traceback" not in err, (args, err)
        assert lines[0].startswith(f"bilevel-dist: error: {message}"), lines[0]


def test_missing_config_file_from_the_shell(tmp_path):
    result = run_cli("fit", "--config", "missing.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"error: config: File does not exist: '{tmp_path}/missing.yaml'")
    assert "Traceback" not in result.stderr


def test_fit_then_test_from_the_command_line(tmp_path):
    fit = run_cli(
        "fit",
        "--config",
        str(DIGITS),
        "--trainer.max_steps",
        "100",
        "--trainer.enable_progress_bar",
        "false",
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-2000:]
    checkpoint = tmp_path / "checkpoints" / "digits" / "last.ckpt"
    test = run_cli("test", "--config", str(DIGITS), "--ckpt_path", str(checkpoint), cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-2000:]
    metrics = sorted((tmp_path / "logs" / "lightning_logs").glob("version_*/metrics.csv"))[-1].read_text()
    header, values = metrics.splitlines()[:2]
    accuracy = float(dict(zip(header.split(","), values.split(","), strict=True))["test_accuracy"])
    assert accuracy > 0.85


@pytest.mark.slow
def test_two_process_cli_run_equals_one_process_replay(tmp_path):
    """``--trainer.devices 2 --trainer.strategy ddp`` from the command line: the final per-sample
    weights and model equal one process replaying the same global batches (``shards 2``)."""
    common = ["--config", str(DIGITS), "--trainer.max_steps", "20", "--trainer.precision", "64-true"]
    common += ["--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "10"]
    runs = {}
    for name, extra in {
        "two": ["--trainer.devices", "2", "--trainer.strategy", "ddp"],
        "one": ["--trainer.devices", "1", "--data.init_args.shards", "2"],
    }.items():
        (tmp_path / name).mkdir()
        result = run_cli("fit", *common, *extra, cwd=tmp_path / name)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = torch.load(tmp_path / name / "checkpoints/digits/last.ckpt", weights_only=True)
    two, one = runs["two"], runs["one"]
    assert two["global_step"] == one["global_step"] == 20
    logit_two, logit_one = two["bilevel"]["outer"]["logit"], one["bilevel"]["outer"]["logit"]
    assert logit_two.shape == (1147,)
    assert float((logit_two - logit_one).abs().max()) < 1e-10
    assert float(logit_two.abs().max()) > 1e-3  # the weights did move
    for key, value in one["state_dict"].items():
        assert float((two["state_dict"][key] - value).abs().max()) < 1e-10, key
