"""Real PostgreSQL for every test: SMIFDB_TEST_DSN, else Docker (SMIFDB_TEST_DOCKER=1), else a
throwaway local cluster. Each test gets its own database, cloned from a migrated template."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import psycopg
import pytest
from processes import Runners
from psycopg import conninfo, sql

from smifdb import db, migrate

_counter = itertools.count()


def _docker_reachable() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A DSN for a server on which tests may create databases."""
    if os.environ.get("SMIFDB_TEST_DSN"):
        yield os.environ["SMIFDB_TEST_DSN"]
    elif os.environ.get("SMIFDB_TEST_DOCKER") == "1" and _docker_reachable():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
    else:
        from smifdb.pgserver import ThrowawayCluster

        with ThrowawayCluster() as dsn:
            yield dsn


def dsn_for(server: str, dbname: str) -> str:
    return conninfo.make_conninfo(server, dbname=dbname)


def create_database(server: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(dsn_for(server, "postgres"), autocommit=True) as conn:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(query)
    return dsn_for(server, name)


def drop_database(server: str, name: str) -> None:
    with psycopg.connect(dsn_for(server, "postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> Iterator[str]:
    name = f"smifdb_tmpl_{os.getpid()}"
    dsn = create_database(pg_server, name)
    migrate.upgrade(dsn)
    yield name
    drop_database(pg_server, name)


@pytest.fixture
def empty_dsn(pg_server: str) -> Iterator[str]:
    """A new, empty (unmigrated) database."""
    name = f"smifdb_t{os.getpid()}_{next(_counter)}"
    yield create_database(pg_server, name)
    drop_database(pg_server, name)


@pytest.fixture
def dsn(pg_server: str, template_db: str) -> Iterator[str]:
    """A new database at the newest schema, for this test only."""
    name = f"smifdb_t{os.getpid()}_{next(_counter)}"
    yield create_database(pg_server, name, template=template_db)
    drop_database(pg_server, name)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    with db.connect(dsn) as connection:
        yield connection


@pytest.fixture
def procs(dsn: str, tmp_path) -> Iterator[Runners]:
    """Runner and manager processes on this test's database, killed at its end."""
    r = Runners(dsn, tmp_path)
    yield r
    r.close()


@pytest.fixture
def runners(procs: Runners) -> Runners:
    return procs
