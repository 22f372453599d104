"""Where the database comes from: an explicit DSN, or the embedded default cluster."""

from __future__ import annotations

import os
import random

import psycopg

from smifdb.pgserver import Cluster

# What a lost connection or a restarting server raises: reconnect with Backoff and carry on.
DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


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
