"""The ``compress`` command line: thin commands over the library (see :func:`main`)."""

from compress.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
