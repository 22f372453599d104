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

smif jobs go one step further (``Zygote``): a worker warmed up once for a model run (its
models configured and imported, see smifdb.smifrun.warm_up) forks a new process for each job,
so that every job starts where a `smif run` process is after its first, in a process of its
own all the same.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

from smifdb import errors

log = logging.getLogger("smifdb.runner")
# Each worker runs the parent's main module again as __mp_main__ (multiprocessing's rule); under
# `python -m smifdb.cli` runpy then warns that the module is imported already, which it is:
# the zygote preloaded it. Set here, in the zygote, so every worker inherits it.
warnings.filterwarnings(
    "ignore", message=r"'smifdb\.cli' found in sys\.modules", category=RuntimeWarning
)
DEFAULT_MAX_JOBS = 1000
MEMORY_EVERY = 16  # jobs between two checks of a worker's resident memory
MAX_ZYGOTES = 2  # warm zygotes a runner keeps (one per smif model run), more while jobs run
ZYGOTE_IDLE = 300.0  # seconds unused before a zygote gives way to another's
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
    # pint, which xarray imports at a step's first reindex (0.3 s). (Not smif.convert.unit:
    # smif.convert needs rtree, which smif's sample does not, and a failed preload is silent.)
    return ("smifdb.smifrun", "smif.controller.execute_step", "smif.data_layer.file", "pint")


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


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _serve(conn: Connection, allow: tuple[str, ...], tail_bytes: int) -> None:
    """A worker's loop: call what it is sent, answer, until the runner hangs up; or, told to
    become a zygote, warm up and fork a process per call from then on."""
    _die_with_parent()  # with the forkserver, as it with us
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner decides when a job stops
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == _BECOME_ZYGOTE:
            _become_zygote(conn, message[1], message[2], allow, tail_bytes)
            return
        target, args, setup = message
        saved = _enter(setup) if setup else None
        try:
            answer = _answer(target, args, allow, tail_bytes)
        finally:
            if saved is not None:
                _leave(saved)
        _send(conn, answer)


def _answer(target: str, args: dict[str, Any], allow: tuple[str, ...], tail_bytes: int) -> Answer:
    from smifdb.execute import NotAllowed, allowed_callable
    from smifdb.pgtext import unstorable

    try:
        function = allowed_callable(target, allow)
        value = function(**args)
        if value is not None and (why := unstorable(value)):
            raise ValueError(f"the returned value cannot be stored as JSON: {why}")
        return Answer("ok", value)
    except NotAllowed as exc:
        return Answer("not_allowed", error=str(exc))
    except BaseException as exc:  # sys.exit() too: it fails the job, not the worker
        tail = traceback.format_exc()[-tail_bytes:]
        return Answer("error", error=f"{type(exc).__name__}: {exc}"[:2000], tail=tail)


def _send(conn: Connection, answer: Answer) -> None:
    try:
        conn.send(answer)
    except Exception as exc:  # a value pickle cannot carry
        conn.send(Answer("error", error=f"the result cannot be sent back: {exc!r}"[:2000]))


# -- zygotes: a process per job, forked from a warm one ------------------------------------

_BECOME_ZYGOTE = "become zygote"
REAP_EVERY = 0.05  # seconds a zygote waits for a request before it reaps its children


