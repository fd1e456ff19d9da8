"""Progress output: a bar on a terminal, plain periodic lines in a log."""

from __future__ import annotations

import io
import time

from compress.progress import LineProgress, tqdm


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_at_most_every_interval_and_the_final_state():
    out = io.StringIO()
    bar = tqdm(range(40), desc="epoch 1/2", file=out, mininterval=0.05)
    assert isinstance(bar, LineProgress)
    for i in bar:
        time.sleep(0.003)
        bar.set_postfix(loss=f"{i:.1f}")
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert 2 <= len(lines) < 40  # periodic, not one per step
    assert all(line.startswith("epoch 1/2: ") for line in lines) and "epoch 1/2: 0/40" not in text
    assert lines[-1].startswith("epoch 1/2: 40/40 (100%)") and lines[-1].endswith("loss=39.0")


def test_an_inner_bar_that_does_not_stay_prints_no_closing_line_and_disabled_prints_nothing():
    out = io.StringIO()
    for _ in tqdm(range(3), file=out, leave=False, mininterval=60):
        pass
    assert out.getvalue() == ""  # shorter than the interval: the loop's own summary is enough
    quiet = io.StringIO()
    for _ in tqdm(range(3), file=quiet, disable=True):
        pass
    assert quiet.getvalue() == ""


def test_a_terminal_gets_tqdms_bar():
    bar = tqdm(range(3), file=_Tty())
    assert not isinstance(bar, LineProgress)
    bar.close()


def test_every_progress_bar_of_the_package_goes_through_compress_progress():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "compress"
    direct = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "progress.py"
              and re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M)]
    assert direct == [], f"use compress.progress.tqdm (plain lines in logs): {direct}"
