"""Submitting DAGs: validation before any write, one transaction, rows as expected."""

from __future__ import annotations

import itertools
import json
import os
import random
import resource
import signal
import subprocess
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from processes import PY
from test_api import client, error  # noqa: F401 - the API's fixture and error helper

import smifdb
from smifdb import limits, store
from smifdb.cli import main
from smifdb.spec import SpecError, parse
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


def test_every_value_round_trips_through_copy_text(conn) -> None:
    """submit_dag renders COPY's text format itself: tabs, newlines, carriage returns and
    backslashes in keys, fields and payloads, non-ASCII text, NULLs and floats come back as
    given."""
    odd = "tab\there\nnew\rline \\N back\\slash é ✓"
    spec = {
        "name": odd,
        "jobs": [
            {
                "key": odd,
                "command": [odd, "\\"],
                "env": {"X": odd},
                "model": odd,
                "operation": "op\t",
                "timestep": 2020,
                "decision": -1,
                "timeout": 1.5e-3,
                "retry_backoff": 0,
                "priority": -7,
                "max_attempts": 3,
            },
            {"key": "b\\", "python": "m:f", "after": [odd]},
        ],
    }
    wf = smifdb.submit(conn, spec)
    rows = conn.execute(
        "SELECT key, payload, model, operation, timestep, decision, timeout_seconds,"
        " retry_backoff_seconds, priority, max_attempts, status::text, unfinished_parents"
        " FROM jobs WHERE workflow_id = %s ORDER BY id",
        [wf],
    ).fetchall()
    assert rows[0] == (
        odd,
        {"argv": [odd, "\\"], "env": {"X": odd}},
        odd,
        "op\t",
        2020,
        -1,
        1.5e-3,
        0.0,
        -7,
        3,
        "ready",
        0,
    )
    assert rows[1][:4] == ("b\\", {"args": {}, "function": "m:f"}, None, None)
    assert rows[1][4:] == (None, None, None, 1.0, 0, 1, "waiting", 1)
    edge = conn.execute(
        "SELECT p.key, c.key FROM job_edges e JOIN jobs p ON p.id = e.parent_id"
        " JOIN jobs c ON c.id = e.child_id WHERE c.workflow_id = %s",
        [wf],
    ).fetchall()
    assert edge == [(odd, "b\\")]
    assert conn.execute("SELECT name FROM workflows WHERE id = %s", [wf]).fetchone() == (odd,)


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
        "exactly one of 'command', 'python' or 'smif'",
    ),
    "neither command nor python": (
        {"jobs": [{"key": "a"}]},
        "exactly one of 'command', 'python' or 'smif'",
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
    # Accepted, and then every attempt failed to start: "Argument list too long".
    "env value past exec's limit": (
        {"jobs": [{"key": "a", "command": "true", "env": {"BIG": "x" * 140_000}}]},
        "'env' BIG longer than 131071 bytes",
    ),
    "command past exec's limit": (
        {"jobs": [{"key": "a", "command": ["echo", "é" * 70_000]}]},
        "an argument of 'command' longer than 131071 bytes",
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


def test_job_ids_that_are_not_one_range_are_read_one_by_one(dsn: str, conn) -> None:
    """Ids come back as a range when the sequence gave this submission n values in a row;
    otherwise (values of other sessions among them) as the list, and edges still join the
    right jobs."""
    spec = {
        "jobs": [{"key": f"j{i}", "python": "m:f", "after": [f"j{i - 1}"] if i else []}
        for i in range(50)]
    }  # fmt: skip
    conn.execute("ALTER SEQUENCE jobs_id_seq INCREMENT BY 3")  # as if others took two in three
    try:
        spaced = smifdb.submit(dsn, spec)
    finally:
        conn.execute("ALTER SEQUENCE jobs_id_seq INCREMENT BY 1")
    solid = smifdb.submit(dsn, spec)
    for wf, step in ((spaced, 3), (solid, 1)):
        ids = [r[0] for r in conn.execute(
            "SELECT id FROM jobs WHERE workflow_id = %s ORDER BY id", [wf]
        )]  # fmt: skip
        assert len(ids) == 50 and {b - a for a, b in itertools.pairwise(ids)} == {step}
        edges = conn.execute(
            "SELECT p.key, c.key FROM job_edges e JOIN jobs p ON p.id = e.parent_id"
            " JOIN jobs c ON c.id = e.child_id WHERE c.workflow_id = %s",
            [wf],
        ).fetchall()
        assert sorted(edges) == sorted((f"j{i - 1}", f"j{i}") for i in range(1, 50))


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
        ("jobs: &j\n  - {key: a, python: 'm:f', args: {x: *j}}\n", "makes the document contain"),
    ]:
        spec.write_text(text)
        result = run_cli(dsn, "submit", str(spec))
        assert result.exit_code == 2 and message in result.output, result.output
    # Aliases for reuse stay well inside the expansion budget: 2,000 jobs, each merging a
    # shared base and naming a shared argument mapping, several times the written size.
    base = "base: &base {python: 'smifdb.examples:noop', max_attempts: 2}\n"
    args = "common: &common {a: [1, 2, 3], b: {c: text, d: [x, y]}}\n"
    jobs = "".join(
        f"  - {{<<: *base, key: j{i}, args: {{common: *common}}}}\n" for i in range(2000)
    )
    spec.write_text(base + args + "jobs:\n" + jobs)
    raw = smifdb.spec.load_file(spec)
    raw.pop("base"), raw.pop("common")
    assert smifdb.submit(conn, raw) > 0
    assert conn.execute("SELECT count(*) FROM jobs WHERE max_attempts = 2").fetchone()[0] == 2001


# -- bounded input: what one spec may cost to read (smifdb.limits) ---------------------------


# The peak RSS of a process forked from pytest counts pytest's own pages at the fork (Linux
# records the old address space's high-water mark at exec), and pytest grows as the suite runs.
# So the command runs as the child of a small process that reports its child's peak.
_PEAK = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
print(f"@@peak-rss {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
sys.exit(code)
"""


def bounded_cli(dsn: str, *args: str, timeout: float = 60) -> tuple[int, str, float, int]:
    """`smifdb ARGS` in a process of its own with 2 GiB of address space (a regression fails
    the test, not the machine): (exit status, output, seconds, peak RSS in bytes)."""
    cap = 2 * 2**30

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [PY, "-c", _PEAK, PY, "-m", "smifdb.cli", "--dsn", dsn, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
            start_new_session=True,
        )
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"smifdb {' '.join(args)} ran over {timeout} s") from None
        log.seek(0)
        output, _, peak = log.read().rpartition("@@peak-rss ")
    return proc.returncode, output, time.monotonic() - start, int(peak) * 1024


def _laughs(levels: int = 9) -> str:
    """The "billion laughs": 9 aliases to 9 aliases to ... 9 strings, 9**9 strings in all."""
    text = "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, levels):
        text += f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n"
    return text


def _merge_laughs(levels: int = 9) -> str:
    """The same through merge keys: each level merges nine copies of the one below."""
    text = "m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8, i: 9}\n"
    for i in range(1, levels):
        text += f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 9)}]}}\n"
    return text


ALIAS_BOMBS = {
    # 9**9 strings from 340 bytes: the CLI spent minutes and died of MemoryError.
    "nested lists": lambda: _laughs() + "jobs: [{key: a, python: 'm:f', args: {x: *l8}}]\n",
    "merge keys": lambda: _merge_laughs() + "jobs: [{key: a, python: 'm:f', args: *m8}]\n",
    # 10,000 uses of one 100 kB string: 1 GB from a 130 kB file.
    "one long string": lambda: (
        f"s: &s {'y' * 100_000}\n"
        f"jobs: [{{key: a, python: 'm:f', args: {{x: [{', '.join(['*s'] * 10_000)}]}}}}]\n"
    ),
}


@pytest.mark.parametrize("case", sorted(ALIAS_BOMBS))
def test_yaml_alias_bombs_are_refused_at_once(case: str, tmp_path: Path, dsn: str, conn) -> None:
    spec = tmp_path / "bomb.yaml"
    spec.write_text(ALIAS_BOMBS[case]())
    started = time.monotonic()
    with pytest.raises(SpecError, match="YAML aliases expand the document past"):
        smifdb.spec.load_file(spec)
    assert time.monotonic() - started < 0.5  # the node graph is measured, never expanded
    status, output, seconds, rss = bounded_cli(dsn, "submit", str(spec))
    assert status == 2, output
    assert "YAML aliases expand the document past" in output, output
    assert "Traceback" not in output
    assert seconds < 5, seconds  # 0.5 s here, nearly all of it Python's start-up
    assert rss < 150 * 2**20, rss  # 52 MiB here
    assert counts(conn) == {"workflows": 0, "jobs": 0, "job_edges": 0, "events": 0}


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


DEEP_SPECS = {
    # json.loads recursed into Python's limit, or the validation after it did: a traceback.
    "990 levels of JSON": (
        "deep.json",
        f'{{"jobs": [{{"key": "a", "python": "m:f", "args": {{"x": {_nested(990)}}}}}]}}',
    ),
    "100,000 levels of JSON": ("deep.json", _nested(100_000)),
    "990 levels of YAML": (
        "deep.yaml",
        f"jobs: [{{key: a, python: 'm:f', args: {{x: {_nested(990)}}}}}]",
    ),
    # Aliases nest what they name: 40 levels inside 40 levels.
    "80 levels through an alias": (
        "deep.yaml",
        f"d: &d {_nested(40)}\njobs: [{{key: a, python: 'm:f', args: {{x: "
        + "[" * 40
        + "*d"
        + "]" * 40
        + "}}]",
    ),
}


def test_measuring_depth_is_linear_in_a_body_of_escaped_quotes(tmp_path: Path) -> None:
    """An unterminated string of 100,000 escaped quotes: the bracket scan retried its string
    match from every quote, 35 s for these 200 kB (and an hour for a 1 MB API body)."""
    spec = tmp_path / "quotes.json"
    spec.write_text("[" * 70 + '"' + '\\"' * 100_000)
    started = time.monotonic()
    with pytest.raises(SpecError, match="nested more than 64 levels deep"):
        smifdb.spec.load_file(spec)
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("case", sorted(DEEP_SPECS))
def test_deep_nesting_is_refused(case: str, tmp_path: Path, dsn: str, conn) -> None:
    name, text = DEEP_SPECS[case]
    spec = tmp_path / name
    spec.write_text(text)
    started = time.monotonic()
    with pytest.raises(SpecError, match="nested more than 64 levels deep"):
        smifdb.spec.load_file(spec)
    assert time.monotonic() - started < 0.5
    result = run_cli(dsn, "submit", str(spec))
    assert result.exit_code == 2, result.output
    assert "nested more than 64 levels deep" in result.output
    assert counts(conn)["workflows"] == 0


def test_deep_args_from_python_are_a_spec_error(conn) -> None:
    deep: list = []
    for _ in range(990):
        deep = [deep]
    with pytest.raises(SpecError, match="'args' nests more than 61 levels deep"):
        smifdb.submit(conn, {"jobs": [{"key": "a", "python": "m:f", "args": {"x": deep}}]})
    fits: list = []
    for _ in range(limits.MAX_DEPTH - 5):  # 60 lists in {"jobs": [{"args": {"x": ...}}]}: 64
        fits = [fits]
    assert smifdb.submit(conn, {"jobs": [{"key": "a", "python": "m:f", "args": {"x": fits}}]})
    assert counts(conn)["workflows"] == 1


def test_deep_json_body_is_a_400(client, conn) -> None:  # noqa: F811 - test_api's fixture
    """The API decoded 990 nested lists into a RecursionError: a 500."""
    for depth in (990, 4_900):  # test_api.client takes bodies up to 10,000 bytes
        args = {"x": "NEST"}
        body = json.dumps({"jobs": [{"key": "a", "python": "m:f", "args": args}]})
        body = body.replace('"NEST"', _nested(depth))
        response = client.post(
            "/api/v1/workflows/", content=body, headers={"content-type": "application/json"}
        )
        assert "nested more than 64 levels deep" in error(response, 400)
    assert counts(conn)["workflows"] == 0


def test_job_keys_are_bounded_by_bytes(tmp_path: Path, dsn: str, conn) -> None:
    """A 3,000-character key passed validation and PostgreSQL refused its index row."""
    spec = tmp_path / "keys.json"
    for key in ("k" * 3000, "é" * 501):  # 1,002 bytes in UTF-8
        spec.write_text(json.dumps({"jobs": [{"key": key, "command": "true"}]}))
        result = run_cli(dsn, "submit", str(spec))
        assert result.exit_code == 2, result.output
        assert "'key' must be at most 1000 bytes in UTF-8" in result.output
    assert counts(conn)["workflows"] == 0
    spec.write_text(json.dumps({"jobs": [{"key": "k" * 1000, "command": "true"}]}))
    assert run_cli(dsn, "submit", str(spec)).exit_code == 0


def test_a_name_postgresql_cannot_store_is_refused(tmp_path: Path, dsn: str, conn) -> None:
    """`--name` is not in the spec whose strings were checked: PostgreSQL refused it."""
    spec = tmp_path / "ok.yaml"
    spec.write_text("jobs: [{key: a, command: 'true'}]\n")
    for name, problem in (("run\udcff", "unpaired surrogate"), ("run\x00", "NUL character")):
        result = run_cli(dsn, "submit", str(spec), "--name", name)
        assert result.exit_code == 2, result.output
        assert f"the name holds a{'n' if problem[0] == 'u' else ''} {problem}" in result.output
    assert counts(conn)["workflows"] == 0


def test_validation_memory_stays_linear_and_small() -> None:
    """A 50,000-job layered DAG (two parents per job) validates within 600 bytes per job at its
    peak, as traced (~300 measured): at that rate a million jobs stay far under 1 GB. The spec
    itself is built before tracing starts."""
    rng = random.Random(1)
    n, per_layer = 50_000, 1_000
    jobs = []
    for i in range(n):
        layer = i // per_layer
        parents = {f"j{rng.randrange(0, layer * per_layer)}" for _ in range(2)} if layer else ()
        jobs.append({"key": f"j{i}", "python": "smifdb.examples:noop", "after": sorted(parents)})
    tracemalloc.start()
    try:
        dag = parse({"name": "big", "jobs": jobs})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(dag.jobs) == n and dag.edge_count > 1.9 * (n - per_layer)
    assert peak < 600 * n, f"validation peaked at {peak / n:.0f} bytes per job"


def _layered(n: int, seed: int = 7) -> dict:
    rng = random.Random(seed)
    return {
        "name": "layered",
        "jobs": [
            {
                "key": f"j{i}",
                "python": "m:f",
                "args": {"i": i % 3},
                "priority": i % 5,
                "after": sorted({f"j{rng.randrange(i)}" for _ in range(2)}) if i >= 10 else [],
            }
            for i in range(n)
        ],
    }


def _rows(conn: psycopg.Connection, wf: int) -> dict[str, list]:
    """A workflow's jobs, edges, ready roots and submission events by key (ids aside)."""
    return {
        "jobs": conn.execute(
            "SELECT key, kind::text, payload, status::text, priority, unfinished_parents,"
            " max_attempts, timeout_seconds, retry_backoff_seconds FROM jobs"
            " WHERE workflow_id = %s ORDER BY key",
            [wf],
        ).fetchall(),
        "edges": conn.execute(
            "SELECT p.key, c.key FROM job_edges e JOIN jobs p ON p.id = e.parent_id"
            " JOIN jobs c ON c.id = e.child_id WHERE c.workflow_id = %s ORDER BY 1, 2",
            [wf],
        ).fetchall(),
        "ready": conn.execute(
            "SELECT j.key, r.priority FROM ready_jobs r JOIN jobs j ON j.id = r.job_id"
            " WHERE r.workflow_id = %s ORDER BY 1",
            [wf],
        ).fetchall(),
        "events": conn.execute(
            "SELECT coalesce(j.key, ''), e.to_status, e.reason FROM events e"
            " LEFT JOIN jobs j ON j.id = e.job_id WHERE e.workflow_id = %s ORDER BY 1, 2",
            [wf],
        ).fetchall(),
    }


def test_a_spec_checked_as_it_is_written_writes_what_parse_and_submit_dag_write(
    dsn: str, conn
) -> None:
    """smifdb.submit writes each job as soon as it is checked (spec.Checking, submit_checking):
    the rows are those of the two steps one after the other."""
    from smifdb.store.submit import submit_dag

    spec = _layered(25_000)  # more than one chunk of COPY rows
    streamed = smifdb.submit(dsn, spec)
    with psycopg.connect(dsn) as other:
        stepwise = submit_dag(other, parse(spec), actor="test")
    assert _rows(conn, streamed) == _rows(conn, stepwise)
    assert len(_rows(conn, streamed)["edges"]) > 40_000


@pytest.mark.parametrize(
    ("last", "says"),
    [
        ({"key": "bad", "python": "m:f", "priority": "high"}, "'priority' must be an integer"),
        ({"key": "j3", "python": "m:f"}, "duplicate job key 'j3'"),
        ({"key": "late", "python": "m:f", "after": ["nowhere"]}, "depends on unknown job"),
    ],
)
def test_a_spec_wrong_at_its_end_is_rolled_back_after_its_jobs_were_sent(
    dsn: str, conn, last: dict, says: str
) -> None:
    spec = _layered(25_000)
    spec["jobs"].append(last)
    before = counts(conn)
    with pytest.raises(SpecError, match=says):
        smifdb.submit(dsn, spec)
    assert counts(conn) == before


def test_a_spec_wrong_at_its_top_level_is_refused_before_anything_is_sent(dsn: str, conn) -> None:
    spec = _layered(100) | {"name": 123, "extra": True}
    spec["jobs"][50]["priority"] = "high"
    before = counts(conn)
    with pytest.raises(SpecError) as refused:
        smifdb.submit(dsn, spec)
    assert "'name' must be a non-empty string" in str(refused.value)
    assert "unknown top-level field(s) extra" in str(refused.value)
    assert "job 'j50': 'priority' must be an integer" in str(refused.value)  # all listed
    assert counts(conn) == before


def test_a_cycle_found_once_every_job_was_sent_writes_nothing(dsn: str, conn) -> None:
    spec = _layered(25_000)
    spec["jobs"][0]["after"] = ["j24999"]  # j0 is an ancestor of the last job
    before = counts(conn)
    with pytest.raises(SpecError, match="dependency cycle"):
        smifdb.submit(dsn, spec)
    assert counts(conn) == before
