"""``bilevel-dist tune``: a Ray Tune sweep over a recipe's config keys.

:func:`prepare` checks the recipe and SEARCH.yaml together before Ray starts: every searched value
(each choice, both ends of a range) must build the recipe's model, data and trainer, and the
metric must be one the model logs. :func:`run` runs (or, from the sweep's directory, resumes) the
sweep, prints a results table and writes the best trial's config as ``best.yaml``, which
``bilevel-dist fit --config`` runs as is. With ``stage: test`` a trial is the run of
``bilevel-dist test`` instead, reporting the model's ``test_metrics`` once (an audit's grid).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bilevel_dist._checks import ConfigError, is_number, one_line
from bilevel_dist.lightning_cli import UserError, cli_class
from bilevel_dist.tune.search import Search, parse, read_yaml, report_function
from bilevel_dist.tune.trial import get_key, run_trial, trial_config, with_settings

SWEEP_FILE = "bilevel_sweep.yaml"  # the recipe and the search, for --resume
BEST_FILE = "best.yaml"
RESULTS_FILE = "results.csv"


def prepare(recipe_path: str | Path, search: Search) -> tuple[dict[str, Any], tuple[str, ...], dict[str, Any]]:
    """The recipe as a mapping, the model's validation metrics (its test metrics with ``stage:
    test``) and the recipe's own values of the searched keys, after checking every searched value
    against the recipe (see module doc)."""
    recipe = read_yaml(recipe_path, "config")
    if not isinstance(recipe, dict):
        raise ConfigError("config", f"{recipe_path} is not a fit config (a mapping of model, data, trainer)")
    # as a trial builds it: with the trial's loggers (wandb's among them) and callbacks
    with tempfile.TemporaryDirectory() as scratch:
        base = trial_config(with_settings(recipe, search.fixed), Path(scratch), wandb=search.wandb, group="-", name="-")
        return _check(recipe, base, search)


def _check(recipe: dict[str, Any], base: dict[str, Any], search: Search) -> tuple[Any, ...]:
    """:func:`prepare`'s checks on ``base``, the recipe as a trial runs it."""
    try:
        cli = _build(base)
    except UserError as error:
        raise ConfigError("fixed" if search.fixed else "config", str(error)) from None
    name = type(cli.model).__name__
    if search.stage == "test":
        logged = tuple(getattr(cli.model, "test_metrics", ()))
        if not logged:
            raise ConfigError("stage", f"{name} declares no test_metrics (the metrics its test logs) to report")
    else:
        logged = cli.model.validation_metrics
    if search.metric not in logged:
        what = "" if search.stage == "fit" else " in test"
        raise ConfigError("metric", f"{search.metric!r} is not logged{what} by {name}; it logs {', '.join(logged)}")
    for key in search.space:
        for value in search.candidates(key):
            try:
                _build(with_settings(base, {key: value}))
            except UserError as error:
                raise ConfigError(f"space.{key}", f"{value!r} does not make a run: {error}") from None
    values = _recipe_values(cli.config.as_dict(), search)
    for key, build in (("scheduler", lambda: _scheduler(search)), ("searcher", lambda: _searcher(search, [values]))):
        try:
            build()
        except (AssertionError, TypeError, ValueError) as error:
            raise ConfigError(key, one_line(error) or type(error).__name__) from None
    return recipe, logged, values


def _recipe_values(parsed: dict[str, Any], search: Search) -> dict[str, Any]:
    """The recipe's own value of each searched key that the space can give: the first trial."""
    values = {}
    for key in search.space:
        found, value = get_key(parsed, key)
        if found and search.contains(key, value):
            values[key] = value
    return values


