"""A runner's data plane: job files between the blob store and the machine it runs on.

Kinds (smifdb.kinds) see only this: fetch stored files into the runner's cache and link them
into an attempt's folder, store an attempt's outputs, and run a query of their own on a data
connection. Data connections are a small pool opened on demand and closed when idle, apart from
the runner's claim and heartbeat connections: a runner whose jobs have no files opens none.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool

from smifdb import db
from smifdb.cache import Cache
from smifdb.store import blobs, jobfiles
from smifdb.store.blobs import FileEntry

T = TypeVar("T")
MAX_DATA_CONNECTIONS = 4
IDLE_SECONDS = 60.0


class JobFiles:
    """What every attempt with files shares on one runner: the cache, the folder attempts run
    in, the size limit of one output file, and the data connections."""

    def __init__(
        self,
        dsn: str,
        cache: Cache,
        work_root: Path,
        *,
        max_file_bytes: int = blobs.DEFAULT_MAX_FILE_BYTES,
        connections: int = MAX_DATA_CONNECTIONS,
    ) -> None:
        self.dsn, self.cache, self.work_root = dsn, cache, Path(work_root)
        self.max_file_bytes = max_file_bytes
        self._size = max(1, connections)
        self._pool: ConnectionPool | None = None
        self._lock = threading.Lock()

    # -- connections ------------------------------------------------------------------------

    def _connections(self) -> ConnectionPool:
        with self._lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self.dsn,
                    min_size=0,
                    max_size=self._size,
                    max_idle=IDLE_SECONDS,
                    # No prepared statements: a transaction-pooling PgBouncer may serve them.
                    kwargs={
                        "autocommit": True,
                        "application_name": "smifdb runner data",
                        "prepare_threshold": None,
                    },
                    open=True,
                    name="smifdb-data",
                )
            return self._pool

    def with_conn(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """``fn(conn)`` on a data connection; a lost connection is retried once on another."""
        for attempt in (1, 2):
            try:
                with self._connections().connection(timeout=60) as conn:
                    return fn(conn)
            except db.DB_ERRORS:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    # -- inputs -----------------------------------------------------------------------------

    def job_inputs(
        self, workflow_id: int, *, files: bool, inputs: Sequence[str]
    ) -> list[tuple[str, FileEntry]]:
        return self.with_conn(
            lambda conn: jobfiles.job_inputs(conn, workflow_id, files=files, inputs=inputs)
        )

    def fetch(self, entries: Iterable[FileEntry]) -> None:
        """Every entry in the cache, each blob downloaded at most once per machine."""
        with self.holding(entries):
            pass

    def holding(self, entries: Iterable[FileEntry]) -> contextlib.AbstractContextManager[None]:
        """``fetch``, and keep this runner's cache evictions off them until the block ends."""
        return self.cache.holding(entries, self._download)

    def _download(self, sha256: str, dest: Path, mode: int) -> None:
        self.with_conn(lambda conn: blobs.get_file(conn, sha256, dest, mode=mode))

    def materialise(self, placed: Sequence[tuple[str, FileEntry]], folder: Path) -> None:
        """Fetch (folder under ``folder``, file) pairs and link them into place."""
        with self.holding(entry for _, entry in placed):
            for under, entry in placed:
                self.cache.materialise([entry], folder, under)

    # -- outputs ----------------------------------------------------------------------------

    def store(self, found: Sequence[tuple[str, Path, int]]) -> list[dict[str, Any]]:
        """Upload files (relative path, file, mode) that the store lacks; their entries, as an
        Outcome's ``outputs``. Each blob is its own short transaction, committed before the
        outcome that references it is recorded."""
        hashed = []
        for rel, path, mode in found:
            sha256, size = blobs.hash_file(path)
            if size > self.max_file_bytes:
                raise blobs.FileTooLarge(
                    f"output {rel} is {size} bytes, more than the runner's --max-file-bytes "
                    f"({self.max_file_bytes})"
                )
            hashed.append((rel, path, mode, sha256, size))
        absent = self.with_conn(lambda conn: blobs.missing(conn, [h[3] for h in hashed]))
        stored: set[str] = set()
        for _rel, path, _mode, sha256, _size in hashed:
            if sha256 in absent and sha256 not in stored:
                self.with_conn(
                    lambda conn, p=path, s=sha256: blobs.put_file(
                        conn, p, max_bytes=self.max_file_bytes, sha256=s
                    )
                )
                stored.add(sha256)
        return [
            {"path": rel, "sha256": sha256, "size": size, "mode": mode}
            for rel, _path, mode, sha256, size in hashed
        ]
