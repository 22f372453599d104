"""Structured logs of real runner, manager and API processes: every line of standard error is
one JSON object with `--log-format json`, and job events carry their workflow and job key."""

from __future__ import annotations

import io
import json
import logging
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from processes import FAST, PY, wait_for

import smifdb
from smifdb import logs
from smifdb.store import control, read

JOB_EVENTS = {"claimed", "started", "succeeded", "failed", "retried", "cancelled", "released"}


class Process:
    """A smifdb process whose standard output and standard error go to separate files."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.err_path = tmp / f"{name}.stderr"
        self.out_path = tmp / f"{name}.stdout"
        with open(self.err_path, "wb") as err, open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen([PY, "-m", "smifdb.cli", *args], stdout=out, stderr=err)

    def stderr(self) -> str:
        return self.err_path.read_text()

    def json_lines(self) -> list[dict]:
        """Every line of standard error, each of which must be a JSON object."""
        entries = []
        for line in self.stderr().splitlines():
            entry = json.loads(line)  # fails the test on any line that is not JSON
            assert isinstance(entry, dict), line
            assert {"ts", "level", "logger", "msg"} <= entry.keys(), line
            entries.append(entry)
        return entries

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        p.kill()


def py(code: str) -> list[str]:
    return [PY, "-c", code]


def runner(processes: list[Process], tmp: Path, dsn: str, name: str, *args: str) -> Process:
    p = Process(
        tmp, name, "--dsn", dsn, "runner", "run", "--name", name, "--log-dir", str(tmp / "logs"),
        *FAST, *args,
    )  # fmt: skip
    processes.append(p)
    return p


def job_events(entries: list[dict], event: str) -> list[dict]:
    return [e for e in entries if e.get("event") == event]


def job_status(conn: psycopg.Connection, wf: int, key: str) -> str:
    row = conn.execute(
        "SELECT status::text FROM jobs WHERE workflow_id = %s AND key = %s", [wf, key]
    ).fetchone()
    return row[0]


def test_runner_json_logs_every_job_event(conn, dsn, processes, tmp_path) -> None:
    wf = smifdb.submit(
        conn,
        {
            "name": "logged",
            "jobs": [
                {"key": "first", "command": py("print('hello')")},
                {"key": "then", "command": py("pass"), "after": ["first"]},
                {
                    "key": "flaky job",  # a key with a space: still one field, one line
                    "command": py("import sys; sys.exit(3)"),
                    "max_attempts": 2,
                    "retry_backoff": 0.05,
                },
            ],
        },
    )
    r = runner(
        processes, tmp_path, dsn, "json-1", "--slots", "2", "--exit-when-idle",
        "--log-format", "json", "--log-level", "debug",
    )  # fmt: skip
    assert r.proc.wait(timeout=60) == 0, r.stderr()
    entries = r.json_lines()
    assert r.out_path.read_text() == ""  # nothing but log lines, and those on standard error

    events = [e for e in entries if e.get("event") in JOB_EVENTS]
    for e in events:
        assert e["workflow_id"] == wf and e["runner"] == "json-1", e
        assert e["job_key"] in {"first", "then", "flaky job"}, e
        assert isinstance(e["job_id"], int) and isinstance(e["attempt"], int), e
        assert e["logger"] == "smifdb.runner"
    by_key = {
        key: [(e["event"], e["attempt"], e["status"]) for e in events if e["job_key"] == key]
        for key in ("first", "then", "flaky job")
    }
    assert by_key["first"] == [
        ("claimed", 1, "running"),
        ("started", 1, "running"),
        ("succeeded", 1, "succeeded"),
    ]
    assert by_key["then"][-1] == ("succeeded", 1, "succeeded")
    assert [(e, a) for e, a, _ in by_key["flaky job"]] == [
        ("claimed", 1),
        ("started", 1),
        ("retried", 1),
        ("claimed", 2),
        ("started", 2),
        ("failed", 2),
    ]
    assert by_key["flaky job"][2][2] == "ready"  # a retried job goes back to ready
    failed = job_events(entries, "failed")[0]
    assert failed["level"] == "INFO" and "exit status 3" in failed["msg"]
    assert any(e["msg"].startswith("runner json-1 started") for e in entries)


def test_rescue_cancel_and_release_are_logged(conn, dsn, runners, processes, tmp_path) -> None:
    started = tmp_path / "started"
    code = (
        f"import os,time; open({str(started)!r},'a').write(os.environ['SMIFDB_JOB_KEY']+' '"
        "+os.environ['SMIFDB_ATTEMPT']+'\\n'); time.sleep(60)"
    )
    wf = smifdb.submit(
        conn,
        {"jobs": [{"key": "orphan", "command": py(code), "max_attempts": 3}]},
    )
    victim = runners.start("--slots", "1", name="victim")
    wait_for(lambda: started.exists() and "orphan 1" in started.read_text(), what="attempt 1")
    victim.send_signal(signal.SIGKILL)
    victim.wait()

    r = runner(processes, tmp_path, dsn, "json-2", "--slots", "1", "--log-format", "json")
    wait_for(lambda: "orphan 2" in started.read_text(), what="the rescued job to run again")
    control.cancel(conn, wf, actor="test", job_key="orphan")
    wait_for(lambda: read.finished_status(conn, wf), what="the cancel")

    wf2 = smifdb.submit(conn, {"jobs": [{"key": "held", "command": py(code)}]})
    wait_for(lambda: "held 1" in started.read_text(), what="the held job to start")
    r.proc.send_signal(signal.SIGTERM)  # grace 30 s; a second signal skips it
    wait_for(lambda: "draining" in r.stderr(), what="draining")
    r.proc.send_signal(signal.SIGTERM)
    assert r.proc.wait(timeout=30) == 0, r.stderr()
    assert job_status(conn, wf2, "held") == "ready"

    entries = r.json_lines()
    rescued = job_events(entries, "rescued")
    assert [(e["job_key"], e["workflow_id"], e["runner"], e["status"]) for e in rescued] == [
        ("orphan", wf, "victim", "ready")  # the lost attempt's runner, and where the job went
    ]
    assert rescued[0]["attempt"] == 1 and "rescued" in rescued[0]["msg"]
    cancelled = job_events(entries, "cancelled")
    assert [(e["job_key"], e["workflow_id"], e["attempt"]) for e in cancelled] == [
        ("orphan", wf, 2)
    ]
    released = job_events(entries, "released")
    assert [(e["job_key"], e["workflow_id"], e["status"]) for e in released] == [
        ("held", wf2, "ready")
    ]
    assert any(e["msg"] == "received SIGTERM: draining" for e in entries)


def test_text_logs_name_workflow_and_job_and_respect_the_level(conn, dsn, processes, tmp_path):
    wf = smifdb.submit(conn, {"jobs": [{"key": "only", "command": py("pass")}]})
    r = runner(processes, tmp_path, dsn, "text-1", "--slots", "1", "--exit-when-idle")
    assert r.proc.wait(timeout=60) == 0, r.stderr()
    lines = r.stderr().splitlines()
    succeeded = [ln for ln in lines if "event=succeeded" in ln]
    assert len(succeeded) == 1, lines
    line = succeeded[0]
    assert " INFO smifdb.runner: job succeeded: exit status 0 [" in line
    assert f"workflow_id={wf}" in line and "job_key=only" in line and "attempt=1" in line
    assert "runner=text-1" in line and "status=succeeded" in line
    assert not any(ln.lstrip().startswith("{") for ln in lines)
    assert not any("event=claimed" in ln for ln in lines)  # debug only

    # At warning level job events are not even formatted: nothing of them reaches stderr.
    smifdb.submit(conn, {"jobs": [{"key": "quiet", "command": py("pass")}]})
    q = runner(
        processes, tmp_path, dsn, "text-2", "--slots", "1", "--exit-when-idle",
        "--log-level", "warning",
    )  # fmt: skip
    assert q.proc.wait(timeout=60) == 0, q.stderr()
    assert "event=" not in q.stderr()


def test_manager_json_logs(conn, dsn, processes, tmp_path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "twice.py").write_text(
        "def decide(history):\n"
        "    if len(history) >= 2:\n"
        "        return None\n"
        "    return {'jobs': [{'key': 'step', 'command': ['true']}]}\n"
    )
    submitted = subprocess.run(
        [PY, "-m", "smifdb.cli", "--dsn", dsn, "modelrun", "submit", str(project), "loop",
         "--decide", "twice:decide"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    model_run_id = int(submitted.stdout.strip())
    m = Process(
        tmp_path, "manager", "--dsn", dsn, "manager", "run", "--poll", "0.2",
        "--log-format", "json",
    )  # fmt: skip
    processes.append(m)
    r = runner(processes, tmp_path, dsn, "json-3", "--slots", "1", "--log-format", "json")
    wait_for(lambda: read.model_run_finished_status(conn, model_run_id), what="the model run")
    m.proc.send_signal(signal.SIGTERM)
    r.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(timeout=30) == 0 and r.proc.wait(timeout=30) == 0
    entries = m.json_lines()
    bundles = [e for e in entries if "bundle" in e]
    assert [(e["model_run_id"], e["bundle"]) for e in bundles] == [(model_run_id, 1)]
    assert isinstance(bundles[0]["workflow_id"], int)
    ended = [e for e in entries if e.get("status") == "succeeded"]
    assert ended and ended[0]["model_run_id"] == model_run_id
    workflows = {w for (w,) in conn.execute("SELECT id FROM workflows")}
    assert len(workflows) == 2 and bundles[0]["workflow_id"] in workflows
    assert {e["workflow_id"] for e in job_events(r.json_lines(), "succeeded")} == workflows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.mark.parametrize("workers", [1, 2])
def test_api_json_logs(dsn, processes, tmp_path, workers) -> None:
    port = free_port()
    api = Process(
        tmp_path, "api", "--dsn", dsn, "api", "serve", "--port", str(port),
        "--workers", str(workers), "--log-format", "json",
    )  # fmt: skip
    processes.append(api)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: get(f"{base}/openapi.json") == 200, 60, "the API")
    assert get(f"{base}/api/v1/workflows/999999") == 401  # no credentials
    # Access lines are written after the response: wait for both before stopping.
    wait_for(lambda: api.stderr().count('"uvicorn.access"') >= 2, 10, "access log lines")
    api.proc.send_signal(signal.SIGTERM)
    assert api.proc.wait(timeout=30) in (0, -signal.SIGTERM), api.stderr()  # uvicorn re-raises
    entries = api.json_lines()
    assert api.out_path.read_text() == ""  # access lines too go to standard error, as JSON
    access = [e for e in entries if e["logger"] == "uvicorn.access"]
    seen = {(e["method"], e["path"], e["status"]) for e in access}
    assert ("GET", "/openapi.json", 200) in seen
    assert ("GET", "/api/v1/workflows/999999", 401) in seen
    assert any(e["logger"] == "uvicorn.error" and "Started server" in e["msg"] for e in entries)


def record(**extra: object) -> logging.LogRecord:
    r = logging.makeLogRecord({"name": "smifdb.test", "levelname": "INFO", "levelno": 20})
    r.msg, r.args = "line one\nline two %s", ("x",)
    r.__dict__.update(extra)
    return r


def test_formatters() -> None:
    line = logs.JsonFormatter().format(record(workflow_id=3, job_key="a b", level="shadowed"))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == "line one\nline two x" and entry["level"] == "INFO"
    assert entry["workflow_id"] == 3 and entry["job_key"] == "a b"
    try:
        raise ValueError("boom")
    except ValueError:
        failed = record()
        failed.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(logs.JsonFormatter().format(failed))["exc"]

    text = logs.TextFormatter().format(record(workflow_id=3, job_key='a "b"', empty=""))
    assert text.endswith('x [workflow_id=3 job_key="a \\"b\\"" empty=""]')
    assert logs.TextFormatter().format(record()).endswith("line two x")


def test_configure_levels_and_warnings() -> None:
    root, ours = logging.getLogger(), logging.getLogger("smifdb")
    saved = root.handlers[:], root.level, ours.level
    stream = io.StringIO()
    try:
        root.handlers[:] = []
        logs.configure("info", "json", stream=stream)
        logs.configure("debug", "text", stream=stream)  # configured already: no change
        logging.getLogger("smifdb.x").debug("filtered out")
        logging.getLogger("smifdb.x").info("kept", extra={"job_key": "k"})
        logging.getLogger("alembic.x").info("a library's chatter: filtered out")
        warnings.warn("a warning", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
        root.handlers[:], root.level, ours.level = saved
    entries = [json.loads(ln) for ln in stream.getvalue().splitlines()]
    assert [(e["logger"], e.get("job_key")) for e in entries] == [
        ("smifdb.x", "k"),
        ("py.warnings", None),
    ]
    age = datetime.now(UTC) - datetime.fromisoformat(entries[0]["ts"])
    assert timedelta(0) <= age < timedelta(minutes=5)  # an ISO 8601 time with its zone
