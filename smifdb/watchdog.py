"""A runner's watchdog: kills its jobs' process groups when the runner dies, however it dies.

PR_SET_PDEATHSIG reaches only a job's own process; a shell script's children, or anything a
model forks, would outlive a SIGKILLed runner and run on while another runner reruns the job.
The watchdog is a process of its own (its own session, deaf to the signals meant for the
runner) that reads ``+PGID TOKEN`` and ``-PGID`` lines from the runner on a pipe. The kernel
closes that pipe when the runner dies, SIGKILL included: at end of input, every group still
listed, and every process marked with a listed attempt's token (smifdb/proctree.py: what left
the group, a daemon), gets SIGTERM, then SIGKILL after a grace.

Run by the runner as ``python -m smifdb.watchdog``; not a user command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from typing import BinaryIO

from smifdb import proctree

GRACE = 5.0
QUICK_DEATH = 2.0  # seconds: a watchdog dying sooner after its start probably cannot run
log = logging.getLogger("smifdb.runner")


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_groups(groups: set[int], grace: float = GRACE, tokens: Iterable[str] = ()) -> None:
    """SIGTERM, then SIGKILL after ``grace``, to the groups and the processes ``tokens`` mark."""
    tokens = [t for t in tokens if t]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        if sig == signal.SIGKILL:
            proctree.kill_marked(tokens)
            return
        marked = proctree.signal_marked(tokens, sig)
        deadline = time.monotonic() + grace
        while (groups := {g for g in groups if _alive(g)}) and time.monotonic() < deadline:
            time.sleep(0.05)
        while marked and time.monotonic() < deadline and proctree.marked(tokens):
            time.sleep(0.05)
        if not groups and not proctree.marked(tokens):
            return


def watch(lines: BinaryIO) -> None:
    groups: dict[int, str] = {}  # pgid -> its attempt's token
    for line in lines:
        with contextlib.suppress(ValueError, IndexError):
            pgid, _, token = line[1:].strip().partition(b" ")
            if line.startswith(b"+"):
                groups[int(pgid)] = token.decode()
            elif line.startswith(b"-"):
                groups.pop(int(pgid), None)
    kill_groups(set(groups), tokens=groups.values())


class Watchdog:
    """The runner's end of the pipe; the process starts with the first job it guards.

    It keeps the groups it has been told of, so that a watchdog started again (the first one
    died: the runner's heartbeat checks) is told them all. A process forked without exec
    (multiprocessing in a Python job) closes its copy of the pipe, or the pipe would outlive
    the runner.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._groups: dict[int, str] = {}  # pgid -> token
        self._closed = False
        # As the runner started: a Python job may change os.environ (PYTHONHOME, PATH).
        self._env = dict(os.environ)
        self._started_at = 0.0
        self._quick_deaths = 0  # in a row: a watchdog that cannot run is retried with backoff
        self._retry_at = 0.0
        os.register_at_fork(after_in_child=self._forget)

    def guard(self, pgid: int, token: str = "") -> None:
        """Guard a job's group, and the processes its attempt's ``token`` marks."""
        with self._lock:
            self._groups[pgid] = token
            self._send(f"+{pgid} {token}\n")

    def release(self, pgid: int) -> None:
        with self._lock:
            self._groups.pop(pgid, None)
            self._send(f"-{pgid}\n")

    def revive(self) -> None:
        """Start the watchdog again if it died while groups depend on it."""
        with self._lock:
            if self._closed or not self._groups or self._alive():
                return
            if time.monotonic() >= self._retry_at:
                self._send("")  # a new watchdog, told every group

    def close(self) -> None:
        """End of input: the watchdog kills whatever is still listed, then exits."""
        with self._lock:
            self._closed = True
            if self._process is not None and self._process.stdin is not None:
                with contextlib.suppress(OSError):
                    self._process.stdin.close()

    def _forget(self) -> None:
        if self._process is not None and self._process.stdin is not None:
            with contextlib.suppress(OSError):
                os.close(self._process.stdin.fileno())
            self._process = None

    def _alive(self) -> bool:
        """Caller holds the lock. Notes a death once; one soon after starting backs off."""
        if self._process is None:
            return False
        if self._process.poll() is None:
            return True
        lived = time.monotonic() - self._started_at
        self._quick_deaths = self._quick_deaths + 1 if lived < QUICK_DEATH else 0
        if self._quick_deaths:
            delay = min(2.0**self._quick_deaths, 60.0)
            self._retry_at = time.monotonic() + delay
            log.error(
                "the runner's watchdog exited %.1f s after starting (status %s): job process "
                "groups are unguarded until one runs; next try in %.0f s",
                lived,
                self._process.returncode,
                delay,
            )
        else:
            log.warning("the runner's watchdog exited; starting another")
        self._process = None
        return False

    def _send(self, line: str) -> None:
        """Caller holds the lock. Never raises: a job must not fail for want of a guard."""
        try:
            if not self._alive():
                if time.monotonic() < self._retry_at:
                    return  # the groups are kept: a watchdog that starts is told them all
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "smifdb.watchdog"],
                    stdin=subprocess.PIPE,
                    start_new_session=True,
                    env=self._env,
                )
                self._started_at = time.monotonic()
                line = "".join(f"+{g} {t}\n" for g, t in self._groups.items()) + line
            assert self._process.stdin is not None
            self._process.stdin.write(line.encode())
            self._process.stdin.flush()
        except OSError as exc:
            log.error("cannot reach the runner's watchdog: %s", exc)


if __name__ == "__main__":
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    watch(sys.stdin.buffer)
