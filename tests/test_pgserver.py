"""The local cluster launcher: stale clusters, half-made clusters, root, and no orphans."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from smifdb.pgserver import Cluster


def wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def reachable_tmp():
    """A folder the server's account can reach (pytest's own tmp_path is mode 0700 for root)."""
    path = Path(tempfile.mkdtemp(prefix="smifdb-test-"))
    path.chmod(0o755)  # our own new folder, not a parent we found
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster(reachable_tmp: Path):
    home = reachable_tmp / "home"
    c = Cluster.embedded(home, fallback_base=reachable_tmp / "fallback")
    yield c
    c.stop(mode="immediate")


def test_start_is_idempotent_and_reused(cluster: Cluster) -> None:
    dsn = cluster.start()
    pid = cluster.postmaster_pid()
    assert cluster.start() == dsn
    assert cluster.postmaster_pid() == pid
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == "smifdb"
    assert cluster.status()["running"] is True
    assert cluster.stop() is True
    assert cluster.stop() is False
    assert cluster.status()["running"] is False


def test_killed_server_is_recovered_with_its_data(cluster: Cluster) -> None:
    dsn = cluster.start()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    pid = cluster.postmaster_pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    assert (cluster.pgdata / "postmaster.pid").exists()  # stale lock left behind
    dsn = cluster.start()
    assert cluster.postmaster_pid() not in (None, pid)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT x FROM kept").fetchone()[0] == 42


def test_lock_file_naming_another_program_is_cleared(cluster: Cluster) -> None:
    cluster.start()
    cluster.stop()
    # A stale pid file whose pid now belongs to some other live program (here: pytest).
    (cluster.pgdata / "postmaster.pid").write_text(f"{os.getpid()}\n{cluster.pgdata}\n")
    assert cluster.postmaster_pid() is None
    cluster.start()
    assert cluster.ready()


def test_half_initialised_folder_is_rebuilt(cluster: Cluster) -> None:
    cluster.pgdata.mkdir(parents=True)
    (cluster.pgdata / "junk").write_text("left by a killed initdb")
    cluster.start()
    assert cluster.initialised() and not (cluster.pgdata / "junk").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root needs a reachable data folder")
def test_root_uses_reachable_folder_without_touching_parents(reachable_tmp: Path) -> None:
    locked = reachable_tmp / "locked"
    locked.mkdir(mode=0o700)
    home = locked / "home"
    fallback = reachable_tmp / "fallback"
    c = Cluster.embedded(home, fallback_base=fallback)
    try:
        assert fallback in c.pgdata.parents
        c.start()
        assert c.ready()
        assert (locked.stat().st_mode & 0o777) == 0o700  # parent permissions untouched
        owner = c.pgdata.stat().st_uid
        assert owner != 0 and owner == c.account.pw_uid
    finally:
        c.stop(mode="immediate")


HOLDER = """
import json, sys, time
from smifdb.pgserver import ThrowawayCluster
t = ThrowawayCluster()
t.start()
print(json.dumps({"pid": t.cluster.postmaster_pid(), "root": str(t.root)}), flush=True)
time.sleep(600)
"""


def test_no_orphaned_postmaster_after_parent_sigkill() -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    info = json.loads(holder.stdout.readline())
    os.kill(info["pid"], 0)  # the postmaster runs
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert wait_gone(info["pid"]), "postmaster outlived its killed parent"
    deadline = time.monotonic() + 30
    while Path(info["root"]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(info["root"]).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the copy is root's last resort")
def test_root_copy_of_unreachable_install_runs() -> None:
    from smifdb import pgserver

    installs = pgserver.candidate_bindirs()
    assert installs, "no PostgreSQL install found at all"
    copied = pgserver._reachable_copy(installs[0].parent)
    assert pgserver._can_run(copied, pgserver._server_account())
