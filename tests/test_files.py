"""Files for command jobs: a workflow's ``files:``, jobs' ``inputs:`` and ``outputs:``,
through the blob store, run by real runners that cannot see the submitter's folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import yaml
from processes import PY, Runners, cli, hide, require_namespaces, wait_for

from smifdb.store import queue, read

ISSUE_SPEC = {
    "name": "files",
    "files": ["data"],
    "jobs": [
        {
            "key": "a",
            "command": "mkdir -p out && echo 21 > out/n.txt && cp data/in.txt out/copy.txt",
            "outputs": ["out/*.txt"],
        },
        {
            "key": "b",
            "command": 'cat a/out/n.txt && cmp data/in.txt a/out/copy.txt && echo "dir=$SMIFDB_JOB_DIR"',
            "after": ["a"],
            "inputs": ["a"],
        },
    ],
}


class Machines(Runners):
    """Runners each a machine of its own: its SMIFDB_HOME (cache, job folders)."""

    prefix: tuple[str, ...] = ()

    def start(self, *args: str, name: str | None = None) -> subprocess.Popen:
        return super().start(*args, *(() if "--slots" in args else ("--slots", "1")), name=name)

    def spawn(self, *args: str, log_name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{log_name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [*self.prefix, PY, "-m", "smifdb.cli", "--dsn", self.dsn, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SMIFDB_HOME": str(self.home(log_name))},
        )
        self.procs.append(proc)
        return proc

    def home(self, name: str) -> Path:
        return self.tmp / "machines" / name


class Hidden(Machines):
    """Machines that cannot see ``hidden`` (the submitter's folder): each runner in a mount
    namespace of its own with an empty tmpfs over it."""

    def __init__(self, dsn: str, tmp: Path, hidden: Path) -> None:
        super().__init__(dsn, tmp)
        self.prefix = tuple(hide(hidden))


@pytest.fixture
def machines(dsn: str, tmp_path: Path) -> Iterator[Machines]:
    r = Machines(dsn, tmp_path)
    yield r
    r.close()


def write_spec(folder: Path, spec: dict, name: str = "spec.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return path


def submit(dsn: str, spec_file: Path, *args: str) -> int:
    result = cli(dsn, "submit", str(spec_file), *args)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


def finish(conn: psycopg.Connection, wf: int, timeout: float = 60) -> str:
    return wait_for(lambda: read.finished_status(conn, wf), timeout, f"workflow {wf}")


def jobs(conn: psycopg.Connection, wf: int) -> dict[str, dict]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    rows = cur.execute(
        "SELECT id, key, status::text AS status, attempts, error, log_tail FROM jobs"
        " WHERE workflow_id = %s",
        [wf],
    ).fetchall()
    return {r["key"]: r for r in rows}


def stored(conn: psycopg.Connection, wf: int) -> dict[str, dict[str, tuple[int, str, int]]]:
    """Each job's recorded outputs: path -> (attempt, sha256, size)."""
    found: dict[str, dict[str, tuple[int, str, int]]] = {}
    for key, path, attempt, sha, size in conn.execute(
        "SELECT j.key, o.path, o.attempt, encode(o.sha256, 'hex'), o.size FROM job_outputs o"
        " JOIN jobs j ON j.id = o.job_id WHERE j.workflow_id = %s",
        [wf],
    ):
        found.setdefault(key, {})[path] = (attempt, sha, size)
    return found


def workflow_count(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM workflows").fetchone()[0]


def incomplete_blobs(conn: psycopg.Connection) -> list:
    """Blobs whose chunks are not all there (none may be, ever)."""
    return conn.execute(
        "SELECT encode(b.sha256, 'hex') FROM blobs b WHERE b.chunks <> ("
        " SELECT count(*) FROM blob_chunks c WHERE c.sha256 = b.sha256)"
        " OR b.size <> (SELECT coalesce(sum(length(c.data)), 0) FROM blob_chunks c"
        " WHERE c.sha256 = b.sha256)"
    ).fetchall()


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


# -- the issue's DAG, on a runner that cannot see the submitter's folder ---------------------


def test_issue_dag_runs_where_the_submitters_folder_is_hidden(dsn, conn, tmp_path) -> None:
    require_namespaces(tmp_path)
    submitter = tmp_path / "submitter"
    (submitter / "data" / "deep").mkdir(parents=True)
    (submitter / "data" / "in.txt").write_bytes(os.urandom(3000))
    (submitter / "data" / "deep" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (submitter / "data" / "deep" / "run.sh").chmod(0o755)
    wf = submit(dsn, write_spec(submitter, ISSUE_SPEC))
    r = Hidden(dsn, tmp_path, submitter)
    try:
        r.start("--slots", "2", name="elsewhere")
        assert finish(conn, wf) == "succeeded", r.output("elsewhere")
    finally:
        r.close()
    rows = jobs(conn, wf)
    assert rows["b"]["log_tail"].splitlines()[0] == "21"
    folder = r.home("elsewhere") / "cache" / "work" / f"job-{rows['b']['id']}.1"
    assert f"dir={folder}" in rows["b"]["log_tail"]
    assert not folder.exists()  # the attempt's folder is removed after it
    assert set(stored(conn, wf)) == {"a"}
    assert sorted(stored(conn, wf)["a"]) == ["out/copy.txt", "out/n.txt"]

    dest = tmp_path / "export"
    result = cli(dsn, "outputs", str(wf), "--export", str(dest))
    assert result.returncode == 0, result.stderr
    assert tree(dest) == {
        "a/out/n.txt": b"21\n",
        "a/out/copy.txt": (submitter / "data" / "in.txt").read_bytes(),
    }
    listed = cli(dsn, "outputs", str(wf), "--json")
    assert listed.returncode == 0, listed.stderr
    rows_listed = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(x["job"], x["path"], x["size"]) for x in rows_listed] == [
        ("a", "out/copy.txt", 3000),
        ("a", "out/n.txt", 3),
    ]


def test_workflow_files_keep_their_paths_and_exec_bits(dsn, conn, machines, tmp_path) -> None:
    """A folder keeps its path under the spec's folder, a file outside it is its basename,
    and the executable bit travels."""
    outside = tmp_path / "elsewhere" / "tool.sh"
    outside.parent.mkdir()
    outside.write_text("#!/bin/sh\necho tool\n")
    outside.chmod(0o755)
    folder = tmp_path / "spec"
    (folder / "data" / "sub").mkdir(parents=True)
    (folder / "data" / "sub" / "x.txt").write_text("x")
    (folder / "top.txt").write_text("top")
    spec = {
        "files": ["data", str(outside), "top.txt"],
        "jobs": [
            {
                "key": "j",
                "command": "./tool.sh && cat data/sub/x.txt top.txt && test ! -e spec.yaml",
                "cwd": ".",
            }
        ],
    }
    wf = submit(dsn, write_spec(folder, spec))
    machines.start()
    assert finish(conn, wf) == "succeeded", jobs(conn, wf)["j"]
    assert jobs(conn, wf)["j"]["log_tail"] == "tool\nxtop"


def test_inputs_imply_after_and_each_attempt_gets_a_fresh_folder(
    dsn, conn, machines, tmp_path
) -> None:
    """A job given only ``inputs`` waits for them; a retry does not see its failed attempt's
    files."""
    spec = {
        "jobs": [
            {"key": "p", "command": "sleep 1 && echo made > o.txt", "outputs": ["o.txt"]},
            {
                "key": "c",
                "command": 'cat p/o.txt && test ! -e mark && touch mark && [ "$SMIFDB_ATTEMPT" = 2 ]',
                "inputs": ["p"],
                "outputs": [{"glob": "mark", "optional": True}],
                "max_attempts": 2,
                "retry_backoff": 0,
            },
        ]
    }
    wf = submit(dsn, write_spec(tmp_path / "spec", spec))
    machines.start("--slots", "2")
    assert finish(conn, wf) == "succeeded", jobs(conn, wf)
    assert jobs(conn, wf)["c"]["attempts"] == 2
    assert jobs(conn, wf)["c"]["log_tail"].startswith("made")
    assert sorted(stored(conn, wf)["c"]) == ["mark"]
    assert stored(conn, wf)["c"]["mark"][0] == 2


def test_smifdb_run_uploads_files_too(dsn, conn, tmp_path) -> None:
    folder = tmp_path / "spec"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "in.txt").write_text("hello")
    spec = {
        "files": ["data"],
        "jobs": [{"key": "a", "command": "cat data/in.txt > o.txt", "outputs": ["o.txt"]}],
    }
    env = {**os.environ, "SMIFDB_HOME": str(tmp_path / "home")}
    result = cli(dsn, "run", str(write_spec(folder, spec)), "--slots", "1", env=env)
    assert result.returncode == 0, result.stderr
    dest = tmp_path / "export"
    assert cli(dsn, "outputs", "1", "--export", str(dest)).returncode == 0
    assert tree(dest) == {"a/o.txt": b"hello"}


# -- bad input: exit 2 naming it, nothing written --------------------------------------------


def _bad(tmp_path: Path, spec: dict) -> Path:
    folder = tmp_path / "bad"
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "f.txt").write_text("f")
    return write_spec(folder, spec)


