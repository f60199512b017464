"""The ``bilevel-dist`` command: ``fit``, ``validate`` and ``test`` on Lightning's ``LightningCLI``
(built by :mod:`bilevel_dist.lightning_cli`), ``tune`` (:mod:`bilevel_dist.tune`), ``plot``
(:mod:`bilevel_dist.health`) and ``estimators``.

``bilevel-dist fit --config recipes/data_denoising/digits.yaml --model.algorithm.name soba``.
Configs use ``class_path``/``init_args`` for the model (a :class:`BilevelModule`, or any other
``LightningModule``) and the data (a :class:`BilevelDataModule`). A user mistake (unknown key,
wrong type, unknown algorithm, a bad value, a missing file) prints one line naming the key and
exits with code 2, without a traceback.
A run whose step turns non-finite under ``nonfinite: raise`` prints one line and exits with code 1.
"""

from __future__ import annotations

import argparse
import sys

from bilevel_dist._checks import ConfigError, NonFiniteError
from bilevel_dist.lightning_cli import COMMANDS, UserError, cli_class, origin_of


def _estimators() -> int:
    from bilevel_dist import hypergrad

    for name, cls in sorted(hypergrad.REGISTRY.items()):
        print(f"{name:12s} {(cls.__doc__ or '').strip().splitlines()[0]}")
    return 0


def _arguments(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser whose mistakes raise :class:`UserError` (one line, exit code 2)."""

    class Arguments(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise UserError(message)

    return Arguments(prog=prog, description=description)


def _tune(argv: list[str]) -> int:
    """``bilevel-dist tune --config RECIPE.yaml --search SEARCH.yaml`` or ``--resume DIR``."""
    parser = _arguments("bilevel-dist tune", "A Ray Tune sweep over a recipe's config keys.")
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


def _plot(argv: list[str]) -> int:
    """``bilevel-dist plot LOGDIR [--out FILE.png]``: the hypergradient-health panels of a run."""
    parser = _arguments("bilevel-dist plot", "Hypergradient-health panels from a run's logs.")
    parser.add_argument("logdir", help="the run's log directory (metrics.csv or TensorBoard events below it)")
    parser.add_argument("--out", help="the PNG to write (default: LOGDIR/health.png)")
    try:
        args = parser.parse_args(argv)
        from bilevel_dist import health

        print(health.plot(args.logdir, args.out))
        return 0
    except UserError as error:
        print(f"bilevel-dist: error: {error}", file=sys.stderr)
        return 2
    except ConfigError as error:
        print(f"bilevel-dist: error: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code (2 for a user mistake, printed as one line)."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["estimators"]:
        return _estimators()
    if argv[:1] == ["tune"]:
        return _tune(argv[1:])
    if argv[:1] == ["plot"]:
        return _plot(argv[1:])
    if argv[:1] == ["--version"]:
        import bilevel_dist

        print(f"bilevel-dist {bilevel_dist.__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        commands = ", ".join((*COMMANDS, "tune", "plot", "estimators"))
        print(f"usage: bilevel-dist {{{commands}}} [--config FILE.yaml] [--help]")
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        commands = ", ".join((*COMMANDS, "tune", "plot", "estimators"))
        print(f"bilevel-dist: error: unknown command {argv[0]!r}; choose one of {commands}", file=sys.stderr)
        return 2
    try:
        cli_class()(None if from_shell else argv)
    except UserError as error:
        print(f"bilevel-dist: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteError as error:  # the run diverged: not a config mistake, the checkpoints stay good
        print(f"bilevel-dist: error: {error}", file=sys.stderr)
        return 1
    except ConfigError as error:  # raised while running, e.g. a batch larger than the dataset
        where = origin_of(error)
        qualified = where == "trainer" or error.key.startswith(("model.", "data.", "trainer."))
        key = error.key if qualified else f"{where}.init_args.{error.key}"
        print(f"bilevel-dist: error: {key}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
