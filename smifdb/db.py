"""Where the database comes from: an explicit DSN, or the embedded default cluster."""

from __future__ import annotations

import logging
import os
import random
import time

import psycopg

from smifdb.pgserver import Cluster

# What a lost connection or a restarting server raises: reconnect with Backoff and carry on.
DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)

# Worth waiting for at start: no server answered, or it answered "not now". Anything else (a
# refusal: unknown database or role, password, pg_hba.conf, SSL) will not change by waiting.
_NO_ANSWER = (
    "Connection refused",
    "No such file or directory",  # no socket: the server is not running
    "timeout expired",
    "failed to resolve host",
    "could not translate host name",
    "Temporary failure in name resolution",
    "server closed the connection unexpectedly",
    "Connection reset by peer",
    "No route to host",
    "Network is unreachable",
)
_NOT_NOW = (
    "starting up",
    "shutting down",
    "in recovery",
    "not accepting connections",
    "not yet accepting connections",
    "too many clients",
    "too many connections",  # a role's or database's connection limit (SQLSTATE 53300 too)
    "remaining connection slots",
)

log = logging.getLogger("smifdb")


def resolve_dsn(dsn: str | None = None, *, migrate_embedded: bool = True) -> str:
    """``dsn`` if given, else ``SMIFDB_DSN``, else the embedded cluster (started and migrated)."""
    dsn = dsn or os.environ.get("SMIFDB_DSN")
    if dsn:
        return dsn
    dsn = Cluster.embedded().start()
    if migrate_embedded:
        from smifdb import migrate  # alembic is slow to import; most commands never need it

        migrate.ensure_current(dsn)
    return dsn


def connect(dsn: str, **kwargs) -> psycopg.Connection:
    """An autocommit connection: every multi-statement write opens its own transaction."""
    kwargs.setdefault("application_name", "smifdb")
    return psycopg.connect(dsn, autocommit=True, **kwargs)


class Backoff:
    """Exponential backoff with jitter for reconnecting: 0.1 s doubling to 10 s."""

    def __init__(self, first: float = 0.1, cap: float = 10.0) -> None:
        self.first, self.cap, self.current = first, cap, first

    def next(self) -> float:
        delay = self.current * random.uniform(0.5, 1.5)
        self.current = min(self.current * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.current = self.first


def worth_waiting_for(exc: psycopg.OperationalError) -> bool:
    """No server answered, or it said "not now". Waiting for a refusal would hide a mistake."""
    text = str(exc)
    return any(reason in text for reason in _NO_ANSWER + _NOT_NOW)


class StandbyError(psycopg.OperationalError):
    """Connected, but to a read-only standby: runners and managers write."""


def connect_patiently(dsn: str, wait: float) -> psycopg.Connection:
    """A first connection for a long-lived process that writes, waiting up to ``wait`` seconds
    for a database that is down, starting or still a standby (a runner started with its
    database, or during an outage or a failover, on a batch system whose allocation would
    otherwise be lost)."""
    deadline = time.monotonic() + wait
    backoff = Backoff(first=0.5, cap=5.0)
    while True:
        try:
            conn = connect(dsn, connect_timeout=10)
            if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                return conn
            conn.close()
            raise StandbyError(
                "the server is in recovery (a read-only standby): connect to the primary"
            )
        except psycopg.OperationalError as exc:
            left = deadline - time.monotonic()
            if not (isinstance(exc, StandbyError) or worth_waiting_for(exc)) or left <= 0:
                raise
            log.warning("waiting for the database (%.0f s left): %s", left, str(exc).strip())
            time.sleep(min(backoff.next(), left))