BAD = {
    "a missing files: path": (
        {"files": ["data", "nope"], "jobs": [{"key": "a", "command": "true"}]},
        "files: nope does not exist",
    ),
    "a glob with '..'": (
        {"jobs": [{"key": "a", "command": "true", "outputs": ["out/../../x"]}]},
        "outputs[0]: the glob 'out/../../x' leaves the job's folder ('..')",
    ),
    "an absolute output glob": (
        {"jobs": [{"key": "a", "command": "true", "outputs": [{"glob": "/etc/*"}]}]},
        "outputs[0]: the glob '/etc/*' is absolute",
    ),
    "an unknown input key": (
        {"jobs": [{"key": "a", "command": "true", "inputs": ["zz"]}]},
        "job 'a' takes the outputs of unknown job 'zz'",
    ),
    "a python job with outputs": (
        {"jobs": [{"key": "a", "python": "smifdb.examples:noop", "outputs": ["x"]}]},
        "'outputs' goes with 'command', not 'python': a python job runs in the runner's own",
    ),
    "an absolute cwd in a private folder": (
        {"files": ["data"], "jobs": [{"key": "a", "command": "true", "cwd": "/tmp"}]},
        "'cwd' '/tmp' is absolute: give a path relative to the job's private folder",
    ),
    "files that collide": (
        {"files": ["data", "data/f.txt"], "jobs": [{"key": "a", "command": "true"}]},
        "would both be data/f.txt",
    ),
    "an input landing on the files": (
        {
            "files": ["data"],
            "jobs": [
                {"key": "data", "command": "true", "outputs": ["x"]},
                {"key": "b", "command": "true", "inputs": ["data"]},
            ],
        },
        "the outputs of input 'data' would land in ./data/",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_input_is_refused_before_anything_is_written(dsn, conn, tmp_path, case) -> None:
    spec, message = BAD[case]
    result = cli(dsn, "submit", str(_bad(tmp_path, spec)))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert workflow_count(conn) == 0
    assert conn.execute("SELECT count(*) FROM blobs").fetchone()[0] == 0


def test_a_file_over_the_limit_is_exit_2_and_nothing_is_written(dsn, conn, tmp_path) -> None:
    path = _bad(tmp_path, {"files": ["data"], "jobs": [{"key": "a", "command": "true"}]})
    (path.parent / "data" / "big.bin").write_bytes(b"x" * 5000)
    result = cli(dsn, "submit", str(path), "--max-file-bytes", "4K")
    assert result.returncode == 2, result.stderr
    assert "big.bin is 5,000 bytes" in result.stderr and "--max-file-bytes" in result.stderr
    result = cli(dsn, "submit", str(path), env={**os.environ, "SMIFDB_MAX_FILE_BYTES": "4096"})
    assert result.returncode == 2 and "big.bin is 5,000 bytes" in result.stderr
    assert workflow_count(conn) == 0
    assert conn.execute("SELECT count(*) FROM blobs").fetchone()[0] == 0


def test_outputs_are_refused_at_collection(dsn, conn, machines, tmp_path) -> None:
    """A symlink out of the folder and a glob matching nothing fail the attempt, with nothing
    recorded; an optional glob matching nothing succeeds."""
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    spec = {
        "jobs": [
            {
                "key": "link",
                "command": f"mkdir out && echo ok > out/ok.txt && ln -s {secret} out/s.txt",
                "outputs": ["out/*"],
            },
            {"key": "none", "command": "echo ok > ok.txt", "outputs": ["ok.txt", "out/*.csv"]},
            {
                "key": "optional",
                "command": "echo ok > ok.txt",
                "outputs": ["ok.txt", {"glob": "out/*.csv", "optional": True}],
            },
        ]
    }
    wf = submit(dsn, write_spec(tmp_path / "spec", spec))
    machines.start("--slots", "3")
    assert finish(conn, wf) == "failed"
    rows = jobs(conn, wf)
    assert rows["link"]["status"] == "failed"
    assert (
        f"output out/s.txt points outside the job's folder (to {secret})" in rows["link"]["error"]
    )
    assert rows["none"]["status"] == "failed"
    assert "output 'out/*.csv' matched no file in the job's folder" in rows["none"]["error"]
    assert rows["optional"]["status"] == "succeeded"
    assert stored(conn, wf) == {
        "optional": {"ok.txt": (1, stored(conn, wf)["optional"]["ok.txt"][1], 3)}
    }


def test_an_output_over_the_runners_limit_or_a_corrupt_input_fails_the_attempt(
    dsn, conn, machines, tmp_path
) -> None:
    """Nothing is recorded as outputs, and the error says what happened."""
    folder = tmp_path / "spec"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "in.bin").write_bytes(os.urandom(3000))
    big = {"key": "big", "command": "head -c 2048 /dev/zero > o.bin", "outputs": ["o.bin"]}
    spec = {"jobs": [big, {"key": "small", "command": "echo 1 > o.txt", "outputs": ["o.txt"]}]}
    wf = submit(dsn, write_spec(folder, spec))
    corrupt = submit(
        dsn,
        write_spec(
            folder,
            {"files": ["data"], "jobs": [{"key": "read", "command": "cat data/in.bin"}]},
            "corrupt.yaml",
        ),
    )
    conn.execute(
        "UPDATE blob_chunks SET data = set_byte(data, 99, get_byte(data, 99) # 255)"
        " WHERE sha256 = (SELECT sha256 FROM workflow_files WHERE workflow_id = %s)",
        [corrupt],
    )
    machines.start("--max-file-bytes", "1K", "--slots", "2")
    assert finish(conn, wf) == "failed" and finish(conn, corrupt) == "failed"
    rows = jobs(conn, wf)
    assert (
        "output o.bin is 2048 bytes, more than the runner's --max-file-bytes (1024)"
        in (rows["big"]["error"])
    )
    assert rows["small"]["status"] == "succeeded"
    assert set(stored(conn, wf)) == {"small"}
    error = jobs(conn, corrupt)["read"]["error"]
    assert "is corrupt" in error and "blob " in error
    assert stored(conn, corrupt) == {}


def test_outputs_cli_lists_filters_exports_and_refuses(dsn, conn, machines, tmp_path) -> None:
    spec = {
        "jobs": [
            {"key": "a", "command": "echo a > x.txt", "outputs": ["x.txt"]},
            {"key": "b", "command": "mkdir -p d && echo b > d/y.txt", "outputs": ["d"]},
        ]
    }
    wf = submit(dsn, write_spec(tmp_path / "spec", spec))
    machines.start()
    assert finish(conn, wf) == "succeeded"
    table = cli(dsn, "outputs", str(wf))
    assert table.returncode == 0 and table.stdout.split()[:4] == ["JOB", "PATH", "SIZE", "SHA256"]
    only_b = cli(dsn, "outputs", str(wf), "--job", "b", "--json")
    assert [json.loads(line)["path"] for line in only_b.stdout.splitlines()] == ["d/y.txt"]
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep").write_text("k")
    for args, message in (
        (["999"], "no workflow 999"),
        ([str(wf), "--job", "zz"], f"workflow {wf} has no job 'zz'"),
        ([str(wf), "--export", str(dest)], "is not empty: give an empty or new folder, or --force"),
    ):
        result = cli(dsn, "outputs", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    result = cli(dsn, "outputs", str(wf), "--export", str(dest), "--force", "--job", "a")
    assert result.returncode == 0, result.stderr
    assert tree(dest) == {"keep": b"k", "a/x.txt": b"a\n"}


# -- fencing --------------------------------------------------------------------------------


def test_a_stale_attempts_outputs_are_never_recorded(dsn, conn, machines, tmp_path) -> None:
    spec = {"jobs": [{"key": "a", "command": "echo real > o.txt", "outputs": ["o.txt"]}]}
    wf = submit(dsn, write_spec(tmp_path / "spec", spec))
    machines.start()
    assert finish(conn, wf) == "succeeded"
    before = stored(conn, wf)
    job = jobs(conn, wf)["a"]
    sha = before["a"]["o.txt"][1]
    fake = [{"path": "forged.txt", "sha256": sha, "size": 5, "mode": 0o644}]
    for attempt, owner in ((1, "someone-else"), (2, "r0"), (0, "r0")):
        outcome = queue.Outcome(
            job_id=job["id"],
            workflow_id=wf,
            attempt=attempt,
            owner=owner,
            status="succeeded",
            outputs=fake,
        )
        queue.finish(conn, "test", [outcome])
    assert stored(conn, wf) == before
    assert jobs(conn, wf)["a"]["status"] == "succeeded"


# -- a runner killed while it moves files ---------------------------------------------------


def _data_query(conn: psycopg.Connection, pattern: str) -> bool:
    """Is a runner's data connection running a statement like ``pattern`` now?"""
    return bool(
        conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = 'smifdb runner data'"
            " AND state = 'active' AND query ILIKE %s",
            [pattern],
        ).fetchone()
    )


def test_sigkill_while_uploading_a_big_output(dsn, conn, machines, tmp_path) -> None:
    """The rescued job succeeds; its outputs are the recorded attempt's, each blob whole."""
    spec = {
        "jobs": [
            {
                "key": "big",
                "command": "mkdir out && head -c 200000000 /dev/urandom > out/big.bin"
                " && echo $SMIFDB_JOB_DIR > out/who.txt",
                "outputs": ["out"],
                "max_attempts": 2,
            }
        ]
    }
    wf = submit(dsn, write_spec(tmp_path / "spec", spec))
    first = machines.start(name="first")
    wait_for(lambda: _data_query(conn, "%COPY%blob_chunks%"), 60, "the upload")
    first.send_signal(signal.SIGKILL)
    first.wait()
    machines.start(name="rescuer")
    assert finish(conn, wf, timeout=120) == "succeeded", machines.output("rescuer")
    job = jobs(conn, wf)["big"]
    assert job["attempts"] == 2
    outputs = stored(conn, wf)["big"]
    assert sorted(outputs) == ["out/big.bin", "out/who.txt"]
    assert {attempt for attempt, _, _ in outputs.values()} == {job["attempts"]}
    assert outputs["out/big.bin"][2] == 200_000_000
    assert incomplete_blobs(conn) == []
    dest = tmp_path / "export"
    assert cli(dsn, "outputs", str(wf), "--export", str(dest)).returncode == 0
    assert "rescuer" in (dest / "big" / "out" / "who.txt").read_text()


def test_sigkill_while_materialising_a_big_input(dsn, conn, machines, tmp_path) -> None:
    folder = tmp_path / "spec"
    (folder / "data").mkdir(parents=True)
    with open(folder / "data" / "big.bin", "wb") as f:
        f.write(os.urandom(1 << 20) * 200)
    spec = {
        "files": ["data"],
        "jobs": [{"key": "use", "command": "wc -c < data/big.bin", "max_attempts": 2}],
    }
    wf = submit(dsn, write_spec(folder, spec))
    first = machines.start(name="first")
    wait_for(lambda: _data_query(conn, "%blob_chunks%"), 60, "the download")
    time.sleep(0.3)
    first.send_signal(signal.SIGKILL)
    first.wait()
    machines.start(name="rescuer")
    assert finish(conn, wf, timeout=120) == "succeeded", machines.output("rescuer")
    assert jobs(conn, wf)["use"]["log_tail"].strip() == str(200 << 20)
    assert incomplete_blobs(conn) == []


# -- the API --------------------------------------------------------------------------------


def _api_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]["message"]