def _become_zygote(
    conn: Connection, warm: str, args: dict[str, Any], allow: tuple[str, ...], tail_bytes: int
) -> None:
    """Run ``warm(**args)`` (smifdb's own code, not a job's: no allow list), answer, then
    fork a child per job. Each child runs one call and answers on a pipe of its own, which the
    runner handed over with the request; a child that ends without answering gets a note
    from here in its place, with its exit status. The zygote only forks, reaps and kills."""
    from smifdb.execute import resolve

    try:
        resolve(warm)[0](**args)
    except BaseException as exc:
        _send(conn, Answer("error", error=f"{type(exc).__name__}: {exc}"[:2000]))
        return
    _send(conn, Answer("ok"))
    children: dict[int, Connection] = {}
    try:
        while True:
            try:
                ready = conn.poll(REAP_EVERY if children else None)  # idle: nothing to reap
                message = conn.recv() if ready else None
            except (EOFError, OSError):
                return  # the runner hung up
            if message is not None and message[0] == "kill":
                if message[1] in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(message[1], signal.SIGKILL)
            elif message is not None:
                _, target, args, setup = message
                answers = Connection(reduction.recv_handle(conn))
                pid = os.fork()
                if pid == 0:
                    _child(conn, answers, children, target, args, setup, allow, tail_bytes)
                children[pid] = answers
                conn.send(pid)
            _reap(children)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _child(
    conn: Connection,
    answers: Connection,
    others: dict[int, Connection],
    target: str,
    args: dict[str, Any],
    setup: dict[str, Any],
    allow: tuple[str, ...],
    tail_bytes: int,
) -> None:
    """A forked child of a zygote: one call, its answer, and the end of the process."""
    try:
        _die_with_parent()
        conn.close()
        for other in others.values():
            other.close()
        _enter(setup)
        _send(answers, _answer(target, args, allow, tail_bytes))
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    finally:
        os._exit(0)


