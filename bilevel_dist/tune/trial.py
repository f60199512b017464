"""One trial of a sweep: the recipe's ``fit`` run with the trial's settings, reporting to Tune.

A trial is the Lightning run ``bilevel-dist fit --config`` makes from the recipe with the trial's
settings set (:func:`trial_config`), except that its logs go to the trial's directory and Tune, not
``ModelCheckpoint``, keeps its checkpoints. Every validation reports the recipe's validation
metrics with a checkpoint; a retried or resumed trial starts from the last one. With
``workers > 1`` the trial is a Ray Train ``TorchTrainer`` running Lightning's DDP through
``RayDDPStrategy``. With ``stage: test`` a trial is the run ``bilevel-dist test --config`` makes
instead (an audit that trains inside ``test``), reporting the model's test metrics once, with no
checkpoint.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from bilevel_dist.lightning_cli import TRAINER_DEFAULTS, cli_class

CHECKPOINT = "checkpoint.ckpt"
_OUTPUT_LOGGERS = ("CSVLogger", "TensorBoardLogger", "WandbLogger")


def _holder(node: Any, part: str, create: bool) -> Any:
    """Where ``part`` lives under ``node``: a ``class_path`` entry keeps its settings in
    ``init_args`` (``model.x`` is ``model.init_args.x``, as on the command line)."""
    if isinstance(node, dict) and "class_path" in node and part not in ("class_path", "init_args"):
        return node.setdefault("init_args", {}) if create else node.get("init_args") or {}
    return node


def set_key(config: dict[str, Any], key: str, value: Any) -> None:
    """Sets dotted ``key`` in a ``fit`` config (see :func:`_holder`)."""
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        node = _holder(node, part, create=True)
        if depth == len(parts) - 1:
            node[part] = copy.deepcopy(value)
            return
        child = node.get(part)
        if isinstance(child, str):  # ``model: pkg.Class`` shorthand
            child = {"class_path": child}
        elif not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child


def get_key(config: dict[str, Any], key: str) -> tuple[bool, Any]:
    """``(found, value)`` of dotted ``key`` in a ``fit`` config (see :func:`_holder`)."""
    node: Any = config
    for part in key.split("."):
        node = _holder(node, part, create=False)
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def with_settings(recipe: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The recipe with ``settings`` (dotted keys) set: the config a trial runs, and the best config."""
    config = copy.deepcopy(recipe)
    for key, value in settings.items():
        set_key(config, key, value)
    return config


def trial_config(
    config: dict[str, Any], out_dir: Path, *, wandb: dict[str, Any] | None, group: str, name: str
) -> dict[str, Any]:
    """``config`` with its outputs in ``out_dir``: logs there, no ``ModelCheckpoint`` (Tune keeps the
    checkpoints), and one wandb run per trial grouped by sweep."""
    config = copy.deepcopy(config)
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(out_dir)
    trainer["enable_progress_bar"] = False  # Tune prints the trials' status instead
    loggers = trainer.get("logger", True)
    if loggers is True or loggers is None:  # the CLI's default logger
        loggers = [TRAINER_DEFAULTS["logger"]]
    loggers = [] if loggers is False else loggers if isinstance(loggers, list) else [loggers]
    loggers = [_entry(entry) for entry in loggers]
    if wandb is not None:
        loggers.append({"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": dict(wandb)})
    for entry in loggers:
        kind = str(entry.get("class_path", "")).rsplit(".", 1)[-1]
        if kind in _OUTPUT_LOGGERS:
            entry.setdefault("init_args", {})["save_dir"] = str(out_dir / "logs")
        if kind == "WandbLogger":  # one run per trial, resumed by a retried trial
            entry["init_args"].update(group=group, name=name, id=f"{group}-{name}", resume="allow")
    trainer["logger"] = loggers or False
    callbacks = trainer.get("callbacks") or []
    callbacks = [_entry(entry) for entry in (callbacks if isinstance(callbacks, list) else [callbacks])]
    trainer["callbacks"] = [c for c in callbacks if not str(c.get("class_path", "")).endswith("ModelCheckpoint")]
    trainer["enable_checkpointing"] = False  # nor Lightning's default one
    return config


def _entry(entry: Any) -> Any:
    """``pkg.Class`` shorthand as ``{class_path: pkg.Class}``."""
    return {"class_path": entry} if isinstance(entry, str) else copy.deepcopy(entry)