def test_api_lists_pages_and_streams_outputs(dsn, conn, machines, tmp_path) -> None:
    """A viewer reads a job's outputs: keyset pages with a Link, each file an attachment
    with its sha256 as ETag, never rendered; unknown ones are JSON 404s; no token is 401."""
    import credentials

    from smifdb.api import create_app

    html = b"<html><script>alert(1)</script></html>"
    spec = {
        "jobs": [
            {
                "key": "a",
                "command": "mkdir out && echo 1 > out/1.txt && echo 2 > out/2.txt"
                f" && printf '%s' '{html.decode()}' > out/page.html",
                "outputs": ["out"],
            }
        ]
    }
    wf = submit(dsn, write_spec(tmp_path / "spec", spec))
    machines.start()
    assert finish(conn, wf) == "succeeded", jobs(conn, wf)["a"]
    app = create_app(dsn)
    viewer = credentials.user_token(dsn, "vic", role="viewer")
    runner = credentials.user_token(dsn, "node", role="runner")
    base = f"/api/v1/workflows/{wf}/jobs/a/outputs"
    with credentials.client(app, viewer) as client:
        first = client.get(f"{base}?limit=2")
        assert first.status_code == 200, first.text
        page = first.json()
        assert [f["path"] for f in page["data"]] == ["out/1.txt", "out/2.txt"]
        assert page["next"] and 'rel="next"' in first.headers["link"]
        second = client.get(f"{base}?limit=2&cursor={page['next']}").json()
        assert [f["path"] for f in second["data"]] == ["out/page.html"]
        assert second["next"] is None
        row = second["data"][0]
        assert row["size"] == len(html) and row["job"] == "a" and len(row["sha256"]) == 64
        url = urlsplit(row["url"]).path
        assert url == f"{base}/out/page.html"
        got = client.get(url)
        assert got.status_code == 200 and got.content == html
        assert got.headers["content-type"] == "application/octet-stream"
        assert got.headers["x-content-type-options"] == "nosniff"
        assert got.headers["content-disposition"].startswith('attachment; filename="page.html"')
        assert got.headers["content-length"] == str(len(html))
        assert got.headers["etag"] == f'"{row["sha256"]}"'
        assert client.get(url, headers={"If-None-Match": got.headers["etag"]}).status_code == 304

        assert "has no job 'zz'" in _api_error(
            client.get(f"/api/v1/workflows/{wf}/jobs/zz/outputs"), 404
        )
        assert "no workflow 999" in _api_error(
            client.get("/api/v1/workflows/999/jobs/a/outputs"), 404
        )
        for path in ("out/none.txt", "out/%2e%2e/out/1.txt", "%2e%2e/x"):
            assert "has no output" in _api_error(client.get(f"{base}/{path}"), 404)
        other = client.get(f"/api/v1/workflows/{wf}/jobs?cursor={page['next']}")
        assert other.status_code == 400
        # files: over HTTP is refused (no upload route), inputs/outputs are not.
        refused = client.post("/api/v1/workflows/", json={"files": ["data"], **spec})
        assert refused.status_code == 403  # a viewer submits nothing, whatever the spec
    operator = credentials.user_token(dsn, "olive", role="operator")
    with credentials.client(app, operator) as client:
        refused = client.post("/api/v1/workflows/", json={"files": ["data"], **spec})
        assert "'files' cannot be submitted over the API" in _api_error(refused, 400)
        assert client.post("/api/v1/workflows/", json=spec).status_code == 201
    with credentials.client(app) as anonymous:
        assert anonymous.get(base).status_code == 401
        assert anonymous.get(url).status_code == 401
    with credentials.client(app, runner) as client:
        assert client.get(base).status_code == 403
        assert client.get(url).status_code == 403


