"""SEARCH.yaml: what a sweep searches, how it schedules trials and what each trial gets.

Checked in full, without Ray, before anything starts: a mistake is a :class:`ConfigError` whose
key names the entry (``space.model.algorithm.outer_lr``, ``scheduler.grace_period``, ...).
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bilevel_dist._checks import ConfigError, is_number, one_line, positive_int

# Tune's sampling functions by the name SEARCH.yaml uses, with the arity of their arguments.
DISTRIBUTIONS = {
    "choice": None,
    "grid": None,
    "uniform": 2,
    "loguniform": 2,
    "quniform": 3,
    "qloguniform": 3,
    "randint": 2,
    "lograndint": 2,
}
SCHEDULERS = ("asha", "median", "fifo")
SEARCHERS = ("random", "optuna")
STAGES = ("fit", "test")
KEYS = (
    "space",
    "metric",
    "mode",
    "num_samples",
    "fixed",
    "scheduler",
    "searcher",
    "include_recipe",
    "resources",
    "workers",
    "max_failures",
    "max_concurrent",
    "keep_checkpoints",
    "wandb",
    "seed",
    "report",
    "stage",
)


@dataclass
class Search:
    """A checked SEARCH.yaml; :meth:`candidates` lists the values each searched key can take."""

    space: dict[str, tuple[str, list[Any]]]
    metric: str
    mode: str
    num_samples: int = 1
    fixed: dict[str, Any] = field(default_factory=dict)
    scheduler: tuple[str, dict[str, Any]] = ("asha", {})
    searcher: tuple[str, dict[str, Any]] = ("random", {})
    include_recipe: bool = True
    cpu: float = 1.0
    gpu: float = 0.0
    workers: int = 1
    max_failures: int = 2
    max_concurrent: int | None = None
    keep_checkpoints: int = 2
    wandb: dict[str, Any] | None = None
    seed: int = 0
    #: ``package.module:function`` called with the results table and the sweep directory after the
    #: sweep (a recipe's summary: grouped means, a curve)
    report: str | None = None
    #: ``fit`` (a trial fits, reporting every validation) or ``test`` (a trial is the run of
    #: ``bilevel-dist test``, reporting its test metrics once: an audit, a grid of evaluations)
    stage: str = "fit"

    def candidates(self, key: str) -> list[Any]:
        """Values of ``key`` that bound what a trial can be given, as Tune samples them: every
        choice, or both ends of a range (floats; a ``randint`` excludes its upper end)."""
        kind, args = self.space[key]
        if kind in ("choice", "grid"):
            return list(args)
        low, high = args[:2]
        return [low, high - 1] if "randint" in kind else [float(low), float(high)]

    def contains(self, key: str, value: Any) -> bool:
        """Whether ``key``'s distribution can give ``value``."""
        kind, args = self.space[key]
        if kind in ("choice", "grid"):
            return value in args
        if "randint" in kind:
            return isinstance(value, int) and not isinstance(value, bool) and args[0] <= value < args[1]
        return isinstance(value, float) and args[0] <= value <= args[1]

    def as_dict(self) -> dict[str, Any]:
        """The YAML form, as written next to a sweep so that ``--resume`` can rebuild it."""
        return {
            "space": {key: {kind: list(args)} for key, (kind, args) in self.space.items()},
            "metric": self.metric,
            "mode": self.mode,
            "num_samples": self.num_samples,
            "fixed": dict(self.fixed),
            "scheduler": {"name": self.scheduler[0], **self.scheduler[1]},
            "searcher": {"name": self.searcher[0], **self.searcher[1]},
            "include_recipe": self.include_recipe,
            "resources": {"cpu": self.cpu, "gpu": self.gpu},
            "workers": self.workers,
            "max_failures": self.max_failures,
            "max_concurrent": self.max_concurrent,
            "keep_checkpoints": self.keep_checkpoints,
            "wandb": self.wandb,
            "seed": self.seed,
            "report": self.report,
            "stage": self.stage,
        }


def load(path: str | Path) -> Search:
    """Reads and checks SEARCH.yaml; a missing or unreadable file is a :class:`ConfigError` too."""
    return parse(read_yaml(path, "search"))


