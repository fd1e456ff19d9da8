"""The error type for mistakes a user can fix: bad names, bad files, bad values."""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(ValueError):
    """A problem with the user's input, reported as one line without a traceback.

    The command line catches it, prints ``error: <message>`` and exits with status 2.
    Library callers get an ordinary ``ValueError`` subclass.
    """


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> UserError:
    """Build the error for a name that is not one of ``valid``, with a "did you mean" hint.

    Args:
        kind: what was being looked up ("model", "tap", "dataset", ...).
        name: the name the user gave.
        valid: every name that would have been accepted.
    """
    valid = sorted(set(valid))
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    shown = ", ".join(valid[:40]) + (f", ... ({len(valid)} in all)" if len(valid) > 40 else "")
    return UserError(f"unknown {kind} {name!r}{hint}; valid: {shown}")


class OptionError(UserError):
    """A bad value of one configuration field, raised where the field is checked (a config
    class's ``__post_init__``). Shown as ``<key> <message>`` on its own, and as
    ``<where>.<key>: <message>`` when a recipe section is loaded (:func:`compress.config.from_dict`).
    """

    def __init__(self, key: str, message: str):
        super().__init__(f"{key} {message}")
        self.key, self.message = key, message
