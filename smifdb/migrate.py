"""Alembic, driven from code so that migrations work from an installed wheel."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool


def migrations_dir() -> Path:
    """Inside the wheel the migrations are ``smifdb/migrations``; in a checkout, ``migrations/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError(f"smifdb's migrations are missing (looked beside {here})")


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["connection"] = connection
    return cfg


@contextlib.contextmanager
def _connection(dsn: str) -> Iterator[Connection]:
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=NullPool
    )
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


@functools.cache
def head() -> str:
    heads = ScriptDirectory.from_config(_config()).get_heads()
    return heads[0]


def current(dsn: str) -> str | None:
    with _connection(dsn) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(dsn: str, revision: str = "head") -> None:
    with _connection(dsn) as conn:
        command.upgrade(_config(conn), revision)


def downgrade(dsn: str, revision: str) -> None:
    with _connection(dsn) as conn:
        command.downgrade(_config(conn), revision)


def ensure_current(dsn: str) -> None:
    """Upgrade to head unless already there: cheap enough to call on every embedded start."""
    if current(dsn) != head():
        upgrade(dsn)


def drift(dsn: str) -> list:
    """Differences between the migrated database and ``smifdb.schema.metadata``."""
    from alembic.autogenerate import compare_metadata

    from smifdb.schema import metadata

    with _connection(dsn) as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, metadata)


if __name__ == "__main__":
    import sys

    # Developer helper: python -m smifdb.migrate revision -m "message" (writes into migrations/)
    if sys.argv[1:2] == ["revision"]:
        message = sys.argv[sys.argv.index("-m") + 1] if "-m" in sys.argv else "change"
        command.revision(_config(), message=message)
    else:
        sys.exit("usage: python -m smifdb.migrate revision -m MESSAGE")