def _reap(children: dict[int, Connection]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        answers = children.pop(pid, None)
        if answers is not None:  # read only if the child ended without answering
            with contextlib.suppress(OSError):
                answers.send(("ended", os.waitstatus_to_exitcode(status)))
            answers.close()


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
        return _death(self.process.exitcode, self.killed)

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


def _death(code: int | None, killed: bool) -> str:
    if killed:
        return "its worker was killed to stop it"
    if code is not None and code < 0:
        return f"its worker process died of {signal.Signals(-code).name}"
    return f"its worker process exited with status {code}"


class Zygote:
    """A worker warmed up once (say, for one smif model run: its project read and its models
    imported) that forks a new process for each job: each job still runs in a process of its
    own, killable and unable to touch the next, without paying the warm-up again."""

    def __init__(self, pool: WorkerPool, warm: str, args: dict[str, Any]) -> None:
        self.worker = Worker(pool.context, pool.allow, pool.tail_bytes)
        self.lock = threading.Lock()  # one request and its reply at a time
        self.used = time.monotonic()
        self.running = 0  # its children not yet answered: it is not closed while they run
        try:
            self.worker.conn.send((_BECOME_ZYGOTE, warm, args))
            answer = self.worker.conn.recv()
        except (EOFError, OSError) as exc:
            self.close()
            raise WorkerDied(self.worker.death()) from exc
        if answer.kind != "ok":
            self.close()
            raise WorkerDied(f"its zygote could not warm up: {answer.error}")

    def alive(self) -> bool:
        return self.worker.process.is_alive()

    def child(self) -> Child:
        """A child to be; the caller holds the pool's zygote lock."""
        self.used = time.monotonic()
        with self.lock:
            self.running += 1
        return Child(self)

    def idle(self) -> bool:
        return self.running == 0

    def _fork(self, target: str, args: dict[str, Any], setup: dict[str, Any]) -> tuple:
        """A new child running this call: (its pid, the runner's end of its answer pipe)."""
        ours, theirs = multiprocessing.Pipe()
        try:
            with self.lock:
                conn = self.worker.conn
                conn.send(("run", target, args, setup))
                reduction.send_handle(conn, theirs.fileno(), self.worker.process.pid)
                return conn.recv(), ours
        except (EOFError, OSError) as exc:
            ours.close()
            raise WorkerDied("its zygote process ended") from exc
        finally:
            theirs.close()

    def kill(self, pid: int) -> None:
        with contextlib.suppress(OSError), self.lock:
            self.worker.conn.send(("kill", pid))

    def close(self) -> None:
        self.worker.close()


class Child:
    """One job's process, forked by a Zygote; used like a Worker for one call."""

    def __init__(self, zygote: Zygote) -> None:
        self.zygote = zygote
        self.pid: int | None = None
        self.killed = False

    def call(self, target: str, args: dict[str, Any], setup: dict[str, Any]) -> Answer:
        try:
            self.pid, answers = self.zygote._fork(target, args, setup)
            if self.killed:  # stopped while it was being forked
                self.zygote.kill(self.pid)
            try:
                message = answers.recv()
            except (EOFError, OSError) as exc:
                why = _death(None, True) if self.killed else "its zygote died"
                raise WorkerDied(why) from exc
            finally:
                answers.close()
        finally:
            with self.zygote.lock:
                self.zygote.running -= 1
        if isinstance(message, Answer):
            return message
        raise WorkerDied(_death(message[1], self.killed))

    def kill(self) -> None:
        self.killed = True
        if self.pid is not None:
            self.zygote.kill(self.pid)


def _forkserver(preload: tuple[str, ...]) -> Any:
    """multiprocessing's forkserver context, its zygote to import ``preload`` once (each
    worker forks from it with them imported). And the main module: each worker runs it again
    as __mp_main__ (multiprocessing's rule), its imports then cached. By name (`python -m
    smifdb.cli`) or by path."""
    _check_main()
    context = multiprocessing.get_context("forkserver")
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    first = [main.name] if main is not None else ["__main__"]
    context.set_forkserver_preload([*first, "smifdb.workers", "smifdb.execute", *preload])
    return context


def prestart(preload: tuple[str, ...]) -> None:
    """Start the zygote now, importing ``preload`` while other work goes on (a model run's
    submission, say), rather than at the first job that needs a worker. Its preloads must
    be those the runner's WorkerPool is then given."""
    from multiprocessing import forkserver

    _forkserver(preload)
    forkserver.ensure_running()


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
        self.allow, self.max_jobs, self.max_memory = allow, max_jobs, max_memory
        self.tail_bytes = tail_bytes
        self.context = _forkserver(preload)
        self._idle: list[Worker] = []
        self._lock = threading.Lock()
        self._zygotes: dict[tuple, Zygote] = {}  # oldest first
        self._zygote_lock = threading.Lock()  # held while one warms up: its jobs wait for it
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

    def zygote_child(self, key: tuple, warm: str, args: dict[str, Any]) -> Child | Worker:
        """A process for one job, forked from the zygote ``key`` (started and warmed with
        ``warm(**args)`` on first use); a fresh worker if that zygote cannot warm up."""
        with self._zygote_lock:
            now = time.monotonic()
            for old_key, old in list(self._zygotes.items()):
                unused = old_key != key and old.idle() and now - old.used > ZYGOTE_IDLE
                if not old.alive() or unused:
                    del self._zygotes[old_key]
                    old.close()
            zygote = self._zygotes.get(key)
            if zygote is None:
                # Past MAX_ZYGOTES, the oldest with no job running goes: closing a zygote
                # ends its children, so one whose jobs run stays until they end.
                spare = [k for k, z in self._zygotes.items() if z.idle()]
                for old_key in spare[: max(len(self._zygotes) + 1 - MAX_ZYGOTES, 0)]:
                    self._zygotes.pop(old_key).close()
                try:
                    zygote = Zygote(self, warm, args)
                except WorkerDied as exc:
                    log.warning("jobs run without a warm zygote: %s", exc)
                    return self.fresh()
                self._zygotes[key] = zygote
            return zygote.child()

    def give(self, worker: Worker | Child) -> None:
        """Back to the idle list, unless it is dead, spent or too big: then it ends."""
        if isinstance(worker, Child):  # its process has ended
            return
        # Its size is read every MEMORY_EVERY jobs (three system calls, which 64 slots making
        # them for every no-op job turned into a fifth of a runner's time), and whether it is
        # alive when it is taken again.
        spent = worker.jobs >= self.max_jobs or (
            worker.jobs % MEMORY_EVERY == 0 and worker.resident() > self.max_memory
        )
        if worker.killed or spent:
            worker.close()
            return
        with self._lock:
            self._idle.append(worker)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        with self._zygote_lock:
            zygotes, self._zygotes = list(self._zygotes.values()), {}
        for worker in [*idle, *zygotes]:
            worker.close()
