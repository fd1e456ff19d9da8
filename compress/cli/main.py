"""The ``compress`` command line: the parser and the one place where errors become ``error:`` lines."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from compress.cli import analysis, deploy, run
from compress.errors import UserError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from compress._version import __version__

    parser = argparse.ArgumentParser(prog="compress", description=(
        "Look inside a trained image classifier: probe every stage, find each filter's label clusters, "
        "and report which layers and filters do real work. With no command, runs the demo on the embedded digits."))
    parser.add_argument("--version", action="version", version=f"compress {__version__}")
    sub = parser.add_subparsers(dest="command")
    run.add_commands(sub)
    analysis.add_commands(sub)
    deploy.add_commands(sub)
    return parser


def _seed(args: argparse.Namespace) -> int | None:
    for name in ("seed", "analysis_seed"):
        if getattr(args, name, None) is not None:
            return getattr(args, name)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``compress`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv or ["demo"])
    from compress import distributed

    several = None
    if not getattr(args, "distributed", False):
        several = (f"`compress {args.command or 'demo'}` runs in one process; under torchrun use `compress train` "
                   f"or `compress analyze`")
    try:
        with distributed.session(seed=_seed(args), single_process=several) as quiet:
            if quiet and hasattr(args, "quiet"):
                args.quiet = True
            args.func(args)
    except UserError as e:
        if distributed.is_main():
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished epochs are checkpointed, run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
