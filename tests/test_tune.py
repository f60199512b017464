"""``bilevel-dist tune``: sweeps of the denoising recipe on a real Ray head on 127.0.0.1."""

import csv
import glob
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bilevel_dist.cli import main
from bilevel_dist.tune import set_key, trial_config

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "data_denoising" / "digits.yaml"
SEARCH = ROOT / "recipes" / "data_denoising" / "search.yaml"
BUDGET = {"model.baselines": [], "trainer.max_steps": 100, "trainer.val_check_interval": 25}
QUICK_FIT = ["--model.init_args.baselines", "[]", "--trainer.enable_progress_bar", "false"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head of our own on 127.0.0.1 with token authentication; torn down by process group
    and by its temp dir, so that no other Ray on the machine is touched."""
    temp_dir = Path(tmp_path_factory.mktemp("ray", numbered=True))
    port, dashboard = _free_port(), _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "scripts"), os.environ.get("PYTHONPATH", "")]),
        "RAY_DEDUP_LOGS": "0",
        "WANDB_MODE": "offline",
    }
    command = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1"]
    command += [f"--port={port}", f"--dashboard-port={dashboard}", "--num-cpus=2", "--num-gpus=0"]
    for option in ("node-manager", "object-manager", "ray-client-server", "dashboard-agent-grpc", "runtime-env-agent"):
        command.append(f"--{option}-port={_free_port()}")  # none of Ray's fixed defaults: another Ray may hold them
    command += [f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
    command += [f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while subprocess.run(["ray", "status", f"--address={address}"], env=env, capture_output=True).returncode:
        assert process.poll() is None and time.time() < deadline, "the Ray head did not start"
        time.sleep(1)
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:  # the head drains for up to 30 s; nothing of it is needed any more
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for pid in _pids_mentioning(str(temp_dir)):  # workers that left the process group
        os.kill(pid, signal.SIGKILL)


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if text in Path(cmdline).read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.split("/")[2]))
        except OSError:
            continue
    return [pid for pid in pids if pid != os.getpid()]


def _search(path: Path, **settings) -> Path:
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def _tune(head, *args, cwd, timeout=300, env=None):
    command = [sys.executable, "-m", "bilevel_dist.cli", "tune", "--address", head["address"], "--storage", "sweeps"]
    command += args
    return subprocess.run(
        command, cwd=cwd, env={**head["env"], **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def _results(sweep: Path) -> list[dict]:
    with open(sweep / "results.csv") as handle:
        return list(csv.DictReader(handle))


def _last_validation(metrics_csv: Path, key: str = "val_outer_loss") -> float:
    with open(metrics_csv) as handle:
        values = [row[key] for row in csv.DictReader(handle) if row.get(key)]
    return float(values[-1])


def _trial_dirs(sweep: Path) -> dict[str, Path]:
    """Trial id (``abcde_00001``, as the random searcher numbers trials) to trial directory."""
    return {"_".join(d.name.split("_")[2:4]): d for d in sweep.glob("run_trial_*") if d.is_dir()}


def _fit(config: Path, cwd: Path, *overrides: str) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "bilevel_dist.cli", "fit", "--config", str(config), *QUICK_FIT, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in a 1-CPU trial: the same float reduction order
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _fitted(process: subprocess.Popen, cwd: Path) -> float:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    return _last_validation(cwd / "logs" / "lightning_logs" / "version_0" / "metrics.csv")


# -- the sweep -------------------------------------------------------------------------------------


def test_eight_trial_sweep_best_config_fits_at_least_as_well_as_the_recipe(head, tmp_path):
    shipped = yaml.safe_load(SEARCH.read_text())
    # FIFO: ASHA could stop the recipe's own trial early, and then there is no full-budget value to compare
    search = _search(
        tmp_path / "search.yaml", **{**shipped, "fixed": {**shipped["fixed"], **BUDGET}, "scheduler": "fifo"}
    )
    run = _tune(head, "--config", str(RECIPE), "--search", str(search), "--name", "s", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    sweep = tmp_path / "sweeps" / "s"
    rows = _results(sweep)
    assert len(rows) == 8 and {row["status"] for row in rows} == {"OK"}
    # the recipe's own values are the first trial (include_recipe)
    first = min(rows, key=lambda row: row["trial"])
    assert float(first["model.algorithm.outer_lr"]) == 100.0 and float(first["model.algorithm.inner_lr"]) == 0.5
    best_reported = min(float(row["val_outer_loss"]) for row in rows if row["step"] == "100")
    assert f"best config: {sweep / 'best.yaml'}" in run.stdout

    # `fit --config best.yaml` runs as is and reproduces the best trial; the recipe at the same budget is no better
    best_fit = _fit(sweep / "best.yaml", tmp_path / "best")
    budget = ["--trainer.max_steps", "100", "--trainer.val_check_interval", "25"]
    recipe_fit = _fit(RECIPE, tmp_path / "recipe", *budget)
    best, recipe = _fitted(best_fit, tmp_path / "best"), _fitted(recipe_fit, tmp_path / "recipe")
    print(f"\nsweep of 8: best val_outer_loss {best:.6g} (reported {best_reported:.6g}); recipe {recipe:.6g}")
    assert best == pytest.approx(best_reported, rel=1e-12)
    assert recipe == pytest.approx(float(first["val_outer_loss"]), rel=1e-12)
    assert best <= recipe


def test_privacy_audit_sweep_reports_psnr_by_setting_and_the_noise_curve(head, tmp_path):
    """The privacy recipe's audit file at a tiny budget: 2 images × 2 noise multipliers; its
    report averages each setting's trials over the images and draws PSNR against the noise."""
    shipped = yaml.safe_load((ROOT / "recipes" / "privacy" / "audit.yaml").read_text())
    budget = {"trainer.max_steps": 20, "trainer.val_check_interval": 20, "model.width": 2}
    space = {"data.first": {"grid": [1, 2]}, "model.noise_multiplier": {"grid": [0.0, 0.01]}}
    search = _search(tmp_path / "audit.yaml", **{**shipped, "space": space, "fixed": {**shipped["fixed"], **budget}})
    recipe = ROOT / "recipes" / "privacy" / "fedsgd_photo.yaml"
    run = _tune(head, "--config", str(recipe), "--search", str(search), "--name", "audit", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    sweep = tmp_path / "sweeps" / "audit"
    rows = _results(sweep)
    assert len(rows) == 4 and {row["status"] for row in rows} == {"OK"}
    table = (sweep / "audit.md").read_text().splitlines()
    assert len(table) == 4  # header, rule, one row per noise multiplier
    for line in table[2:]:
        noise, images, spread, _ = (cell.strip() for cell in line.strip("|").split("|"))
        psnrs = [float(row["val_psnr"]) for row in rows if float(row["model.noise_multiplier"]) == float(noise)]
        mean = sum(psnrs) / len(psnrs)
        assert images == "2" and spread.startswith(f"{mean:.2f} ± ")
    assert (sweep / "psnr_vs_noise.png").stat().st_size > 1000


def test_sweep_submitted_through_the_jobs_api_finishes_with_one_wandb_run_per_trial(head, tmp_path):
    search = _search(
        tmp_path / "search.yaml",
        metric="val_outer_loss",
        mode="min",
        num_samples=2,
        space={"model.algorithm.outer_lr": {"loguniform": [10.0, 1000.0]}},
        fixed={**BUDGET, "trainer.max_steps": 50},
        searcher="optuna",
        wandb={"project": "bilevel-dist-test"},
    )
    job = f"tune-{secrets.token_hex(4)}"
    entrypoint = ["bilevel-dist", "tune", "--config", str(RECIPE), "--search", str(search)]
    entrypoint += ["--storage", f"{tmp_path}/sweeps", "--name", "sweep-via-jobs"]
    jobs = ["ray", "job"]
    address = f"--address={head['dashboard']}"
    submit = [*jobs, "submit", address, f"--submission-id={job}", "--no-wait", "--", *entrypoint]
    submitted = subprocess.run(submit, env=head["env"], capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    deadline = time.time() + 300
    while True:
        status = subprocess.run([*jobs, "status", address, job], env=head["env"], capture_output=True, text=True)
        said = (status.stdout + status.stderr).lower()
        if any(f"job '{job}' {word}" in said for word in ("succeeded", "failed", "stopped")):
            break
        assert time.time() < deadline, "the job did not finish"
        time.sleep(2)
    logs = subprocess.run([*jobs, "logs", address, job], env=head["env"], capture_output=True, text=True)
    assert f"job '{job}' succeeded" in said, (logs.stdout + logs.stderr)[-3000:]
    assert "best config:" in logs.stdout + logs.stderr
    sweep = tmp_path / "sweeps" / "sweep-via-jobs"
    rows = _results(sweep)
    assert len(rows) == 2 and {row["status"] for row in rows} == {"OK"}
    assert 100.0 in {float(row["model.algorithm.outer_lr"]) for row in rows}  # the recipe's own value runs too
    for trial in rows:  # one offline wandb run per trial, named after it and grouped under the sweep
        (run,) = glob.glob(f"{sweep}/run_trial_{trial['trial']}_*/logs/wandb/offline-run-*/run-*.wandb")
        record = Path(run).read_bytes()
        assert b"sweep-via-jobs" in record and b"bilevel-dist-test" in record and b"val_outer_loss" in record
        assert f"run_trial_{trial['trial']}".encode() in record


def test_a_crashed_trial_is_retried_from_its_last_checkpoint(head, tmp_path):
    marker = tmp_path / "killed"
    kill = {"class_path": "kill_at.KillOnceAt", "init_args": {"step": 60, "marker": str(marker)}}
    search = _search(
        tmp_path / "search.yaml",
        metric="val_outer_loss",
        mode="min",
        num_samples=2,  # two identical trials: one is killed at step 60, after the checkpoint of step 50
        space={"model.algorithm.inner_steps": {"grid": [5]}},
        fixed={**BUDGET, "trainer.callbacks": [kill]},
        include_recipe=False,
        scheduler="fifo",
        max_failures=1,
    )
    run = _tune(head, "--config", str(RECIPE), "--search", str(search), "--name", "c", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = _results(tmp_path / "sweeps" / "c")
    assert {row["status"] for row in rows} == {"OK"} and len(rows) == 2
    assert rows[0]["val_outer_loss"] == rows[1]["val_outer_loss"]  # the resumed trial is bitwise the other one
    killed = _trial_dirs(tmp_path / "sweeps" / "c")[marker.read_text()]
    versions = sorted(p.name for p in (killed / "logs" / "lightning_logs").iterdir())
    assert versions == ["version_0", "version_1"]
    with open(killed / "logs" / "lightning_logs" / "version_1" / "metrics.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert min(steps) == 50  # restarted from the step-50 checkpoint, not from scratch


def test_a_killed_driver_resumes_without_rerunning_finished_trials(head, tmp_path):
    search = _search(
        tmp_path / "search.yaml",
        metric="val_outer_loss",
        mode="min",
        space={"model.algorithm.outer_lr": {"grid": [25.0, 50.0, 100.0, 200.0]}},
        fixed=BUDGET,
        include_recipe=False,
        scheduler="fifo",
        max_concurrent=1,
    )
    sweep = tmp_path / "sweeps" / "k"
    command = [sys.executable, "-m", "bilevel_dist.cli", "tune", "--address", head["address"], "--config", str(RECIPE)]
    command += ["--search", str(search), "--storage", "sweeps", "--name", "k"]
    env = {**head["env"], "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # snapshot the sweep's state every second
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(finished := _terminated(sweep)) < 2:
        assert driver.poll() is None and time.time() < deadline, "the sweep did not get going"
        time.sleep(0.5)
    driver.kill()
    driver.wait()
    assert len(finished) < 4
    resumed = _tune(head, "--resume", str(sweep), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _results(sweep)
    assert len(rows) == 4 and {row["status"] for row in rows} == {"OK"}
    assert {float(row["model.algorithm.outer_lr"]) for row in rows} == {25.0, 50.0, 100.0, 200.0}
    trials = _trial_dirs(sweep)
    for trial in finished:  # one run and four reports each: not run again
        assert [p.name for p in (trials[trial] / "logs" / "lightning_logs").iterdir()] == ["version_0"]
        assert len((trials[trial] / "result.json").read_text().splitlines()) == 4


def _terminated(sweep: Path) -> set[str]:
    """The trials the sweep's last state snapshot records as finished."""
    done = set()
    for state in sweep.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):
            continue
        done |= {meta["trial_id"] for meta in map(json.loads, (t[0] for t in trials)) if meta["status"] == "TERMINATED"}
    return done


def _two_worker_trial(head, tmp_path, recipe: Path, metric: str, space: dict, fixed: dict, name: str) -> dict:
    """One trial of ``recipe`` as a Ray Train run of 2 workers, float64; its results row."""
    search = _search(
        tmp_path / "search.yaml",
        metric=metric,
        mode="min",
        space=space,
        fixed={**fixed, "trainer.precision": "64-true"},
        include_recipe=False,
        workers=2,
        resources={"cpu": 1},
    )
    run = _tune(head, "--config", str(recipe), "--search", str(search), "--name", name, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = _results(tmp_path / "sweeps" / name)
    assert row["status"] == "OK" and row["step"] == str(fixed["trainer.max_steps"])
    return row


def test_a_two_worker_trial_equals_the_one_process_replay_of_its_shards(head, tmp_path):
    budget = {**BUDGET, "trainer.max_steps": 40, "trainer.val_check_interval": 20}
    space = {"model.algorithm.inner_steps": {"grid": [5]}}
    row = _two_worker_trial(head, tmp_path, RECIPE, "val_outer_loss", space, budget, "w")
    overrides = ["--trainer.max_steps", "40", "--trainer.val_check_interval", "20", "--trainer.precision", "64-true"]
    replay = _fitted(_fit(RECIPE, tmp_path / "replay", *overrides, "--data.init_args.shards", "2"), tmp_path / "replay")
    print(f"\n2-worker trial val_outer_loss {row['val_outer_loss']}, 1-process replay of 2 shards {replay!r}")
    assert float(row["val_outer_loss"]) == pytest.approx(replay, rel=1e-10, abs=0)


def test_a_two_worker_federated_trial_equals_one_process(head, tmp_path):
    """The federated recipe as a Ray Train trial of 2 workers: the sampled clients split across
    them, one all-reduce a round; the same run in one process gives the same validation loss."""
    recipe = ROOT / "recipes" / "federated" / "digits_fedavg.yaml"
    budget = {"trainer.max_steps": 6, "trainer.val_check_interval": 3}
    space = {"model.algorithm.local_lr": {"grid": [0.1]}}
    row = _two_worker_trial(head, tmp_path, recipe, "val_loss", space, budget, "fed")
    overrides = ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.precision", "64-true"]
    one = tmp_path / "one"
    one.mkdir()
    command = [sys.executable, "-m", "bilevel_dist.cli", "fit", "--config", str(recipe), *overrides]
    fit = subprocess.run(command, cwd=one, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert fit.returncode == 0, fit.stderr[-2000:]
    (metrics,) = one.glob("**/version_0/metrics.csv")
    replay = _last_validation(metrics, "val_loss")
    print(f"\n2-worker federated trial val_loss {row['val_loss']}, 1 process {replay!r}")
    assert float(row["val_loss"]) == pytest.approx(replay, rel=1e-10, abs=0)


# -- mistakes caught before any trial ----------------------------------------------------------

GOOD = {
    "metric": "val_outer_loss",
    "mode": "min",
    "space": {"model.algorithm.outer_lr": {"loguniform": [10.0, 1000.0]}},
}
MALFORMED = [
    ({**GOOD, "metrc": "x"}, "metrc: unknown setting (did you mean metric?)"),
    ({**GOOD, "space": {"model.algorithm.outer_lr": {"logunifrom": [1, 2]}}}, "outer_lr: unknown distribution"),
    ({**GOOD, "space": {"model.algorithm.outer_lr": {"loguniform": [0, 2]}}}, "loguniform needs low > 0"),
    ({**GOOD, "space": {"model.algorithm.outer_lr": 5}}, "space.model.algorithm.outer_lr: must be one distribution"),
    ({**GOOD, "metric": "val_acc"}, "metric: 'val_acc' is not logged by Denoising; it logs val_outer_loss, val_acc"),
    ({**GOOD, "space": {"model.algoritm.lr": {"choice": [1]}}}, "space.model.algoritm.lr: 1 does not make a run"),
    ({**GOOD, "space": {"model.algorithm.inner_steps": {"choice": [5, -1]}}}, "inner_steps: -1 does not make a run"),
    ({**GOOD, "scheduler": {"name": "asha", "grace": 1}}, "scheduler.grace: is not a asha option"),
    ({**GOOD, "mode": "maximum"}, "mode: must be min or max"),
    ({**GOOD, "scheduler": {"name": "asha", "grace_period": 0}}, "scheduler: grace_period must be positive!"),
    ({**GOOD, "scheduler": {"name": "asha", "time_attr": "stp"}}, "scheduler.time_attr: must be one of"),
    ({**GOOD, "searcher": {"name": "optuna", "sampler": "tpe"}}, "searcher: You can only pass an instance"),
    ({**GOOD, "space": {"model.algorithm.inner_steps": {"uniform": [3, 10]}}}, "3.0 does not make a run"),
    ({**GOOD, "resources": {"cpu": 1, "gpu": 2}}, "resources.gpu: is 0, 1 or a fraction of one per trial"),
    ({**GOOD, "report": "summary"}, "report: must be package.module:function"),
    ({**GOOD, "report": "bilevel_dist.nope:table"}, "report: cannot import 'bilevel_dist.nope:table'"),
]


@pytest.mark.parametrize(("search", "message"), MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_search_fails_in_one_line_before_any_trial(search, message, tmp_path, capsys):
    import ray

    path = _search(tmp_path / "search.yaml", **search)
    code = main(["tune", "--config", str(RECIPE), "--search", str(path), "--storage", str(tmp_path / "sweeps")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bilevel-dist: error: ") and message in err, err
    assert not (tmp_path / "sweeps").exists() and not ray.is_initialized()


def test_malformed_search_from_the_shell_exits_2_without_traceback(tmp_path):
    path = _search(tmp_path / "search.yaml", **{**GOOD, "metric": "val_acc"})
    command = [sys.executable, "-m", "bilevel_dist.cli", "tune", "--config", str(RECIPE), "--search", str(path)]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"bilevel-dist: error: {path}: metric: 'val_acc'")
    assert not (tmp_path / "sweeps").exists()


# -- trial configs -------------------------------------------------------------------------------


def test_trial_config_keeps_outputs_in_the_trial_and_groups_wandb_runs(tmp_path):
    recipe = yaml.safe_load(RECIPE.read_text())
    set_key(recipe, "model.algorithm.outer_lr", 7.0)
    set_key(recipe, "trainer.max_steps", 9)
    assert recipe["model"]["init_args"]["algorithm"]["outer_lr"] == 7.0 and recipe["trainer"]["max_steps"] == 9
    config = trial_config(recipe, tmp_path, wandb={"project": "p"}, group="sweep", name="t1")
    trainer = config["trainer"]
    assert trainer["default_root_dir"] == str(tmp_path)
    assert trainer["callbacks"] == [] and trainer["enable_checkpointing"] is False  # Tune keeps the checkpoints
    csv_logger, wandb_logger = trainer["logger"]
    assert csv_logger["init_args"]["save_dir"] == str(tmp_path / "logs")
    assert wandb_logger["init_args"] == {
        "project": "p",
        "save_dir": str(tmp_path / "logs"),
        "group": "sweep",
        "name": "t1",
        "id": "sweep-t1",
        "resume": "allow",
    }
    assert recipe["trainer"]["callbacks"][0]["class_path"].endswith("ModelCheckpoint")  # the recipe is untouched


def test_best_config_is_the_best_finite_trial_that_ran_the_whole_budget(tmp_path, capsys):
    from types import SimpleNamespace

    from bilevel_dist.tune import parse
    from bilevel_dist.tune.sweep import _report

    search = parse({**GOOD, "fixed": {"trainer.max_steps": 100}})

    def result(trial, lr, step, loss, error=None):
        metrics = {"trial_id": trial, "step": step, "training_iteration": step // 25, "val_outer_loss": loss}
        return SimpleNamespace(metrics=metrics, config={"model.algorithm.outer_lr": lr}, error=error, checkpoint=None)

    results = [
        result("a", 10.0, 100, 0.30),
        result("b", 20.0, 50, 0.01),  # better, but stopped early by the scheduler
        result("c", 30.0, 100, float("nan")),  # diverged
        result("d", 40.0, 100, 0.20),
        result("e", 50.0, 75, 0.00, error=RuntimeError("crashed")),
    ]
    recipe = yaml.safe_load(RECIPE.read_text())
    assert _report(results, recipe, search, str(tmp_path)) == 0
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["model"]["init_args"]["algorithm"]["outer_lr"] == 40.0 and best["trainer"]["max_steps"] == 100
    assert [row["trial"] for row in _results(tmp_path)] == ["b", "d", "a", "c", "e"]
    assert "3 of 5 trials finished" in capsys.readouterr().out
