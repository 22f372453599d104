"""smifdb: a PostgreSQL-backed workflow manager for smif model runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg

from smifdb.spec import Dag, SpecError, parse

__version__ = "0.1.0"
__all__ = ["Dag", "SpecError", "__version__", "submit"]


def submit(
    conn_or_dsn: psycopg.Connection | str,
    spec: Mapping[str, Any] | Dag,
    *,
    name: str | None = None,
) -> int:
    """Validate ``spec`` and submit it as one new workflow; return the workflow id.

    Nothing is written unless the whole spec is valid (SpecError lists every problem).
    """
    from smifdb import db, store
    from smifdb.store.submit import submit_dag

    dag = spec if isinstance(spec, Dag) else parse(spec, name=name)
    if isinstance(conn_or_dsn, str):
        with db.connect(conn_or_dsn) as conn:
            store.check_schema(conn)
            return submit_dag(conn, dag, actor=store.actor_name("api"))
    store.check_schema(conn_or_dsn)
    return submit_dag(conn_or_dsn, dag, actor=store.actor_name("api"))