def read_yaml(path: str | Path, key: str) -> Any:
    """The YAML file at ``path``; a missing file or bad YAML is a :class:`ConfigError` on ``key``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(key, f"no such file: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(key, f"{path} is not valid YAML: {one_line(error)}") from None


def parse(raw: Any) -> Search:
    """Checks a SEARCH.yaml mapping: unknown keys, distributions, metric mode, scheduler and searcher."""
    if not isinstance(raw, dict):
        raise ConfigError("search", f"expected a mapping of settings, got {type(raw).__name__}")
    for key in raw:
        if key not in KEYS:
            raise ConfigError(str(key), f"unknown setting{_suggest(str(key), KEYS)}; expected one of {', '.join(KEYS)}")
    for key in ("space", "metric", "mode"):
        if key not in raw:
            raise ConfigError(key, "is required")
    space = _space(raw["space"])
    metric = raw["metric"]
    if not isinstance(metric, str) or not metric:
        raise ConfigError("metric", f"must be the name of a logged validation metric, got {metric!r}")
    if raw["mode"] not in ("min", "max"):
        raise ConfigError("mode", f"must be min or max, got {raw['mode']!r}")
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict) or not all(isinstance(k, str) for k in fixed):
        raise ConfigError("fixed", "must map config keys (model.algorithm.lr, trainer.max_steps, ...) to values")
    if overlap := sorted(set(fixed) & set(space)):
        raise ConfigError(f"fixed.{overlap[0]}", "is also searched in space")
    resources = raw.get("resources") or {}
    if not isinstance(resources, dict) or set(resources) - {"cpu", "gpu"}:
        raise ConfigError("resources", f"must be a mapping with cpu and gpu, got {resources!r}")
    cpu, gpu = (_number(f"resources.{k}", resources.get(k, d)) for k, d in (("cpu", 1), ("gpu", 0)))
    stage = raw.get("stage", "fit")
    if stage not in STAGES:
        raise ConfigError("stage", f"must be fit or test, got {stage!r}")
    search = Search(
        space=space,
        metric=metric,
        mode=raw["mode"],
        num_samples=_int("num_samples", raw.get("num_samples", 1)),
        fixed=fixed,
        # a test trial reports once: nothing for ASHA to stop early
        scheduler=_named("scheduler", raw.get("scheduler", "asha" if stage == "fit" else "fifo"), SCHEDULERS),
        searcher=_named("searcher", raw.get("searcher", "random"), SEARCHERS),
        include_recipe=_bool("include_recipe", raw.get("include_recipe", True)),
        cpu=cpu,
        gpu=gpu,
        workers=_int("workers", raw.get("workers", 1)),
        max_failures=_int("max_failures", raw.get("max_failures", 2), allow_zero=True),
        max_concurrent=None if raw.get("max_concurrent") is None else _int("max_concurrent", raw["max_concurrent"]),
        keep_checkpoints=_int("keep_checkpoints", raw.get("keep_checkpoints", 2)),
        wandb=_wandb(raw.get("wandb")),
        seed=_int("seed", raw.get("seed", 0), allow_zero=True),
        report=_report_hook(raw.get("report")),
        stage=stage,
    )
    _check_options(search)
    return search


def _space(raw: Any) -> dict[str, tuple[str, list[Any]]]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("space", "must map at least one config key to a distribution, e.g. {loguniform: [0.01, 1]}")
    space = {}
    for key, spec in raw.items():
        where = f"space.{key}"
        if not isinstance(key, str) or not key or key.startswith(".") or ".." in key:
            raise ConfigError(where, "must be a dotted config key such as model.algorithm.lr")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(where, f"must be one distribution such as {{loguniform: [0.01, 1]}}, got {spec!r}")
        ((kind, args),) = spec.items()
        if kind not in DISTRIBUTIONS:
            names = ", ".join(DISTRIBUTIONS)
            raise ConfigError(where, f"unknown distribution {kind!r}{_suggest(str(kind), DISTRIBUTIONS)}; use {names}")
        space[key] = (kind, _arguments(where, kind, args))
    return space


def _arguments(where: str, kind: str, args: Any) -> list[Any]:
    if not isinstance(args, list) or not args:
        raise ConfigError(where, f"{kind} takes a non-empty list, got {args!r}")
    arity = DISTRIBUTIONS[kind]
    if arity is None:
        return args
    if len(args) != arity or not all(is_number(a) for a in args):
        shape = "[low, high, q]" if arity == 3 else "[low, high]"
        raise ConfigError(where, f"{kind} takes {shape} numbers, got {args!r}")
    low, high = args[:2]
    if not low < high:
        raise ConfigError(where, f"{kind} needs low < high, got {args!r}")
    if kind.startswith(("log", "qlog")) and low <= 0:
        raise ConfigError(where, f"{kind} needs low > 0, got {args!r}")
    if "randint" in kind and not all(isinstance(a, int) for a in args):
        raise ConfigError(where, f"{kind} takes integers, got {args!r}")
    if arity == 3 and args[2] <= 0:
        raise ConfigError(where, f"{kind} needs a step q > 0, got {args!r}")
    return args


def _named(key: str, raw: Any, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """``name`` or ``{name: ..., option: value}``."""
    options = dict(raw) if isinstance(raw, dict) else {"name": raw}
    name = options.pop("name", None)
    if name not in names:
        where = f"{key}.name" if isinstance(raw, dict) else key
        raise ConfigError(where, f"must be one of {', '.join(names)}, got {name!r}")
    return name, options


def _check_options(search: Search) -> None:
    """Options of the scheduler and searcher against their Ray signatures; searchers that need a package."""
    scheduler, options = search.scheduler
    for reserved in ("metric", "mode"):
        if reserved in options:
            raise ConfigError(f"scheduler.{reserved}", "is set once, at the top of SEARCH.yaml")
    allowed = {
        "asha": ("time_attr", "max_t", "grace_period", "reduction_factor", "brackets", "stop_last_trials"),
        "median": ("time_attr", "grace_period", "min_samples_required", "min_time_slice", "hard_stop"),
        "fifo": (),
    }[scheduler]
    for option in options:
        if option not in allowed:
            raise ConfigError(f"scheduler.{option}", f"is not a {scheduler} option; use {', '.join(allowed) or 'none'}")
    searcher, options = search.searcher
    if searcher == "random" and options:
        raise ConfigError(f"searcher.{next(iter(options))}", "the random searcher takes no options")
    if searcher == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("searcher", "optuna is not installed: pip install optuna") from None
        if grid := [k for k, (kind, _) in search.space.items() if kind == "grid"]:
            raise ConfigError(f"space.{grid[0]}", "optuna cannot sample a grid; use choice")
        from ray.tune.search.optuna import OptunaSearch

        accepted = inspect.signature(OptunaSearch).parameters
        for option in options:
            if option not in accepted or option in ("space", "metric", "mode", "points_to_evaluate", "seed"):
                raise ConfigError(f"searcher.{option}", "is not an OptunaSearch option (seed is set at the top)")
    if search.cpu == 0 and search.gpu == 0:
        raise ConfigError("resources", "a trial needs a CPU or a GPU")
    if search.gpu > 1 or (search.workers > 1 and search.gpu not in (0, 1)):
        raise ConfigError("resources.gpu", "is 0, 1 or a fraction of one per trial; use workers: N for N-GPU trials")
    if options := search.scheduler[1]:
        _check_scheduler(search.scheduler[0], options)
    if search.stage == "test":
        if search.scheduler[0] != "fifo":
            name = search.scheduler[0]
            raise ConfigError(
                "scheduler", f"stage test reports once a trial, nothing to stop early; use fifo, not {name}"
            )
        if search.workers > 1:
            raise ConfigError("workers", "stage test runs each trial in one process; use workers: 1")


def _check_scheduler(name: str, options: dict[str, Any]) -> None:
    """A result key the scheduler would never find makes it stop nothing, silently."""
    time_attrs = ("training_iteration", "step", "time_total_s")
    if options.get("time_attr", "training_iteration") not in time_attrs:
        raise ConfigError("scheduler.time_attr", f"must be one of {', '.join(time_attrs)}")


def _wandb(raw: Any) -> dict[str, Any] | None:
    if raw is None or raw is False:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("project"), str):
        raise ConfigError("wandb", f"must be a mapping with a project, e.g. {{project: bilevel-dist}}; got {raw!r}")
    unknown = set(raw) - {"project", "entity", "tags"}
    if unknown:
        raise ConfigError(f"wandb.{sorted(unknown)[0]}", "unknown; use project, entity and tags")
    if "tags" in raw and not (isinstance(raw["tags"], list) and all(isinstance(t, str) for t in raw["tags"])):
        raise ConfigError("wandb.tags", f"must be a list of strings, got {raw['tags']!r}")
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("wandb", "wandb is not installed: pip install 'bilevel-dist[wandb]'") from None
    return dict(raw)


def _int(key: str, value: Any, allow_zero: bool = False) -> int:
    try:
        return positive_int(key, value, allow_zero=allow_zero)
    except (TypeError, ValueError) as error:
        raise ConfigError(key, str(error).removeprefix(f"{key} ")) from None


def _number(key: str, value: Any) -> float:
    if not is_number(value) or value < 0 or not math.isfinite(value):
        raise ConfigError(key, f"must be a number >= 0, got {value!r}")
    return float(value)


def report_function(path: str) -> Any:
    """The function a ``report: package.module:function`` entry names."""
    module_name, _, name = path.partition(":")
    import importlib

    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError("report", f"cannot import {path!r}: {one_line(error)}") from None
    if not callable(function):
        raise ConfigError("report", f"{path!r} is not a function")
    return function


def _report_hook(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or raw.count(":") != 1:
        raise ConfigError("report", f"must be package.module:function, got {raw!r}")
    report_function(raw)
    return raw


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
