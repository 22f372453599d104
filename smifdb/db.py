"""Where the database comes from: an explicit DSN, or the embedded default cluster."""

from __future__ import annotations

import os

import psycopg

from smifdb.pgserver import Cluster


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