def run(
    recipe_path: str | Path | None,
    search: Search | None,
    *,
    name: str | None = None,
    storage: str = "sweeps",
    address: str | None = None,
    resume: str | None = None,
) -> int:
    """Runs a new sweep (``recipe_path`` and ``search``) or resumes the one in ``resume``; the
    exit code is 1 when no trial finished."""
    if resume is not None:
        sweep_dir = _absolute(resume)
        saved = _read_sweep(sweep_dir)
        recipe, search, launch_dir = saved["recipe"], parse(saved["search"]), saved["launch_dir"]
        storage, name = sweep_dir.rsplit("/", 1)
        metrics = saved["metrics"]
    else:
        assert recipe_path is not None and search is not None
        recipe, metrics, values = prepare(recipe_path, search)
        launch_dir = os.getcwd()
        name = name or f"{Path(recipe_path).stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        storage = _absolute(storage)
        sweep_dir = f"{storage}/{name}"
        if _exists(f"{sweep_dir}/{SWEEP_FILE}"):
            raise ConfigError("name", f"a sweep named {name!r} is already in {storage}; use --resume {sweep_dir}")
        metrics = list(metrics)
        points = [values] if search.include_recipe else []
    plan = {
        "recipe": recipe,
        "fixed": search.fixed,
        "metrics": metrics,
        "wandb": search.wandb,
        "name": name,
        "storage": storage,
        "launch_dir": launch_dir,
        "workers": search.workers,
        "cpu": search.cpu,
        "gpu": search.gpu,
        "max_failures": search.max_failures,
        "keep_checkpoints": search.keep_checkpoints,
        "stage": search.stage,
    }
    import ray
    from ray import tune

    if not ray.is_initialized():
        local = address is None and not os.environ.get("RAY_ADDRESS")
        ray.init(address=address, **({"include_dashboard": False} if local else {}))
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), _resources(search))
    if resume is not None:
        if not tune.Tuner.can_restore(sweep_dir):
            raise ConfigError("resume", f"{sweep_dir} holds no Tune state to resume (the sweep never started)")
        tuner = tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _tuner(trainable, search, points, name, storage)
        saved = {"recipe": recipe, "search": search.as_dict(), "launch_dir": launch_dir, "metrics": metrics}
        store(f"{sweep_dir}/{SWEEP_FILE}", yaml.safe_dump(saved, sort_keys=False))
    results = tuner.fit()
    return _report(results, recipe, search, sweep_dir, metrics)


def _tuner(trainable: Any, search: Search, points: list[dict[str, Any]], name: str, storage: str) -> Any:
    from ray import tune

    return tune.Tuner(
        trainable,
        param_space={key: _distribution(kind, args) for key, (kind, args) in search.space.items()},
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=search.mode,
            num_samples=search.num_samples,
            scheduler=_scheduler(search),
            search_alg=_searcher(search, points),
            # a multi-worker trial reserves nothing itself: without a limit every trial would start
            # a worker group at once and wait for resources
            max_concurrent_trials=search.max_concurrent or (1 if search.workers > 1 else None),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            # Ray Train retries a multi-worker trial itself
            failure_config=tune.FailureConfig(max_failures=search.max_failures if search.workers == 1 else 0),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=search.keep_checkpoints),
            sync_config=tune.SyncConfig(sync_artifacts=True),  # the trials' logs go to the sweep's storage
            verbose=1,
        ),
    )


def _scheduler(search: Search) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    name, options = search.scheduler
    return {"asha": ASHAScheduler, "median": MedianStoppingRule, "fifo": FIFOScheduler}[name](**options)


def _searcher(search: Search, points: list[dict[str, Any]]) -> Any:
    points = [point for point in points if point] or None
    name, options = search.searcher
    if name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(points_to_evaluate=points, seed=search.seed, **options)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points, random_state=search.seed)


def _distribution(kind: str, args: list[Any]) -> Any:
    from ray import tune

    if kind == "grid":
        return tune.grid_search(args)
    if kind == "choice":
        return tune.choice(args)
    return getattr(tune, kind)(*args)


def _resources(search: Search) -> dict[str, float]:
    """A single-worker trial holds its resources; a multi-worker trial only drives its worker
    group, which asks for the resources per worker itself (Tune wants a non-empty request: one
    byte of memory)."""
    return {"cpu": search.cpu, "gpu": search.gpu} if search.workers == 1 else {"cpu": 0, "memory": 1}


