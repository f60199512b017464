"""The ``bilevel-dist`` command."""

from __future__ import annotations

import argparse
import sys

import bilevel_dist
from bilevel_dist import hypergrad


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes exit with code 2 and one line on stderr (argparse's way)."""
    parser = argparse.ArgumentParser(prog="bilevel-dist", description=bilevel_dist.__doc__)
    parser.add_argument("--version", action="version", version=f"bilevel-dist {bilevel_dist.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("estimators", help="list the hypergradient estimators by name")
    args = parser.parse_args(argv)
    if args.command == "estimators":
        for name, cls in sorted(hypergrad.REGISTRY.items()):
            print(f"{name:12s} {(cls.__doc__ or '').strip().splitlines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
