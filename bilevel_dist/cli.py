"""The ``bilevel-dist`` command: ``fit``, ``validate`` and ``test`` on Lightning's ``LightningCLI``.

``bilevel-dist fit --config recipes/data_denoising/digits.yaml --model.algorithm.name soba``.
Configs use ``class_path``/``init_args`` for the model (a :class:`BilevelModule`) and the data (a
:class:`BilevelDataModule`). A user mistake (unknown key, wrong type, unknown algorithm, a bad
value, a missing file) prints one line naming the key and exits with code 2, without a traceback.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any

from bilevel_dist._checks import ConfigError, one_line

COMMANDS = ("fit", "validate", "test")
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}},
    "log_every_n_steps": 1,
}


class UserError(Exception):
    """A mistake in the command line or config: reported in one line, exit code 2."""


def _parser_message(message: str) -> str:
    """jsonargparse's (often nested, multi-line) error as ``key: reason``: for a class that
    failed every alternative of a union, the reason of the first alternative."""
    key, reason = "", str(message)
    while True:
        match = re.match(r'\s*Parser key "([^"]+)":\s*(.*)', reason, re.S)
        if match:
            key = f"{key}.{match[1]}" if key else match[1]
            reason = match[2]
        errors = re.search(r"Errors:\s*-\s*(.*?)(?:\n\s*- |\Z)", reason, re.S)
        if errors:
            reason = errors[1]
            if key in ("model", "data"):
                nested = re.match(r"\s*([A-Za-z_][\w.]*): (.*)", reason, re.S)
                if nested:  # already reported as "key: reason" by the nested parser
                    key, reason = f"{key}.init_args.{nested[1]}", nested[2]
                elif reason.lstrip().startswith("Parser key"):
                    key += ".init_args"
        elif not match:
            break
    reason = one_line(reason)
    return f"{key}: {reason}" if key else reason


def cli_class() -> type:
    """The ``LightningCLI`` subclass behind ``fit``/``validate``/``test`` (and every tune trial)."""
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from bilevel_dist.lightning import BilevelDataModule, BilevelModule

    class Parser(LightningArgumentParser):
        """Raises instead of printing usage, so that the CLI reports one line."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["exit_on_error"] = False
            super().__init__(*args, **kwargs)

        def error(self, message: str, ex: Exception | None = None) -> None:  # type: ignore[override]
            raise UserError(_parser_message(message))

    class BilevelCLI(LightningCLI):
        """``LightningCLI`` for :class:`BilevelModule` subclasses and :class:`BilevelDataModule`."""

        def __init__(self, args: list[str] | dict[str, Any] | None, run: bool = True) -> None:
            if args is not None:  # a config from Python (a tune trial) while sys.argv holds another command
                warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended", UserWarning)
            super().__init__(
                BilevelModule,
                BilevelDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                trainer_defaults=TRAINER_DEFAULTS,
                parser_class=Parser,
                save_config_kwargs={"overwrite": True},
                args=args,
                run=run,
            )

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {name: kwargs for name, kwargs in LightningCLI.subcommands().items() if name in COMMANDS}

        def instantiate_classes(self) -> None:
            _offline_wandb(self.config[self.subcommand] if self.subcommand else self.config)
            try:
                super().instantiate_classes()
            except UserError:
                raise
            except Exception as error:
                cause = _user_mistake(error)
                if cause is None:
                    raise
                origin = _origin(cause)
                if isinstance(cause, ConfigError):
                    raise UserError(f"{origin}.init_args.{cause.key}: {cause}") from None
                raise UserError(f"{origin}: {one_line(cause)}") from None

    return BilevelCLI


