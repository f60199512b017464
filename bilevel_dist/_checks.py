"""Argument checks shared by the constructors: clear errors that name the parameter."""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A bad setting, with the dotted ``key`` that names it (the CLI prints ``key: message``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key nested under ``prefix``."""
        return ConfigError(f"{prefix}.{self.key}", str(self))


class NonFiniteError(RuntimeError):
    """A step produced non-finite values (under ``nonfinite="raise"``): the state was not updated,
    so the last checkpoint and the module's variables stay finite (the CLI exits with code 1)."""


def setting(key: str, check: Any, value: Any) -> Any:
    """``check(key, value)``, its ``TypeError``/``ValueError`` turned into a :class:`ConfigError`
    that names ``key``."""
    try:
        return check(key, value)
    except (TypeError, ValueError) as error:
        raise ConfigError(key, str(error)) from None


def one_line(message: Any) -> str:
    """``message`` (an error or text) on one line, for a one-line CLI error."""
    return " ".join(str(message).split())


def is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    """Returns ``value`` if it is an int ``> 0`` (``>= 0`` with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def positive_float(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Returns ``value`` as a float if it is finite and ``> 0`` (``>= 0`` with ``allow_zero``)."""
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")
    return float(value)


def unit_interval(name: str, value: Any) -> float:
    """Returns ``value`` if it lies in ``[0, 1)``."""
    value = positive_float(name, value, allow_zero=True)
    if value >= 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")
    return value


def optional_tol(name: str, value: Any) -> float | None:
    """``None`` or a finite tolerance ``>= 0``."""
    return None if value is None else positive_float(name, value, allow_zero=True)
