"""Finding and ending every process a command job started, wherever it went.

A job's process group misses what leaves it: ``setsid``, a double-forked daemon, anything that
calls setpgid. Each attempt's environment carries a token of its own (TOKEN_VAR), which every
process it starts inherits through fork and exec, whatever its group, session or parent; ending
the attempt ends every process whose environment holds that token (as Jenkins' process-tree
killer does with its build cookie). The runner does so when an attempt ends, and its watchdog
does when the runner dies.

Why not a child subreaper (PR_SET_CHILD_SUBREAPER)? Orphans would become the runner's children,
to be told apart from the children its in-process Python jobs start and wait for (reaping one
of those steals its exit status, not reaping an orphan leaves a zombie); and once the runner is
SIGKILLed they go to init all the same, where only a scan finds them. What the token misses: a
process that empties or rewrites its own environment (``env -i``), and processes of other users.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterable

TOKEN_VAR = "SMIFDB_JOB_TOKEN"
_PREFIX = TOKEN_VAR.encode() + b"="
_PROC = "/proc"


def new_token(job_id: int, attempt: int) -> str:
    return f"{job_id}.{attempt}.{secrets.token_hex(8)}"


def marked(tokens: Iterable[str]) -> dict[int, str]:
    """pid -> token of every readable process whose environment holds one of ``tokens``.

    A process's environment as it started (/proc/PID/environ); a zombie's reads empty.
    """
    wanted = {t.encode() for t in tokens}
    found: dict[int, str] = {}
    if not wanted:
        return found
    me = os.getpid()
    try:
        names = os.listdir(_PROC)
    except OSError:  # no /proc (not Linux): the process group is all there is
        return found
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"{_PROC}/{name}/environ", "rb") as f:
                data = f.read()
        except OSError:  # gone, or another user's
            continue
        start = data.find(_PREFIX)
        while start != -1:
            if start == 0 or data[start - 1] == 0:
                end = data.find(b"\0", start)
                value = data[start + len(_PREFIX) : end if end != -1 else None]
                if value in wanted:
                    found[int(name)] = value.decode()
                    break
            start = data.find(_PREFIX, start + 1)
    return found


def signal_marked(tokens: Iterable[str], sig: int) -> int:
    """Send ``sig`` to every process marked with one of ``tokens``; how many there were."""
    pids = marked(tokens)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return len(pids)


def kill_marked(tokens: Iterable[str], grace: float = 0.0, patience: float = 5.0) -> int:
    """End every process marked with ``tokens``: SIGTERM and ``grace`` seconds first if a grace
    is given, then SIGKILL, scanning again until none is left (one may fork meanwhile) or for
    ``patience`` seconds. Returns how many processes were found."""
    tokens = list(tokens)
    found = 0
    if grace > 0 and (found := signal_marked(tokens, signal.SIGTERM)):
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and marked(tokens):
            time.sleep(0.05)
    deadline = time.monotonic() + patience
    while n := signal_marked(tokens, signal.SIGKILL):
        found += n
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return found


class Sweeper:
    """Kills the processes of ended attempts, one /proc scan for all the attempts that end
    meanwhile: a runner of many slots of short jobs scans once per batch, not once per job."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._wanted: set[str] = set()
        self._scanning = False
        self._scans = 0  # scans completed

    def end(self, token: str) -> None:
        """Return once no process marked ``token`` is left: a scan that started after this
        call began found none, or killed what it found."""
        with self._cond:
            self._wanted.add(token)
            done_at = self._scans + (2 if self._scanning else 1)
            while self._scans < done_at:
                if self._scanning:
                    self._cond.wait()
                    continue
                self._scanning, tokens, self._wanted = True, self._wanted, set()
                self._cond.release()
                try:
                    kill_marked(tokens)
                finally:
                    self._cond.acquire()
                    self._scanning = False
                    self._scans += 1
                    self._cond.notify_all()
