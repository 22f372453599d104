"""What every kind of job runs on (smifdb/kinds/ has one module per kind): the Attempt.

Shared by the kinds: a subprocess run as its own process group (so a timeout or cancellation
kills everything it started) without the runner's secrets in its environment, its output in a
capped log (run_process); the allow-list of the callables Python code may run in a runner.
Every attempt, outside any database transaction, ends in an Outcome for the runner to record.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from smifdb import proctree
from smifdb.pgtext import unstorable
from smifdb.store.queue import ClaimedJob, Outcome

if TYPE_CHECKING:  # not at run time: `import smifdb` (spec -> kinds -> here) must not import
    # smifdb.watchdog, which runs as `python -m smifdb.watchdog` (runpy warns on stderr)
    from smifdb.watchdog import Watchdog

if TYPE_CHECKING:
    from smifdb.files import JobFiles

LOG_TAIL_BYTES = 4000
KILL_GRACE = 5.0
MAX_LOG_BYTES = 64 * 2**20  # a job's log file on disk, at most
MAX_RESULT_BYTES = 16 * 2**20  # a result file read into memory and stored as jsonb, at most
TAIL_BYTES = 2**20  # of a log past its cap, the last bytes kept (in memory until the end)
MARKER_ROOM = 200  # bytes kept free in a capped log for the line that says what was dropped
DRAIN_TIMEOUT = 2.0  # seconds to read what a job's ended processes left in the pipe
_PR_SET_PDEATHSIG = 1
# Python jobs run inside the runner, with its connections and secrets: only callables under
# these module prefixes (and those a runner is told of) run anywhere.
# The built-in examples, smif's --in-process jobs, and the DAFNI shim's publisher steps.
DEFAULT_PYTHON_ALLOW = ("smifdb.examples", "smifdb.smifrun", "smifdb.dafni:publish")
# The runner's credentials, which a job's environment never inherits (a spec's own `env:` may
# still set them): whatever a job prints, its log and log tail would show them.
SECRET_ENV = frozenset(
    {
        "SMIFDB_DSN",
        "SMIFDB_TEST_DSN",
        "SMIFDB_API_DSN",
        "SMIFDB_API_TOKEN",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGSSLKEY",
        "PGSSLCERT",
        "PGSSLROOTCERT",
        "PGSSLCRL",
    }
)
SECRET_SUFFIXES = ("_DSN", "_TOKEN", "_PASSWORD", "_SECRET")  # of any other SMIFDB_* name
_MODULE_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")


def is_secret(name: str) -> bool:
    return name in SECRET_ENV or (name.startswith("SMIFDB_") and name.endswith(SECRET_SUFFIXES))


def job_environment(base: dict[str, str] | os._Environ) -> dict[str, str]:
    """The runner's environment less its secrets: what every command job starts from."""
    return {k: v for k, v in base.items() if not is_secret(k)}


def check_allow_entry(entry: str) -> str:
    """An allow-list entry: a dotted module prefix, or one exact ``module:attr`` callable."""
    module, colon, attr = entry.partition(":")
    if not _MODULE_PATH.match(module) or (colon and not _MODULE_PATH.match(attr)):
        raise ValueError(
            f"{entry!r} is not a module prefix such as 'mypkg' or 'mypkg.models' (or one "
            "callable, 'mypkg.models:simulate')"
        )
    return entry


def python_allowed(target: str, allow: tuple[str, ...]) -> bool:
    """Is ``module:attr`` allowed? A prefix allows its module and every module under it, by
    dotted path ('mypkg' allows 'mypkg:f' and 'mypkg.sub:f', not 'mypkgevil:f')."""
    module = target.partition(":")[0]
    return any(
        target == entry if ":" in entry else module == entry or module.startswith(entry + ".")
        for entry in allow
    )


