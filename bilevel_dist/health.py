"""The hypergradient-health dashboard: ``bilevel-dist plot LOGDIR`` reads a run's logged scalars
(Lightning's ``metrics.csv`` or TensorBoard event files) and draws the keys that tell whether a
bilevel run can be trusted into one PNG, so a user without wandb sees it too.

Panels (the keys, as :class:`~bilevel_dist.lightning.BilevelModule` and
:class:`~bilevel_dist.lightning.HypergradientMonitor` log them):

- ``monitor/cosine``: the step's direction against the reference hypergradient (1 is exact);
- ``monitor/relative_error``;
- ``inner_grad_norm``: how well the lower level is solved;
- ``linear_residual``: the linear system's residual (SOBA-type methods);
- ``penalty_gamma``: the penalty schedule;
- ``hypergrad_norm`` and ``outer_loss``;
- ``skipped_steps``: steps dropped for non-finite values.

In wandb, the same keys are the panels: group ``monitor/*`` in one section.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from bilevel_dist._checks import ConfigError

PANELS = (
    ("monitor/cosine", "cosine to the reference", False),
    ("monitor/relative_error", "relative error to the reference", True),
    ("inner_grad_norm", "inner gradient norm", True),
    ("linear_residual", "linear-system residual", True),
    ("penalty_gamma", "penalty γ", True),
    ("hypergrad_norm", "hypergradient norm", True),
    ("outer_loss", "outer loss", False),
    ("skipped_steps", "skipped steps (non-finite)", False),
)

Series = dict[str, list[tuple[int, float]]]


def read(logdir: str | Path) -> Series:
    """Every scalar logged under ``logdir``, by key: ``[(step, value), ...]``. The newest
    ``metrics.csv`` below it is read, else TensorBoard event files (needs ``tensorboard``)."""
    root = Path(logdir)
    if not root.exists():
        raise ConfigError("logdir", f"{root} does not exist")
    tables = sorted(root.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if tables:
        return _read_csv(tables[-1])
    events = sorted(root.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if events:
        return _read_events(events[-1].parent)
    raise ConfigError("logdir", f"no metrics.csv or TensorBoard event file under {root}")


def _read_csv(path: Path) -> Series:
    series: Series = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key != "step" and value not in (None, ""):
                    series.setdefault(key, []).append((int(float(step)), float(value)))
    return series


def _read_events(folder: Path) -> Series:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise ConfigError("logdir", "reading TensorBoard logs needs tensorboard: pip install tensorboard") from None
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {key: [(e.step, e.value) for e in accumulator.Scalars(key)] for key in accumulator.Tags()["scalars"]}


def plot(logdir: str | Path, out: str | Path | None = None) -> Path:
    """Draws the health panels found in ``logdir``'s logs into ``out`` (default
    ``LOGDIR/health.png``) and returns its path."""
    from bilevel_dist.figures import pyplot

    series = read(logdir)
    shown = [(key, title, log) for key, title, log in PANELS if series.get(key)]
    if not shown:
        raise ConfigError("logdir", f"none of the health keys {[k for k, _, _ in PANELS]} was logged in {logdir}")
    plt = pyplot()
    columns = min(3, len(shown))
    rows = math.ceil(len(shown) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, (key, title, log) in zip(axes.flat, shown, strict=False):
        steps, values = zip(*sorted(series[key]), strict=True)
        axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        if log and all(v > 0 for v in values):
            axis.set_yscale("log")
        if key == "monitor/cosine":
            axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axis.set_title(f"{title}\n{key}", fontsize=9)
        axis.set_xlabel("step")
    for axis in list(axes.flat)[len(shown) :]:
        axis.axis("off")
    figure.tight_layout()
    path = Path(out) if out is not None else Path(logdir) / "health.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
