"""What figures share: matplotlib without a display, and the PNG sent to every
logger that takes images."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (runs headless: clusters, CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_image(loggers: Iterable[Any], key: str, path: Path) -> None:
    """Sends the PNG at ``path`` to the loggers that store images (wandb)."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.log_image(key=key, images=[str(path)])
