"""The Witches' Brew audit fanned out by ``bilevel-dist tune`` (``stage: test``): one trial per
(case, victim seed), and a success table equal to one ``bilevel-dist test`` run of the same cases
and victims. Tiny settings (20 brew steps, 1 restart, 3 epochs) that still brew."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_tune import head  # noqa: F401 - the Ray head of our own on 127.0.0.1, a fixture

from bilevel_dist.cli import main
from bilevel_dist.recipes.security import WitchesBrewAudit
from bilevel_dist.recipes.security.witches_brew import success_rate

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "security" / "witches_brew_blobs.yaml"
SWEEP = ROOT / "recipes" / "security" / "witches_brew_sweep.yaml"
TRAINING = {"epochs": 3, "lr": 0.05, "batch_size": 64, "momentum": 0.9, "weight_decay": 5.0e-4}
TINY = {"model.steps": 20, "model.restarts": 1, "model.training": TRAINING}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def read(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_one_case_and_victim_seed_is_that_pair_of_the_full_audit():
    """``victim_seeds: [1]`` with ``seed: 1`` is case 1 × victim 1 of the audit of 2 cases × 2
    victims: the same case, the same brew, the same poisoned and clean victims."""
    settings = {key.removeprefix("model."): value for key, value in TINY.items()}
    full = WitchesBrewAudit(cases=2, victims=2, **settings)
    pair = WitchesBrewAudit(cases=1, seed=1, victim_seeds=[1], **settings)
    assert pair.victims == 1 and pair.victim_seeds == [1] and full.victim_seeds == [0, 1]
    whole, one = full.run_case(1), pair.run_case(0)
    assert one.case.target == whole.case.target and one.case.adversarial == whole.case.adversarial
    assert torch.equal(one.case.poisons, whole.case.poisons) and torch.equal(one.brew.delta, whole.brew.delta)
    assert one.poisoned.tolist() == whole.poisoned[1:].tolist() and one.clean.tolist() == whole.clean[1:].tolist()
    assert float(one.accuracy[0]) == pytest.approx(float(whole.accuracy[1]), abs=1e-12)


def _search(path: Path) -> Path:
    """The shipped search file at 2 cases × 2 victim seeds and the tiny budget."""
    search = yaml.safe_load(SWEEP.read_text())
    search["space"] = {"model.seed": {"grid": [0, 1]}, "model.victim_seeds": {"grid": [[0], [1]]}}
    search["fixed"] = {**search["fixed"], **TINY}
    path.write_text(yaml.safe_dump(search, sort_keys=False))
    return path


def test_sweep_of_two_cases_by_two_victims_prints_the_audits_success_table(head, tmp_path):  # noqa: F811
    # the audit in one `test` run, alongside the sweep (one thread, as in a 1-CPU trial)
    out = tmp_path / "audit"
    command = [sys.executable, "-m", "bilevel_dist.cli", "test", "--config", str(RECIPE), "--model.cases", "2"]
    command += ["--model.victims", "2", "--model.steps", "20", "--model.restarts", "1"]
    command += ["--model.training", str(TRAINING), "--trainer.logger.init_args.save_dir", str(out)]
    audit = subprocess.Popen(
        command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    tune = [sys.executable, "-m", "bilevel_dist.cli", "tune", "--address", head["address"], "--storage", "sweeps"]
    tune += ["--config", str(RECIPE), "--search", str(_search(tmp_path / "search.yaml")), "--name", "fan"]
    run = subprocess.run(tune, cwd=tmp_path, env=head["env"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    _, err = audit.communicate(timeout=300)
    assert audit.returncode == 0, err[-3000:]

    sweep = tmp_path / "sweeps" / "fan"
    trials = read(sweep / "results.csv")
    assert len(trials) == 4 and {t["status"] for t in trials} == {"OK"}
    (logs,) = out.glob("*/version_0")
    pairs = {(int(r["case"]), int(r["victim_seed"])): r for r in read(logs / "success.csv")}
    assert len(pairs) == 4
    for trial in trials:  # each trial is its pair of the audit: flips, poisoned and clean, and accuracy
        (victim,) = yaml.safe_load(trial["model.victim_seeds"])
        row = pairs[int(trial["model.seed"]), victim]
        assert float(trial["test_success"]) == int(row["poisoned_flip"]), (trial, row)
        assert float(trial["test_clean_success"]) == int(row["clean_flip"]), (trial, row)
        assert f"{float(trial['test_accuracy']):.4f}" == row["poisoned_accuracy"], (trial, row)

    # the printed table: per case the flips of the audit's victims, and the audit's mean ± SE
    table = (sweep / "success.md").read_text()
    assert table in run.stdout
    for case in (0, 1):
        flips = [pairs[case, v] for v in (0, 1)]
        poisoned, clean = (sum(int(r[key]) for r in flips) for key in ("poisoned_flip", "clean_flip"))
        assert f"| {case} | 0, 1 | {poisoned}/2 | {clean}/2 |" in table.splitlines()
    hits = torch.tensor([[int(pairs[c, v]["poisoned_flip"]) for v in (0, 1)] for c in (0, 1)])
    mean, se = success_rate(hits)
    logged = [r for r in read(logs / "metrics.csv") if r.get("test_success")][-1]
    assert float(logged["test_success"]) == pytest.approx(mean)
    assert float(logged["test_success_se"]) == pytest.approx(se)
    assert f"success {mean:.3f} ± {se:.3f} (poisoned)" in table
    print(f"\n{table}")


def test_success_table_counts_flips_per_case_from_trials_of_any_size(tmp_path, capsys):
    """A trial of several victims counts as its flips; a failed trial is left out and said; the
    mean ± SE is over the cases' rates, as :func:`success_rate` gives it."""
    import pandas

    from bilevel_dist.recipes.security.module import success_table

    rows = [
        ("OK", 0, [0, 1, 2, 3], 0.75, 0.0),
        ("OK", 1, [0, 1], 0.5, 0.5),
        ("OK", 1, [2], 1.0, 0.0),
        ("OK", 1, [3], 0.0, 0.0),
        ("ERROR", 0, [4], None, None),
    ]
    columns = ["status", "model.seed", "model.victim_seeds", "test_success", "test_clean_success"]
    text = success_table(pandas.DataFrame(rows, columns=columns), str(tmp_path))
    assert "| 0 | 0, 1, 2, 3 | 3/4 | 0/4 |" in text and "| 1 | 0, 1, 2, 3 | 2/4 | 1/4 |" in text
    mean, se = success_rate(torch.tensor([[0.75], [0.5]]))
    assert f"success {mean:.3f} ± {se:.3f} (poisoned), 0.125 ± 0.125 (clean control)" in text
    assert "1 trial(s) failed and are left out" in text
    assert (tmp_path / "success.md").read_text() == text + "\n" and text in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stage": "tset"}, "stage: must be fit or test, got 'tset'"),
        ({"scheduler": "asha"}, "scheduler: stage test reports once a trial, nothing to stop early; use fifo"),
        ({"workers": 2}, "workers: stage test runs each trial in one process"),
        ({"metric": "val_success"}, "metric: 'val_success' is not logged in test by WitchesBrewAudit"),
    ],
    ids=["stage", "scheduler", "workers", "metric"],
)
def test_bad_stage_settings_exit_2_with_one_line(change, message, tmp_path, capsys):
    import ray

    search = {**yaml.safe_load(SWEEP.read_text()), **change}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search))
    code = main(["tune", "--config", str(RECIPE), "--search", str(path), "--storage", str(tmp_path / "sweeps")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bilevel-dist: error: ") and message in err, err
    assert not (tmp_path / "sweeps").exists() and not ray.is_initialized()
