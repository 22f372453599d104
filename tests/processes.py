"""Real smifdb processes for tests: runners and managers, killed at the end of each test."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

FAST = ["--poll", "0.2", "--heartbeat", "0.2", "--dead-after", "2"]
PY = sys.executable


def wait_for(predicate: Callable[[], object], timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Runners:
    """Starts runner and manager processes; kills any left at the end of the test."""

    def __init__(self, dsn: str, tmp: Path) -> None:
        self.dsn, self.tmp, self.procs = dsn, tmp, []

    def start(self, *args: str, name: str | None = None) -> subprocess.Popen:
        name = name or f"r{len(self.procs)}"
        return self.spawn(
            "runner",
            "run",
            "--name",
            name,
            "--log-dir",
            str(self.tmp / "logs"),
            *FAST,
            *args,
            log_name=name,
        )

    def manager(self, *args: str, name: str) -> subprocess.Popen:
        return self.spawn(
            "manager", "run", "--poll", "0.2", "--dead-after", "2", *args, log_name=name
        )

    def spawn(self, *args: str, log_name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{log_name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [PY, "-m", "smifdb.cli", "--dsn", self.dsn, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def output(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
