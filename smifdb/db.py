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

# A server that answers with one of these means "not now", not "never".
_NOT_NOW = (
    "starting up",
    "shutting down",
    "in recovery",
    "not yet accepting connections",
    "too many clients",
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
    """No server answered (refused, no socket, timed out, no such host yet), or it said "not
    now". A server that refused us (unknown database or role, password, pg_hba) will go on
    refusing: waiting would only hide the mistake."""
    text = str(exc)
    return "FATAL:" not in text or any(reason in text for reason in _NOT_NOW)


def connect_patiently(dsn: str, wait: float) -> psycopg.Connection:
    """A first connection for a long-lived process, waiting up to ``wait`` seconds for a
    database that is down or starting (a runner started with its database, or during an
    outage, on a batch system whose allocation would otherwise be lost)."""
    deadline = time.monotonic() + wait
    backoff = Backoff(first=0.5, cap=5.0)
    while True:
        try:
            return connect(dsn, connect_timeout=10)
        except psycopg.OperationalError as exc:
            left = deadline - time.monotonic()
            if not worth_waiting_for(exc) or left <= 0:
                raise
            log.warning("waiting for the database (%.0f s left): %s", left, str(exc).strip())
            time.sleep(min(backoff.next(), left))