def _report_callback(metrics: list[str], workers: bool) -> Any:
    """Ray's Lightning report callback, reporting the validation metrics (and the step) with a
    checkpoint at the end of every validation; through Ray Train from a worker group."""
    import ray
    from ray.tune.integration.pytorch_lightning import TuneReportCheckpointCallback

    class ReportValidation(TuneReportCheckpointCallback):
        def _get_report_dict(self, trainer: Any, pl_module: Any) -> dict[str, Any] | None:
            report = super()._get_report_dict(trainer, pl_module)
            return {**report, "step": trainer.global_step} if report else report

        def _handle(self, trainer: Any, pl_module: Any) -> None:
            if not workers:
                return super()._handle(trainer, pl_module)
            if trainer.sanity_checking:
                return None
            report = self._get_report_dict(trainer, pl_module)
            with self._get_checkpoint(trainer) as checkpoint:  # every rank takes part in saving
                ray.train.report(report, checkpoint=checkpoint if trainer.global_rank == 0 else None)
            return None

    return ReportValidation(metrics=metrics, filename=CHECKPOINT, on="validation_end")


def _fit(config: dict[str, Any], metrics: list[str], checkpoint: Any, workers: bool) -> None:
    """Builds the run as ``bilevel-dist fit`` does and fits it, from ``checkpoint`` when there is one."""
    cli = cli_class()(config, run=False)
    trainer = cli.trainer
    if workers:
        from ray.train.lightning import prepare_trainer

        trainer = prepare_trainer(trainer)
    trainer.callbacks.append(_report_callback(metrics, workers))
    if checkpoint is None:
        trainer.fit(cli.model, datamodule=cli.datamodule)
        return
    with checkpoint.as_directory() as directory:
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=os.path.join(directory, CHECKPOINT))


def _test(config: dict[str, Any], metrics: list[str]) -> None:
    """Builds the run as ``bilevel-dist test`` does, tests it and reports the test metrics once."""
    import ray.tune

    cli = cli_class()(config, run=False)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    logged = cli.trainer.callback_metrics
    ray.tune.report({key: float(logged[key]) for key in metrics if key in logged})


def _enter(launch_dir: str) -> None:
    """Relative paths in the recipe (data roots) mean what they mean to ``fit`` run where the sweep
    was launched, when this node has that directory."""
    if os.path.isdir(launch_dir):
        os.chdir(launch_dir)


def run_trial(settings: dict[str, Any], plan: dict[str, Any]) -> None:
    """Tune's function trainable: ``settings`` are the sampled values, ``plan`` the sweep's constants."""
    import ray.tune

    context = ray.tune.get_context()
    out_dir = Path(context.get_trial_dir())
    _enter(plan["launch_dir"])
    config = with_settings(plan["recipe"], {**plan["fixed"], **settings})
    config = trial_config(config, out_dir, wandb=plan["wandb"], group=plan["name"], name=context.get_trial_name())
    if plan.get("stage") == "test":
        _test(config, plan["metrics"])
        return
    if plan["workers"] == 1:
        _fit(config, plan["metrics"], ray.tune.get_checkpoint(), workers=False)
        return
    _fit_on_workers(config, plan, context.get_trial_name())


def _fit_on_workers(config: dict[str, Any], plan: dict[str, Any], trial_name: str) -> None:
    """The trial as a Ray Train run of ``plan["workers"]`` DDP workers. The run is named after the
    trial, so a retried or resumed trial restores it from its latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = config["trainer"]
    trainer.update(devices="auto", accelerator="auto", num_nodes=1, enable_progress_bar=False)
    trainer["strategy"] = {"class_path": "ray.train.lightning.RayDDPStrategy"}
    trainer["plugins"] = [{"class_path": "ray.train.lightning.RayLightningEnvironment"}]
    gpus = int(plan["gpu"])
    run = TorchTrainer(
        _fit_worker,
        train_loop_config={"config": config, "metrics": plan["metrics"], "launch_dir": plan["launch_dir"]},
        scaling_config=ScalingConfig(
            num_workers=plan["workers"], use_gpu=gpus > 0, resources_per_worker={"CPU": plan["cpu"], "GPU": gpus}
        ),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        run_config=RunConfig(
            name=trial_name,
            storage_path=f"{plan['storage']}/{plan['name']}/workers",
            callbacks=[TuneReportCallback()],
            failure_config=FailureConfig(max_failures=plan["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=plan["keep_checkpoints"]),
        ),
    )
    run.fit()


def _fit_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    _enter(loop_config["launch_dir"])
    _fit(loop_config["config"], loop_config["metrics"], ray.train.get_checkpoint(), workers=True)
