"""Python jobs in warm worker processes: killable, and unable to take the runner down.

A call in a runner's own thread cannot be stopped (a timeout frees the record, not the slot)
and shares the runner's process (``os._exit`` or a segfault ends the runner). So a runner
keeps worker processes, at most one per slot, each running one job at a time. They are forked
by multiprocessing's forkserver, a zygote that has imported the ``--preload`` modules once, so
a new worker starts in milliseconds with them imported. Stopping a job (timeout, cancel,
release) kills its worker; a worker that dies (``os._exit``, a signal, the OOM killer) fails
only its attempt; either way the next job gets a new worker. A worker is also replaced after
``max_jobs`` jobs or once its resident memory passes ``max_memory`` bytes, so what one job
leaks or caches does not pile up. As with any multiprocessing, a worker imports the parent's
main module again: code that starts a Runner itself belongs under ``if __name__ ==
"__main__"``.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from smifdb import errors

DEFAULT_MAX_JOBS = 1000
DEFAULT_MAX_MEMORY = 1 << 30  # bytes of resident memory
_PR_SET_PDEATHSIG = 1
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Answer:
    """What a worker said of one call: ``kind`` is 'ok' (``value``), 'not_allowed' or
    'error' (``error``, ``tail``: the traceback's end)."""

    kind: str
    value: Any = None
    error: str | None = None
    tail: str | None = None


def default_preload() -> tuple[str, ...]:
    """What every zygote imports: smif's step, where smif is installed (a second of imports
    a smif job would otherwise pay; the zygote starts at a runner's first python or smif job,
    never for runners of commands alone)."""
    if importlib.util.find_spec("smif") is None:
        return ()
    # smif.convert.unit imports pint, which a step would otherwise import first (0.3 s).
    return (
        "smifdb.smifrun",
        "smif.controller.execute_step",
        "smif.data_layer.file",
        "smif.convert.unit",
    )


class NoWorkers(errors.BadInput):
    """This process's main module cannot be imported again, as each worker must."""


def _check_main() -> None:
    """Workers import the parent's ``__main__`` again (multiprocessing's rule): `smifdb` and
    `python -m smifdb.cli` are fine, and so is a script guarded by ``if __name__ ==
    "__main__"``; code read from standard input is not a file to import."""
    main = sys.modules.get("__main__")
    if getattr(main, "__spec__", None) is not None:
        return
    path = getattr(main, "__file__", None)
    if path is not None and not os.path.isfile(path):
        raise NoWorkers(
            f"python jobs run in worker processes, which import the main module again, and "
            f"{path!r} is not a file: run from a file (its code under if __name__ == "
            f"'__main__'), or call python jobs in threads (--python-in-thread)"
        )


class WorkerDied(Exception):
    """The worker ended mid-call: killed on purpose, or by what the job did."""


def _serve(conn: Connection, allow: tuple[str, ...], tail_bytes: int) -> None:
    """A worker's loop: call what it is sent, answer, until the runner hangs up."""
    with contextlib.suppress(OSError, AttributeError):  # die with the zygote, as it with us
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner decides when a job stops
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from smifdb.execute import NotAllowed, allowed_callable
    from smifdb.pgtext import unstorable

    while True:
        try:
            target, args, setup = conn.recv()
        except (EOFError, OSError):
            return
        saved = _enter(setup) if setup else None
        try:
            function = allowed_callable(target, allow)
            value = function(**args)
            if value is not None and (why := unstorable(value)):
                raise ValueError(f"the returned value cannot be stored as JSON: {why}")
            answer = Answer("ok", value)
        except NotAllowed as exc:
            answer = Answer("not_allowed", error=str(exc))
        except BaseException as exc:  # sys.exit() too: it fails the job, not the worker
            tail = traceback.format_exc()[-tail_bytes:]
            answer = Answer("error", error=f"{type(exc).__name__}: {exc}"[:2000], tail=tail)
        finally:
            if saved is not None:
                _leave(saved)
        try:
            conn.send(answer)
        except Exception as exc:  # a value pickle cannot carry
            conn.send(Answer("error", error=f"the result cannot be sent back: {exc!r}"[:2000]))


def _enter(setup: dict[str, Any]) -> dict[str, Any]:
    """Make the worker look like a job's own process: its folder, its environment (the
    runner's less its secrets, as a command job's), its output into its log file."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {"cwd": os.getcwd(), "fds": (os.dup(1), os.dup(2)), "environ": dict(os.environ)}
    fd = os.open(setup["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(setup["environ"])
    os.chdir(setup["cwd"])
    sys.dont_write_bytecode = True  # beside the models' code is the runner's cache
    return saved


def _leave(saved: dict[str, Any]) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    for target, fd in zip((1, 2), saved["fds"], strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(saved["environ"])
    with contextlib.suppress(OSError):
        os.chdir(saved["cwd"])


class Worker:
    """One worker process and its end of the pipe; used by one slot thread at a time."""

    def __init__(self, context: Any, allow: tuple[str, ...], tail_bytes: int) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(child, allow, tail_bytes), name="smifdb-worker", daemon=True
        )
        self.process.start()
        child.close()
        self.jobs = 0
        self.killed = False

    def call(
        self, target: str, args: dict[str, Any], setup: dict[str, Any] | None = None
    ) -> Answer:
        """Run one job here (``setup``: its folder, environment and log file, see _enter);
        WorkerDied if the process ends first."""
        self.jobs += 1
        try:
            self.conn.send((target, args, setup))
            return self.conn.recv()
        except (EOFError, OSError, BrokenPipeError) as exc:
            self.process.join(5)
            raise WorkerDied(self.death()) from exc

    def death(self) -> str:
        code = self.process.exitcode
        if self.killed:
            return "its worker was killed to stop it"
        if code is not None and code < 0:
            return f"its worker process died of {signal.Signals(-code).name}"
        return f"its worker process exited with status {code}"

    def kill(self) -> None:
        self.killed = True
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(self.process.pid, signal.SIGKILL)

    def resident(self) -> int:
        try:
            with open(f"/proc/{self.process.pid}/statm") as statm:
                return int(statm.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            return 0

    def close(self) -> None:
        self.kill()
        self.conn.close()
        self.process.join(5)


class WorkerPool:
    """A runner's idle workers, taken by a slot for a job and given back after it."""

    def __init__(
        self,
        allow: tuple[str, ...],
        *,
        preload: tuple[str, ...] = (),
        max_jobs: int = DEFAULT_MAX_JOBS,
        max_memory: int = DEFAULT_MAX_MEMORY,
        tail_bytes: int = 4096,
    ) -> None:
        _check_main()
        self.allow, self.max_jobs, self.max_memory = allow, max_jobs, max_memory
        self.tail_bytes = tail_bytes
        self.context = multiprocessing.get_context("forkserver")
        # The zygote imports these once; each worker forks from it with them imported.
        # And the main module: each worker runs it again as __mp_main__ (multiprocessing's
        # rule), its imports then cached. By name (`python -m smifdb.cli`) or by path.
        main = getattr(sys.modules.get("__main__"), "__spec__", None)
        first = [main.name] if main is not None else ["__main__"]
        self.context.set_forkserver_preload([*first, "smifdb.workers", "smifdb.execute", *preload])
        self._idle: list[Worker] = []
        self._lock = threading.Lock()
        self.started = 0  # workers started, for logs and tests

    def take(self) -> Worker:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.process.is_alive():
                    return worker
                worker.close()
            self.started += 1
        return Worker(self.context, self.allow, self.tail_bytes)

    def fresh(self) -> Worker:
        """A new worker, for a job that must not share one (it is ended when given back)."""
        with self._lock:
            self.started += 1
        worker = Worker(self.context, self.allow, self.tail_bytes)
        worker.jobs = self.max_jobs  # spent after this one
        return worker

    def give(self, worker: Worker) -> None:
        """Back to the idle list, unless it is dead, spent or too big: then it ends."""
        spent = worker.jobs >= self.max_jobs or worker.resident() > self.max_memory
        if worker.killed or spent or not worker.process.is_alive():
            worker.close()
            return
        with self._lock:
            self._idle.append(worker)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()
