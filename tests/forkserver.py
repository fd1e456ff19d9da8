"""Many ``compress`` commands as separate processes, fast: a fork server.

Importing PyTorch and the package costs a CLI process 3-6 s of CPU, which dominates a test of a
bad input that is refused in milliseconds. The server is one Python process that imports the
command line (and the libraries it loads lazily) once, then forks a child per command: each
child is a real process of its own (its own PID, file descriptors, exit status, resource limits)
that runs ``compress.cli.main.main(argv)`` with its output in files, as the console script does.
Several children run at once.

The server speaks JSON lines: a request ``{"id", "argv", "cwd", "env", "fsize", "stdout",
"stderr"}`` on its stdin; ``{"id", "pid"}`` once forked and ``{"pid", "status", "seconds"}`` when
the child ends (status as :attr:`subprocess.Popen.returncode`: negative for a signal).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SERVER = r'''
import json, os, resource, signal, sys, threading, time, traceback
from compress.cli.main import main
for name in ("PIL.Image", "PIL.PngImagePlugin", "yaml", "onnx", "onnxruntime", "sklearn.datasets",
             "safetensors.torch", "compress.recipe.steps", "compress.recipe.runner", "compress.deploy.export",
             "compress.deploy.bench", "compress.deploy.predict", "compress.jobs", "compress.reports.bench",
             "compress.reports.run", "compress.reports.analysis", "compress.reports.cifar_k"):
    __import__(name)
lock, started = threading.Lock(), {}
out = os.fdopen(os.dup(1), "w")
devnull = os.open(os.devnull, os.O_RDONLY)


def reply(obj):
    with lock:
        out.write(json.dumps(obj) + "\n")
        out.flush()


def reap():
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(0.02)
            continue
        with lock:
            t0 = started.pop(pid, None)
        reply({"pid": pid, "status": os.waitstatus_to_exitcode(status),
               "seconds": time.monotonic() - t0 if t0 is not None else 0.0})


def child(req):
    code = 99
    try:
        os.chdir(req["cwd"])
        os.environ.update(req.get("env") or {})
        if req.get("fsize"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-long write fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        os.dup2(devnull, 0)
        for fd, key in ((1, "stdout"), (2, "stderr")):
            target = os.open(req[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.argv = ["compress", *req["argv"]]
        code = main(req["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


threading.Thread(target=reap, daemon=True).start()
for line in sys.stdin:
    req = json.loads(line)
    with lock:
        pid = os.fork()
        if pid == 0:
            child(req)
        started[pid] = time.monotonic()
    reply({"id": req["id"], "pid": pid})
'''


@dataclass
class Result:
    """What one command did."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # from fork to exit: the command's own time, without the import


class ForkServer:
    """A running fork server; :meth:`submit` starts a command, :meth:`result` waits for it."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONDONTWRITEBYTECODE="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=str(self.workdir))
        self._cond = threading.Condition()
        self._pids: dict[int, int] = {}  # request id -> pid
        self._ends: dict[int, dict] = {}  # pid -> end message
        self._next = 0
        self._argv: dict[int, list[str]] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._cond:
                if "id" in msg:
                    self._pids[msg["id"]] = msg["pid"]
                else:
                    self._ends[msg["pid"]] = msg
                self._cond.notify_all()

    def submit(self, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
               fsize: int | None = None) -> int:
        """Start ``compress <argv>`` in a new child; returns a handle for :meth:`result`."""
        with self._cond:
            handle = self._next
            self._next += 1
        self._argv[handle] = list(argv)
        req = {"id": handle, "argv": list(argv), "cwd": str(cwd or self.workdir), "env": env or {}, "fsize": fsize,
               "stdout": str(self.workdir / f"{handle}.out"), "stderr": str(self.workdir / f"{handle}.err")}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return handle

    def pid(self, handle: int, timeout: float = 60) -> int:
        """The child's PID, once forked."""
        with self._cond:
            if not self._cond.wait_for(lambda: handle in self._pids, timeout):
                raise TimeoutError("the fork server did not start the command")
            return self._pids[handle]

    def result(self, handle: int, timeout: float = 300) -> Result:
        """Wait for the command to end (killing it past ``timeout`` seconds)."""
        pid = self.pid(handle)
        with self._cond:
            if not self._cond.wait_for(lambda: pid in self._ends, timeout):
                os.kill(pid, 9)
                self._cond.wait_for(lambda: pid in self._ends, 30)
            end = self._ends.pop(pid)
        read = lambda suffix: (self.workdir / f"{handle}.{suffix}").read_text(errors="replace")  # noqa: E731
        return Result(self._argv[handle], end["status"], read("out"), read("err"), end["seconds"])

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_for(predicate, timeout: float = 120, what: str = "the condition") -> None:
    """Poll ``predicate`` every 20 ms until it is true; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"{what} did not happen within {timeout} s"
        time.sleep(0.02)
