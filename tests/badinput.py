"""The harness of the bad-input tests (``test_bad_input.py``, ``test_bad_files.py``).

A case is a function ``(tmp, out, base) -> Case``: it prepares its files under ``tmp`` and names
the command and the fragments its one error line must contain. ``out`` is a folder holding the
files of an earlier run (:data:`SENTINELS`); ``base`` holds a tiny trained run, its model file
and its ONNX export. Every case of a module runs as its own process, several at once, through a
:class:`~forkserver.ForkServer` (:func:`run_cases`); the test of a case then checks that the
command exited with status 2, printed exactly one line ``error: ...`` with the fragments and no
traceback, and left every earlier file byte for byte as it was (:func:`check_refused`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import yaml
from PIL import Image

from forkserver import ForkServer, Result

TINY = ["--model", "vgg6", "--width", "0.125", "--fc-hidden", "none"]
T = [*TINY, "--limit-train", "200", "--limit-test", "100", "--epochs", "1"]
RECIPE = {"name": "bad", "model": {"name": "vgg6", "options": {"width": 0.125, "fc_hidden": []},
                                   "train": {"epochs": 1}},
          "data": {"name": "digits", "limit_train": 100, "limit_test": 50}, "steps": [{"trim": {"tap": "plateau"}}]}
SENTINELS = {"config.yaml": b"model: an earlier run\n", "analysis.json": b'{"earlier": true}\n',
             "checkpoint.pt": os.urandom(4096)}
IN_FLIGHT = 6  # commands running at once (each is one process)


@dataclass
class Case:
    """One bad input: the command, what its error line must say, and what must stay untouched."""

    argv: list[str]
    fragments: list[str]
    keep: list[Path] = field(default_factory=list)  # more folders or files whose bytes must not change
    max_seconds: float | None = None  # the command's own time (a memory bound: refused before allocating)
    fsize: int | None = None  # a limit on the size of any file written (a full disk)


@dataclass
class Base:
    """A tiny trained run (``run/checkpoint.pt``, ``run/config.yaml``, ``run/model.pt``) and its
    ONNX export, made once per module."""

    run: Path
    onnx: Path

    @property
    def ckpt(self) -> Path:
        return self.run / "checkpoint.pt"

    @property
    def model(self) -> Path:
        return self.run / "model.pt"


def make_base(server: ForkServer, folder: Path) -> Base:
    """Train the tiny run and export it (through the server: two commands)."""
    run = folder / "run"
    done = server.result(server.submit(["train", *T, "--out", str(run), "--quiet"]))
    assert done.returncode == 0, done.stderr
    onnx = folder / "model.onnx"
    done = server.result(server.submit(["export", str(run / "model.pt"), "--out", str(onnx), "--verify-samples", "8"]))
    assert done.returncode == 0, done.stderr
    return Base(run, onnx)


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) and its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@dataclass
class Outcome:
    """A case as prepared and its result, with the snapshots taken before it ran."""

    case: Case
    result: Result
    before: dict[Path, dict[str, bytes]]
    cwd: Path

    def __repr__(self) -> str:  # short in a failure report: no file contents
        return f"Outcome(argv={self.case.argv}, returncode={self.result.returncode})"


def run_cases(server: ForkServer, cases: list[Callable], tmp: Path, base: Base) -> dict[str, Outcome]:
    """Prepare every case, run them :data:`IN_FLIGHT` at a time, and return the outcome per case name."""
    prepared: dict[str, tuple[Case, dict[Path, dict[str, bytes]], Path]] = {}
    for fn in cases:
        folder = tmp / fn.__name__.lstrip("_")
        out = folder / "out"
        out.mkdir(parents=True)
        for name, data in SENTINELS.items():  # artifacts of an earlier run in the output folder
            (out / name).write_bytes(data)
        case = fn(folder, str(out), base)
        watched = [out, base.run, base.onnx, *case.keep]
        prepared[fn.__name__] = (case, {p: snapshot(p) for p in watched}, folder)
    outcomes: dict[str, Outcome] = {}
    running: list[tuple[str, int]] = []
    names = list(prepared)
    while names or running:
        while names and len(running) < IN_FLIGHT:
            name = names.pop(0)
            case, _, folder = prepared[name]
            running.append((name, server.submit(case.argv, cwd=folder, fsize=case.fsize)))
        name, handle = running.pop(0)
        case, before, folder = prepared[name]
        outcomes[name] = Outcome(case, server.result(handle), before, folder)
    return outcomes


def check_refused(outcome: Outcome) -> None:
    """Exit status 2, one line ``error: ...`` holding every fragment, no traceback, nothing changed."""
    case, proc = outcome.case, outcome.result
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    assert err.splitlines() == [err] and err.startswith("error: "), err
    for fragment in case.fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    for path, before in outcome.before.items():
        assert snapshot(path) == before, f"{path} changed"  # every earlier file intact, no temporary files left
    if case.max_seconds is not None:
        assert proc.seconds < case.max_seconds, f"refused only after {proc.seconds:.1f} s"


def images(root: Path, folders: dict[str, list[tuple[str, str, int | tuple[int, int]]]]) -> str:
    """An image folder: ``{split/class: [(file name, PIL mode, size), ...]}``; returns ``imagefolder:<root>``."""
    for folder, files in folders.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, mode, size in files:
            size = (size, size) if isinstance(size, int) else size
            color = 60 if mode in ("L", "P", "I", "I;16") else (60,) * len(mode)
            Image.new(mode, size, color=color).save(root / folder / name)
    return f"imagefolder:{root}"


def good_split(split: str, size: int = 8) -> dict:
    """Two classes of two RGB images each."""
    return {f"{split}/{c}": [(f"{i}.png", "RGB", size) for i in range(2)] for c in ("cat", "dog")}


def recipe(tmp: Path, change: dict | None = None, text: str | bytes | None = None, name: str = "recipe.yaml") -> str:
    """A recipe file: :data:`RECIPE` with ``change`` applied, or the given text or bytes."""
    path = tmp / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text if text is not None else yaml.safe_dump({**RECIPE, **(change or {})}))
    return str(path)


def copy_run(base: Base, tmp: Path) -> Path:
    """A copy of the base training run that a case may damage."""
    return Path(shutil.copytree(base.run, tmp / "run"))


def outcomes_of(cases: list[Callable], tmp_path_factory) -> Iterator[dict[str, Outcome]]:
    """Run ``cases`` (forked from one server, against one trained base) and yield their outcomes:
    the body of a module-scoped ``outcomes`` fixture."""
    server = ForkServer(tmp_path_factory.mktemp("server"))
    try:
        base = make_base(server, tmp_path_factory.mktemp("base"))
        yield run_cases(server, cases, tmp_path_factory.mktemp("cases"), base)
    finally:
        server.close()
