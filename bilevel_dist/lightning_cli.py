"""The ``LightningCLI`` behind ``bilevel-dist fit|validate|test`` and every tune trial.

:func:`cli_class` builds it: the model is a ``LightningModule`` (a :class:`BilevelModule`, or a
recipe's single-level method such as BIO) and the data a :class:`BilevelDataModule`, each given by
``class_path``/``init_args``. A user mistake (unknown key, wrong type, unknown algorithm, a bad
value, a missing file) is raised as a :class:`UserError` whose one line names the key;
``bilevel-dist`` prints it and exits with code 2.
"""

from __future__ import annotations

import os
import re
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
    from lightning import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    class Parser(LightningArgumentParser):
        """Raises instead of printing usage, so that the CLI reports one line."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["exit_on_error"] = False
            super().__init__(*args, **kwargs)

        def error(self, message: str, ex: Exception | None = None) -> None:  # type: ignore[override]
            raise UserError(_parser_message(message))

    class BilevelCLI(LightningCLI):
        """``LightningCLI`` for any ``LightningModule`` (a :class:`BilevelModule` subclass, or a
        recipe's single-level method such as BIO) and any ``LightningDataModule`` (a
        :class:`BilevelDataModule`, or an episodic one that draws its own tasks)."""

        def __init__(self, args: list[str] | dict[str, Any] | None, run: bool = True) -> None:
            if args is not None:  # a config from Python (a tune trial) while sys.argv holds another command
                warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended", UserWarning)
            super().__init__(
                LightningModule,
                LightningDataModule,
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
                origin = origin_of(cause)
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


def origin_of(error: BaseException) -> str:
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