@dataclass(frozen=True)
class JobPolicy:
    """What a runner lets its jobs do, the same for every attempt it runs."""

    python_allow: tuple[str, ...] = DEFAULT_PYTHON_ALLOW
    max_result_bytes: int = MAX_RESULT_BYTES
    max_log_bytes: int = MAX_LOG_BYTES
    workers: Any = None  # smifdb.workers.WorkerPool for python jobs; None: in slot threads
    smif_processes: bool = False  # smif jobs as `smif step` processes, not warm workers


def _die_with_runner() -> Callable[[], None] | None:
    """A preexec hook so a job's process is killed if its runner dies (Linux only).

    Otherwise a SIGKILLed runner leaves its jobs running while another runner reruns them.
    This covers the job's own process from its first instruction; the runner's watchdog
    (smifdb/watchdog.py) covers the rest of its process group once it is registered.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return hook


_PREEXEC = _die_with_runner() if sys.platform.startswith("linux") else None  # see watchdog.py
_SWEEPER = proctree.Sweeper()  # ends what left a job's group (see proctree.py)
# Commands also find programs installed beside the runner (its venv's bin, e.g. `smif`), after
# everything on PATH: a runner started as .venv/bin/smifdb works without activating the venv.
_PATH = os.pathsep.join(
    p for p in (os.environ.get("PATH", os.defpath), str(Path(sys.executable).parent)) if p
)


@dataclass
class Attempt:
    """One running attempt; the runner's other threads may ask it to stop."""

    job: ClaimedJob
    owner: str
    log_dir: Path
    watchdog: Watchdog | None = None  # kills the process group if the runner dies
    policy: JobPolicy = field(default_factory=JobPolicy)
    started: float = field(default_factory=time.monotonic)
    stop_reason: str | None = None  # 'timeout' | 'cancelled' | 'released'
    kill_at: float | None = None  # when a stopped attempt's process group gets SIGKILL
    process: subprocess.Popen | None = None
    files: JobFiles | None = None  # the runner's data plane: cache, data connections
    folder: Path | None = None  # the attempt's private folder, if its kind made one
    worker: Any = None  # the python worker process running it (smifdb.workers.Worker)
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # closed at its end
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def deadline(self) -> float | None:
        return self.started + self.job.timeout if self.job.timeout else None

    def outcome(self, status: str, final: bool = False, **kwargs: Any) -> Outcome:
        """``final``: a failure that no retry would mend (its attempts left are not used)."""
        return Outcome(
            job_id=self.job.id,
            workflow_id=self.job.workflow_id,
            attempt=self.job.attempt,
            owner=self.owner,
            status=status,
            max_attempts=self.job.attempt if final else self.job.max_attempts,
            retry_backoff=self.job.retry_backoff,
            key=self.job.key,
            claimed_at=self.job.claimed_at,
            claim_id=self.job.claim_id,
            **kwargs,
        )

    def stop(self, reason: str) -> None:
        """Ask the attempt to end: terminate its process group, then kill it after a grace.

        The slot thread ends the group (_end_group) before the outcome is recorded; the timer
        only unblocks a slot waiting for a leader that ignores SIGTERM. (If the runner exits
        first, its watchdog still guards the group.)
        """
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason = reason
                self.kill_at = time.monotonic() + KILL_GRACE
            process = self.process
        if process is not None and process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            timer = threading.Timer(KILL_GRACE, _signal_group, (process, signal.SIGKILL))
            timer.daemon = True
            timer.start()

    def stopped_outcome(self, **kwargs: Any) -> Outcome:
        """The outcome of an attempt that was stopped from outside."""
        reason = self.stop_reason
        if reason == "timeout":
            error = f"timed out after {self.job.timeout:g} s"
            return self.outcome("failed", error=error, reason=error, **kwargs)
        if reason == "released":
            return self.outcome("released", reason="released: runner shutting down", **kwargs)
        return self.outcome("cancelled", error="cancelled", reason="cancelled", **kwargs)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _end_group(process: subprocess.Popen, kill_at: float) -> None:
    """A stopped attempt is over only when its whole group is: what ignores SIGTERM gets
    SIGKILL at ``kill_at``. Until then the group stays with the watchdog and the outcome
    unrecorded, so a retry or a rescue never runs beside it."""
    while _group_alive(process.pid) and time.monotonic() < kill_at:
        time.sleep(0.05)
    _signal_group(process, signal.SIGKILL)
    deadline = time.monotonic() + KILL_GRACE
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def private_folder(path: Path) -> None:
    """A folder only the runner's user can enter (made so if it is ours and is not): logs and
    results hold whatever a job printed or returned."""
    try:
        path.mkdir(mode=0o700)
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
    except FileExistsError:
        st = path.stat()
        if st.st_mode & 0o077 and st.st_uid == os.getuid():
            path.chmod(0o700)


