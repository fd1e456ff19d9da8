"""The ``compress`` command line: the parser and the one place where errors become ``error:`` lines.

Every failure ends in exactly one line on stderr (from rank 0 under ``torchrun``):

- ``error: <what> <value>: <why>; <what would be valid>`` and exit status 2 for input the user
  can fix (:class:`~compress.errors.UserError`, a bad flag, a full disk or a permission denied);
- ``error: internal error (<type>: <message>); this is a bug — the full traceback is in <file>``
  and exit status 1 for anything else, the traceback written to the run folder (when the
  command names an existing one) or the system's temporary folder;
- Ctrl-C keeps its message and status 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NoReturn, Sequence

from compress.cli import analysis, deploy, optimize, run
from compress.errors import UserError, clip

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are :class:`UserError` (one line, status 2), not usage text."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{clip(message, 300)} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from compress._version import __version__

    parser = _Parser(prog="compress", description=(
        "Look inside a trained image classifier: probe every stage, find each filter's label clusters, "
        "and report which layers and filters do real work. With no command, runs the demo on the embedded digits."))
    parser.add_argument("--version", action="version", version=f"compress {__version__}")
    sub = parser.add_subparsers(dest="command")
    run.add_commands(sub)
    analysis.add_commands(sub)
    deploy.add_commands(sub)
    optimize.add_commands(sub)
    return parser


def _seed(args: argparse.Namespace) -> int | None:
    for name in ("seed", "analysis_seed"):
        if getattr(args, name, None) is not None:
            return getattr(args, name)
    return None


def _is_main() -> bool:
    from compress import distributed

    return distributed.is_main()


def _report(message: str) -> None:
    if _is_main():
        print(f"error: {message}", file=sys.stderr)


def _save_traceback(args: argparse.Namespace | None) -> str | None:
    """Write the current exception's traceback to a file; returns its path (``None``: nowhere writable)."""
    text = "".join(traceback.format_exc())
    name = f"compress-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    out = getattr(args, "out", None)
    mine = isinstance(out, str) and _is_main() and Path(out).is_dir()  # under torchrun only rank 0 writes there
    folders = ([Path(out)] if mine else []) + [Path(tempfile.gettempdir())]
    for folder in folders:
        try:
            path = folder / name
            path.write_text(f"compress {' '.join(sys.argv[1:])}\n\n{text}")
            return str(path)
        except OSError:
            continue
    return None


def _environment_error(e: OSError) -> str | None:
    """The one-line message of an OSError that is the machine's, not the program's (disk full,
    permission denied, ...), else ``None``."""
    from compress.io import ENVIRONMENT_ERRNOS

    if e.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = f" {e.filename!r}" if e.filename else ""
    return f"cannot access{where}: {e.strerror or e}; check the free space and the permissions of the folders given"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``compress`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = None
    try:
        args = build_parser().parse_args(argv or ["demo"])
        return _run(args)
    except UserError as e:
        _report(str(e))
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished epochs are checkpointed, run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`compress steps | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        message = _environment_error(e)
        if message is not None:
            _report(message)
            return 2
        return _internal_error(e, args)
    except Exception as e:  # the one catch of what nobody foresaw: a bug, reported in one line
        return _internal_error(e, args)


def _internal_error(e: Exception, args: argparse.Namespace | None) -> int:
    saved = _save_traceback(args)
    where = f"the full traceback is in {saved}" if saved else "the traceback could not be saved"
    _report(f"internal error ({type(e).__name__}: {clip(str(e), 160) or 'no message'}); this is a bug — {where}")
    return 1


def _run(args: argparse.Namespace) -> int:
    from compress import distributed

    several = None
    if not getattr(args, "distributed", False):
        several = (f"`compress {args.command or 'demo'}` runs in one process; under torchrun use `compress train`, "
                   f"`analyze`, `run`, `demo` or `cifar-k`")
    with distributed.session(seed=_seed(args), single_process=several) as quiet:
        if quiet and hasattr(args, "quiet"):
            args.quiet = True
        args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