def _user_mistake(error: BaseException) -> BaseException | None:
    """The first error in ``error``'s chain that a bad setting raises, else ``None``."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    mistakes = (ConfigError, MisconfigurationException, TypeError, ValueError, FileNotFoundError)
    seen = error
    while seen is not None:
        if isinstance(seen, ConfigError):
            return seen
        seen = seen.__cause__ or seen.__context__
    deepest = error
    while (deepest.__cause__ or deepest.__context__) is not None:
        deepest = deepest.__cause__ or deepest.__context__
    return deepest if isinstance(deepest, mistakes) else None


def _origin(error: BaseException) -> str:
    """``model``, ``data`` or ``trainer``: which configured object raised ``error``."""
    from lightning import LightningDataModule, LightningModule

    origin, tb = "trainer", error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, LightningModule):
            origin = "model"
        elif isinstance(owner, LightningDataModule):
            origin = "data"
        tb = tb.tb_next
    return origin


def _offline_wandb(config: Any) -> None:
    """A ``WandbLogger`` without an API key logs offline instead of prompting for a login."""
    loggers = config.get("trainer", {}).get("logger")
    entries = loggers if isinstance(loggers, list) else [loggers]
    wants_wandb = any("WandbLogger" in str(getattr(e, "class_path", e)) for e in entries if e)
    if wants_wandb and not os.environ.get("WANDB_API_KEY") and not os.path.exists(os.path.expanduser("~/.netrc")):
        os.environ.setdefault("WANDB_MODE", "offline")


def _estimators() -> int:
    from bilevel_dist import hypergrad

    for name, cls in sorted(hypergrad.REGISTRY.items()):
        print(f"{name:12s} {(cls.__doc__ or '').strip().splitlines()[0]}")
    return 0


def _tune(argv: list[str]) -> int:
    """``bilevel-dist tune --config RECIPE.yaml --search SEARCH.yaml`` or ``--resume DIR``."""
    import argparse

    class Arguments(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise UserError(message)

    parser = Arguments(prog="bilevel-dist tune", description="A Ray Tune sweep over a recipe's config keys.")
    parser.add_argument("--config", help="the recipe: a fit config (RECIPE.yaml)")
    parser.add_argument("--search", help="SEARCH.yaml: space, metric, mode, scheduler, resources, ...")
    parser.add_argument("--name", help="the sweep's name (default: recipe name and time)")
    parser.add_argument("--storage", default="sweeps", help="where sweeps live: a directory or s3://, gs:// URI")
    parser.add_argument("--address", help="a Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    parser.add_argument("--resume", metavar="DIR", help="resume the sweep in DIR (after its driver died)")
    try:
        args = parser.parse_args(argv)
        if args.resume is None and (args.config is None or args.search is None):
            raise UserError("tune needs --config RECIPE.yaml and --search SEARCH.yaml, or --resume DIR")
        if args.resume is not None and (args.config or args.search):
            raise UserError("--resume DIR takes the recipe and search saved in DIR; drop --config and --search")
        try:
            import ray.tune  # noqa: F401
        except ImportError:
            raise UserError("tune needs Ray Tune: pip install 'bilevel-dist[tune]'") from None
        from bilevel_dist.tune import search as search_file
        from bilevel_dist.tune import sweep

        search = None
        if args.resume is None:
            try:
                search = search_file.load(args.search)
            except ConfigError as error:
                raise UserError(f"{args.search}: {error.key}: {error}") from None
        return sweep.run(
            args.config, search, name=args.name, storage=args.storage, address=args.address, resume=args.resume
        )
    except UserError as error:
        print(f"bilevel-dist: error: {error}", file=sys.stderr)
        return 2
    except ConfigError as error:
        searched = args.search and error.key.startswith(("space", "metric", "fixed", "scheduler", "searcher"))
        where = f"{args.search}: " if searched else ""
        print(f"bilevel-dist: error: {where}{error.key}: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code (2 for a user mistake, printed as one line)."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["estimators"]:
        return _estimators()
    if argv[:1] == ["tune"]:
        return _tune(argv[1:])
    if argv[:1] == ["--version"]:
        import bilevel_dist

        print(f"bilevel-dist {bilevel_dist.__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        commands = ", ".join((*COMMANDS, "tune", "estimators"))
        print(f"usage: bilevel-dist {{{commands}}} [--config FILE.yaml] [--help]")
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        commands = ", ".join((*COMMANDS, "tune", "estimators"))
        print(f"bilevel-dist: error: unknown command {argv[0]!r}; choose one of {commands}", file=sys.stderr)
        return 2
    try:
        cli_class()(None if from_shell else argv)
    except UserError as error:
        print(f"bilevel-dist: error: {error}", file=sys.stderr)
        return 2
    except ConfigError as error:  # raised while running, e.g. a batch larger than the dataset
        origin = _origin(error)
        qualified = origin == "trainer" or error.key.startswith(("model.", "data.", "trainer."))
        key = error.key if qualified else f"{origin}.init_args.{error.key}"
        print(f"bilevel-dist: error: {key}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
