"""The error type for mistakes a user can fix: bad names, bad files, bad values; and the helpers
that keep a user's value in a message short and printable."""

from __future__ import annotations

import difflib
import reprlib
from typing import Any, Iterable

__all__ = ["UserError", "OptionError", "unknown_name", "shorten", "clip", "printable", "MAX_SHOWN"]

MAX_SHOWN = 200  # characters of a user's value shown in a message, at most

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 120, 120, 40


class UserError(ValueError):
    """A problem with the user's input, reported as one line without a traceback.

    The command line catches it, prints ``error: <message>`` and exits with status 2.
    Library callers get an ordinary ``ValueError`` subclass.
    """


def printable(text: str) -> str:
    """``text`` with every control or non-printable character escaped (``\\n``, ``\\x1b``, ...),
    so that a name read from a file can neither break a line nor drive the terminal."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def shorten(value: Any, limit: int = MAX_SHOWN) -> str:
    """A user's value as it appears in a message: its ``repr`` (strings quoted), nested
    containers cut after a few levels and items, never more than ``limit`` characters, one line.

    Safe on any value: a container nested 20,000 deep or a string of a gigabyte gives a short
    line, not a ``RecursionError`` or a wall of text.
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # a repr that fails (a hostile object) must not hide the real error
        text = f"<{type(value).__name__}>"
    text = printable(text)
    if len(text) > limit:
        text = text[: limit - 5] + " ...)" if text[:1] in "[{(" else text[: limit - 4] + " ..."
    return text


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    """A message text (e.g. another library's error) on one printable line of at most ``limit`` characters."""
    text = printable(" ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> UserError:
    """Build the error for a name that is not one of ``valid``, with a "did you mean" hint.

    Args:
        kind: what was being looked up ("model", "tap", "dataset", ...).
        name: the name the user gave.
        valid: every name that would have been accepted.
    """
    valid = sorted(set(valid))
    name = str(name)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5) if len(name) <= MAX_SHOWN else []
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    shown = ", ".join(valid[:40]) + (f", ... ({len(valid)} in all)" if len(valid) > 40 else "")
    return UserError(f"unknown {kind} {shorten(name)}{hint}; valid: {shown}")


class OptionError(UserError):
    """A bad value of one configuration field, raised where the field is checked (a config
    class's ``__post_init__``). Shown as ``<key> <message>`` on its own, and as
    ``<where>.<key>: <message>`` when a recipe section is loaded (:func:`compress.config.from_dict`).
    """

    def __init__(self, key: str, message: str):
        super().__init__(f"{key} {message}")
        self.key, self.message = key, message
