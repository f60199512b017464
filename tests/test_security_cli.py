"""The security audits from the command line (``WitchesBrewAudit``, ``BackdoorAudit``): ``test``
reproduces the library's ``attack_case`` and ``run_seed`` exactly; bad input (ε ≤ 0, a budget
above 100%, a target outside the test set, a trigger larger than the image) exits 2 with one
line naming the key."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bilevel_dist.cli import main
from bilevel_dist.recipes.security import attack_case, blobs
from bilevel_dist.recipes.security.backdoor import BLOConfig, Setting, average, run_seed
from bilevel_dist.recipes.security.networks import mlp

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "security"


pytestmark = pytest.mark.usefixtures("one_thread")


def args(config: str, root: Path, *extra: str) -> list[str]:
    """``config`` writing under ``root``."""
    return [
        "--config", str(RECIPES / config),
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root / "logs"), *extra,
    ]  # fmt: skip


def read(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_witches_brew_cli_is_attack_case(tmp_path):
    """One case, 4 victims, 40 brew steps, 10 epochs: the CSV's flips, poisoned and clean, are exactly
    ``attack_case``'s with the same settings (case seed 0, victims 0–3), and the logged success
    is their mean."""
    training = {"epochs": 10, "lr": 0.05, "batch_size": 64}  # not train_victims' defaults: they must reach it
    extra = ["--model.cases", "1", "--model.victims", "4", "--model.steps", "40", "--model.training", str(training)]
    assert main(["test", *args("witches_brew_blobs.yaml", tmp_path, *extra)]) == 0
    (out,) = (tmp_path / "logs").glob("*/version_0")
    rows = read(out / "success.csv")
    assert [int(r["victim_seed"]) for r in rows] == [0, 1, 2, 3]

    x, y, x_test, y_test = blobs(0)
    direct = attack_case(
        mlp([64, 128, 128, 10]), x, y, x_test, y_test, eps=1.0, budget=0.01, seed=0, victim_seeds=range(4),
        restarts=4, steps=40, lr=0.4, training=training,
    )  # fmt: skip
    assert {int(r["target"]) for r in rows} == {direct.case.target}
    assert {int(r["adversarial"]) for r in rows} == {direct.case.adversarial}
    assert [bool(int(r["poisoned_flip"])) for r in rows] == direct.poisoned.tolist()
    assert [bool(int(r["clean_flip"])) for r in rows] == direct.clean.tolist()
    metrics = [r for r in read(out / "metrics.csv") if r.get("test_success")]
    assert float(metrics[-1]["test_success"]) == pytest.approx(float(direct.poisoned.float().mean()))
    assert (out / "success.png").stat().st_size > 1000


def test_backdoor_cli_is_run_seed(tmp_path):
    """Tiny settings (2 seeds, 3 BLO steps, 2 epochs): the CSV's mean rows equal
    ``average(run_seed(...))`` and the example figure is written."""
    blo = '{"iters": 3, "pretrain": 1}'
    extra = ["--model.seeds", "[0, 1]", "--model.epochs", "2", "--model.blo", blo]
    assert main(["test", *args("backdoor_digits.yaml", tmp_path, *extra)]) == 0
    (out,) = (tmp_path / "logs").glob("*/version_0")
    rows = [r for r in read(out / "backdoor.csv") if r["seed"] == "mean"]
    setting = Setting(epochs=2, blo=BLOConfig(iters=3, pretrain=1))
    expected = average([run_seed(setting, seed) for seed in (0, 1)])
    for row in rows:
        for metric in ("benign", "attack", "artefact"):
            value = expected[row["method"]][metric]
            assert row[metric] == ("NA" if value is None else f"{value:.6f}"), (row, metric)
    assert {r["method"] for r in rows} == {"clean", "heuristic", "blo"}
    assert (out / "backdoor.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("command", "config", "extra", "key"),
    [
        ("test", "witches_brew_blobs.yaml", ["--model.eps", "0"], "model.init_args.eps"),
        ("test", "witches_brew_blobs.yaml", ["--model.budget", "1.5"], "model.init_args.budget"),
        ("test", "witches_brew_blobs.yaml", ["--model.target", "100000"], "model.init_args.target"),
        ("test", "backdoor_digits.yaml", ["--model.trigger_size", "20"], "model.init_args.trigger_size"),
        ("test", "backdoor_digits.yaml", ["--model.ratio", "0"], "model.init_args.ratio"),
        ("fit", "witches_brew_blobs.yaml", [], "model.class_path"),
    ],
)
def test_bad_input_exits_2_with_one_line(command, config, extra, key, tmp_path, capsys):
    assert main([command, *args(config, tmp_path, *extra)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"bilevel-dist: error: {key}"), errors[0]