# -- the cache and the blob store -----------------------------------------------------------


def blob_bytes(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT coalesce(sum(length(data)), 0) FROM blob_chunks").fetchone()[0]


def test_two_workflows_sharing_an_input_store_it_once(dsn, conn, tmp_path) -> None:
    folder = tmp_path / "spec"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "big.bin").write_bytes(os.urandom(50 << 20))
    spec = {"files": ["data"], "jobs": [{"key": "a", "command": "true"}]}
    first = submit(dsn, write_spec(folder, spec))
    assert blob_bytes(conn) == 50 << 20
    other = tmp_path / "other"
    (other / "inputs").mkdir(parents=True)
    os.link(folder / "data" / "big.bin", other / "inputs" / "same.bin")
    second = submit(dsn, write_spec(other, {**spec, "files": ["inputs"]}))
    assert blob_bytes(conn) == 50 << 20
    assert conn.execute("SELECT count(*) FROM blobs").fetchone()[0] == 1
    named = conn.execute(
        "SELECT workflow_id, path FROM workflow_files ORDER BY workflow_id"
    ).fetchall()
    assert named == [(first, "data/big.bin"), (second, "inputs/same.bin")]


def _cache_objects(home: Path) -> list[Path]:
    return sorted(p for p in (home / "cache" / "objects").rglob("*") if p.is_file())