def _report(results: Any, recipe: dict[str, Any], search: Search, sweep_dir: str, metrics: Any = ()) -> int:
    """Prints the results table (every validation metric the model logs in ``metrics``, or test
    metric with ``stage: test``, ranked by the searched one), writes it as CSV and the best config
    as YAML, then runs the search's ``report`` on the table."""
    rows, logged, fit = [], metrics, search.stage == "fit"
    for result in results:
        metrics = result.metrics or {}
        row = {"trial": metrics.get("trial_id", "?"), "status": "ERROR" if result.error else "OK"}
        row.update({key: (result.config or {}).get(key) for key in search.space})
        if fit:  # a test trial reports once, with no step
            row.update(step=metrics.get("step"), validations=metrics.get("training_iteration"))
        row[search.metric] = metrics.get(search.metric)
        row.update({key: metrics.get(key) for key in logged if key != search.metric})
        rows.append((result, row))
    sign = 1 if search.mode == "min" else -1
    ranked = [item for item in rows if _usable(item[1], search.metric)]
    ranked.sort(key=lambda item: sign * item[1][search.metric])
    rows = ranked + [item for item in rows if not _usable(item[1], search.metric)]
    import pandas

    table = pandas.DataFrame([row for _, row in rows])
    when = "last validation" if fit else "test"
    print(f"\n{len(ranked)} of {len(rows)} trials finished; {search.metric} ({search.mode}), {when}:")
    print(table.to_string(index=False))
    store(f"{sweep_dir}/{RESULTS_FILE}", table.to_csv(index=False))
    if not ranked:
        _summarise(search, table, sweep_dir)
        print(f"bilevel-dist: no trial finished with a finite {search.metric}; see the trials under {sweep_dir}")
        return 1
    # the best of the trials that ran the whole budget: one the scheduler stopped early is not the
    # run ``fit`` makes from its config
    longest = max(row.get("step") or 0 for _, row in ranked)
    result, row = next(item for item in ranked if (item[1].get("step") or 0) == longest)
    best = with_settings(recipe, {**search.fixed, **{key: result.config[key] for key in search.space}})
    path = f"{sweep_dir}/{BEST_FILE}"
    store(
        path,
        f"# best trial {row['trial']} of sweep {sweep_dir}: {search.metric} = {row[search.metric]}\n"
        + yaml.safe_dump(best, sort_keys=False),
    )
    print(f"best trial {row['trial']}: {search.metric} = {row[search.metric]:.6g}")
    print(f"best config: {path}  (bilevel-dist {search.stage} --config {path})")
    # a multi-worker trial's checkpoints are Ray Train's; Tune only hears of their path
    checkpoint = result.checkpoint.path if result.checkpoint is not None else result.metrics.get("checkpoint_path")
    if checkpoint:
        print(f"best checkpoint: {checkpoint}")
    _summarise(search, table, sweep_dir)
    return 0


def _summarise(search: Search, table: Any, sweep_dir: str) -> None:
    """The search's ``report`` on the results table, last: a failing one costs only its summary."""
    if not search.report:
        return
    try:
        report_function(search.report)(table, sweep_dir)
    except Exception as error:  # noqa: BLE001 - a user's summary must not lose the sweep's results
        print(f"bilevel-dist: the report {search.report} failed: {one_line(error)}")


def _usable(row: dict[str, Any], metric: str) -> bool:
    """A trial that ended well: no error and a finite metric (a diverged trial reports NaN)."""
    return row["status"] == "OK" and is_number(row[metric]) and math.isfinite(row[metric])


def _build(config: dict[str, Any]) -> Any:
    """The ``fit`` run of ``config`` built but not run, with Lightning's start-up chatter muted."""
    with _quiet():
        return cli_class()(config, run=False)


@contextlib.contextmanager
def _quiet() -> Any:
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _absolute(path: str) -> str:
    """Local paths made absolute (Ray needs that); URIs (``s3://``, ``gs://``) as they are."""
    return path.rstrip("/") if "://" in path else str(Path(path).expanduser().resolve())


def _filesystem(path: str) -> tuple[Any, str]:
    from pyarrow import fs

    return fs.FileSystem.from_uri(path if "://" in path else f"file://{path}")


def store(path: str, data: str | bytes) -> None:
    """Writes ``data`` at ``path`` on the sweep's storage (a local directory or a remote URI)."""
    filesystem, inner = _filesystem(path)
    filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(inner) as stream:
        stream.write(data.encode() if isinstance(data, str) else data)


def _exists(path: str) -> bool:
    from pyarrow import fs

    filesystem, inner = _filesystem(path)
    return filesystem.get_file_info(inner).type != fs.FileType.NotFound


def _read_sweep(sweep_dir: str) -> dict[str, Any]:
    path = f"{sweep_dir}/{SWEEP_FILE}"
    if not _exists(path):
        raise ConfigError("resume", f"{sweep_dir} is not a sweep directory (no {SWEEP_FILE})")
    filesystem, inner = _filesystem(path)
    with filesystem.open_input_stream(inner) as stream:
        return yaml.safe_load(stream.read().decode())
