"""The blob store on a real PostgreSQL: round trips, corruption, dedup, a writer SIGKILLed
mid-COPY, the size limit, prune (and what it must keep), and path validation."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from processes import PY, cli, wait_for

from smifdb import db, errors
from smifdb.store import blobs
from smifdb.store.blobs import CHUNK_BYTES, FileEntry

MiB = 1 << 20


def workflow(conn: psycopg.Connection, name: str = "w") -> int:
    return conn.execute(
        "INSERT INTO workflows (name, job_count) VALUES (%s, 1) RETURNING id", [name]
    ).fetchone()[0]


def write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def stored(conn: psycopg.Connection) -> tuple[int, int, int]:
    """Blobs, chunks and chunk bytes in the store."""
    return conn.execute(
        "SELECT (SELECT count(*) FROM blobs), count(*), coalesce(sum(length(data)), 0)"
        " FROM blob_chunks"
    ).fetchone()


def backdate(conn: psycopg.Connection, sha: str, by: timedelta = timedelta(days=1)) -> None:
    conn.execute(
        "UPDATE blobs SET last_used_at = last_used_at - %s WHERE sha256 = %s",
        [by, bytes.fromhex(sha)],
    )


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * MiB + 12345]
)
def test_round_trip(conn: psycopg.Connection, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    src = write(tmp_path / "src", data)
    sha, n = blobs.put_file(conn, src)
    assert (sha, n) == (hashlib.sha256(data).hexdigest(), size)
    chunks = -(-size // CHUNK_BYTES)
    assert stored(conn) == (1, chunks, size)
    assert conn.execute("SELECT size, chunks FROM blobs").fetchone() == (size, chunks)
    assert b"".join(blobs.read_chunks(conn, sha)) == data
    dest = tmp_path / "dest"
    blobs.get_file(conn, sha, dest)
    assert dest.read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["dest", "src"]  # no temporary file left behind
    # Storing it again stores nothing new.
    assert blobs.put_file(conn, src) == (sha, size)
    assert stored(conn) == (1, chunks, size)


def test_put_tree_keeps_the_exec_bit_and_skips_stored_files(
    conn: psycopg.Connection, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    write(root / "run.sh", b"#!/bin/sh\necho hi\n", 0o755)
    write(root / "data" / "x.csv", b"a,b\n1,2\n", 0o600)
    write(root / "data" / "copy.csv", b"a,b\n1,2\n", 0o644)
    entries = blobs.put_tree(conn, root, ["run.sh", "data/./x.csv", "data/copy.csv"])
    assert [(e.path, e.mode) for e in entries] == [
        ("run.sh", 0o755),
        ("data/x.csv", 0o644),
        ("data/copy.csv", 0o644),
    ]
    assert entries[1].sha256 == entries[2].sha256
    assert stored(conn)[0] == 2
    wf = workflow(conn)
    blobs.add_workflow_files(conn, wf, entries)
    assert blobs.workflow_files(conn, wf) == sorted(entries, key=lambda e: e.path)
    out = tmp_path / "out"
    out.mkdir()
    for e in blobs.workflow_files(conn, wf):
        dest = out / e.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        blobs.get_file(conn, e.sha256, dest, mode=e.mode)
    assert (out / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (out / "data/x.csv").stat().st_mode & 0o777 == 0o644
    assert subprocess.run([out / "run.sh"], capture_output=True).stdout == b"hi\n"


def test_put_tree_refuses_a_symlink_out_of_its_root(
    conn: psycopg.Connection, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    write(tmp_path / "secret", b"x")
    write(root / "ok", b"y")
    (root / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(errors.BadInput, match="leads out of"):
        blobs.put_tree(conn, root, ["ok", "link"])
    assert stored(conn)[0] == 0  # checked before anything is written


def test_put_stream(conn: psycopg.Connection, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + 3)
    with open(write(tmp_path / "f", data), "rb") as f:
        sha, size = blobs.put_stream(conn, f)
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert b"".join(blobs.read_chunks(conn, sha)) == data
    with open(tmp_path / "f", "rb") as f, pytest.raises(blobs.FileTooLarge):
        blobs.put_stream(conn, f, max_bytes=MiB)


def corrupt_one_byte(conn: psycopg.Connection, sha: str, seq: int, at: int) -> None:
    conn.execute(
        "UPDATE blob_chunks SET data = overlay(data PLACING"
        " set_byte('\\x00'::bytea, 0, get_byte(data, %(at)s) # 1) FROM %(at)s + 1 FOR 1)"
        " WHERE sha256 = %(sha)s AND seq = %(seq)s",
        {"sha": bytes.fromhex(sha), "seq": seq, "at": at},
    )


def test_a_flipped_byte_is_detected_before_the_last_chunk(
    conn: psycopg.Connection, tmp_path: Path
) -> None:
    data = os.urandom(3 * CHUNK_BYTES + 10)
    sha, _ = blobs.put_file(conn, write(tmp_path / "src", data))
    corrupt_one_byte(conn, sha, seq=1, at=77)
    got = []
    with pytest.raises(blobs.BlobCorrupt, match=f"blob {sha} is corrupt") as exc:
        for chunk in blobs.read_chunks(conn, sha):
            got.append(chunk)
    assert exc.value.status == 500
    assert len(got) == 3  # the last chunk was never handed out
    dest = tmp_path / "dest"
    with pytest.raises(blobs.BlobCorrupt, match=sha):
        blobs.get_file(conn, sha, dest)
    assert not dest.exists()
    assert sorted(os.listdir(tmp_path)) == ["src"]  # the temporary file is gone too


def test_a_missing_or_short_chunk_is_named(conn: psycopg.Connection, tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK_BYTES)
    sha, _ = blobs.put_file(conn, write(tmp_path / "src", data))
    key = bytes.fromhex(sha)
    conn.execute("DELETE FROM blob_chunks WHERE sha256 = %s AND seq = 1", [key])
    with pytest.raises(blobs.BlobCorrupt, match=f"blob {sha} is corrupt: chunk 1 of 3 is missing"):
        list(blobs.read_chunks(conn, sha))
    sha2, _ = blobs.put_file(conn, write(tmp_path / "src2", data[:-1]))
    conn.execute(
        "UPDATE blob_chunks SET data = substring(data FROM 2) WHERE sha256 = %s AND seq = 2",
        [bytes.fromhex(sha2)],
    )
    with pytest.raises(blobs.BlobCorrupt, match="hold"):
        list(blobs.read_chunks(conn, sha2))
    with pytest.raises(blobs.BlobMissing):
        list(blobs.read_chunks(conn, "0" * 64))


def test_dedup_across_workflows(conn: psycopg.Connection, tmp_path: Path) -> None:
    """The same 50 MB input of two workflows is stored once."""
    data = os.urandom(50 * 10**6)
    entries = []
    for name in ("one", "two"):
        root = tmp_path / name
        write(root / "input" / "big.bin", data)
        wf = workflow(conn, name)
        listed = blobs.put_tree(conn, root, ["input/big.bin"])
        blobs.add_workflow_files(conn, wf, listed)
        entries.append(blobs.workflow_files(conn, wf))
    assert entries[0] == entries[1]
    assert stored(conn) == (1, -(-len(data) // CHUNK_BYTES), len(data))
    # TOAST holds the bytes once too (EXTERNAL storage: uncompressed, not duplicated).
    toast = conn.execute(
        "SELECT pg_table_size('blob_chunks') - pg_relation_size('blob_chunks')"
    ).fetchone()[0]
    assert len(data) <= toast < 1.2 * len(data)


def test_a_referenced_blob_cannot_be_deleted(conn: psycopg.Connection, tmp_path: Path) -> None:
    sha, size = blobs.put_file(conn, write(tmp_path / "f", b"hello"))
    wf = workflow(conn)
    blobs.add_workflow_files(conn, wf, [FileEntry("f", sha, size)])
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("DELETE FROM blobs WHERE sha256 = %s", [bytes.fromhex(sha)])
    with pytest.raises(blobs.BlobMissing):
        blobs.add_workflow_files(conn, wf, [FileEntry("g", "1" * 64, 1)])
    with pytest.raises(errors.Conflict):
        blobs.add_workflow_files(conn, wf, [FileEntry("f", sha, size)])
    # The path checks hold in the database too, not only in Python.
    for bad in ("../x", "/abs", "a/../b", ""):
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO workflow_files (workflow_id, path, sha256, size)"
                " VALUES (%s, %s, %s, 5)",
                [wf, bad, bytes.fromhex(sha)],
            )


KILLED_WRITER = """
import sys
from pathlib import Path
from smifdb import db
from smifdb.store import blobs
with db.connect(sys.argv[1], application_name="killed-writer") as conn:
    blobs.put_file(conn, Path(sys.argv[2]), sha256=sys.argv[3])