def test_a_file_many_jobs_need_is_fetched_once_per_machine(dsn, conn, machines, tmp_path) -> None:
    """Every job's folder links one cached object: same inode, fetched once."""
    folder = tmp_path / "spec"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "in.bin").write_bytes(os.urandom(1 << 20))
    spec = {
        "files": ["data"],
        "jobs": [{"key": f"j{i}", "command": "stat -c %i data/in.bin"} for i in range(6)],
    }
    wf = submit(dsn, write_spec(folder, spec))
    machines.start("--slots", "3", name="m")
    assert finish(conn, wf) == "succeeded"
    inodes = {row["log_tail"].strip() for row in jobs(conn, wf).values()}
    objects = _cache_objects(machines.home("m"))
    assert len(objects) == 1 and inodes == {str(objects[0].stat().st_ino)}


def test_a_cache_over_its_cap_evicts_the_least_recently_used(dsn, conn, machines, tmp_path) -> None:
    runner = None
    shas = []
    for name in ("first", "second"):
        folder = tmp_path / name
        (folder / "data").mkdir(parents=True)
        (folder / "data" / "in.bin").write_bytes(os.urandom(700 << 10))
        spec = {"files": ["data"], "jobs": [{"key": "a", "command": "cat data/in.bin >/dev/null"}]}
        wf = submit(dsn, write_spec(folder, spec))
        runner = runner or machines.start("--cache-max-bytes", "1M", name="m")
        assert finish(conn, wf) == "succeeded"
        shas.append(
            conn.execute(
                "SELECT encode(sha256, 'hex') FROM workflow_files WHERE workflow_id = %s", [wf]
            ).fetchone()[0]
        )
    assert [p.name for p in _cache_objects(machines.home("m"))] == [shas[1]]


