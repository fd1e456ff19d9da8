"""Progress bars that suit where the output goes.

On a terminal, :data:`tqdm` is ``tqdm.auto``'s bar, redrawn in place. When standard error is a
file or a pipe (a log of ``nohup``, a CI job, ``torchrun``'s captured output), a bar redrawn with
carriage returns fills the log with thousands of fragments; there :data:`tqdm` is
:class:`LineProgress` instead: the same interface, printing one plain, complete line at most
every :data:`LOG_INTERVAL` seconds (and the final state of a bar that printed before; a loop
shorter than the interval prints nothing), e.g.::

    epoch 3/12: 236/450 (52%) 03:53 elapsed, 02:46 left, 1.28it/s, acc=0.563, loss=1.270

Whether stderr is a terminal is decided when a bar is made, so redirecting in a test or a
subprocess takes effect. ``tqdm.write`` works with both.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm as _terminal_tqdm
from tqdm.std import tqdm as _std_tqdm

__all__ = ["tqdm", "LineProgress", "LOG_INTERVAL"]

LOG_INTERVAL = 30.0  # seconds between two progress lines in a log


class LineProgress(_std_tqdm):
    """A tqdm whose every display is one plain line (no carriage return, no bar), at most one
    per ``mininterval`` seconds (default :data:`LOG_INTERVAL`), none at the start, and the final
    state of a bar that printed before."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("mininterval", LOG_INTERVAL)
        kwargs.setdefault("maxinterval", max(kwargs["mininterval"], 10.0))
        kwargs.setdefault("bar_format", "{desc}{desc_sep}{n_fmt}/{total_fmt} ({percentage:.0f}%) {elapsed} elapsed, "
                                        "{remaining} left, {rate_fmt}{postfix}")
        kwargs["dynamic_ncols"] = False
        kwargs["ncols"] = None
        self._printed: int | None = None
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        d = super().format_dict
        d["bar_format"] = self._line_format(d)
        return d

    def _line_format(self, d: dict[str, Any]) -> str:
        fmt = self.bar_format
        if d.get("total") is None:  # no total: count, elapsed and rate only
            fmt = "{desc}{desc_sep}{n_fmt} {elapsed} elapsed, {rate_fmt}{postfix}"
        return fmt.replace("{desc_sep}", ": " if d.get("prefix") else "")

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self.disable:
            return False
        if msg is None:
            if self.n == 0:  # the start says nothing a log needs (short loops print no line at all)
                return True
            msg = self.format_meter(**self.format_dict)
        if msg.strip():  # tqdm clears a bar with an empty message: nothing to print in a log
            self.fp.write(msg.strip() + "\n")
            self.fp.flush()
            self._printed = self.n
        return True

    def close(self) -> None:
        if self.disable:
            return
        if self.leave and self._printed is not None and self._printed != self.n:
            self.display()  # the final state of a bar long enough to have printed before
        fp, self.fp = self.fp, _Discard()  # tqdm's own closing newline or clearing is not for a log
        try:
            super().close()
        finally:
            self.fp = fp

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)  # shown with the next periodic line

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description(desc, refresh=False)


class _Discard:
    def write(self, s: str) -> None:
        pass

    def flush(self) -> None:
        pass


def tqdm(*args: Any, **kwargs: Any) -> _std_tqdm:
    """A progress bar: tqdm's on a terminal, :class:`LineProgress` when stderr is not one."""
    stream = kwargs.get("file") or sys.stderr
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        terminal = False
    return (_terminal_tqdm if terminal else LineProgress)(*args, **kwargs)


tqdm.write = _std_tqdm.write  # type: ignore[attr-defined]