"""


def test_a_writer_killed_mid_copy_leaves_nothing(dsn: str, tmp_path: Path) -> None:
    block = os.urandom(MiB)
    big = tmp_path / "big"
    with open(big, "wb") as f:
        for i in range(400):
            f.write(i.to_bytes(4, "big") + block[4:])
    sha, size = blobs.hash_file(big)
    proc = subprocess.Popen([PY, "-c", KILLED_WRITER, dsn, str(big), sha])
    with db.connect(dsn) as conn:
        try:
            # Its COPY is under way: rows have gone in.
            def copying() -> bool:
                assert proc.poll() is None, "the writer ended before it was killed"
                return conn.execute(
                    "SELECT bytes_processed FROM pg_stat_progress_copy p"
                    " JOIN pg_stat_activity a USING (pid)"
                    " WHERE a.application_name = 'killed-writer' AND bytes_processed >= 20 * 1048576"
                ).fetchone()

            wait_for(
                copying,
                timeout=60,
                what="the writer's COPY",
            )
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        wait_for(
            lambda: (
                not conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = 'killed-writer'"
                ).fetchone()
            ),
            what="the writer's backend to end",
        )
        assert stored(conn) == (0, 0, 0)
        assert blobs.missing(conn, [sha]) == {sha}
        assert blobs.put_file(conn, big) == (sha, size)
        assert stored(conn) == (1, 400, size)


def test_a_file_changed_during_upload_is_not_stored(
    conn: psycopg.Connection, tmp_path: Path
) -> None:
    src = write(tmp_path / "f", os.urandom(2 * MiB))
    sha, _ = blobs.hash_file(src)
    src.write_bytes(os.urandom(2 * MiB))  # same size, other bytes
    with pytest.raises(blobs.FileChanged, match="changed while it was uploaded"):
        blobs.put_file(conn, src, sha256=sha)
    src.write_bytes(os.urandom(3 * MiB))  # grown
    with pytest.raises(blobs.FileChanged):
        blobs.put_file(conn, src, sha256=sha)
    assert stored(conn) == (0, 0, 0)


def test_too_large(conn: psycopg.Connection, tmp_path: Path, monkeypatch) -> None:
    src = write(tmp_path / "big.bin", os.urandom(MiB + 1))
    with pytest.raises(blobs.FileTooLarge, match="SMIFDB_MAX_FILE_BYTES") as exc:
        blobs.put_file(conn, src, max_bytes=MiB)
    assert "big.bin is 1,048,577 bytes, over the limit of 1,048,576 bytes" in exc.value.message
    assert exc.value.status == 413
    with pytest.raises(blobs.FileTooLarge):
        blobs.put_tree(conn, tmp_path, ["big.bin"], max_bytes=MiB)
    assert stored(conn) == (0, 0, 0)
    monkeypatch.setenv("SMIFDB_MAX_FILE_BYTES", "1024")
    assert blobs.max_file_bytes() == 1024
    monkeypatch.setenv("SMIFDB_MAX_FILE_BYTES", "lots")
    with pytest.raises(errors.BadInput, match="SMIFDB_MAX_FILE_BYTES"):
        blobs.max_file_bytes()


def test_prune_keeps_referenced_and_fresh_blobs(conn: psycopg.Connection, tmp_path: Path) -> None:
    referenced, _ = blobs.put_file(conn, write(tmp_path / "a", b"referenced" * 100_000))
    old, _ = blobs.put_file(conn, write(tmp_path / "b", os.urandom(3 * MiB)))
    fresh, _ = blobs.put_file(conn, write(tmp_path / "c", b"fresh"))
    wf = workflow(conn)
    blobs.add_workflow_files(conn, wf, [FileEntry("a", referenced, 1_000_000)])
    for sha in (referenced, old):
        backdate(conn, sha)
    assert blobs.count_unreferenced(conn) == (1, 3 * MiB)
    assert blobs.delete_unreferenced(conn) == (1, 3 * MiB)
    left = {bytes(r[0]).hex() for r in conn.execute("SELECT sha256 FROM blobs")}
    assert left == {referenced, fresh}
    assert conn.execute(
        "SELECT count(*) FROM blob_chunks WHERE sha256 = %s", [bytes.fromhex(old)]
    ).fetchone() == (0,)
    # Once its record goes, a blob goes (after the grace).
    conn.execute("DELETE FROM workflows WHERE id = %s", [wf])
    assert blobs.prune_blobs(conn) == 1
    assert blobs.prune_blobs(conn, grace=timedelta(0)) == 1
    assert stored(conn) == (0, 0, 0)


def test_prune_batches(conn: psycopg.Connection, tmp_path: Path) -> None:
    for i in range(7):
        sha, _ = blobs.put_file(conn, write(tmp_path / str(i), str(i).encode()))
        backdate(conn, sha)
    assert blobs.prune_blobs(conn, limit=2) == 7
    assert stored(conn) == (0, 0, 0)


def test_a_dedup_hit_protects_a_blob_from_prune(dsn: str, tmp_path: Path) -> None:
    """missing() bumps last_used_at: a blob about to be named survives a prune, both when the
    touch comes first (prune skips the row it holds, then finds it fresh) and when the prune
    comes first (the touch waits, then reports the blob missing, so it is uploaded again)."""
    with db.connect(dsn) as conn, db.connect(dsn) as other:
        sha, _ = blobs.put_file(conn, write(tmp_path / "f", b"shared input"))
        backdate(conn, sha)
        with other.transaction():
            assert blobs.missing(other, [sha]) == set()
            assert blobs.prune_blobs(conn) == 0  # held by the touch: skipped, not waited for
        assert blobs.prune_blobs(conn) == 0  # fresh now
        assert blobs.missing(conn, [sha]) == set()

        backdate(conn, sha)
        result: list[set[str]] = []
        with conn.transaction():
            assert blobs.delete_unreferenced(conn) == (1, len(b"shared input"))
            touch = threading.Thread(target=lambda: result.append(blobs.missing(other, [sha])))
            touch.start()
            touch.join(0.5)
            assert touch.is_alive()  # waiting for the prune's lock
        touch.join(10)
        assert result == [{sha}]


def test_prune_command_removes_the_files_of_what_it_deletes(dsn: str, tmp_path: Path) -> None:
    with db.connect(dsn) as conn:
        shared, _ = blobs.put_file(conn, write(tmp_path / "s", b"shared"))
        own, _ = blobs.put_file(conn, write(tmp_path / "o", os.urandom(2 * MiB)))
        old, new = workflow(conn, "old"), workflow(conn, "new")
        blobs.add_workflow_files(
            conn, old, [FileEntry("s", shared, 6), FileEntry("o", own, 2 * MiB)]
        )
        blobs.add_workflow_files(conn, new, [FileEntry("s", shared, 6)])
        conn.execute(
            "UPDATE workflows SET status = 'succeeded', started_at = now() - interval '40 days',"
            " finished_at = now() - interval '40 days' WHERE id = %s",
            [old],
        )
        conn.execute("UPDATE blobs SET last_used_at = now() - interval '2 hours'")
    out = cli(dsn, "prune", "--older-than", "30d", "--dry-run")
    assert "would delete 0 unreferenced blob(s), 0 bytes" in out.stdout, out.stdout
    out = cli(dsn, "prune", "--older-than", "30d")
    assert out.returncode == 0, out.stderr
    assert "deleted 1 workflow(s)" in out.stdout
    assert f"deleted 1 unreferenced blob(s), {2 * MiB:,} bytes" in out.stdout, out.stdout
    with db.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM workflow_files").fetchone() == (1,)
        assert {bytes(r[0]).hex() for r in conn.execute("SELECT sha256 FROM blobs")} == {shared}
    out = cli(dsn, "prune", "--older-than", "30d", "--blob-grace", "soon")
    assert out.returncode == 2 and "--blob-grace" in out.stderr, out.stderr


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/../../b", "", "a\x00b", ".", "x/.."])
def test_check_path_refuses(bad: str) -> None:
    with pytest.raises(errors.BadInput, match="file path"):
        blobs.check_path(bad)


def test_check_path_normalises() -> None:
    assert blobs.check_path("a/./b//c/") == "a/b/c"
    assert blobs.check_path("results/x.csv") == "results/x.csv"
    with pytest.raises(errors.BadInput, match="not a sha256"):
        blobs.add_workflow_files(None, 1, [FileEntry("a", "XYZ", 1)])  # type: ignore[arg-type]
    with pytest.raises(errors.BadInput, match="mode"):
        blobs.add_workflow_files(None, 1, [FileEntry("a", "0" * 64, 1, 0o600)])  # type: ignore[arg-type]


def test_model_run_files_and_job_outputs(conn: psycopg.Connection, tmp_path: Path) -> None:
    from smifdb.store import modelruns

    mr = modelruns.create(
        conn,
        name="m",
        kind="python",
        project_dir="/nowhere",
        decide="smifdb.examples:converge_decision",
        options={},
        priority=0,
        actor="test",
    )
    one = blobs.put_tree(
        conn, write(tmp_path / "p" / "config" / "a.yml", b"a").parents[1], ["config/a.yml"]
    )
    two, _ = blobs.put_file(conn, write(tmp_path / "state", b"state 2"))
    blobs.add_model_run_files(conn, mr, [*one, FileEntry("results/state.csv", one[0].sha256, 1)])
    with pytest.raises(errors.Conflict):
        blobs.add_model_run_files(conn, mr, [FileEntry("results/state.csv", two, 7)])
    blobs.add_model_run_files(conn, mr, [FileEntry("results/state.csv", two, 7)], replace=True)
    assert blobs.model_run_files(conn, mr, "results/") == [FileEntry("results/state.csv", two, 7)]
    assert [e.path for e in blobs.model_run_files(conn, mr)] == [
        "config/a.yml",
        "results/state.csv",
    ]

    wf = workflow(conn)
    job = conn.execute(
        "INSERT INTO jobs (workflow_id, key, kind, payload, status)"
        " VALUES (%s, 'a', 'command', '{}', 'succeeded') RETURNING id",
        [wf],
    ).fetchone()[0]
    conn.execute(
        "INSERT INTO job_outputs (job_id, attempt, path, sha256, size, mode)"
        " VALUES (%s, 1, 'out/n.txt', %s, 7, 493)",
        [job, bytes.fromhex(two)],
    )
    assert blobs.job_outputs(conn, [job, job + 1]) == {job: [FileEntry("out/n.txt", two, 7, 0o755)]}
