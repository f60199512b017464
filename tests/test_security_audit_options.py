"""``WitchesBrewAudit``'s brew and victim options from the command line: an ensemble, poison
mini-batches, augmentation and no clean control give exactly ``attack_case``'s result with the same
settings; the image networks run the CIFAR-10 config on a tiny directory; bad values exit 2."""

from __future__ import annotations

import pytest
from test_denoising import write_cifar
from test_security_cli import args, read

from bilevel_dist.cli import main
from bilevel_dist.recipes.security import attack_case, digits
from bilevel_dist.recipes.security.networks import mlp
from bilevel_dist.recipes.security.witches_brew import Augmentation

pytestmark = pytest.mark.usefixtures("one_thread")


def test_audit_options_reach_attack_case(tmp_path):
    """Digits, an ensemble of 2, exact poison batches of 5, shifts for the brew and crops for the
    victims, no clean control: the CSV's flips are ``attack_case``'s, the clean column is empty and
    no clean metric is logged."""
    training = {"epochs": 3, "lr": 0.05, "batch_size": 128}
    extra = [
        "--model.dataset", "digits", "--model.eps", "0.1", "--model.budget", "0.01", "--model.cases", "1",
        "--model.victims", "2", "--model.restarts", "2", "--model.steps", "6", "--model.lr", "0.04",
        "--model.widths", "[32]", "--model.ensemble", "2", "--model.poison_batch", "5",
        "--model.exact_batches", "true", "--model.augment", "{shift: 1.0, flip: true}",
        "--model.victim_augment", "{shift: 1}", "--model.clean_control", "false",
        "--model.training", str(training),
    ]  # fmt: skip
    assert main(["test", *args("witches_brew_blobs.yaml", tmp_path, *extra)]) == 0
    (out,) = (tmp_path / "logs").glob("*/version_0")
    rows = read(out / "success.csv")
    x, y, x_test, y_test = digits(0)
    direct = attack_case(
        mlp([64, 32, 10]), x, y, x_test, y_test, eps=0.1, budget=0.01, seed=0, victim_seeds=range(2), restarts=2,
        steps=6, lr=0.04, box=(0.0, 1.0), training=training, ensemble=2, poison_batch=5, exact_batches=True,
        augmentation=Augmentation(1.0, True), victim_augmentation=Augmentation(1.0, False, integer=True),
        clean_control=False,
    )  # fmt: skip
    assert [int(r["target"]) for r in rows] == [direct.case.target] * 2
    assert [bool(int(r["poisoned_flip"])) for r in rows] == direct.poisoned.tolist()
    assert [float(r["poisoned_accuracy"]) for r in rows] == pytest.approx(direct.accuracy.tolist(), abs=1e-4)
    assert float(rows[0]["best_alignment"]) == pytest.approx(float(direct.brew.final[direct.brew.best]), abs=1e-4)
    assert {r["clean_flip"] for r in rows} == {""}
    logged = [r for r in read(out / "metrics.csv") if r.get("test_success")]
    assert float(logged[-1]["test_success"]) == pytest.approx(float(direct.poisoned.float().mean()))
    assert not logged[-1].get("test_clean_success")


@pytest.mark.parametrize("network", ["convnet", "resnet18"])
def test_cifar10_config_runs_its_network_on_a_tiny_directory(tmp_path, network):
    """The GPU config as shipped, on 60 fake CIFAR-10 images with tiny budgets: the victims are
    batch-norm networks trained one after another, the brew keeps ‖Δ‖∞ ≤ ε (its best alignment is
    finite), and the poisoned victims' accuracy is recorded."""
    write_cifar(tmp_path / "cifar")
    training = {"epochs": 1, "lr": 0.01, "batch_size": 30, "momentum": 0.9, "weight_decay": 5e-4, "milestones": []}
    extra = [
        "--model.root", str(tmp_path / "cifar"), "--model.network", network, "--model.budget", "0.05",
        "--model.cases", "1", "--model.victims", "1", "--model.restarts", "1", "--model.steps", "2",
        "--model.poison_batch", "2", "--model.training", str(training), "--trainer.accelerator", "cpu",
    ]  # fmt: skip
    assert main(["test", *args("witches_brew_cifar10.yaml", tmp_path, *extra)]) == 0
    (out,) = (tmp_path / "logs").glob("*/version_0")
    (row,) = read(out / "success.csv")
    assert 0 <= float(row["poisoned_accuracy"]) <= 1 and 0 <= float(row["best_alignment"]) <= 2
    assert row["clean_flip"] in ("0", "1")


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (["--model.network", "vgg"], "model.init_args.network"),
        (["--model.network", "convnet"], "model.init_args.network"),  # blobs are vectors
        (["--model.augment", "{shift: 1.0}"], "model.init_args.augment"),  # blobs are vectors
        (["--model.dataset", "digits", "--model.augment", "{rotate: 1}"], "model.init_args.augment.rotate"),
        (
            ["--model.dataset", "digits", "--model.victim_augment", "{shift: 1.5}"],
            "model.init_args.victim_augment.shift",
        ),
        (["--model.ensemble", "0"], "model.init_args.ensemble"),
        (["--model.poison_batch", "0"], "model.init_args.poison_batch"),
        (["--model.clean_control", "maybe"], "model.init_args.clean_control"),
    ],
)
def test_bad_audit_options_exit_2_with_one_line(tmp_path, capsys, extra, key):
    assert main(["test", *args("witches_brew_blobs.yaml", tmp_path, *extra)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"bilevel-dist: error: {key}"), errors[0]