def test_inputs_larger_than_the_cache_cap_fail_clearly(dsn, conn, machines, tmp_path) -> None:
    """Evicting down to the cap would remove a job's own inputs before they are linked."""
    folder = tmp_path / "spec"
    (folder / "data").mkdir(parents=True)
    for name in ("x.bin", "y.bin"):
        (folder / "data" / name).write_bytes(os.urandom(700 << 10))
    spec = {"files": ["data"], "jobs": [{"key": "a", "command": "true"}]}
    wf = submit(dsn, write_spec(folder, spec))
    machines.start("--cache-max-bytes", "1M", name="m")
    assert finish(conn, wf) == "failed"
    error = jobs(conn, wf)["a"]["error"]
    assert (
        "the job's inputs are 1,433,600 bytes, more than this runner's --cache-max-bytes" in error
    )


def test_a_full_cache_disk_fails_the_attempt_and_keeps_the_cache_sound(
    dsn, conn, machines, tmp_path
) -> None:
    """A 1 MiB tmpfs as --cache-dir and a 5 MiB input: the attempt fails, saying so; the
    cache holds no temporary file, and a job whose input fits runs there after."""
    cache = tmp_path / "tiny"
    cache.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(cache)])
    if mounted.returncode != 0:
        if os.environ.get("SMIFDB_TEST_REQUIRE_NAMESPACES"):
            pytest.fail("cannot mount a tmpfs (CI runs as root)")
        pytest.skip("mounting a tmpfs needs root")
    try:
        big, small = tmp_path / "big", tmp_path / "small"
        for folder, size in ((big, 5 << 20), (small, 1000)):
            (folder / "data").mkdir(parents=True)
            (folder / "data" / "in.bin").write_bytes(os.urandom(size))
        job = {"key": "a", "command": "wc -c < data/in.bin"}
        wf = submit(dsn, write_spec(big, {"files": ["data"], "jobs": [job]}))
        machines.start("--cache-dir", str(cache), name="m")
        assert finish(conn, wf) == "failed"
        error = jobs(conn, wf)["a"]["error"]
        assert "in the runner's cache" in error and "no space left on the device" in error
        assert [p for p in cache.rglob("*") if p.is_file()] == []
        wf = submit(dsn, write_spec(small, {"files": ["data"], "jobs": [job]}))
        assert finish(conn, wf) == "succeeded"
        assert jobs(conn, wf)["a"]["log_tail"].strip() == "1000"
        leftovers = [p.name for p in cache.rglob("*") if p.is_file() and p.name.startswith(".")]
        assert leftovers == []
    finally:
        machines.close()
        subprocess.run(["umount", "-l", str(cache)])
