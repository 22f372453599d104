"""Real smifdb processes for tests: runners and managers, killed at the end of each test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAST = ["--poll", "0.2", "--heartbeat", "0.2", "--dead-after", "2"]
PY = sys.executable


def cli(dsn: str, *args: str, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
    """`smifdb --dsn DSN ARGS…` in a process of its own, its output captured as text."""
    return subprocess.run(
        [PY, "-m", "smifdb.cli", "--dsn", dsn, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def submit_loop_model_run(dsn: str, project: Path) -> subprocess.CompletedProcess:
    """A generic decision-loop model run, submitted from the CLI (no manager runs it on)."""
    args = ["modelrun", "submit", str(project), "loop"]
    return cli(dsn, *args, "--decide", "smifdb.examples:converge_decision", check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def hide(folder: Path) -> list[str]:
    """A command prefix: run the rest where ``folder`` is an empty tmpfs (checked empty)."""
    script = 'mount -t tmpfs none "$1" && [ -z "$(ls -A "$1")" ] && shift && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, "sh", str(folder)]


def require_namespaces(tmp_path: Path) -> None:
    """Skip, with the reason, where ``unshare -m`` cannot hide a folder; fail instead where
    CI says these tests must run (SMIFDB_TEST_REQUIRE_NAMESPACES, or _SMIF)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "seen").write_text("x")
    try:
        result = subprocess.run([*hide(probe), "true"], capture_output=True, text=True)
    except FileNotFoundError as exc:
        result = subprocess.CompletedProcess([], 1, "", str(exc))
    if result.returncode != 0:
        import pytest

        why = f"unshare -m with a tmpfs mount is unavailable here: {result.stderr.strip()}"
        required = ("SMIFDB_TEST_REQUIRE_NAMESPACES", "SMIFDB_TEST_REQUIRE_SMIF")
        if any(os.environ.get(name) for name in required):  # CI runs these: a failure there
            pytest.fail(why)
        pytest.skip(why)


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


class ApiServer:
    """An API app under a real uvicorn in a background thread, on a socket bound before it starts."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, args=([self.sock],), daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), what="uvicorn")
        assert self.server.started, "the API server did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
