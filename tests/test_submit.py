"""Submitting DAGs: validation before any write, one transaction, rows as expected."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

import smifdb
from smifdb import store
from smifdb.cli import main
from smifdb.store import read

EXAMPLE = """
name: example
jobs:
  - key: prepare
    command: ["python", "-c", "print('hello')"]
    cwd: .
    env: {A: "1", B: 2}
  - key: simulate
    python: "mypkg.models:simulate"
    args: {year: 2020}
    after: [prepare]
    priority: 5
    max_attempts: 3
    timeout: 600
  - key: report
    command: "echo done > report.txt"
    after: [simulate, prepare]
    model: energy_demand
    operation: simulate
    timestep: 2010
    decision: 0
"""


def counts(conn: psycopg.Connection) -> dict[str, int]:
    return {
        t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
        for t in ("workflows", "jobs", "job_edges", "events")
    }


def run_cli(dsn: str, *args: str, input: str | None = None):
    return CliRunner().invoke(main, ["--dsn", dsn, *args], input=input)


def test_submit_yaml_file(tmp_path: Path, dsn: str, conn: psycopg.Connection) -> None:
    spec = tmp_path / "dag.yaml"
    spec.write_text(EXAMPLE)
    result = run_cli(dsn, "submit", str(spec))
    assert result.exit_code == 0, result.output
    workflow_id = int(result.stdout.strip())

    wf = read.get_workflow(conn, workflow_id)
    assert wf["name"] == "example" and wf["status"] == "pending" and wf["job_count"] == 3
    rows = {
        r[0]: r[1:]
        for r in conn.execute(
            "SELECT key, kind::text, status::text, unfinished_parents, priority, max_attempts,"
            " timeout_seconds, payload, model, operation, timestep, decision FROM jobs"
            " WHERE workflow_id = %s",
            [workflow_id],
        )
    }
    assert rows["prepare"][:6] == ("command", "ready", 0, 0, 1, None)
    assert rows["prepare"][6] == {
        "argv": ["python", "-c", "print('hello')"],
        "cwd": str(tmp_path),  # relative to the spec file's folder
        "env": {"A": "1", "B": "2"},
    }
    assert rows["simulate"][:6] == ("python", "waiting", 1, 5, 3, 600.0)
    assert rows["simulate"][6] == {"function": "mypkg.models:simulate", "args": {"year": 2020}}
    assert rows["report"][1:3] == ("waiting", 2)
    assert rows["report"][6] == {"shell": "echo done > report.txt", "cwd": str(tmp_path)}
    assert rows["report"][7:] == ("energy_demand", "simulate", 2010, 0)
    edges = conn.execute(
        "SELECT p.key, c.key FROM job_edges e JOIN jobs p ON p.id = e.parent_id"
        " JOIN jobs c ON c.id = e.child_id ORDER BY 1, 2"
    ).fetchall()
    assert edges == [("prepare", "report"), ("prepare", "simulate"), ("simulate", "report")]
    # Every job and the workflow get an audit row saying who submitted them.
    events = conn.execute(
        "SELECT job_id IS NULL, to_status, actor, reason FROM events WHERE workflow_id = %s",
        [workflow_id],
    ).fetchall()
    assert len(events) == 4
    assert all(e[2].startswith("cli@") and e[3] == "submitted" for e in events)
    assert sorted(e[1] for e in events) == ["pending", "ready", "waiting", "waiting"]


def test_submit_json_with_name_override(tmp_path: Path, dsn: str, conn) -> None:
    spec = tmp_path / "dag.json"
    spec.write_text(json.dumps({"jobs": [{"key": "a", "command": ["true"]}]}))
    result = run_cli(dsn, "submit", str(spec), "--name", "renamed")
    assert result.exit_code == 0, result.output
    assert read.get_workflow(conn, int(result.stdout))["name"] == "renamed"


def test_submit_from_stdin(dsn: str, conn) -> None:
    result = run_cli(dsn, "submit", "-", input=EXAMPLE)
    assert result.exit_code == 0, result.output
    assert counts(conn)["jobs"] == 3


def test_python_api_with_dsn_and_connection(dsn: str, conn) -> None:
    spec = {
        "name": "api",
        "jobs": [{"key": "a", "python": "m:f"}, {"key": "b", "python": "m:f", "after": ["a"]}],
    }
    first = smifdb.submit(dsn, spec)
    second = smifdb.submit(conn, spec, name="again")
    assert second > first
    assert counts(conn) == {"workflows": 2, "jobs": 4, "job_edges": 2, "events": 6}


def test_one_notify_per_submission(dsn: str, conn) -> None:
    listener = psycopg.connect(dsn, autocommit=True)
    listener.execute(f"LISTEN {store.READY_CHANNEL}")
    spec = {"jobs": [{"key": f"j{i}", "python": "m:f"} for i in range(50)]}
    workflow_id = smifdb.submit(conn, spec)
    got = []
    for note in listener.notifies(timeout=2):
        got.append(note.payload)
    listener.close()
    assert got == [str(workflow_id)]


BAD_SPECS = {
    "cycle": (
        {
            "jobs": [
                {"key": "a", "command": "true", "after": ["c"]},
                {"key": "b", "command": "true", "after": ["a"]},
                {"key": "c", "command": "true", "after": ["b"]},
            ]
        },
        "dependency cycle: ",
    ),
    "unknown dependency": (
        {"jobs": [{"key": "a", "command": "true", "after": ["nope"]}]},
        "depends on unknown job 'nope'",
    ),
    "duplicate key": (
        {"jobs": [{"key": "a", "command": "true"}, {"key": "a", "command": "false"}]},
        "duplicate job key 'a'",
    ),
    "both command and python": (
        {"jobs": [{"key": "a", "command": "true", "python": "m:f"}]},
        "exactly one of 'command' or 'python'",
    ),
    "neither command nor python": (
        {"jobs": [{"key": "a"}]},
        "exactly one of 'command' or 'python'",
    ),
    "empty job list": ({"name": "x", "jobs": []}, "'jobs' must be a non-empty list"),
    "wrong type priority": (
        {"jobs": [{"key": "a", "command": "true", "priority": "high"}]},
        "'priority' must be an integer",
    ),
    "wrong type after": (
        {"jobs": [{"key": "a", "command": "true", "after": [1]}]},
        "'after' must be a list of job keys",
    ),
    "bad python target": (
        {"jobs": [{"key": "a", "python": "not a target"}]},
        "'python' must look like",
    ),
    "unknown field": (
        {"jobs": [{"key": "a", "command": "true", "afterr": ["b"]}]},
        "unknown field(s) afterr",
    ),
    "zero attempts": (
        {"jobs": [{"key": "a", "command": "true", "max_attempts": 0}]},
        "'max_attempts' must be an integer from 1 to 1000",
    ),
    "negative timeout": (
        {"jobs": [{"key": "a", "command": "true", "timeout": -1}]},
        "'timeout' must be a positive number",
    ),
    "self loop": (
        {"jobs": [{"key": "a", "command": "true", "after": ["a"]}]},
        "depends on itself",
    ),
    "not a mapping": ([1, 2, 3], "must be a mapping"),
    # Each of these was accepted by validation and then refused by PostgreSQL with a traceback.
    "timestep beyond an integer column": (
        {"jobs": [{"key": "a", "command": "true", "timestep": 10**20}]},
        "'timestep' must be an integer",
    ),
    "NUL in a command": (
        {"jobs": [{"key": "a", "command": "printf a\x00b"}]},
        "jobs[1].command: the string holds a NUL character",
    ),
    "NaN in args": (
        {"jobs": [{"key": "a", "python": "m:f", "args": {"x": float("nan")}}]},
        "'args' must be JSON (no NaN or Infinity)",
    ),
    # Accepted before, and wrong at run time: no timeout at all; a failed start.
    "infinite timeout": (
        {"jobs": [{"key": "a", "command": "true", "timeout": float("inf")}]},
        "'timeout' must be a positive number",
    ),
    "env name with =": (
        {"jobs": [{"key": "a", "command": "true", "env": {"A=B": "1"}}]},
        "'env' must map names (without '=')",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_rejected_nothing_written(case: str, tmp_path: Path, dsn: str, conn) -> None:
    raw, message = BAD_SPECS[case]
    # A valid job beside the bad one proves nothing is half-written.
    if isinstance(raw, dict) and raw.get("jobs"):
        raw = {**raw, "jobs": [{"key": "fine", "command": "true"}, *raw["jobs"]]}
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps(raw))
    result = run_cli(dsn, "submit", str(spec))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert counts(conn) == {"workflows": 0, "jobs": 0, "job_edges": 0, "events": 0}


def test_cycle_names_its_jobs(tmp_path: Path, dsn: str) -> None:
    raw, _ = BAD_SPECS["cycle"]
    spec = tmp_path / "cycle.json"
    spec.write_text(json.dumps(raw))
    result = run_cli(dsn, "submit", str(spec))
    line = next(ln for ln in result.output.splitlines() if "cycle" in ln)
    assert all(k in line for k in ("a", "b", "c"))


def test_every_problem_reported_at_once(tmp_path: Path, dsn: str) -> None:
    spec = tmp_path / "many.yaml"
    spec.write_text(
        "jobs:\n  - {key: a}\n  - {key: b, command: x, priority: z}\n"
        "  - {key: c, command: y, after: [q]}\n"
    )
    result = run_cli(dsn, "submit", str(spec))
    assert result.exit_code == 2
    assert "3 problem(s)" in result.output


@pytest.mark.parametrize(
    "content, message",
    [
        ("jobs: [unclosed", "cannot parse"),
        ("{not json", "cannot parse"),
        # Parsers keep a repeated key's last value: the first `after` would be lost.
        ("jobs:\n  - {key: z, command: x, after: [x], after: [y]}", "found duplicate key 'after'"),
        ('{"jobs": [{"key": "a", "command": "x", "command": "y"}]}', "duplicate key 'command'"),
    ],
)
def test_unparsable_file(content: str, message: str, tmp_path: Path, dsn: str, conn) -> None:
    spec = tmp_path / ("bad.yaml" if content.startswith("jobs") else "bad.json")
    spec.write_text(content)
    result = run_cli(dsn, "submit", str(spec))
    assert result.exit_code == 2 and message in result.output
    assert counts(conn)["workflows"] == 0


def test_missing_file(dsn: str) -> None:
    result = run_cli(dsn, "submit", "/nonexistent/dag.yaml")
    assert result.exit_code == 2
    assert "/nonexistent/dag.yaml" in result.output


def test_unmigrated_database_is_named(empty_dsn: str, tmp_path: Path) -> None:
    spec = tmp_path / "dag.yaml"
    spec.write_text(EXAMPLE)
    result = run_cli(empty_dsn, "submit", str(spec))
    assert result.exit_code == 1
    assert "smifdb db upgrade" in result.output


def test_concurrent_submissions_do_not_interleave(dsn: str, conn) -> None:
    """Each submission is one transaction: readers never see a partial workflow."""
    chain = [
        {"key": f"j{i}", "python": "m:f", "after": [f"j{i - 1}"] if i else []} for i in range(2000)
    ]
    spec = {"jobs": chain}
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            smifdb.submit(dsn, spec)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    partial = 0
    while any(t.is_alive() for t in threads):
        for _id, job_count, actual in conn.execute(
            "SELECT w.id, w.job_count, (SELECT count(*) FROM jobs j WHERE j.workflow_id = w.id)"
            " FROM workflows w"
        ):
            partial += job_count != actual
    for t in threads:
        t.join()
    assert not errors and partial == 0
    assert counts(conn)["jobs"] == 8000


@pytest.mark.parametrize(
    "args, message",
    [
        (["runner", "run", "--slots", "1", "--poll", "nan"], "'nan' is not a finite number"),
        (["runner", "run", "--slots", "1", "--lease", "1e300"], "is not in the range 1<=x"),
        (["runner", "run", "--slots", "1", "--lease", "3"], "--lease (3 s) must be more than"),
        (["runner", "run", "--slots", "1", "--dead-after", "4"], "--dead-after (4 s) must be"),
        (["wait", "1", "--timeout", "inf"], "inf is not in the range 0<=x"),
        (["runner", "register", "", "--slots", "1"], "must be 1 to 200 printable characters"),
        (["runner", "register", "a\nb", "--slots", "1"], "must be 1 to 200 printable"),
        (["runner", "run", "--slots", "1", "--name", " "], "must be 1 to 200 printable"),
    ],
)
def test_bad_cli_arguments_exit_2(args: list[str], message: str, dsn: str, conn) -> None:
    result = run_cli(dsn, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert conn.execute("SELECT count(*) FROM runners").fetchone()[0] == 0


@pytest.mark.parametrize("dsn_arg", ["not a dsn", "foo=bar", "postgresql://[::1"])
def test_a_malformed_dsn_is_named(dsn_arg: str) -> None:
    result = CliRunner().invoke(main, ["--dsn", dsn_arg, "runner", "status"])
    assert result.exit_code == 2, result.output
    assert "is not a connection string" in result.output


def test_run_checks_its_log_folder_before_submitting(tmp_path: Path, dsn: str, conn) -> None:
    spec = tmp_path / "dag.yaml"
    spec.write_text(EXAMPLE)
    (tmp_path / "file").write_text("")
    result = run_cli(dsn, "run", str(spec), "--slots", "1", "--log-dir", str(tmp_path / "file/x"))
    assert result.exit_code == 2, result.output
    assert "cannot create the log folder" in result.output
    assert counts(conn)["workflows"] == 0


def test_register_refuses_the_name_of_a_running_runner(dsn: str, conn) -> None:
    assert run_cli(dsn, "runner", "register", "node-1", "--slots", "2").exit_code == 0
    assert run_cli(dsn, "runner", "register", "node-1", "--slots", "4").exit_code == 0  # renewed
    conn.execute("UPDATE runners SET state = 'active', pid = 42, host = 'h' WHERE name = 'node-1'")
    result = run_cli(dsn, "runner", "register", "node-1", "--slots", "50", "--host", "elsewhere")
    assert result.exit_code == 2 and "runner 'node-1' is running (host h, pid 42)" in result.output
    row = conn.execute("SELECT slots, host FROM runners WHERE name = 'node-1'").fetchone()
    assert row == (4, "h")


def test_progress_off_a_terminal_prints_only_changes(conn) -> None:
    """`smifdb wait` reads every second; in a log file that was one line a second."""
    import io

    from smifdb.progress import ProgressPrinter

    wf = smifdb.submit(conn, {"jobs": [{"key": "a", "command": "true"}]})
    out = io.StringIO()
    printer = ProgressPrinter(conn, wf, stream=out)
    for _ in range(5):
        printer.tick(force=True)
    assert len(out.getvalue().splitlines()) == 1
    conn.execute("UPDATE jobs SET status = 'running' WHERE workflow_id = %s", [wf])
    printer.tick(force=True)
    assert len(out.getvalue().splitlines()) == 2


def test_yaml_anchors_merge_keys_and_odd_structures(tmp_path: Path, dsn: str, conn) -> None:
    spec = tmp_path / "anchors.yaml"
    spec.write_text(
        "base: &base {command: 'true', max_attempts: 2}\n"
        "jobs:\n  - {<<: *base, key: a}\n  - {<<: *base, key: b, max_attempts: 3}\n"
    )
    assert run_cli(dsn, "submit", str(spec)).exit_code == 2  # 'base' is not a field...
    spec.write_text(
        "jobs:\n  - &a {key: a, command: 'true', max_attempts: 2}\n"
        "  - {<<: *a, key: b, max_attempts: 3}\n"
    )
    result = run_cli(dsn, "submit", str(spec))
    assert result.exit_code == 0, result.output  # ...but merge keys work, explicit keys win
    rows = conn.execute("SELECT key, max_attempts FROM jobs ORDER BY key").fetchall()
    assert rows == [("a", 2), ("b", 3)]
    for text, message in [
        ("jobs:\n  - {key: a, command: x, env: {2020-01-01: x}}\n", "'env' must map names"),
        ("jobs: &j\n  - {key: a, python: 'm:f', args: {x: *j}}\n", "'args' must be JSON"),
    ]:
        spec.write_text(text)
        result = run_cli(dsn, "submit", str(spec))
        assert result.exit_code == 2 and message in result.output, result.output