def private_file(path: Path) -> int:
    """Open ``path`` empty for writing, mode 0600 (even a file left by an earlier attempt)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def file_stem(job: ClaimedJob) -> str:
    """``KEY.ATTEMPT``, or ``SAFE-KEY+ID.ATTEMPT`` for a key that is not a safe file name.

    The job id keeps two keys that make the same safe name ('a b', 'a_b') from sharing a log
    and a result file; no safe key contains '+'.
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", job.key)[:100]
    return f"{job.key if safe == job.key else f'{safe}+{job.id}'}.{job.attempt}"


def _tail(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - LOG_TAIL_BYTES))
            data = f.read()
    except OSError:
        return None
    text = data.decode("utf-8", errors="replace")
    return text if size <= LOG_TAIL_BYTES else "…" + text


def run_process(
    attempt: Attempt,
    argv: str | list[str],
    *,
    shell: bool = False,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> Outcome:
    """Run ``argv`` (a /bin/sh command if ``shell``) as the attempt's process group, its
    output into the attempt's log; its outcome, with the result file's JSON if it succeeded.

    The environment is the runner's less its secrets, plus ``env`` and the SMIFDB_* names of
    the attempt. What is left of the group when the leader exits, or is stopped, is killed.
    """
    job, policy = attempt.job, attempt.policy
    folder = attempt.log_dir / f"workflow-{job.workflow_id}"
    private_folder(folder)
    stem = file_stem(job)
    log_path = folder / f"{stem}.log"
    result_path = folder / f"{stem}.result.json"
    os.close(private_file(result_path))  # empty: no result, unless the job writes one
    token = proctree.new_token(job.id, job.attempt)
    environment = {
        **job_environment(os.environ),
        "PATH": _PATH,
        **(env or {}),
        "SMIFDB_JOB_ID": str(job.id),
        "SMIFDB_JOB_KEY": job.key,
        "SMIFDB_WORKFLOW_ID": str(job.workflow_id),
        "SMIFDB_ATTEMPT": str(job.attempt),
        "SMIFDB_RESULT_FILE": str(result_path),
        proctree.TOKEN_VAR: token,
    }
    with open(private_file(log_path), "wb") as log:
        try:
            with attempt._lock:
                if attempt.stop_reason is not None:
                    return attempt.stopped_outcome()
                attempt.process = subprocess.Popen(
                    argv,
                    shell=shell,
                    cwd=cwd,
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_PREEXEC,  # one prctl call: safe after fork
                )
        except OSError as exc:
            if cwd and not os.path.isdir(cwd):  # Popen names the program, not the folder
                error = f"cannot start {argv!r}: no working folder {cwd}"
            else:
                error = f"cannot start {argv!r}: {exc.strerror or exc}"
            log.write(error.encode() + b"\n")
            return attempt.outcome(
                "failed", error=error, reason="could not start", log_tail=error + "\n"
            )
        process = attempt.process
        if attempt.watchdog is not None:
            attempt.watchdog.guard(process.pid, token)
        output = CappedLog(log, policy.max_log_bytes)
        try:
            returncode = _copy_output(attempt, process, output)
        finally:  # even if copying failed: the attempt is not over while its processes run
            if attempt.stop_reason is None:
                # The job is its process group: what it left running in the background goes
                # too, or it would run on beside the next attempt or the jobs after it.
                _signal_group(process, signal.SIGKILL)
            else:
                _end_group(process, attempt.kill_at or time.monotonic())
            # And so is every process it started that left the group (setsid, daemons).
            _SWEEPER.end(token)
            _drain(process, output)
            output.close()
        if attempt.watchdog is not None:
            attempt.watchdog.release(process.pid)
    tail = _tail(log_path)
    common = {"exit_code": returncode, "log_tail": tail}
    if attempt.stop_reason is not None:
        return attempt.stopped_outcome(**common)
    if returncode != 0:
        error = f"exit status {returncode}" if returncode > 0 else f"killed by signal {-returncode}"
        return attempt.outcome("failed", error=error, reason=error, **common)
    try:
        result = _read_result(result_path, policy.max_result_bytes)
    except ValueError as exc:
        return attempt.outcome("failed", error=str(exc), reason="bad result file", **common)
    return attempt.outcome("succeeded", result=result, reason="exit status 0", **common)


def run_in_worker(
    attempt: Attempt,
    target: str,
    args: dict[str, Any],
    *,
    cwd: str,
    env: dict[str, str],
    warm: tuple[tuple, str, dict[str, Any]] | None = None,
) -> Outcome:
    """Call ``target(**args)`` as the attempt's own process: a new worker of the runner's
    pool (forked from its warm zygote, so without a new interpreter's start-up), in ``cwd``,
    with a command job's environment plus ``env``, its output into the attempt's log. Stopped
    by killing the worker; a worker that dies fails the attempt. ``warm``: (key, function,
    arguments) of a zygote of the pool's own, warmed up once by ``function(**arguments)``,
    to fork the process from instead."""
    job, policy = attempt.job, attempt.policy
    folder = attempt.log_dir / f"workflow-{job.workflow_id}"
    private_folder(folder)
    log_path = folder / f"{file_stem(job)}.log"
    os.close(private_file(log_path))
    environ = {
        **job_environment(os.environ),
        "PATH": _PATH,
        **env,
        "SMIFDB_JOB_ID": str(job.id),
        "SMIFDB_JOB_KEY": job.key,
        "SMIFDB_WORKFLOW_ID": str(job.workflow_id),
        "SMIFDB_ATTEMPT": str(job.attempt),
    }
    setup = {"cwd": cwd, "log": str(log_path), "environ": environ}
    worker = policy.workers.zygote_child(*warm) if warm else policy.workers.fresh()
    answer, died = call_in_worker(attempt, worker, target, args, setup)
    cap_log_file(log_path, policy.max_log_bytes)
    tail = _tail(log_path)
    if attempt.stop_reason is not None:
        return attempt.stopped_outcome(log_tail=tail)
    if answer is None:
        error = f"the job ended its process: {died}"
        return attempt.outcome("failed", error=error, reason="worker died", log_tail=tail)
    if answer.kind != "ok":
        final = answer.kind == "not_allowed"
        log_tail = ((tail or "") + (answer.tail or ""))[-LOG_TAIL_BYTES:] or None
        reason = "callable not allowed" if final else "exception"
        return attempt.outcome(
            "failed", final=final, error=answer.error, reason=reason, log_tail=log_tail
        )
    return attempt.outcome("succeeded", result=answer.value, reason="returned", log_tail=tail)


def call_in_worker(
    attempt: Attempt,
    worker: Any,
    target: str,
    args: dict[str, Any],
    setup: dict[str, Any] | None = None,
) -> tuple[Any, str | None]:
    """(the worker's answer, None), or (None, how it died): the worker is the attempt's while
    it runs, so that stopping the attempt kills it, and goes back to its pool after."""
    from smifdb.workers import WorkerDied

    attempt.worker = worker
    if attempt.stop_reason is not None:  # stopped while it was being handed a worker
        worker.kill()
    try:
        return worker.call(target, args, setup), None
    except WorkerDied as exc:
        return None, str(exc)
    finally:
        attempt.worker = None
        attempt.policy.workers.give(worker)


def cap_log_file(path: Path, cap: int) -> None:
    """Keep a log written straight to its file (by a worker) within ``cap`` bytes, as
    CappedLog keeps a job's piped output: its head, a line saying what was dropped, its tail."""
    try:
        if path.stat().st_size <= cap:
            return
        capped = path.with_name(path.name + ".capping")
        with open(path, "rb") as source, open(private_file(capped), "wb") as out:
            log = CappedLog(out, cap)
            while chunk := source.read(1 << 20):
                log.write(chunk)
            log.close()
        os.replace(capped, path)
    except OSError:
        pass  # the log as it is: its tail is still read from its end


def _read_result(path: Path, limit: int) -> Any:
    """The job's $SMIFDB_RESULT_FILE, read no further than ``limit`` bytes (a huge or sparse
    file must not take the runner's memory); None if empty. ValueError says what is wrong."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(limit + 1) if size <= limit else b""
    except OSError as exc:
        raise ValueError(f"$SMIFDB_RESULT_FILE cannot be read: {exc}") from exc
    if size > limit or len(data) > limit:
        raise ValueError(
            f"$SMIFDB_RESULT_FILE holds {max(size, len(data))} bytes, more than the runner's "
            f"--max-result-bytes ({limit}): write large outputs to files and return their paths"
        )
    if not data:
        return None
    try:
        result = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"$SMIFDB_RESULT_FILE does not hold JSON: {exc}") from exc
    if why := unstorable(result):
        raise ValueError(f"$SMIFDB_RESULT_FILE holds JSON that cannot be stored: {why}")
    return result


def _pidfd(pid: int) -> int | None:
    """A descriptor that polls readable once ``pid`` exits (Linux 5.3+), else None."""
    try:
        return os.pidfd_open(pid)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return None


def _copy_output(attempt: Attempt, process: subprocess.Popen, output: CappedLog) -> int:
    """Copy the job's output into its log until its leader exits; stop it at its timeout.

    Waits on the output pipe and on the leader's exit together: a background process that
    keeps the pipe open must not keep the attempt from ending with its leader.
    """
    assert process.stdout is not None
    pipe = process.stdout.fileno()
    os.set_blocking(pipe, False)
    pidfd = _pidfd(process.pid)
    poller = select.poll()
    poller.register(pipe, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    deadline = attempt.deadline
    open_pipe = True
    try:
        while True:
            wait = None
            if deadline is not None and attempt.stop_reason is None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    attempt.stop("timeout")  # the leader then exits, or is killed at kill_at
                    wait = None
            if pidfd is None:  # no exit to wait on: look now and then
                wait = 0.05 if wait is None else min(wait, 0.05)
            events = poller.poll(None if wait is None else wait * 1000)
            if open_pipe and any(fd == pipe for fd, _ in events):
                if not _read_into(pipe, output):
                    poller.unregister(pipe)
                    open_pipe = False
                output.flush()
            exited = any(fd == pidfd for fd, _ in events) if pidfd is not None else None
            if exited or (pidfd is None and process.poll() is not None):
                return process.wait()
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _read_into(pipe: int, output: CappedLog) -> bool:
    """Read what the pipe holds now into ``output``; False at end of input."""
    while True:
        try:
            data = os.read(pipe, 1 << 16)
        except BlockingIOError:
            return True
        if not data:
            return False
        output.write(data)


def _drain(process: subprocess.Popen, output: CappedLog) -> None:
    """What the job's processes wrote before they were ended. Bounded: a process that escaped
    every kill (see smifdb/proctree.py) may hold the pipe open; it is then closed on it."""
    assert process.stdout is not None
    pipe = process.stdout.fileno()
    poller = select.poll()  # not select(): a runner of many slots has descriptors past 1024
    poller.register(pipe, select.POLLIN)
    deadline = time.monotonic() + DRAIN_TIMEOUT
    with contextlib.suppress(OSError):
        while poller.poll(max(deadline - time.monotonic(), 0) * 1000):
            if not _read_into(pipe, output):
                break
    process.stdout.close()


class CappedLog:
    """A job's output into its log file, at most ``cap`` bytes of it: the head as it comes, and
    once that is full, the last TAIL_BYTES (held in memory) with a line saying how much of the
    middle was dropped. A job writing gigabytes leaves ``cap`` bytes on disk; the database's
    log tail, read from the file's end, is the output's last words as before."""

    def __init__(self, file: BinaryIO, cap: int) -> None:
        self.file = file
        self.tail_cap = min(cap // 2, TAIL_BYTES)
        self.head_left = cap - self.tail_cap - MARKER_ROOM
        self.tail = bytearray()
        self.dropped = 0

    def write(self, data: bytes) -> None:
        if self.head_left > 0:
            head = data[: self.head_left]
            self.file.write(head)
            self.head_left -= len(head)
            data = data[len(head) :]
        if data:
            self.tail += data
            if len(self.tail) > 2 * self.tail_cap:  # trimmed now and then, not at every read
                self._trim()

    def flush(self) -> None:
        self.file.flush()

    def _trim(self) -> None:
        cut = len(self.tail) - self.tail_cap
        if cut > 0:
            self.dropped += cut
            del self.tail[:cut]

    def close(self) -> None:
        self._trim()
        if self.dropped:
            self.file.write(
                f"\n[smifdb: {self.dropped} bytes of output dropped here: the log keeps its "
                f"first and last bytes, at most --max-log-bytes in all]\n".encode()
            )
        self.file.write(bytes(self.tail))
        self.file.flush()
        self.tail = bytearray()


_FUNCTIONS: dict[str, tuple[Any, str | None]] = {}


class NotAllowed(Exception):
    """A python job's callable is not one its runner allows."""


def resolve(target: str) -> tuple[Any, str | None]:
    """``package.module:attr.path`` → (the object, the module its path passes through, if any)
    (cached). 'smifdb.examples:os.system' reaches os.system through the module ``os``."""
    if target not in _FUNCTIONS:
        module_name, _, attr_path = target.partition(":")
        obj: Any = importlib.import_module(module_name)
        via = None
        for part in attr_path.split("."):
            obj = getattr(obj, part)
            if isinstance(obj, types.ModuleType) and via is None:
                via = obj.__name__
        _FUNCTIONS[target] = obj, via
    return _FUNCTIONS[target]


def allowed_callable(target: str, allow: tuple[str, ...]) -> Any:
    """The callable ``target`` names, if ``allow`` allows it (checked before its module is
    imported: importing runs code). A prefix allows what is defined under it, not what its
    modules import: 'smifdb.examples:os.system' is os.system, defined in 'posix'. An exact
    ``module:attr`` entry allows that one name, whatever it is."""
    module = target.partition(":")[0]
    how = f"to allow it, start the runner with --python-allow {module} (or SMIFDB_PYTHON_ALLOW={module})"
    if not python_allowed(target, allow):
        raise NotAllowed(
            f"python callable {target!r} is not allowed: its module is under none of the "
            f"allowed prefixes ({', '.join(allow)}); {how}"
        )
    obj, via = resolve(target)
    if target in allow:
        return obj
    defined_in = getattr(obj, "__module__", None)
    if (
        via is not None
        or not isinstance(defined_in, str)
        or not python_allowed(f"{defined_in}:_", allow)
    ):
        where = f"module {via}" if via else f"{defined_in or 'no module'}"
        raise NotAllowed(
            f"python callable {target!r} is not allowed: it is {where}'s, not defined under "
            f"the allowed prefixes ({', '.join(allow)}); name it where it is defined"
        )
    return obj
